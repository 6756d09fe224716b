"""Conformance of the twins: the Python script and its Node.js twin, run as processes against the fake
Images API, print the same documents, send the same requests, refuse the same input with the same
words and exit codes, and share job records, so an agent may use either.

Each differential test runs the Python twin as the reference and the parametrised twin beside it: with
`twin=python` it checks the Python twin's own behaviour (and that the comparison is sound), with
`twin=node` that the Node twin matches it. Where Node.js 18+ is missing, the Node cases skip and say why."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

import generate_image as gi
from conftest import TEST_KEY
from fake_api import FakeImagesAPI, Recorded, Reply, api_error, images_answer, make_image, make_png
from twins import SCRIPT_NAMES, run_twin, same_request, same_words, script_env, skip_reason, twin_command

PNG = b"\x89PNG\r\n\x1a\n"
# What differs between two runs of the same twin, so cannot be compared across twins.
VOLATILE = frozenset({"elapsed_s"})
JOB_LINE = re.compile(r"job (\d{8}-\d{6}-[0-9a-f]{6})\r?\n")
# A reply slow enough that the other twin starts and attaches while the job is pending.
SLOW = Reply(body=images_answer([make_png(64, 64)]), delay=1.5)
# The inputs the tables use: name -> (format, width, height, alpha), or raw bytes.
INPUTS: dict[str, Any] = {
    "in.png": ("png", 256, 256, False), "a.png": ("png", 256, 256, False), "b.jpg": ("jpeg", 128, 96, False),
    "mask.png": ("png", 256, 256, True), "small-mask.png": ("png", 128, 128, True),
    "花园.png": ("png", 256, 256, False), "photo.png": ("jpeg", 160, 120, False),   # a JPEG named .png
    "notimg.png": b"hello, not an image", "f.json": b'[{"prompt": "cat"}]',
    # a PNG whose IHDR claims 4 GiB: a mask check must read what is there, not what it claims
    "liar-mask.png": b"\x89PNG\r\n\x1a\n\xff\xff\xff\xf0IHDR" + (256).to_bytes(4, "big") * 2 + b"\x08\x06",
}


def write_inputs(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, spec in INPUTS.items():
        fmt, width, height, alpha = spec if isinstance(spec, tuple) else ("", 0, 0, False)
        (folder / name).write_bytes(spec if isinstance(spec, bytes) else make_image(fmt, width, height, alpha=alpha))
    return folder


@pytest.fixture
def inputs(isolated: Path) -> Path:
    """The inputs in the work folder, where a twin started without cwd runs."""
    return write_inputs(isolated)


@pytest.fixture
def offline_env() -> dict[str, str]:
    """No key, the default base URL: what --dry-run, --help and --list-models need."""
    return script_env(APIYI_WORKER="inprocess")


def online(api: FakeImagesAPI, **changes: Optional[str]) -> dict[str, str]:
    """The key and the fake API; the job runs inside the command, which is faster."""
    return script_env(APIYI_API_KEY=TEST_KEY, APIYI_BASE_URL=api.url, APIYI_WORKER="inprocess", **changes)


@pytest.fixture
def online_env(api: FakeImagesAPI) -> dict[str, str]:
    return online(api)


Done = subprocess.CompletedProcess


def pair(twin: str, *args: str, env: dict[str, str], before: Callable[[], None] = lambda: None) -> tuple[Done, Done]:
    """The Python twin's run (the reference) and this twin's; for twin=python it runs once.
    before() runs before each run (to queue the server's reply)."""
    before()
    reference = run_twin("python", *args, env=env)
    if twin == "python":
        return reference, reference
    before()
    return reference, run_twin(twin, *args, env=env)


def steady(document: Any) -> Any:
    """The document without the VOLATILE fields, at any depth."""
    if isinstance(document, dict):
        return {key: steady(value) for key, value in document.items() if key not in VOLATILE}
    if isinstance(document, list):
        return [steady(value) for value in document]
    return document


def first_line(stream: bytes) -> str:
    return same_words(stream).splitlines()[0] if stream else ""


# --- a. dry runs ------------------------------------------------------------------------------------

# args, and what the Python twin puts in the request body (the Node twin must match the whole document).
DRY_RUNS = [
    pytest.param(["-p", "cat", "-f", "cat.png"], {"model": "gpt-image-2", "output_format": "png"}, id="defaults"),
    pytest.param(["-p", "cat", "-f", "wide.png", "-s", "16:9", "-r", "2K", "-q", "high"],
                 {"size": "2048x1152", "quality": "high"}, id="ratio-2k-high"),
    pytest.param(["-p", "cat", "-f", "uhd.png", "-s", "3840x2160"], {"size": "3840x2160"}, id="4k-preset"),
    pytest.param(["-p", "cat", "-f", "photo.jpg", "-o", "jpeg", "-c", "80"],
                 {"output_format": "jpeg", "output_compression": 80}, id="jpeg-compression"),
    pytest.param(["-p", "cat", "-f", "clear.png", "-o", "webp", "--background", "transparent", "--model",
                  "gpt-image-2.5-flare"], {"output_format": "webp", "background": "transparent"},
                 id="webp-transparent"),
    pytest.param(["-p", "cat", "-f", "three.png", "-n", "3"], {"n": 3}, id="n-3"),
    pytest.param(["-p", "-a cat on a mat", "-f", "dash.png"], {"prompt": "-a cat on a mat"}, id="prompt-with-a-dash"),
    pytest.param(["-p", "cat", "-f", "loose.png", "--moderation", "low"], {"moderation": "low"}, id="moderation"),
    pytest.param(["-p", "加一道彩虹", "-f", "edit.png", "-i", "in.png"], {"prompt": "加一道彩虹"}, id="edit"),
    pytest.param(["-p", "fuse", "-f", "fused.png", "-i", "a.png", "b.jpg"], {"prompt": "fuse"}, id="fusion"),
    pytest.param(["-p", "fill", "-f", "masked.png", "-i", "in.png", "-m", "mask.png"], {}, id="mask"),
    pytest.param(["-p", "cat", "-f", "same.png", "-s", "match", "-i", "b.jpg"], {"size": "944x704"}, id="match"),
    pytest.param(["-p", "cat", "-f", "loop.gif", "--model", "gpt-image-2.6-flare", "-o", "gif", "--frames", "6",
                  "--frame-ms", "100"], {"frame_count": 6, "frame_duration_ms": 100}, id="gif"),
    pytest.param(["-p", "cat", "-f", "logo.svg", "--model", "gpt-image-2.6-flare", "-o", "svg", "--svg-model",
                  "gpt-5.6-terra"], {"svg": {"model": "gpt-5.6-terra"}}, id="svg"),
    pytest.param(["-p", "cat", "-f", "vip.png", "--model", "gpt-image-2-vip", "-s", "16:9", "-r", "4K"],
                 {"size": "3840x2160"}, id="vip-4k"),
    pytest.param(["-p", "cat", "-f", "all.png", "--model", "gpt-image-2.6-all", "-n", "2"], {"n": 2}, id="flat-n-2"),
    pytest.param(["-p", "cat", "-f", "sun.png", "--model", "gpt-image-2.6-sunburst", "--complexity", "low"],
                 {"complexity": "low"}, id="complexity"),
    pytest.param(["-p", "一只可爱的橘猫", "-f", "橘猫.png", "-i", "花园.png"], {"prompt": "一只可爱的橘猫"}, id="chinese"),
    pytest.param(["-p", "cat", "-f", "capped.png", "--max-cost", "5", "-q", "low"], {"quality": "low"}, id="max-cost"),
    pytest.param(["-p", "cat", "-f", "keyed.png", "-k", TEST_KEY], {}, id="key-redacted"),
    pytest.param(["-p", "cat", "-f", "x.png", "-i", "photo.png"], {}, id="jpeg-named-png"),
    pytest.param(["-p", "cat", "-f", "noext", "--model", "unknown-model-9"], {"model": "unknown-model-9"},
                 id="unknown-model"),
]


@pytest.mark.parametrize("args, sent", DRY_RUNS)
def test_dry_run_documents_and_text_are_the_same(twin: str, inputs: Path, offline_env: dict[str, str],
                                                 args: list[str], sent: dict[str, Any]) -> None:
    reference, run = pair(twin, *args, "--dry-run", "--json", env=offline_env)
    assert reference.returncode == 0, reference.stderr.decode()
    expected = json.loads(same_request(reference.stdout))
    assert (expected["ok"], expected["dry_run"]) == (True, True)
    body = expected["request"].get("json") or expected["request"]["fields"]
    assert {key: body[key] for key in sent} == sent
    assert TEST_KEY not in reference.stdout.decode()
    assert run.returncode == 0, run.stderr.decode()
    assert json.loads(same_request(run.stdout)) == expected
    # The text form, and what goes to stderr (size notes, warnings), word for word.
    reference, run = pair(twin, *args, "--dry-run", env=offline_env)
    assert (reference.returncode, run.returncode) == (0, 0), run.stderr.decode()
    assert same_request(run.stdout) == same_request(reference.stdout)
    assert same_words(run.stderr) == same_words(reference.stderr)


def test_the_comparison_hides_only_the_boundary_and_the_runtime(inputs: Path, offline_env: dict[str, str]) -> None:
    """Two runs of one twin differ in the multipart boundary alone, so a difference left after
    same_request is a difference between the twins."""
    args = ("-p", "fuse", "-f", "fused.png", "-i", "a.png", "b.jpg", "--dry-run")
    first, second = (run_twin("python", *args, env=offline_env) for _ in range(2))
    assert first.stdout != second.stdout
    assert same_request(first.stdout) == same_request(second.stdout)
    assert "boundary=BOUNDARY" in same_request(first.stdout) and "(RUNTIME)" in same_request(first.stdout)


# --- b. requests --------------------------------------------------------------------------------------

REQUESTS = [
    pytest.param(["-p", "一只可爱的橘猫", "-f", "cat.png", "-s", "1536x1024", "-q", "low"], "generations", id="text"),
    pytest.param(["-p", "加一道彩虹", "-i", "in.png", "-f", "edit.png"], "edits", id="edit"),
    pytest.param(["-p", "fuse", "-i", "a.png", "b.jpg", "-f", "fused.png", "-s", "1024x1024"], "edits", id="fusion"),
    pytest.param(["-p", "fill", "-i", "in.png", "-m", "mask.png", "-f", "masked.png"], "edits", id="mask"),
    pytest.param(["-p", "cats", "-n", "2", "-f", "cats.png"], "generations", id="n-2"),
    pytest.param(["-p", "猫", "-i", "花园.png", "-f", "橘猫.png"], "edits", id="chinese-names"),
    pytest.param(["-p", "cat", "-i", "photo.png", "-f", "x.png"], "edits", id="jpeg-named-png"),
    pytest.param(["-p", "cat", "-f", "meta.png", "--json", "--metadata"], "generations", id="json-metadata"),
]


def wire(request: Recorded) -> dict[str, Any]:
    """What the server parsed from a request; User-Agent and the boundary are left out."""
    content_type = request.header("Content-Type") or ""
    boundary = content_type.partition("boundary=")[2]
    seen: dict[str, Any] = {
        "method": request.method, "path": request.path, "accept": request.header("Accept"),
        "content_type": same_request(content_type),
        "authorized": request.header("Authorization") == f"Bearer {TEST_KEY}",
        "length_matches": request.header("Content-Length") == str(len(request.body)),
        "body": request.body.replace(boundary.encode(), b"BOUNDARY") if boundary else request.body}
    if boundary:
        seen["parts"] = [(p.name, p.filename, p.content_type, p.data) for p in request.parts()]
    else:
        seen["json"] = request.json()
    return seen


def made(folder: Path) -> dict[str, Any]:
    """The files a run left in its folder, but for the inputs: bytes, or a JSON document (steady)."""
    found = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in INPUTS):
        data = path.read_bytes()
        found[path.relative_to(folder).as_posix()] = steady(json.loads(data)) if path.suffix == ".json" else data
    return found


