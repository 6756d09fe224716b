"""The script run as an agent runs it: `python -I -S scripts/generate_image.py ...`, under every
CPython 3.9-3.13 found on this machine, and its Node.js twin `node scripts/generate_image.js ...` for
what both share (the missing ones are skipped, and the skip says so)."""

from __future__ import annotations

import glob
import os
import shutil
import sys
from pathlib import Path
from typing import Optional

import pytest

from conftest import PYTHONS_USED, TEST_KEY
from fake_api import FakeImagesAPI
from twins import SCRIPT_NAMES, SCRIPT_PY, Launcher, launcher, run_twin, skip_reason

VERSIONS = ["3.9", "3.10", "3.11", "3.12", "3.13"]


def find_python(version: str) -> Optional[str]:
    if f"{sys.version_info[0]}.{sys.version_info[1]}" == version:
        return sys.executable
    pyenv_root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    candidates = sorted(glob.glob(os.path.join(pyenv_root, "versions", f"{version}.*", "bin", "python")))
    return candidates[-1] if candidates else shutil.which(f"python{version}")


@pytest.fixture(params=[*(pytest.param(("python", v), id=f"python{v}") for v in VERSIONS),
                        pytest.param(("node", ""), id="node")])
def script(request: pytest.FixtureRequest) -> Launcher:
    """The Python twin under each CPython 3.9-3.13, then the Node twin."""
    twin, version = request.param
    reason = skip_reason(twin)
    if reason:
        pytest.skip(reason)
    if twin == "node":
        return launcher("node")
    found = find_python(version)
    if not found:
        pytest.skip(f"CPython {version} is not installed here")
    PYTHONS_USED[version] = found
    return launcher("python", found)


def test_text_to_image_end_to_end(script: Launcher, api: FakeImagesAPI, agent_env: dict[str, str],
                                  isolated: Path) -> None:
    result = script.run("-p", "一只可爱的橘猫在草地上玩耍", "-f", "out/cat.png", "-s", "1536x1024",
                        env=agent_env)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == b"out/cat.png" + os.linesep.encode()
    assert (isolated / "out" / "cat.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert api.requests[0].json()["prompt"] == "一只可爱的橘猫在草地上玩耍"
    assert TEST_KEY.encode() not in result.stdout + result.stderr


def test_help_version_and_dry_run_need_nothing(script: Launcher, agent_env: dict[str, str]) -> None:
    env = {k: v for k, v in agent_env.items() if k != "APIYI_API_KEY"}
    assert script.run("--help", env=env).returncode == 0
    version = script.run("--version", env=env)
    assert version.stdout.decode() == f"{SCRIPT_NAMES[script.twin]} 1.0.0" + os.linesep
    dry = script.run("-p", "cat", "-f", "cat.png", "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr.decode()
    assert dry.stdout.decode().startswith(f"POST {env['APIYI_BASE_URL']}/images/generations")


def test_edit_with_stdin_prompt(script: Launcher, api: FakeImagesAPI, agent_env: dict[str, str],
                                picture) -> None:
    picture("in.png", "png", 256, 256)
    result = script.run("-p", "-", "-i", "in.png", "-f", "edited.png", env=agent_env,
                        stdin="在天空添加彩虹\n".encode())
    assert result.returncode == 0, result.stderr.decode()
    assert api.requests[0].fields()["prompt"] == "在天空添加彩虹"


@pytest.mark.parametrize("encoding", ["ascii", "gbk", "cp1252"])
def test_console_that_cannot_print_chinese_does_not_crash(api: FakeImagesAPI, agent_env: dict[str, str],
                                                          isolated: Path, encoding: str) -> None:
    env = dict(agent_env, PYTHONIOENCODING=encoding)  # -I would ignore it, so this runs without -I
    script = Launcher("python", (sys.executable, "-S", str(SCRIPT_PY)))
    result = script.run("-p", "橘猫", "-f", "橘猫.png", "--dry-run", env=env)
    assert result.returncode == 0, result.stderr.decode(encoding, "replace")
    assert ("橘猫" in result.stdout.decode(encoding)) == (encoding == "gbk")
    real = script.run("-p", "橘猫", "-f", "橘猫.png", env=env)
    assert real.returncode == 0, real.stderr.decode(encoding, "replace")
    assert (isolated / "橘猫.png").is_file()
    if encoding != "gbk":
        assert real.stdout == b"??.png" + os.linesep.encode()


def test_usage_error_exit_code_and_single_error_line(twin: str, api: FakeImagesAPI,
                                                     agent_env: dict[str, str]) -> None:
    result = run_twin(twin, "-p", "cat", "-s", "999x1", env=agent_env)
    assert result.returncode == 2
    assert result.stdout == b""
    stderr = result.stderr.decode()
    assert stderr.startswith(f"{SCRIPT_NAMES[twin]}: error: --size 999x1: ")
    assert [line for line in stderr.splitlines() if ": error:" in line] == stderr.splitlines()[:1]
    assert api.requests == []
