"""What differs by platform, where no Windows or macOS machine is at hand: each twin's decisions are
checked with the platform faked (sys.platform and os.name for the Python script, process.platform
for the Node.js twin, set before the script loads), and the twins must decide alike."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import pytest

import generate_image as gi
from twins import SCRIPT_JS, skip_reason

PLATFORMS = {"win32": "nt", "darwin": "posix", "linux": "posix"}
ENV = {"LOCALAPPDATA": "/appdata", "XDG_STATE_HOME": "/xdg"}


def as_if_on(platform: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The script sees another platform; pathlib and pytest keep the real one (a WindowsPath cannot be
    made here)."""
    monkeypatch.setattr(gi, "os", types.SimpleNamespace(**{**vars(os), "name": PLATFORMS[platform]}))
    monkeypatch.setattr(gi, "sys", types.SimpleNamespace(**{**vars(sys), "platform": platform}))


def node_decides(platform: str, expression: str) -> Any:
    """The value of a JavaScript expression over the twin's exports (`m`), with process.platform faked."""
    if skip_reason("node"):
        pytest.skip(skip_reason("node"))
    program = (f"Object.defineProperty(process, 'platform', {{ value: {json.dumps(platform)} }});"
               f"const m = require({json.dumps(str(SCRIPT_JS))});"
               f"process.stdout.write(JSON.stringify({expression}));")
    done = subprocess.run(["node", "-e", program], capture_output=True, timeout=30, env=dict(os.environ, HOME="/home/u"))
    assert done.returncode == 0, done.stderr.decode()
    return json.loads(done.stdout)


@pytest.mark.parametrize("platform", PLATFORMS)
def test_the_state_folder_is_the_same_for_both_twins(platform: str, monkeypatch: pytest.MonkeyPatch) -> None:
    as_if_on(platform, monkeypatch)
    monkeypatch.setattr(Path, "home", classmethod(lambda cls: Path("/home/u")))
    python = str(gi.state_folder(ENV)).replace("\\", "/")
    assert node_decides(platform, f"m.stateFolder({json.dumps(ENV)})") == python
    expected = {"win32": "/appdata/apiyi-gpt-image-2-gen", "darwin": "/home/u/Library/Application Support/"
                "apiyi-gpt-image-2-gen", "linux": "/xdg/apiyi-gpt-image-2-gen"}[platform]
    assert python == expected


@pytest.mark.parametrize("platform, size", [("win32", 2), ("linux", 6)])    # UTF-16 units, or UTF-8 bytes
def test_a_name_is_measured_as_the_file_system_counts_it(platform: str, size: int,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    as_if_on(platform, monkeypatch)
    assert gi.name_size("猫猫.png") == node_decides(platform, "m.nameSize('猫猫.png')") == size + 4


@pytest.mark.parametrize("platform, refused", [("win32", True), ("linux", False)])
def test_a_name_windows_refuses_is_refused_there(platform: str, refused: bool) -> None:
    verdict = node_decides(platform, "(() => { try { m.planOutputPath('CON.png', null, 'x'); return false; } "
                                     "catch (err) { return err.message; } })()")
    assert bool(verdict) == refused
    if refused:
        assert "is not a file name Windows accepts" in verdict


@pytest.mark.parametrize("platform", PLATFORMS)
def test_the_worker_is_detached_without_a_console(platform: str) -> None:
    options = node_decides(platform, "m.workerSpawnOptions(3, {})")
    assert options == {"detached": True, "stdio": ["ignore", 3, 3], "env": {}, "windowsHide": True}


def test_a_zombie_is_not_a_live_worker() -> None:
    """A child that exited and was never waited for: signal 0 finds it, the state in /proc says Z."""
    if not Path("/proc/self/stat").exists():
        pytest.skip("no /proc here")
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 10
    while not gi.is_zombie(zombie.pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        assert not gi.pid_alive(zombie.pid)
        assert node_decides("linux", f"m.pidAlive({zombie.pid})") is False
    finally:
        zombie.wait()


def test_a_worker_is_known_alive_by_its_pid_in_both_twins() -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(gone.stdout)
    assert gi.pid_alive(os.getpid()) and not gi.pid_alive(dead)
    assert node_decides("linux", f"[m.pidAlive({os.getpid()}), m.pidAlive({dead})]") == [True, False]
    record = {"liveness": "pid", "pid": os.getpid(), "state": "waiting"}
    assert gi.pid_worker_alive(record) and not gi.pid_worker_alive({**record, "pid": dead})
    assert not gi.pid_worker_alive({k: v for k, v in record.items() if k != "liveness"})  # Python's own: its lock
    assert not gi.pid_worker_alive({**record, "pid": True})


def test_windows_asks_the_process_itself_never_os_kill(monkeypatch: pytest.MonkeyPatch) -> None:
    """On Windows os.kill would end the process: pid_alive opens it and reads its exit code instead."""
    calls: list[tuple] = []

    class Kernel:
        def OpenProcess(self, access: int, inherit: bool, pid: int) -> int:
            calls.append(("open", access, pid))
            return 7

        def GetExitCodeProcess(self, handle: int, code: Any) -> int:
            code._obj.value = gi.WINDOWS_STILL_ACTIVE
            return 1

        def CloseHandle(self, handle: int) -> None:
            calls.append(("close", handle))

    import ctypes

    as_if_on("win32", monkeypatch)
    monkeypatch.setattr(ctypes, "WinDLL", lambda name, use_last_error=False: Kernel(), raising=False)
    monkeypatch.setattr(gi.os, "kill", lambda *a: pytest.fail("os.kill on Windows ends the process"))
    assert gi.pid_alive(1234)
    assert calls == [("open", gi.WINDOWS_QUERY_LIMITED_INFORMATION, 1234), ("close", 7)]