@pytest.mark.parametrize("args, endpoint", REQUESTS)
def test_both_twins_send_the_same_requests_and_save_the_same_files(
        twin: str, api: FakeImagesAPI, tmp_path: Path, args: list[str], endpoint: str) -> None:
    runs = {}
    for who in dict.fromkeys(("python", twin)):     # each twin in a folder (and state folder) of its own
        env = online(api, APIYI_STATE_DIR=str(tmp_path / who / "state"))
        sent = len(api.requests)
        done = run_twin(who, *args, env=env, cwd=write_inputs(tmp_path / who / "work"))
        assert done.returncode == 0, done.stderr.decode()
        assert len(api.requests) == sent + 1
        runs[who] = (wire(api.requests[-1]), done.stdout, made(tmp_path / who / "work"))
    request, stdout, files = runs["python"]
    assert request["path"] == f"/v1/images/{endpoint}" and request["authorized"] and request["length_matches"]
    assert files
    other_request, other_stdout, other_files = runs[twin]
    assert {k: v for k, v in other_request.items() if k != "body"} == {k: v for k, v in request.items() if k != "body"}
    assert other_request["body"] == request["body"]
    if "--json" in args:
        assert steady(json.loads(same_words(other_stdout))) == steady(json.loads(same_words(stdout)))
    else:
        assert same_words(other_stdout) == same_words(stdout)
    assert other_files == files


