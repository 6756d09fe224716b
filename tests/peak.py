"""One process run and measured: its exit code, wall time and peak resident memory, for the
benchmark and for the tests that bound memory (POSIX: posix_spawn and wait4)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Optional

# The process is started by this small launcher, not by the caller: a child forked from a large
# process (pytest, the benchmark) counts that process's pages in its peak until it calls exec.
LAUNCHER = """import os, sys, time
started = time.perf_counter()
pid = os.posix_spawnp(sys.argv[1], sys.argv[1:], os.environ)
_, status, usage = os.wait4(pid, 0)
print(time.perf_counter() - started, usage.ru_maxrss, os.waitstatus_to_exitcode(status), file=sys.stderr)
"""


@dataclasses.dataclass(frozen=True)
class Measured:
    code: int
    wall_s: float
    peak_bytes: int     # with the children it reaped, as wait4 reports them
    stdout: str
    stderr: str


def measured_run(argv: list[str], *, cwd: Optional[Path] = None, env: Optional[dict[str, str]] = None) -> Measured:
    done = subprocess.run([sys.executable, "-I", "-S", "-c", LAUNCHER, *argv], cwd=cwd, capture_output=True,
                          env=env)
    *output, last = done.stderr.decode("utf-8", "replace").strip().splitlines() or [""]
    if done.returncode or len(last.split()) != 3:
        raise RuntimeError(f"the launcher failed for {' '.join(argv)}:\n{done.stderr.decode('utf-8', 'replace')}")
    wall, peak, code = last.split()
    scale = 1 if sys.platform == "darwin" else 1024     # ru_maxrss: bytes on macOS, KiB on Linux
    return Measured(int(code), float(wall), int(peak) * scale, done.stdout.decode("utf-8", "replace"),
                    "\n".join(output))
