#!/usr/bin/env python3
"""Benchmarks: this tool and its Node.js twin next to the official openai SDK and a curl | base64 floor.

    python bench/run.py                 # the full run (about 4 minutes); writes docs/benchmarks.md
    python bench/run.py --quick         # one repetition, small inputs (the test suite runs this)

Everything runs against a fake Images API on 127.0.0.1 (tests/fake_api.py) that answers at once
(or after a set latency), so what is measured is the client: start-up, decoding, writing, uploading.
Each case is a separate process; wall time is measured around it and peak memory is the largest
resident set of the process (or of its pipeline) reported by wait4. The tool's request runs in a
detached worker process, which wait4 does not see: its peak is the one the worker records in its job
record. Standard library only; the SDK columns need `pip install openai`, the Node twin's rows
(scripts/generate_image.js) Node 18 or later, and each is left out, with a line in the report, without it.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import math
import os
import platform
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from fake_api import FakeImagesAPI, Reply, make_png, quota_route, sse_images, stream_reply  # noqa: E402
from peak import measured_run  # noqa: E402

SCRIPT = ROOT / "scripts" / "generate_image.py"
NODE_SCRIPT = ROOT / "scripts" / "generate_image.js"
NODE_OLDEST = 18
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


# The waiting command reaps its worker when it exits, so wait4 reports the larger of the two; this
# wrapper reports the command's own peak (Linux VmHWM) into a file instead.
OWN_PEAK = """import atexit, os, runpy, sys
def record():
    with open("/proc/self/status") as status:
        peak = next(line for line in status if line.startswith("VmHWM:")).split()[1]
    with open(os.environ["BENCH_PEAK_FILE"], "w") as out:
        out.write(peak)
atexit.register(record)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
# The same for the Node twin, loaded with `node --require`. It takes the variable out of the
# environment, so a worker the command starts (even with the same --require) does not write the file.
NODE_OWN_PEAK = """const fs = require("fs");
const peakFile = process.env.BENCH_PEAK_FILE;
delete process.env.BENCH_PEAK_FILE;
process.on("exit", () => {
  const peak = fs.readFileSync("/proc/self/status", "utf8").match(/^VmHWM:\\s+(\\d+)/m)[1];
  fs.writeFileSync(peakFile, peak);
});
"""


@dataclasses.dataclass(frozen=True)
class Twin:
    """One implementation of the tool as the benchmark starts it: this script or its Node.js twin."""

    key: str                        # starts its rows' keys: "tool" for this script, "node" for the twin
    title: str                      # names its end-to-end rows
    tag: str                        # starts its targets' text ("" for this script)
    name: str                       # the interpreter, as the report shows it
    executable: str
    script: Path
    bare: tuple[str, ...]           # what makes the interpreter start and do nothing
    recorder: tuple[str, ...]       # what makes it record its own peak into BENCH_PEAK_FILE

    @property
    def command(self) -> list[str]:
        return [self.executable, str(self.script)]

    @property
    def recording(self) -> list[str]:
        return [self.executable, *self.recorder, str(self.script)]

    def shown(self, *args: str) -> str:
        return f"`{self.name} {self.script.relative_to(ROOT).as_posix()} {' '.join(args)}`"


PYTHON = Twin("tool", "this tool", "", "python", PY, SCRIPT, ("-c", "pass"), ("-c", OWN_PEAK))


def node_twin(work: Path) -> tuple[Optional[Twin], str]:
    """The Node twin and the node version, or None and why the twin's rows are left out."""
    node = shutil.which("node")
    found = subprocess.run([node, "--version"], capture_output=True, text=True) if node else None
    version = found.stdout.strip() if found and found.returncode == 0 else ""
    major = re.match(r"v(\d+)\.", version)
    if not major:
        return None, "node is not installed"
    if int(major.group(1)) < NODE_OLDEST:
        return None, f"node {version} is older than {NODE_OLDEST}"
    if not NODE_SCRIPT.exists():
        return None, f"{NODE_SCRIPT.relative_to(ROOT).as_posix()} is missing"
    recorder = work / "own-peak.js"
    recorder.write_text(NODE_OWN_PEAK, encoding="utf-8")
    return Twin("node", "the Node twin", "the Node twin, ", "node", node, NODE_SCRIPT, ("-e", "0"),
                ("--require", str(recorder))), f"node {version}"