# --- c. bad input -----------------------------------------------------------------------------------

CAT = ["-p", "cat", "-f", "cat.png"]
PROXY = {"HTTP_PROXY": "http://127.0.0.1:9", "NO_PROXY": None, "no_proxy": None}
# args, a piece of the error line the Python twin prints, changes to the environment.
BAD_INPUT = [
    pytest.param([*CAT, "-s", "999x1"], "width and height must be multiples of 16", {}, id="size-999x1"),
    pytest.param([*CAT, "-s", "5000x5000"], "the longest edge must be at most 3840", {}, id="size-5000"),
    pytest.param([*CAT, "-s", "17:3"], "the aspect ratio must be at most 3:1", {}, id="ratio-17-3"),
    pytest.param([*CAT, "-s", "16:9", "-r", "8K"], "'8K' is not one of 1K, 2K, 4K", {}, id="resolution-8k"),
    pytest.param([*CAT, "-s", "3840x2160", "-r", "2K"], "--resolution applies to a ratio", {}, id="resolution-wxh"),
    pytest.param([*CAT, "-q", "ultra"], "'ultra' is not one of auto, low", {}, id="quality-ultra"),
    pytest.param([*CAT, "-n", "11"], "11 is outside 1-10", {}, id="n-11"),
    pytest.param([*CAT, "-n", "0"], "0 is outside 1-10", {}, id="n-0"),
    pytest.param([*CAT, "-c", "80"], "--output-compression applies to jpeg or webp", {}, id="compression-png"),
    pytest.param([*CAT, "--background", "transparent", "-o", "jpeg"], "jpeg has no transparency", {},
                 id="transparent-jpeg"),
    pytest.param([*CAT, "--moderation", "low", "-i", "in.png"], "--moderation applies to text-to-image only", {},
                 id="moderation-edit"),
    pytest.param([*CAT, "-i", "missing.png"], "input image missing.png: not found", {}, id="input-missing"),
    pytest.param([*CAT, "-i", "notimg.png"], "is not a PNG, JPEG or WebP image", {}, id="input-not-image"),
    pytest.param([*CAT, "-i", "in.png", "-m", "small-mask.png"], "is 128x128 but the first input image is 256x256",
                 {}, id="mask-size"),
    pytest.param([*CAT, "-m", "mask.png"], "--mask needs an input image", {}, id="mask-alone"),
    pytest.param([*CAT, "-s", "match"], "-s match takes the shape of the first input image", {}, id="match-alone"),
    pytest.param([*CAT, "-q", "max"], "gpt-image-2 does not take -q max", {}, id="max-on-2"),
    pytest.param([*CAT, "--complexity", "low"], "gpt-image-2 does not take --complexity", {}, id="complexity-on-2"),
    pytest.param([*CAT, "-o", "gif"], "gpt-image-2 does not make gif images", {}, id="gif-on-2"),
    pytest.param([*CAT, "--background", "transparent", "--model", "gpt-image-2-all"],
                 "gpt-image-2-all does not take --background", {}, id="background-on-flat"),
    pytest.param([*CAT, "--model", "gpt-image-2.6-flare", "-o", "gif", "--frames", "30"], "30 is outside 2-16", {},
                 id="frames-30"),
    pytest.param([*CAT, "--model", "gpt-image-2.6-flare", "-o", "gif", "--frame-ms", "105"],
                 "105 is not a multiple of 10", {}, id="frame-ms-105"),
    pytest.param(["-p", "", "-f", "cat.png"], "the prompt is empty", {}, id="prompt-empty"),
    pytest.param(["-f", "cat.png"], "no prompt: give -p TEXT", {}, id="prompt-missing"),
    pytest.param([*CAT, "--timeout", "0"], "must be above 0 and at most 86400", {}, id="timeout-0"),
    pytest.param([*CAT, "--retries", "99"], "99 is outside 0-10", {}, id="retries-99"),
    pytest.param([*CAT, "--base-url", "ftp://x"], "is not an http(s) URL", {}, id="base-url-ftp"),
    pytest.param([*CAT, "--base-url", "http://example.com/v1"], "is plain http and an HTTP proxy is set", PROXY,
                 id="http-through-proxy"),
    pytest.param([*CAT, "-q", "high", "-s", "3840x2160", "--max-cost", "0.01"], "may cost up to $0.4003", {},
                 id="max-cost"),
    pytest.param([*CAT, "--detach", "--dry-run"], "--detach cannot be combined with --dry-run", {},
                 id="detach-dry-run"),
]


