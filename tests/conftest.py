from __future__ import annotations

import dataclasses
import io
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

import generate_image as gi
from fake_api import FakeImagesAPI, make_image
from twins import TWINS, script_env, skip_reason

TEST_KEY = "sk-test-NOT-A-REAL-KEY-0123456789abcdef"
PYTHONS_USED: dict[str, str] = {}  # version -> interpreter that ran the script in a subprocess test
CLEARED_ENV = ("APIYI_API_KEY", "APIYI_BASE_URL", "APIYI_STATE_DIR", "APIYI_WORKER", "http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY",
               "ALL_PROXY", "all_proxy", "no_proxy", "NO_PROXY", "PYTHONIOENCODING")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if PYTHONS_USED:
        by_version = sorted(PYTHONS_USED.items(), key=lambda item: tuple(map(int, item[0].split("."))))
        ran = ", ".join(f"{version} ({path})" for version, path in by_version)
        terminalreporter.write_line(f"CPython versions that ran the script: {ran}")


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No key, no proxy, nothing reachable but loopback; work, temp, home and job-state folders
    inside tmp_path. In-process calls of main() run their job in a thread (APIYI_WORKER=inprocess), so
    what a test patches applies to the worker too; the tests of detached workers set it back.
    After the test, no temporary '.part' file may be left anywhere."""
    for name in CLEARED_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "*")
    monkeypatch.setenv("no_proxy", "*")
    work, temp, state = tmp_path / "work", tmp_path / "tmp", tmp_path / "state"
    work.mkdir()
    temp.mkdir()
    monkeypatch.setenv("APIYI_STATE_DIR", str(state))
    monkeypatch.setenv("APIYI_WORKER", "inprocess")
    (tmp_path / "home").mkdir()
    for name in ("HOME", "USERPROFILE"):    # the last fallback folder is in the home folder
        monkeypatch.setenv(name, str(tmp_path / "home"))
    monkeypatch.chdir(work)
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    yield work
    leftovers = [p for p in tmp_path.rglob("*.part")]
    assert not leftovers, f"temporary files left behind: {leftovers}"


@pytest.fixture(autouse=True)
def pauses(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Backoff waits are recorded instead of slept."""
    waited: list[float] = []
    monkeypatch.setattr(gi, "pause", waited.append)
    return waited


@pytest.fixture
def api() -> FakeImagesAPI:
    with FakeImagesAPI() as server:
        yield server


@pytest.fixture(params=TWINS)
def twin(request: pytest.FixtureRequest) -> str:
    """Each twin in turn (tests/twins.py); Node skips, saying why, where Node.js 18+ is not installed."""
    reason = skip_reason(request.param)
    if reason:
        pytest.skip(reason)
    return str(request.param)


@pytest.fixture
def agent_env(api: FakeImagesAPI) -> dict[str, str]:
    """What an agent's shell gives a twin run as a process: the key and the fake API's URL; the job
    worker is a detached process, as by default (set APIYI_WORKER=inprocess for a faster run)."""
    return script_env(APIYI_API_KEY=TEST_KEY, APIYI_BASE_URL=api.url)


@dataclasses.dataclass
class Run:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


CliRunner = Callable[..., Run]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    """main([...]) in-process; every run also proves the key appears in no output."""

    def run(*args: object, stdin: Optional[bytes] = None) -> Run:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin or b""), encoding="utf-8"))
        code = gi.main([str(a) for a in args])
        captured = capsys.readouterr()
        assert TEST_KEY not in captured.out + captured.err
        return Run(code, captured.out, captured.err)

    return run


@pytest.fixture
def online(api: FakeImagesAPI, cli: CliRunner, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    """The CLI with APIYI_API_KEY set and APIYI_BASE_URL pointing at the fake API."""
    monkeypatch.setenv("APIYI_API_KEY", TEST_KEY)
    monkeypatch.setenv("APIYI_BASE_URL", api.url)
    return cli


@pytest.fixture
def picture(isolated: Path) -> Callable[..., Path]:
    """Write a real image file: picture("in.png", "png", 1024, 1024, alpha=False)."""

    def write(name: str, fmt: str = "png", width: int = 1024, height: int = 1024, *, alpha: bool = False) -> Path:
        path = isolated / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(make_image(fmt, width, height, alpha=alpha))
        return path

    return write