def command_peak(bench: "Bench", command: list[str]) -> Optional[float]:
    """The waiting command's own peak resident MB (None where /proc is missing); command is a Twin's
    recording command."""
    if not Path("/proc/self/status").exists():
        return None
    peak_file = bench.work / "peak.txt"
    subprocess.run(command, cwd=bench.work, capture_output=True, env=bench.env(BENCH_PEAK_FILE=str(peak_file)),
                   check=True)
    return int(peak_file.read_text()) * 1024 / 1e6


def measure(command: list[str], *, shell: bool = False, cwd: Optional[Path] = None,
            env: Optional[dict[str, str]] = None) -> tuple[float, float]:
    """Wall seconds and peak resident MB of one process (with its children, as wait4 reports them)."""
    argv = ["sh", "-c", " ".join(command)] if shell else command
    done = measured_run(argv, cwd=cwd, env=env)
    if done.code:
        raise SystemExit(f"benchmark command failed: {' '.join(argv)}\n{done.stderr}")
    return done.wall_s, done.peak_bytes / 1e6


def mib(megabytes: float) -> float:
    return megabytes * 1e6 / 2 ** 20


class Row:
    def __init__(self, name: str, runs: list[tuple[float, float, Optional[float]]]) -> None:
        self.name = name
        self.walls = [w for w, _, _ in runs]
        self.mems = [m for _, m, _ in runs]
        self.workers = [k for _, _, k in runs if k is not None]

    @property
    def worker(self) -> float:
        return statistics.median(self.workers) if self.workers else math.nan

    @property
    def wall(self) -> float:
        return statistics.median(self.walls)

    @property
    def mem(self) -> float:
        return statistics.median(self.mems)

    def cells(self) -> str:
        worker = (f"{self.worker:,.1f} ({min(self.workers):,.1f}-{max(self.workers):,.1f})" if self.workers
                  else "-")
        return (f"| {self.name} | {self.wall * 1000:,.0f} ({min(self.walls) * 1000:,.0f}-{max(self.walls) * 1000:,.0f})"
                f" | {self.mem:,.1f} ({min(self.mems):,.1f}-{max(self.mems):,.1f}) | {worker} |")


def repeat(name: str, times: int, run: Callable[[], tuple[float, float, Optional[float]]]) -> Row:
    row = Row(name, [run() for _ in range(times)])
    print(f"  {row.cells()}", file=sys.stderr)
    return row


class Bench:
    def __init__(self, api: FakeImagesAPI, work: Path, times: int, sdk_version: Optional[str]) -> None:
        self.api, self.work, self.times = api, work, times
        self.sdk_version = sdk_version
        self.sdk = sdk_version is not None
        node, self.node_note = node_twin(work)      # the node version, or why the twin is left out
        self.twins = [PYTHON, node] if node else [PYTHON]
        self.left_out = [] if self.sdk else ["the openai SDK rows: openai is not installed (`pip install openai`)"]
        if not node:
            self.left_out.append(f"the Node twin's rows: {self.node_note}")
        self.rows: dict[str, Row] = {}
        self.targets: list[tuple[str, str, bool]] = []

    @property
    def state(self) -> Path:
        return self.work / "state"

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, "APIYI_STATE_DIR": str(self.state), "APIYI_WORKER": "process", **extra}

    def run(self, key: str, name: str, command: list[str], *, shell: bool = False,
            route: Optional[Callable[[], Any]] = None, **env: str) -> Row:
        """route, when given, makes the server's route afresh for each repetition (a route with a clock)."""
        def once() -> tuple[float, float, Optional[float]]:
            self.api.requests.clear()
            if route:
                self.api.route = route()
            before = set(self.state.glob("*.json"))
            wall, peak = measure(command, shell=shell, cwd=self.work, env=self.env(**env))
            return wall, peak, newest_worker_peak(set(self.state.glob("*.json")) - before)

        self.rows[key] = repeat(name, self.times, once)
        return self.rows[key]

    def tool(self, *args: str, twin: Twin = PYTHON, recording: bool = False) -> list[str]:
        start = twin.recording if recording else twin.command
        return [*start, "--base-url", self.api.url, "-k", KEY, "--quiet", *args]

    def target(self, text: str, value: float, limit: float, unit: str = "x") -> None:
        self.targets.append((text, f"{value:.2f}{unit} (target at most {limit:g}{unit})", value <= limit))

    def allowance(self, twin: Twin, limit: float) -> float:
        """A MiB limit set for this script, moved for a twin by how much more its bare interpreter
        weighs (both measured in this run): the same allowance over the interpreter."""
        return round(limit + mib(self.rows[f"{twin.key}_bare"].mem - self.rows[f"{PYTHON.key}_bare"].mem), 1)