@pytest.mark.parametrize("args, words, changes", BAD_INPUT)
def test_bad_input_is_refused_by_both_with_the_same_words(twin: str, api: FakeImagesAPI, inputs: Path,
                                                          args: list[str], words: str,
                                                          changes: dict[str, Optional[str]]) -> None:
    reference, run = pair(twin, *args, env=online(api, **changes))
    error = first_line(reference.stderr)
    assert error.startswith(f"{SCRIPT_NAMES['python']}: error: ") and words in error, reference.stderr.decode()
    assert (run.returncode, run.stdout) == (gi.EXIT_USAGE, b""), run.stderr.decode()
    assert first_line(run.stderr) == error
    assert api.requests == []


# --- d. what only the Python twin does ----------------------------------------------------------------

PYTHON_ONLY = [
    pytest.param(["--batch", "f.json"], ("--batch",), id="batch"),
    pytest.param([*CAT, "--out-dir", "d"], ("--out-dir",), id="out-dir"),
    pytest.param([*CAT, "--no-gallery"], ("--no-gallery",), id="no-gallery"),
    pytest.param([*CAT, "-j", "2"], ("-j", "--jobs"), id="j"),
    pytest.param([*CAT, "--jobs", "2"], ("--jobs",), id="jobs"),
    pytest.param([*CAT, "--stream"], ("--stream",), id="stream"),
    pytest.param([*CAT, "--partial-images", "2"], ("--partial-images",), id="partial-images"),
    pytest.param([*CAT, "--keep-partials"], ("--keep-partials",), id="keep-partials"),
    pytest.param([*CAT, "--gallery"], ("--gallery",), id="gallery"),
    pytest.param([*CAT, "--open"], ("--open",), id="open"),
    pytest.param([*CAT, "--events"], ("--events",), id="events"),
    pytest.param(["--doctor"], ("--doctor",), id="doctor"),
]


