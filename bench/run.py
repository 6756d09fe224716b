#!/usr/bin/env python3
"""Benchmarks: this tool next to the official openai SDK and a curl | base64 floor, side by side.

    python bench/run.py                 # the full run (about 4 minutes); writes docs/benchmarks.md
    python bench/run.py --quick         # one repetition, small inputs (the test suite runs this)

Everything runs against a fake Images API on 127.0.0.1 (tests/fake_api.py) that answers at once
(or after a set latency), so what is measured is the client: start-up, decoding, writing, uploading.
Each case is a separate process; wall time is measured around it and peak memory is the largest
resident set of the process (or of its pipeline) reported by wait4. Standard library only; the SDK
columns need `pip install openai` and are left out without it.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import platform
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from fake_api import FakeImagesAPI, Reply, make_png  # noqa: E402

SCRIPT = ROOT / "scripts" / "generate_image.py"
KEY = "sk-bench-NOT-A-REAL-KEY"
PY = sys.executable
SDK_GENERATE = """import base64, sys, openai
client = openai.OpenAI(api_key=sys.argv[1], base_url=sys.argv[2], max_retries=0)
answer = client.images.generate(model="gpt-image-2", prompt="noise")
open(sys.argv[3], "wb").write(base64.b64decode(answer.data[0].b64_json))
"""
SDK_EDIT = """import base64, sys, openai
client = openai.OpenAI(api_key=sys.argv[1], base_url=sys.argv[2], max_retries=0)
images = [open(p, "rb") for p in sys.argv[4:]]
answer = client.images.edit(model="gpt-image-2", prompt="fuse", image=images)
open(sys.argv[3], "wb").write(base64.b64decode(answer.data[0].b64_json))
"""


def noise_png(width: int, height: int) -> bytes:
    """An incompressible PNG: random pixels, stored (zlib level 0)."""
    rows = b"".join(b"\x00" + os.urandom(width * 3) for _ in range(height))

    def chunk(name: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + name + data + struct.pack(">I", zlib.crc32(name + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows, 0)) + chunk(b"IEND", b"")


def padded_png(size_bytes: int) -> bytes:
    """A small real PNG followed by noise up to size_bytes: an upload of that size the tool accepts."""
    head = make_png(512, 512)
    return head + os.urandom(max(0, size_bytes - len(head)))


def answer_for(image: bytes) -> Reply:
    body = json.dumps({"created": 1, "data": [{"b64_json": base64.b64encode(image).decode()}],
                       "usage": {"input_tokens": 1, "output_tokens": 1, "total_tokens": 2}}).encode()
    return Reply(body=body, headers={"Content-Type": "application/json"})


# Each case is started by this small launcher, not by the benchmark process itself: a child forked
# from a large process counts that process's pages in its peak until it calls exec.
LAUNCHER = """import os, sys, time
started = time.perf_counter()
pid = os.posix_spawnp(sys.argv[1], sys.argv[1:], os.environ)
_, status, usage = os.wait4(pid, 0)
print(time.perf_counter() - started, usage.ru_maxrss, os.waitstatus_to_exitcode(status), file=sys.stderr)
"""


def measure(command: list[str], *, shell: bool = False, cwd: Optional[Path] = None) -> tuple[float, float]:
    """Wall seconds and peak resident MB of one process (with its children, as wait4 reports them)."""
    argv = ["sh", "-c", " ".join(command)] if shell else command
    done = subprocess.run([PY, "-I", "-S", "-c", LAUNCHER, *argv], cwd=cwd, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    *output, last = done.stderr.strip().splitlines() or [""]
    wall, peak, code = last.split()
    if done.returncode or code != "0":
        raise SystemExit(f"benchmark command failed: {' '.join(argv)}\n" + "\n".join(output))
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return float(wall), int(peak) * scale / 1e6


class Row:
    def __init__(self, name: str, runs: list[tuple[float, float]]) -> None:
        self.name = name
        self.walls = [w for w, _ in runs]
        self.mems = [m for _, m in runs]

    @property
    def wall(self) -> float:
        return statistics.median(self.walls)

    @property
    def mem(self) -> float:
        return statistics.median(self.mems)

    def cells(self) -> str:
        return (f"| {self.name} | {self.wall * 1000:,.0f} ({min(self.walls) * 1000:,.0f}-{max(self.walls) * 1000:,.0f})"
                f" | {self.mem:,.1f} ({min(self.mems):,.1f}-{max(self.mems):,.1f}) |")


def repeat(name: str, times: int, run: Callable[[], tuple[float, float]]) -> Row:
    row = Row(name, [run() for _ in range(times)])
    print(f"  {row.cells()}", file=sys.stderr)
    return row


class Bench:
    def __init__(self, api: FakeImagesAPI, work: Path, times: int, sdk_version: Optional[str]) -> None:
        self.api, self.work, self.times = api, work, times
        self.sdk_version = sdk_version
        self.sdk = sdk_version is not None
        self.rows: dict[str, Row] = {}
        self.targets: list[tuple[str, str, bool]] = []

    def run(self, key: str, name: str, command: list[str], *, shell: bool = False) -> Row:
        def once() -> tuple[float, float]:
            self.api.requests.clear()
            return measure(command, shell=shell, cwd=self.work)

        self.rows[key] = repeat(name, self.times, once)
        return self.rows[key]

    def tool(self, *args: str) -> list[str]:
        return [PY, str(SCRIPT), "--base-url", self.api.url, "-k", KEY, "--quiet", *args]

    def target(self, text: str, value: float, limit: float, unit: str = "x") -> None:
        self.targets.append((text, f"{value:.2f}{unit} (target at most {limit:g}{unit})", value <= limit))


def installed_openai() -> Optional[str]:
    """The openai version in a child interpreter (importing it here would weigh on the benchmark)."""
    found = subprocess.run([PY, "-c", "import openai; print(openai.__version__)"], capture_output=True, text=True)
    return found.stdout.strip() if found.returncode == 0 else None


def startup(bench: Bench) -> None:
    bare = bench.run("bare", "`python -c pass`", [PY, "-c", "pass"])
    tool = bench.run("startup", "`python scripts/generate_image.py --version`", [PY, str(SCRIPT), "--version"])
    if bench.sdk:
        bench.run("import_openai", '`python -c "import openai"`', [PY, "-c", "import openai"])
    bench.target("start-up / bare python", tool.wall / bare.wall, 1.5)


def answer_always(bench: Bench, reply: Reply) -> None:
    """The answer is built once: building a 33 MB JSON per request would count as server time."""
    bench.api.route = lambda request: reply


def end_to_end(bench: Bench, label: str, image: bytes) -> None:
    answer_always(bench, answer_for(image))
    tool = bench.run(f"tool_{label}", f"this tool, {label}", bench.tool("-p", "noise", "-f", "out.png", "--overwrite"))
    floor_command = ["curl", "-s", "-X", "POST", "-H", "'Content-Type: application/json'", "-H",
                     f"'Authorization: Bearer {KEY}'", "-d", "'{\"model\":\"gpt-image-2\",\"prompt\":\"noise\"}'",
                     f"{bench.api.url}/images/generations", "|", "sed", "-e", "'s/.*\"b64_json\": *\"//'", "-e",
                     "'s/\".*//'", "|", "base64", "-d", ">", "floor.png"]
    floor = bench.run(f"floor_{label}", f"curl \\| sed \\| base64 -d, {label}", floor_command, shell=True)
    assert (bench.work / "out.png").read_bytes() == image == (bench.work / "floor.png").read_bytes()
    bench.target(f"{label} wall / curl floor", tool.wall / floor.wall, 1.5)
    if bench.sdk:
        sdk = bench.run(f"sdk_{label}", f"openai SDK script, {label}",
                        [PY, "-c", SDK_GENERATE, KEY, bench.api.url, "sdk.png"])
        bench.target(f"{label} wall / SDK", tool.wall / sdk.wall, 0.5)
        bench.target(f"{label} peak memory / SDK", tool.mem / sdk.mem, 0.5)


def uploads(bench: Bench, sizes: list[int]) -> None:
    answer_always(bench, answer_for(make_png(64, 64)))
    peaks = []
    for size in sizes:
        names = []
        for index in range(5):
            name = f"in-{size}-{index}.png"
            (bench.work / name).write_bytes(padded_png(size))
            names.append(name)
        label = f"{size / 1e6:g} MB"
        tool = bench.run(f"edit_tool_{size}", f"this tool, edit 5 x {label}",
                         bench.tool("-p", "fuse", "-i", *names, "-f", "edit.png", "--overwrite"))
        peaks.append(tool.mem)
        if bench.sdk:
            sdk = bench.run(f"edit_sdk_{size}", f"openai SDK script, edit 5 x {label}",
                            [PY, "-c", SDK_EDIT, KEY, bench.api.url, "sdk-edit.png", *names])
            bench.target(f"edit 5 x {label} peak memory / SDK", tool.mem / sdk.mem, 0.5)
        for name in names:
            (bench.work / name).unlink()
    bench.target(f"upload peak growth {sizes[0] / 1e6:g} MB -> {sizes[-1] / 1e6:g} MB inputs", peaks[-1] - peaks[0],
                 10, " MB")


def batches(bench: Bench, latency: float, jobs: list[int], items: int) -> None:
    answer_always(bench, Reply(body=answer_for(make_png(64, 64)).body, delay=latency,
                               headers={"Content-Type": "application/json"}))
    (bench.work / "batch.json").write_text(json.dumps([f"picture {i}" for i in range(items)]))
    for j in jobs:
        row = bench.run(f"batch_{j}", f"batch of {items}, {latency:g} s each, -j {j}",
                        bench.tool("--batch", "batch.json", "-j", str(j), "--overwrite"))
        ideal = math.ceil(items / j) * latency
        bench.target(f"batch -j {j} wall / ideal {ideal:g} s", row.wall / ideal, 1.15)


def large_batch(bench: Bench, items: int) -> None:
    answer_always(bench, answer_for(make_png(64, 64)))
    for count in (10, items):
        (bench.work / f"many-{count}.json").write_text(json.dumps([f"picture {i}" for i in range(count)]))
        bench.run(f"many_{count}", f"batch of {count}, instant server, -j 16",
                  bench.tool("--batch", f"many-{count}.json", "-j", "16", "--overwrite"))
    small, large = bench.rows["many_10"], bench.rows[f"many_{items}"]
    per_item = (large.wall - small.wall) / (items - 10) * 1000
    bench.target(f"per-item overhead ({items} items, -j 16)", per_item, 20, " ms")
    bench.target(f"batch memory growth 10 -> {items} items", large.mem - small.mem, 10, " MB")


def machine(sdk_version: Optional[str]) -> str:
    return (f"{platform.system()} {platform.release()} {platform.machine()}, {os.cpu_count()} CPUs, "
            f"Python {platform.python_version()}, " + (f"openai {sdk_version}" if sdk_version else "no openai"))


def report(bench: Bench, command: str) -> str:
    lines = ["# Benchmarks", "", f"Produced by `{command}` on {time.strftime('%Y-%m-%d')}.", "",
             f"Machine: {machine(bench.sdk_version)}.", "",
             "Every case runs as its own process against a fake Images API on 127.0.0.1 that answers at once "
             "(or after the stated latency). Medians of "
             f"{bench.times} runs, with min-max in brackets. Memory is the peak resident set of the process "
             "(for the curl pipeline, its largest process).", "",
             "| case | wall ms | peak MB |", "|---|---|---|"]
    lines += [row.cells() for row in bench.rows.values()]
    lines += ["", "## Targets", "", "| measure | value | result |", "|---|---|---|"]
    lines += [f"| {text} | {value} | {'PASS' if ok else 'MISS'} |" for text, value, ok in bench.targets]
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one repetition and small inputs (a smoke run)")
    parser.add_argument("--times", type=int, default=5, help="repetitions of each case (default 5)")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)
    times = 1 if args.quick else args.times
    with FakeImagesAPI() as api, tempfile.TemporaryDirectory(prefix="bench-") as folder:
        bench = Bench(api, Path(folder), times, installed_openai())
        print("start-up", file=sys.stderr)
        startup(bench)
        print("end to end", file=sys.stderr)
        end_to_end(bench, "1024x1024", noise_png(1024, 1024))
        if not args.quick:
            end_to_end(bench, "3840x2160", noise_png(3840, 2160))
        print("uploads", file=sys.stderr)
        uploads(bench, [1_000_000, 2_000_000] if args.quick else [1_000_000, 40_000_000])
        print("batches", file=sys.stderr)
        if args.quick:
            batches(bench, 0.2, [1, 4], 4)
            large_batch(bench, 30)
        else:
            batches(bench, 1.0, [1, 4, 8, 16], 16)
            large_batch(bench, 1000)
    command = "python bench/run.py" + (" --quick" if args.quick else "")
    text = report(bench, command)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text, encoding="utf-8")
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