def newest_worker_peak(records: set[Path]) -> Optional[float]:
    """The peak resident MB a detached worker recorded; waits for it, since the command may end first."""
    deadline = time.monotonic() + 30
    for path in records:
        while time.monotonic() < deadline:
            record = json.loads(path.read_text(encoding="utf-8"))
            if record.get("peak_rss_kib"):
                return record["peak_rss_kib"] * 1024 / 1e6 if record.get("detached") else None
            time.sleep(0.01)
    return None


def installed_openai() -> Optional[str]:
    """The openai version in a child interpreter (importing it here would weigh on the benchmark)."""
    found = subprocess.run([PY, "-c", "import openai; print(openai.__version__)"], capture_output=True, text=True)
    return found.stdout.strip() if found.returncode == 0 else None


def startup(bench: Bench) -> None:
    for twin in bench.twins:
        bare = bench.run(f"{twin.key}_bare", f"`{twin.name} {' '.join(twin.bare)}`", [twin.executable, *twin.bare])
        tool = bench.run(f"{twin.key}_startup", twin.shown("--version"), [*twin.command, "--version"])
        bench.run(f"{twin.key}_dry_run", twin.shown("--dry-run -p 'a cat'"),
                  bench.tool("--dry-run", "-p", "a cat", twin=twin))
        bench.target(f"start-up / bare {twin.name}", tool.wall / bare.wall, 1.5)
    if bench.sdk:
        bench.run("import_openai", '`python -c "import openai"`', [PY, "-c", "import openai"])


def answer_always(bench: Bench, reply: Reply) -> None:
    """The answer is built once: building a 33 MB JSON per request would count as server time."""
    bench.api.route = lambda request: reply


def end_to_end(bench: Bench, label: str, image: bytes) -> None:
    answer_always(bench, answer_for(image))
    answer = ("-p", "noise", "-f", "out.png", "--overwrite")
    for twin in bench.twins:
        bench.run(f"{twin.key}_{label}", f"{twin.title}, {label}", bench.tool(*answer, twin=twin))
        assert (bench.work / "out.png").read_bytes() == image
    floor_command = ["curl", "-s", "-X", "POST", "-H", "'Content-Type: application/json'", "-H",
                     f"'Authorization: Bearer {KEY}'", "-d", "'{\"model\":\"gpt-image-2\",\"prompt\":\"noise\"}'",
                     f"{bench.api.url}/images/generations", "|", "sed", "-e", "'s/.*\"b64_json\": *\"//'", "-e",
                     "'s/\".*//'", "|", "base64", "-d", ">", "floor.png"]
    floor = bench.run(f"floor_{label}", f"curl \\| sed \\| base64 -d, {label}", floor_command, shell=True)
    assert (bench.work / "floor.png").read_bytes() == image
    for twin in bench.twins:
        bench.target(f"{twin.tag}{label} wall / curl floor", bench.rows[f"{twin.key}_{label}"].wall / floor.wall, 1.5)
        own = command_peak(bench, bench.tool(*answer, twin=twin, recording=True))
        if own is not None:
            bench.target(f"{twin.tag}{label}: the waiting command's own peak", mib(own), bench.allowance(twin, 25),
                         " MiB")
    tool = bench.rows[f"tool_{label}"]
    if bench.sdk:
        sdk = bench.run(f"sdk_{label}", f"openai SDK script, {label}",
                        [PY, "-c", SDK_GENERATE, KEY, bench.api.url, "sdk.png"])
        bench.target(f"{label} wall / SDK", tool.wall / sdk.wall, 0.5)
        bench.target(f"{label} peak memory / SDK", tool.mem / sdk.mem, 0.5)