@pytest.mark.parametrize("args, names", PYTHON_ONLY)
def test_node_twin_refuses_what_only_the_python_twin_does(api: FakeImagesAPI, inputs: Path,
                                                          online_env: dict[str, str], args: list[str],
                                                          names: tuple[str, ...]) -> None:
    reason = skip_reason("node")
    if reason:
        pytest.skip(reason)
    run = run_twin("node", *args, env=online_env)
    assert (run.returncode, run.stdout) == (gi.EXIT_USAGE, b""), run.stderr.decode()
    error = run.stderr.decode().splitlines()[0] if run.stderr else ""
    assert error.startswith(f"{SCRIPT_NAMES['node']}: error: "), run.stderr.decode()
    assert any(name in error for name in names) and SCRIPT_NAMES["python"] in error
    assert api.requests == []


# --- e. the key -------------------------------------------------------------------------------------

def test_the_key_is_in_no_output_and_no_file(twin: str, api: FakeImagesAPI, tmp_path: Path, inputs: Path,
                                             agent_env: dict[str, str]) -> None:
    """A refused request whose answer echoes the key, and a success with the key given by -k: with
    detached workers (their logs and records), --json and --metadata."""
    api.queue(Reply(status=401, body=api_error(f"Incorrect API key provided: {TEST_KEY}", code="invalid_api_key"),
                    headers={"X-Echo": TEST_KEY}))
    refused = run_twin(twin, "-p", "cat", "-f", "refused.png", "--json", "--retries", "0", env=agent_env)
    assert refused.returncode == gi.EXIT_AUTH, refused.stderr.decode()
    assert "Incorrect API key provided: ***" in refused.stdout.decode()
    keyless = {k: v for k, v in agent_env.items() if k != "APIYI_API_KEY"}
    done = run_twin(twin, "-p", "cat", "-f", "ok.png", "--json", "--metadata", "-k", TEST_KEY, env=keyless)
    assert done.returncode == 0, done.stderr.decode()
    assert api.requests[-1].header("Authorization") == f"Bearer {TEST_KEY}"
    assert (inputs / "ok.png.json").is_file()
    for output in (refused.stdout, refused.stderr, done.stdout, done.stderr):
        assert TEST_KEY.encode() not in output
    written = [p for p in tmp_path.rglob("*") if p.is_file()]   # work, state, home and temp folders
    assert any(p.parent.name == "state" for p in written)
    assert [p for p in written if TEST_KEY.encode() in p.read_bytes() or TEST_KEY in p.name] == []


# --- f. jobs across twins ---------------------------------------------------------------------------

@pytest.fixture(params=[("python", "python"), ("python", "node"), ("node", "python"), ("node", "node")],
                ids=["python-then-python", "python-then-node", "node-then-python", "node-then-node"])
def twins_in_turn(request: pytest.FixtureRequest) -> tuple[str, str]:
    """The twin that starts a job, and the one that collects it."""
    for who in request.param:
        reason = skip_reason(who)
        if reason:
            pytest.skip(reason)
    return request.param


def job_id(stdout: bytes) -> str:
    found = JOB_LINE.fullmatch(stdout.decode())
    assert found, f"not a job line: {stdout!r}"
    return found.group(1)


def pending(job: str) -> bool:
    records = {r["id"]: r for r in gi.list_records(Path(os.environ["APIYI_STATE_DIR"]))}
    return job in records and records[job]["state"] not in gi.FINISHED_STATES


def test_a_detached_job_is_collected_by_the_other_twin(twins_in_turn: tuple[str, str], api: FakeImagesAPI,
                                                       agent_env: dict[str, str], isolated: Path) -> None:
    starter, collector = twins_in_turn
    api.queue(SLOW)
    started = run_twin(starter, "-p", "cat", "-f", "cat.png", "--detach", env=agent_env)
    assert started.returncode == 0, started.stderr.decode()
    job = job_id(started.stdout)
    assert pending(job)
    collected = run_twin(collector, "--attach", job, env=agent_env)
    assert (collected.returncode, collected.stdout) == (0, b"cat.png" + os.linesep.encode()), collected.stderr
    assert f"attached to job {job}" in collected.stderr.decode()
    assert len(api.requests) == 1 and (isolated / "cat.png").read_bytes()[:8] == PNG


def test_the_same_command_from_the_other_twin_attaches_instead_of_paying_twice(
        twins_in_turn: tuple[str, str], api: FakeImagesAPI, agent_env: dict[str, str], isolated: Path) -> None:
    starter, collector = twins_in_turn
    api.queue(SLOW)
    command = ("-p", "一只橘猫", "-f", "cat.png", "-s", "1024x1024")
    job = job_id(run_twin(starter, *command, "--detach", env=agent_env).stdout)
    assert pending(job)
    again = run_twin(collector, *command, env=agent_env)
    assert (again.returncode, again.stdout) == (0, b"cat.png" + os.linesep.encode()), again.stderr.decode()
    assert f"attached to job {job}" in again.stderr.decode()
    assert len(api.requests) == 1 and sorted(p.name for p in isolated.iterdir()) == ["cat.png"]


