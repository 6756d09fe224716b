"""The two twins of the tool, run as processes the way an agent runs them: the Python script
(`python -I -S scripts/generate_image.py`) and its Node.js twin (`node scripts/generate_image.js`).

One launcher serves every process-level test, so both twins are started, fed and compared the same
way. Where Node.js 18+ is missing, the Node cases skip and say so; a missing generate_image.js is not
skipped but fails, since the twin is part of the project. The `twin` fixture (each twin in turn) is
in conftest.py, so every test file can use it."""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional, Union

ROOT = Path(__file__).resolve().parents[1]
SCRIPT_PY = ROOT / "scripts" / "generate_image.py"
SCRIPT_JS = ROOT / "scripts" / "generate_image.js"
TWINS = ("python", "node")
SCRIPT_NAMES = {"python": SCRIPT_PY.name, "node": SCRIPT_JS.name}
NODE_MIN = 18
# What an agent's shell passes on; the rest of the test process's environment stays out. HOME and
# APIYI_STATE_DIR are the `isolated` fixture's folders, so no run writes job records outside tmp_path.
KEPT_ENV = ("PATH", "SYSTEMROOT", "TMPDIR", "NO_PROXY", "no_proxy", "HOME", "USERPROFILE", "APIYI_STATE_DIR")

# The only words the twins may print differently: their own names, the runtime in User-Agent and the
# random multipart boundary (its length is shared, so Content-Length still has to match).
RUNTIME_IN_AGENT = re.compile(r"\((?:python|node) v?\d[\d.]*\)")
BOUNDARY = re.compile(r"boundary=[0-9A-Za-z'()+_,./:=?-]+")

Arg = Union[str, Path]


@functools.lru_cache(maxsize=None)
def node_version(node: str) -> tuple[int, ...]:
    done = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30)
    found = re.match(r"v(\d+)\.(\d+)\.(\d+)", done.stdout.strip())
    return tuple(int(part) for part in found.groups()) if found else (0,)


def skip_reason(twin: str) -> Optional[str]:
    """Why this twin cannot run here, or None."""
    if twin == "python":
        return None
    node = shutil.which("node")
    if not node:
        return f"Node.js {NODE_MIN}+ is not installed here (no `node` on PATH)"
    version = node_version(node)
    if version < (NODE_MIN,):
        shown = ".".join(map(str, version))
        return f"Node.js {NODE_MIN}+ is not installed here (`node --version` says {shown})"
    return None


def twin_command(twin: str, python: Optional[str] = None) -> list[str]:
    """The command line that runs a twin: the Python one under `python` (default: this interpreter)."""
    if twin == "python":
        return [python or sys.executable, "-I", "-S", str(SCRIPT_PY)]
    if twin == "node":
        return [shutil.which("node") or "node", str(SCRIPT_JS)]
    raise ValueError(f"no such twin: {twin}")


@dataclasses.dataclass(frozen=True)
class Launcher:
    """One twin under one interpreter; every process-level test starts the script through this."""

    twin: str
    command: tuple[str, ...]

    def run(self, *args: Arg, env: dict[str, str], stdin: bytes = b"", cwd: Optional[Path] = None,
            timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([*self.command, *map(str, args)], input=stdin, capture_output=True, env=env,
                              cwd=cwd, timeout=timeout)


def launcher(twin: str, python: Optional[str] = None) -> Launcher:
    return Launcher(twin, tuple(twin_command(twin, python)))


def run_twin(twin: str, *args: Arg, env: dict[str, str], stdin: bytes = b"", cwd: Optional[Path] = None,
             timeout: float = 60) -> subprocess.CompletedProcess:
    return launcher(twin).run(*args, env=env, stdin=stdin, cwd=cwd, timeout=timeout)


def script_env(**changes: Optional[str]) -> dict[str, str]:
    """The environment a twin gets: KEPT_ENV from this process, then changes (None removes a name)."""
    env = {name: os.environ[name] for name in KEPT_ENV if name in os.environ}
    for name, value in changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def same_words(text: Union[str, bytes]) -> str:
    """Output with the twin's name put as the Python script's, so the twins' words compare equal."""
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    return text.replace(SCRIPT_NAMES["node"], SCRIPT_NAMES["python"])


def same_request(text: Union[str, bytes]) -> str:
    """same_words, and the runtime in User-Agent and the multipart boundary put as placeholders."""
    return BOUNDARY.sub("boundary=BOUNDARY", RUNTIME_IN_AGENT.sub("(RUNTIME)", same_words(text)))