def jobs(bench: Bench, image: bytes, label: str, *, many: int, batch: int) -> None:
    """The worker's own peak memory (one answer, a stream, n images, a batch answering together), what
    the worker costs over running in-process, and how fast attach and --list-jobs answer."""
    answer_always(bench, answer_for(image))
    for twin in bench.twins:
        worker = bench.rows[f"{twin.key}_{label}"].worker
        bench.target(f"{twin.tag}{label}: worker peak", mib(worker), bench.allowance(twin, 40), " MiB")
    one = bench.rows[f"tool_{label}"]
    inproc = bench.run(f"inprocess_{label}", f"this tool in-process (APIYI_WORKER=inprocess), {label}",
                       bench.tool("-p", "noise", "-f", "out.png", "--overwrite"), APIYI_WORKER="inprocess")
    bench.target(f"{label}: foreground with a worker - in-process", (one.wall - inproc.wall) * 1000, 150, " ms")
    attach = bench.run("attach", "`--attach last` of a finished job", [PY, str(SCRIPT), "--attach", "last"])
    listed = bench.run("list_jobs", "`--list-jobs`", [PY, str(SCRIPT), "--list-jobs"])
    bench.target("--attach answers in", attach.wall * 1000, 200, " ms")
    bench.target("--list-jobs answers in", listed.wall * 1000, 200, " ms")
    events = [*sse_images([make_png(64, 64)] * 2, None), *sse_images([], image)]
    bench.api.route = lambda request: stream_reply(events)
    stream = bench.run(f"stream_{label}", f"this tool, --stream, {label}",
                       bench.tool("-p", "noise", "-f", "out.png", "--overwrite", "--stream"))
    bench.target(f"{label} --stream: worker peak", mib(stream.worker), 45, " MiB")
    body = json.dumps({"created": 1, "data": [{"b64_json": base64.b64encode(image).decode()}] * many}).encode()
    answer_always(bench, Reply(body=body, headers={"Content-Type": "application/json"}))
    n = bench.run(f"n_{label}", f"this tool, -n {many}, {label}",
                  bench.tool("-p", "noise", "-f", "n.png", "--overwrite", "-n", str(many)))
    bench.target(f"{label} -n {many}: worker peak", mib(n.worker), 45, " MiB")
    answer_always(bench, answer_for(image))
    (bench.work / "big.json").write_text(json.dumps([f"picture {i}" for i in range(batch)]))
    whole = bench.run(f"batch_{label}", f"batch of {batch} x {label}, -j {batch}, answers together",
                      bench.tool("--batch", "big.json", "-j", str(batch), "--overwrite"))
    bench.target(f"batch of {batch} x {label}: worker peak", mib(whole.worker), 80, " MiB")


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


def quotas(bench: Bench, seconds: float, items: int, cases: list[tuple[int, int]]) -> None:
    """A gateway that refuses what is above its concurrency quota with a 429 (Retry-After: 1): the
    batch must find the quota, not halve below it."""
    (bench.work / "quota.json").write_text(json.dumps([f"picture {i}" for i in range(items)]))
    for jobs, quota in cases:
        refused: list[int] = []
        bench.api.route = quota_route(quota, seconds, refused, retry_after="1")
        row = bench.run(f"quota_{jobs}_{quota}", f"batch of {items}, {seconds:g} s each, -j {jobs}, quota {quota}",
                        bench.tool("--batch", "quota.json", "-j", str(jobs), "--overwrite"))
        ideal = math.ceil(items / quota) * seconds + 1
        bench.target(f"quota {quota}, -j {jobs}: wall / ideal {ideal:g} s ({len(refused) / bench.times:.0f} 429s "
                     "a run)", row.wall / ideal, 1.10)


def outages(bench: Bench, seconds: float) -> None:
    """429s for every request for a while: at the start (a burst), or in the middle (an outage). No
    item may fail (a 429 spends no retries), and the batch must start again at once."""
    for key, items, jobs, window, ideal in (("burst", 48, 8, (0.0, 1.5), 2 + 6 * seconds),
                                            ("outage", 24, 8, (2.0, 7.0), 7 + seconds)):
        (bench.work / f"{key}.json").write_text(json.dumps([f"picture {i}" for i in range(items)]))
        refused: list[int] = []
        row = bench.run(key, f"batch of {items}, {seconds:g} s each, -j {jobs}, quota 8, 429s from {window[0]:g} "
                             f"to {window[1]:g} s", bench.tool("--batch", f"{key}.json", "-j", str(jobs),
                                                               "--overwrite", "--retries", "0"),
                        route=lambda: quota_route(8, seconds, refused, retry_after="1", outage=window))
        bench.target(f"{key} of 429s: wall / ideal {ideal:g} s, no item failed ({len(refused) / bench.times:.0f} "
                     "429s a run)", row.wall / ideal, 1.20)


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