def test_a_job_left_by_max_wait_is_listed_and_collected_by_the_other_twin(
        twins_in_turn: tuple[str, str], api: FakeImagesAPI, agent_env: dict[str, str]) -> None:
    starter, collector = twins_in_turn
    api.queue(SLOW)
    left = run_twin(starter, "-p", "dog", "-f", "dog.png", "--max-wait", "0.5", env=agent_env)
    assert left.returncode == gi.EXIT_STILL_RUNNING, left.stderr.decode()
    job = job_id(left.stdout)
    listed = run_twin(collector, "--list-jobs", env=agent_env)
    assert listed.returncode == 0, listed.stderr.decode()
    [line] = [line for line in listed.stdout.decode().splitlines() if line.startswith(job)]
    assert line.split()[1] not in gi.FINISHED_STATES and "'dog'" in line and "dog.png" in line
    collected = run_twin(collector, "--attach", job, env=agent_env)
    assert (collected.returncode, collected.stdout) == (0, b"dog.png" + os.linesep.encode()), collected.stderr
    assert len(api.requests) == 1


def wait_until_sent(job: str, timeout_s: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        record = gi.read_record(Path(os.environ["APIYI_STATE_DIR"]) / f"{job}.json")
        if record and record.get("sent"):
            return record
        time.sleep(0.02)
    raise AssertionError(f"job {job} was never sent")


def test_a_running_job_is_cancelled_by_the_other_twin(twins_in_turn: tuple[str, str], api: FakeImagesAPI,
                                                      agent_env: dict[str, str], isolated: Path) -> None:
    """The other twin finds the worker alive (by its lock, or by its pid) and stops it; the request was
    sent, so the record says it may still be billed."""
    starter, canceller = twins_in_turn
    api.queue(dataclasses.replace(SLOW, delay=5))
    job = job_id(run_twin(starter, "-p", "cat", "-f", "cat.png", "--detach", env=agent_env).stdout)
    wait_until_sent(job)
    cancelled = run_twin(canceller, "--cancel", job, env=agent_env)
    assert (cancelled.returncode, cancelled.stdout.decode().split()) == (0, ["job", job, "cancelled"]), \
        cancelled.stderr.decode()
    record = gi.read_record(Path(os.environ["APIYI_STATE_DIR"]) / f"{job}.json")
    assert record["state"] == "cancelled" and "may still be billed" in record["error"]["message"]
    assert not (isolated / "cat.png").exists() and len(api.requests) == 1


def test_an_answer_received_but_not_saved_is_saved_by_the_other_twin(twins_in_turn: tuple[str, str],
                                                                      api: FakeImagesAPI, isolated: Path) -> None:
    """A worker that died between receiving and saving leaves its answer in the spool: the same command,
    from either twin, saves it and sends nothing."""
    starter, rescuer = twins_in_turn
    env = online(api)
    image = make_png(96, 64)
    api.queue(Reply(body=images_answer([image])))
    assert run_twin(starter, "-p", "cat", "-f", "cat.png", env=env).returncode == 0
    folder = Path(os.environ["APIYI_STATE_DIR"])
    [record] = gi.list_records(folder)
    files = gi.JobFiles(folder, record["id"])
    gone = 2 ** 22 + 17     # above the largest pid Linux gives: the worker is gone
    record.update(state="saving", result=None, exit_code=None, note=None, pid=gone, detached=True)
    files.record.write_text(json.dumps(record), encoding="utf-8")
    files.spool().write_text(json.dumps(images_answer([image])), encoding="utf-8")
    files.reported.unlink()
    (isolated / "cat.png").unlink()
    rescued = run_twin(rescuer, "-p", "cat", "-f", "cat.png", env=env)
    assert (rescued.returncode, rescued.stdout) == (0, b"cat.png" + os.linesep.encode()), rescued.stderr.decode()
    assert "saving the answer received earlier; nothing new is sent" in rescued.stderr.decode()
    assert (isolated / "cat.png").read_bytes() == image and len(api.requests) == 1
    assert not files.spool().exists() and gi.read_record(files.record)["state"] == "done"


def test_an_interrupted_wait_leaves_the_sent_job_running(twin: str, api: FakeImagesAPI, agent_env: dict[str, str],
                                                         isolated: Path) -> None:
    """Ctrl-C after sending: exit 130 with the job's id; the worker goes on, and the same command
    collects the image without a second request."""
    api.queue(dataclasses.replace(SLOW, delay=3))
    command = ("-p", "cat", "-f", "cat.png")
    waiting = subprocess.Popen([*twin_command(twin), *command], env=agent_env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    folder = Path(os.environ["APIYI_STATE_DIR"])
    deadline = time.monotonic() + 10
    while not gi.list_records(folder) and time.monotonic() < deadline:
        time.sleep(0.02)
    wait_until_sent(gi.list_records(folder)[0]["id"])
    waiting.send_signal(signal.SIGINT)
    out, err = waiting.communicate(timeout=30)
    job = job_id(out)
    assert waiting.returncode == 130 and f"interrupted (SIGINT); the request goes on as job {job}" in same_words(err)
    again = run_twin(twin, *command, env=agent_env)
    assert (again.returncode, again.stdout) == (0, b"cat.png" + os.linesep.encode()), again.stderr.decode()
    assert len(api.requests) == 1


def test_estimates_learn_from_the_runs_of_either_twin(twin: str, api: FakeImagesAPI, inputs: Path,
                                                      online_env: dict[str, str]) -> None:
    """The output tokens of earlier runs, read from the job records, replace the table's bounds."""
    ran = run_twin(twin, "-p", "cat", "-f", "cat.png", env=online_env)
    assert ran.returncode == 0, ran.stderr.decode()
    reference, run = pair(twin, "-p", "dog", "-f", "dog.png", "--dry-run", "--json", env=online_env)
    expected = json.loads(same_request(reference.stdout))
    assert expected["estimate"]["source"] == "1 earlier run"
    assert json.loads(same_request(run.stdout)) == expected


# --- g. the model table -----------------------------------------------------------------------------

def test_the_model_table_is_the_same(twin: str, offline_env: dict[str, str]) -> None:
    reference, run = pair(twin, "--list-models", "--json", env=offline_env)
    expected = json.loads(same_words(reference.stdout))
    assert expected["default"] == "gpt-image-2" and "gpt-image-2.6-flare" in [m["name"] for m in expected["models"]]
    assert (run.returncode, json.loads(same_words(run.stdout))) == (0, expected)
    reference, run = pair(twin, "--list-models", env=offline_env)
    assert (run.returncode, same_words(run.stdout)) == (0, same_words(reference.stdout))


# --- h. the server's answers ------------------------------------------------------------------------

ANSWERS = [
    pytest.param(Reply(status=401, body=api_error("Incorrect API key provided", code="invalid_api_key")),
                 gi.EXIT_AUTH, "account", id="401"),
    pytest.param(Reply(status=400, body=api_error("Invalid size", param="size")), gi.EXIT_REFUSED, "bad_request",
                 id="400"),
    pytest.param(Reply(status=400, body=api_error("Your request was rejected by the safety system.",
                                                  code="moderation_blocked")), gi.EXIT_REFUSED, "safety_refusal",
                 id="content-policy"),
    pytest.param(Reply(status=500, body=api_error("boom", type_="server_error")), gi.EXIT_UNAVAILABLE, "service",
                 id="500"),
    pytest.param(Reply(body={"created": 1_800_000_000, "data": []}), gi.EXIT_UNAVAILABLE, "silent_refusal",
                 id="no-image"),
]


@pytest.mark.parametrize("reply, code, kind", ANSWERS)
def test_the_servers_answers_end_the_same_way(twin: str, api: FakeImagesAPI, online_env: dict[str, str],
                                              reply: Reply, code: int, kind: str) -> None:
    reference, run = pair(twin, "-p", "cat", "-f", "cat.png", "--json", "--retries", "0", env=online_env,
                          before=lambda: api.queue(reply))
    expected = steady(json.loads(same_words(reference.stdout)))
    assert (reference.returncode, expected["ok"], expected["error"]["kind"]) == (code, False, kind)
    assert expected["error"]["exit_code"] == code
    assert run.returncode == code, run.stderr.decode()
    assert steady(json.loads(same_words(run.stdout))) == expected
    errors = [[line for line in same_words(r.stderr).splitlines() if ": error: " in line] for r in (reference, run)]
    assert errors[0] == errors[1] and len(errors[0]) == 1
    assert len(api.requests) == (1 if twin == "python" else 2)


# Answers cut or odd at the transport: the same exit code and words from both (a review found the twin
# crashing on each of these, or throwing a paid answer away).
CUT_ANSWERS = [
    pytest.param(Reply(body=images_answer([make_png(300, 300) + b"\1" * 20_000]), truncate=5000), gi.EXIT_MAYBE_BILLED,
                 "possibly_billed", id="closed-mid-body"),
    pytest.param(Reply(status=500, body=b"<html>" + b"x" * 200_000), gi.EXIT_UNAVAILABLE, "service",
                 id="500-with-a-long-body"),
]
ANSWERS += CUT_ANSWERS


def saved_answers(api: FakeImagesAPI, image: bytes) -> dict[str, list[Reply]]:
    """Answers a paid image must survive, by name: the replies to queue (an image URL is fetched from the
    fake too)."""
    url = f"{api.url}/files/cat.png"
    return {
        "nan-in-usage": [Reply(body=json.dumps(images_answer([image])).replace('"total_tokens": 4210',
                                                                                '"total_tokens": NaN').encode())],
        "url-over-64-kib": [Reply(body={"data": [{"url": url}]}), Reply(body=image)],
        "not-utf-8-text": [Reply(body=json.dumps(images_answer([image], revised_prompt="cat")).encode().replace(
            b'"revised_prompt": "cat"', b'"revised_prompt": "c\xffat"'))],
        "url-redirected": [Reply(body={"data": [{"url": url}]}), Reply(status=302, headers={"Location": url + "?2"}),
                           Reply(body=image)],
    }


@pytest.mark.parametrize("name", ["nan-in-usage", "url-over-64-kib", "url-redirected", "not-utf-8-text"])
def test_a_paid_image_is_saved_whole_by_both(twin: str, api: FakeImagesAPI, online_env: dict[str, str],
                                             isolated: Path, name: str) -> None:
    image = make_image("png", 300, 300) + b"\0" * 70_000     # more than an error body is kept
    for reply in saved_answers(api, image)[name]:
        api.queue(reply)
    done = run_twin(twin, "-p", "cat", "-f", "cat.png", "--retries", "0", env=online_env)
    assert (done.returncode, done.stdout) == (0, b"cat.png" + os.linesep.encode()), done.stderr.decode()
    assert (isolated / "cat.png").read_bytes() == image


def test_a_lying_mask_is_checked_without_a_crash(twin: str, api: FakeImagesAPI, inputs: Path,
                                                offline_env: dict[str, str]) -> None:
    reference, run = pair(twin, "-p", "cat", "-i", "in.png", "-m", "liar-mask.png", "-f", "m.png", "--dry-run",
                          env=offline_env)
    assert (run.returncode, same_request(run.stdout)) == (reference.returncode, same_request(reference.stdout))
    assert first_line(run.stderr) == first_line(reference.stderr) and b"a bug" not in run.stderr


def test_node_debug_that_would_print_the_key_is_refused(api: FakeImagesAPI, online_env: dict[str, str]) -> None:
    if skip_reason("node"):
        pytest.skip(skip_reason("node"))
    done = run_twin("node", "-p", "cat", "-f", "cat.png", env={**online_env, "NODE_DEBUG": "net,http"})
    assert done.returncode == gi.EXIT_USAGE and api.requests == []
    assert b"NODE_DEBUG=net,http would print the API key" in done.stderr and TEST_KEY.encode() not in done.stderr + done.stdout


def test_identical_commands_started_together_pay_once(twin: str, api: FakeImagesAPI, agent_env: dict[str, str],
                                                      isolated: Path) -> None:
    """Finding or starting a job is one locked step in each twin: three at once make one request."""
    api.queue(SLOW)
    started = [subprocess.Popen([*twin_command(twin), "-p", "cat", "-f", "cat.png"], env=agent_env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(3)]
    outputs = [process.communicate(timeout=60) for process in started]
    assert [process.returncode for process in started] == [0, 0, 0], [err.decode() for _, err in outputs]
    assert len(api.requests) == 1 and sorted(p.name for p in isolated.iterdir()) == ["cat.png"]


def test_ctrl_c_ends_a_job_running_inside_the_command_at_once(twin: str, api: FakeImagesAPI,
                                                             agent_env: dict[str, str], isolated: Path) -> None:
    """With no worker process the job is the command's: interrupted, it ends now and says what is lost."""
    api.queue(dataclasses.replace(SLOW, delay=5))
    waiting = subprocess.Popen([*twin_command(twin), "-p", "cat", "-f", "cat.png"],
                               env={**agent_env, "APIYI_WORKER": "inprocess"}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while not api.requests and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)
    interrupted = time.monotonic()
    waiting.send_signal(signal.SIGINT)
    out, err = waiting.communicate(timeout=30)
    assert waiting.returncode == 130 and time.monotonic() - interrupted < 2
    assert "interrupted after the request was sent: it may be billed" in err.decode()
    assert not (isolated / "cat.png").exists()


@pytest.mark.parametrize("stdin", [b"ab\xe4\xb8", b"a\xff", b"\xed\xa0\x80", b"\xf0\x9f\x98\x80ok\xc0\xaf"],
                         ids=["cut-short", "stray-byte", "a-surrogate", "overlong"])
def test_a_prompt_on_stdin_that_is_not_utf8_is_placed_alike(twin: str, offline_env: dict[str, str],
                                                            stdin: bytes) -> None:
    """The byte the error names is where the bad sequence starts, as Python's decoder says it."""
    done = {who: run_twin(who, "-p", "-", "-f", "x.png", "--dry-run", env=offline_env, stdin=stdin)
            for who in {"python", twin}}
    assert {who: (d.returncode, first_line(d.stderr)) for who, d in done.items()} == \
        {who: (gi.EXIT_USAGE, first_line(done["python"].stderr)) for who in done}
    assert "is not UTF-8 (byte " in first_line(done["python"].stderr)
