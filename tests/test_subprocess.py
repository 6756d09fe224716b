"""The script run as an agent runs it: `python -I -S scripts/generate_image.py ...`, under every
CPython 3.9-3.13 found on this machine (the missing ones are skipped, and the skip says so)."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest

import generate_image as gi
from conftest import PYTHONS_USED, TEST_KEY
from fake_api import FakeImagesAPI, Reply, images_answer, make_png

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


def start_batch(agent_env: dict[str, str], *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-I", "-S", str(SCRIPT), "--batch", "b.json", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=agent_env)


def wait_for_requests(api: FakeImagesAPI, count: int) -> None:
    deadline = time.monotonic() + 20
    while len(api.requests) < count:
        assert time.monotonic() < deadline, f"only {len(api.requests)} requests arrived"
        time.sleep(0.02)


@pytest.mark.skipif(os.name == "nt", reason="sends SIGINT, which Windows delivers differently")
def test_ctrl_c_saves_the_requests_in_flight_and_a_rerun_finishes(api: FakeImagesAPI, agent_env: dict[str, str],
                                                                  isolated: Path) -> None:
    api.route = lambda request: Reply(body=images_answer([make_png(64, 64)]), delay=1.0)
    (isolated / "b.json").write_text(json.dumps(["one", "two", "three", "four"]), encoding="utf-8")
    batch = start_batch(agent_env, "-j", "2")
    wait_for_requests(api, 2)
    batch.send_signal(signal.SIGINT)
    out, err = batch.communicate(timeout=30)
    assert batch.returncode == gi.EXIT_INTERRUPTED, err.decode()
    assert len(api.requests) == 2
    assert sorted(out.decode().split()) == ["01-one.png", "02-two.png"]
    assert b"waiting for 2 request(s) in flight" in err
    manifest = [json.loads(line) for line in (isolated / "b.results.jsonl").read_text().splitlines()]
    assert sorted((m["item"], m["status"]) for m in manifest) == [(1, "ok"), (2, "ok")]
    rerun = run_script(sys.executable, "--batch", "b.json", "-j", "2", env=agent_env)
    assert rerun.returncode == 0, rerun.stderr.decode()
    assert sorted(rerun.stdout.decode().split()) == ["03-three.png", "04-four.png"]
    assert sorted(r.prompt() for r in api.requests[2:]) == ["four", "three"]


@pytest.mark.skipif(os.name == "nt", reason="sends SIGINT, which Windows delivers differently")
def test_a_second_ctrl_c_aborts_at_once(api: FakeImagesAPI, agent_env: dict[str, str], isolated: Path) -> None:
    api.route = lambda request: Reply(body=images_answer([make_png(64, 64)]), delay=30)
    (isolated / "b.json").write_text(json.dumps(["one", "two", "three"]), encoding="utf-8")
    started = time.monotonic()
    batch = start_batch(agent_env, "-j", "2")
    wait_for_requests(api, 2)
    batch.send_signal(signal.SIGINT)
    time.sleep(0.3)
    batch.send_signal(signal.SIGINT)
    out, err = batch.communicate(timeout=20)
    assert (batch.returncode, out) == (gi.EXIT_INTERRUPTED, b""), err.decode()
    assert time.monotonic() - started < 10
    assert err.decode().splitlines()[-2].startswith("generate_image.py: error: aborted")
    assert not list(isolated.glob("*.png"))
    manifest = isolated / "b.results.jsonl"
    assert not manifest.exists() or manifest.read_text() == ""