def machine(bench: Bench) -> str:
    return (f"{platform.system()} {platform.release()} {platform.machine()}, {os.cpu_count()} CPUs, "
            f"Python {platform.python_version()}, " + (f"openai {bench.sdk_version}" if bench.sdk else "no openai")
            + (f", {bench.node_note}" if len(bench.twins) > 1 else ""))


NOTES = ("The waiting command's own peak cannot reach 25 MiB while it is one script of this size: "
         "CPython compiles a file run as `__main__` on every start, and `--version` alone peaks at about "
         "32 MiB (the script is about 6,000 lines); waiting adds about 4 MiB (hashlib with OpenSSL for the "
         "fingerprint, subprocess). Starting the worker costs about 100 ms of wall time over running "
         "in-process, which is also why the 1024x1024 case is slower than the curl floor. The 429 cases "
         "(quota, burst, outage) answer 429 with Retry-After: 1; their ideal counts the time any client "
         "needs to see the 429s end.")
NODE_NOTES = ("The Node twin (`node scripts/generate_image.js`) runs the same start-up and end-to-end cases in "
              "the same run, against the same fake and the same answer; its output is checked byte for byte. Its "
              "worker's peak is the one its job record gives (`peak_rss_kib`: VmHWM on Linux, written when the job "
              "ends, with `detached: true`; the worker runs with --expose-gc and collects every 2 MB of answer, "
              "since the socket's and the decoder's spent buffers lie outside V8's heap); its waiting "
              "command's own peak is VmHWM read when it exits, by a module loaded with `node --require`, as this "
              "script's is by a runpy wrapper; its peak column is what wait4 reports for its command, which "
              "includes the worker only if the command reaps it. Its memory targets are this script's, moved by "
              "the difference between the bare interpreters' peaks in the same run (`node -e 0` against "
              "`python -c pass`): the same allowance over the interpreter. Its start-up is judged against "
              "`node -e 0` as this script's is against `python -c pass`.")


def report(bench: Bench, command: str) -> str:
    lines = ["# Benchmarks", "", f"Produced by `{command}` on {time.strftime('%Y-%m-%d')}.", "",
             f"Machine: {machine(bench)}.", "",
             "Every case runs as its own process against a fake Images API on 127.0.0.1 that answers at once "
             "(or after the stated latency). Medians of "
             f"{bench.times} runs, with min-max in brackets. Memory is the peak resident set of the process "
             "(for the curl pipeline, its largest process). For this tool the last column is the detached "
             "worker that sends, receives and saves (its own peak, as its job record says); the peak column "
             "is the larger of the waiting command and that worker, because the command reaps its worker "
             "when it exits and wait4 then counts it. The command's own peak is among the targets.", ""]
    for reason in bench.left_out:
        lines += [f"Left out: {reason}.", ""]
    lines += ["| case | wall ms | peak MB | worker peak MB |", "|---|---|---|---|"]
    lines += [row.cells() for row in bench.rows.values()]
    lines += ["", "## Targets", "", "| measure | value | result |", "|---|---|---|"]
    lines += [f"| {text} | {value} | {'PASS' if ok else 'MISS'} |" for text, value, ok in bench.targets]
    lines += ["", "## Notes", "", NOTES]
    if len(bench.twins) > 1:
        lines += ["", NODE_NOTES]
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
        if args.quick:
            jobs(bench, noise_png(1024, 1024), "1024x1024", many=2, batch=4)
        else:
            end_to_end(bench, "3840x2160", noise_png(3840, 2160))
            jobs(bench, noise_png(3840, 2160), "3840x2160", many=10, batch=16)
        print("uploads", file=sys.stderr)
        uploads(bench, [1_000_000, 2_000_000] if args.quick else [1_000_000, 40_000_000])
        print("batches", file=sys.stderr)
        if args.quick:
            batches(bench, 0.2, [1, 4], 4)
            quotas(bench, 0.2, 8, [(8, 2)])
            large_batch(bench, 30)
        else:
            batches(bench, 1.0, [1, 4, 8, 16], 16)
            quotas(bench, 1.0, 24, [(8, 2), (8, 4), (16, 2), (16, 4)])
            outages(bench, 1.0)
            large_batch(bench, 1000)
    command = "python bench/run.py" + (" --quick" if args.quick else "")
    text = report(bench, command)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text, encoding="utf-8")
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
