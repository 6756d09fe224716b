"""The script run as an agent runs it: `python -I -S scripts/generate_image.py ...`, under every
CPython 3.9-3.13 found on this machine (the missing ones are skipped, and the skip says so)."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest

from conftest import PYTHONS_USED, TEST_KEY
from fake_api import FakeImagesAPI

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "generate_image.py"
VERSIONS = ["3.9", "3.10", "3.11", "3.12", "3.13"]


def find_python(version: str) -> Optional[str]:
    if f"{sys.version_info[0]}.{sys.version_info[1]}" == version:
        return sys.executable
    pyenv_root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    candidates = sorted(glob.glob(os.path.join(pyenv_root, "versions", f"{version}.*", "bin", "python")))
    return candidates[-1] if candidates else shutil.which(f"python{version}")


@pytest.fixture(params=VERSIONS)
def python(request: pytest.FixtureRequest) -> str:
    found = find_python(request.param)
    if not found:
        pytest.skip(f"CPython {request.param} is not installed here")
    PYTHONS_USED[request.param] = found
    return found


def run_script(python: str, *args: str, env: dict[str, str], stdin: bytes = b"",
               flags: tuple[str, ...] = ("-I", "-S")) -> subprocess.CompletedProcess:
    return subprocess.run([python, *flags, str(SCRIPT), *args], input=stdin, capture_output=True,
                          env=env, timeout=60)


@pytest.fixture
def agent_env(api: FakeImagesAPI) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "SYSTEMROOT", "TMPDIR", "NO_PROXY", "no_proxy")}
    env.update(APIYI_API_KEY=TEST_KEY, APIYI_BASE_URL=api.url)
    return env


def test_text_to_image_end_to_end(python: str, api: FakeImagesAPI, agent_env: dict[str, str],
                                  isolated: Path) -> None:
    result = run_script(python, "-p", "一只可爱的橘猫在草地上玩耍", "-f", "out/cat.png", "-s", "1536x1024",
                        env=agent_env)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == b"out/cat.png" + os.linesep.encode()
    assert (isolated / "out" / "cat.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert api.requests[0].json()["prompt"] == "一只可爱的橘猫在草地上玩耍"
    assert TEST_KEY.encode() not in result.stdout + result.stderr


def test_help_version_and_dry_run_need_nothing(python: str, agent_env: dict[str, str]) -> None:
    env = {k: v for k, v in agent_env.items() if k != "APIYI_API_KEY"}
    assert run_script(python, "--help", env=env).returncode == 0
    version = run_script(python, "--version", env=env)
    assert version.stdout.decode().startswith("generate_image.py ")
    dry = run_script(python, "-p", "cat", "-f", "cat.png", "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr.decode()


def test_edit_with_stdin_prompt(python: str, api: FakeImagesAPI, agent_env: dict[str, str], picture) -> None:
    picture("in.png", "png", 256, 256)
    result = run_script(python, "-p", "-", "-i", "in.png", "-f", "edited.png", env=agent_env,
                        stdin="在天空添加彩虹\n".encode())
    assert result.returncode == 0, result.stderr.decode()
    assert api.requests[0].fields()["prompt"] == "在天空添加彩虹"


@pytest.mark.parametrize("encoding", ["ascii", "gbk", "cp1252"])
def test_console_that_cannot_print_chinese_does_not_crash(api: FakeImagesAPI, agent_env: dict[str, str],
                                                          isolated: Path, encoding: str) -> None:
    env = dict(agent_env, PYTHONIOENCODING=encoding)  # -I would ignore it, so this runs without -I
    result = run_script(sys.executable, "-p", "橘猫", "-f", "橘猫.png", "--dry-run", env=env, flags=("-S",))
    assert result.returncode == 0, result.stderr.decode(encoding, "replace")
    assert ("橘猫" in result.stdout.decode(encoding)) == (encoding == "gbk")
    real = run_script(sys.executable, "-p", "橘猫", "-f", "橘猫.png", env=env, flags=("-S",))
    assert real.returncode == 0, real.stderr.decode(encoding, "replace")
    assert (isolated / "橘猫.png").is_file()
    if encoding != "gbk":
        assert real.stdout == b"??.png" + os.linesep.encode()


def test_usage_error_exit_code_and_single_error_line(agent_env: dict[str, str]) -> None:
    result = run_script(sys.executable, "-p", "cat", "-s", "999x1", env=agent_env)
    assert result.returncode == 2
    assert result.stdout == b""
    assert result.stderr.decode().startswith("generate_image.py: error: --size 999x1: ")
