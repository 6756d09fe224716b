"""Bad input: one clear error line, exit 2, nothing sent. Limits are tested on both sides."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import generate_image as gi
from conftest import CliRunner, Run
from fake_api import FakeImagesAPI, make_png


@pytest.fixture
def files(picture, isolated: Path) -> Path:
    """The input files the tables below refer to, by name."""
    picture("in.png", "png", 256, 256)
    picture("mask.png", "png", 256, 256, alpha=True)
    picture("mask_rgb.png", "png", 256, 256)
    picture("mask_small.png", "png", 128, 128, alpha=True)
    picture("mask.jpg", "jpeg", 256, 256)
    (isolated / "folder").mkdir()
    (isolated / "anim.gif").write_bytes(b"GIF89a" + b"\x00" * 64)
    (isolated / "empty.png").write_bytes(b"")
    (isolated / "blocker").write_text("a file where a folder should be")
    for i in range(17):
        picture(f"many/{i}.png", "png", 32, 32)
    return isolated


def many(count: int) -> list[str]:
    return ["-i", *[f"many/{i}.png" for i in range(count)]]


INVALID = [
    pytest.param([], "no prompt: give -p TEXT, or --batch FILE", id="no-prompt"),
    pytest.param(["-p", ""], "the prompt is empty", id="empty-prompt"),
    pytest.param(["-p", " \n\t"], "the prompt is empty", id="blank-prompt"),
    pytest.param(["-p", "x" * 32_001], "the prompt has 32,001 characters; the limit is 32,000", id="prompt-too-long"),
    pytest.param(["-p", "cat", "--bogus"], "unrecognized option: --bogus", id="unknown-flag"),
    pytest.param(["-p", "cat", "-s", "big"], "--size 'big' is not a size", id="size-garbage"),
    pytest.param(["-p", "cat", "-s", "1000x1000"], "must be multiples of 16; nearest valid size is 1008x1008",
                 id="size-not-16"),
    pytest.param(["-p", "cat", "-s", "3856x2160"], "the longest edge must be at most 3840", id="size-edge"),
    pytest.param(["-p", "cat", "-s", "3088x1024"], "the aspect ratio must be at most 3:1", id="size-aspect"),
    pytest.param(["-p", "cat", "-s", "1024x624"], "between 655,360 and 8,294,400 (got 638,976)", id="size-few-pixels"),
    pytest.param(["-p", "cat", "-s", "2896x2880"], "(got 8,340,480); nearest valid size is 2880x2880",
                 id="size-many-pixels"),
    pytest.param(["-p", "cat", "-s", "6000x2000"], "nearest valid size is 3840x1280", id="size-scaled-keeps-3:1"),
    pytest.param(["-p", "cat", "-s", "8000x4000"], "nearest valid size is 3840x1920", id="size-scaled-keeps-2:1"),
    pytest.param(["-p", "cat", "-s", "0x0"], "--size 0x0: width and height must be above 0; e.g. 1024x1024",
                 id="size-zero"),
    pytest.param(["-p", "cat", "-s", "4:1"], "at most 3:1; nearest valid ratio is 3:1", id="ratio-wide"),
    pytest.param(["-p", "cat", "-s", "1:4"], "nearest valid ratio is 1:3", id="ratio-tall"),
    pytest.param(["-p", "cat", "-s", "0:1"], "both sides of a ratio must be above 0", id="ratio-zero"),
    pytest.param(["-p", "cat", "-r", "2K"], "--resolution needs an aspect ratio size", id="resolution-alone"),
    pytest.param(["-p", "cat", "-s", "auto", "-r", "2K"], "not auto", id="resolution-auto"),
    pytest.param(["-p", "cat", "-s", "1024x1024", "-r", "2K"], "applies to a ratio like 16:9, not to 1024x1024",
                 id="resolution-wxh"),
    pytest.param(["-p", "cat", "-s", "16:9", "-r", "8K"], "'8K' is not one of 1K, 2K, 4K", id="resolution-8k"),
    pytest.param(["-p", "cat", "-q", "ultra"], "'ultra' is not one of auto, low, medium, high", id="quality"),
    pytest.param(["-p", "cat", "-o", "gif"], "gpt-image-2 does not make gif images (it makes png, jpeg, webp)", id="format"),
    pytest.param(["-p", "cat", "-c", "50"], "--output-compression applies to jpeg or webp, but the output format "
                 "is png", id="compression-default-png"),
    pytest.param(["-p", "cat", "-f", "a.png", "-c", "50"], "output format is png", id="compression-png-file"),
    pytest.param(["-p", "cat", "-o", "jpeg", "-c", "101"], "101 is outside 0-100", id="compression-101"),
    pytest.param(["-p", "cat", "-o", "jpeg", "-c", "-1"], "-1 is outside 0-100", id="compression-negative"),
    pytest.param(["-p", "cat", "-n", "0"], "0 is outside 1-10", id="n-0"),
    pytest.param(["-p", "cat", "-n", "11"], "11 is outside 1-10", id="n-11"),
    pytest.param(["-p", "cat", "-n", "two"], "'two' is not a whole number", id="n-word"),
    pytest.param(["-p", "cat", "--background", "transparent", "-o", "jpeg"], "needs png or webp",
                 id="transparent-jpeg"),
    pytest.param(["-p", "cat", "--background", "transparent", "-f", "x.jpg"], "needs png or webp",
                 id="transparent-jpg-file"),
    pytest.param(["-p", "cat", "--moderation", "strict"], "'strict' is not one of auto, low", id="moderation"),
    pytest.param(["-p", "cat", "--timeout", "0"], "0 must be above 0", id="timeout-0"),
    pytest.param(["-p", "cat", "--timeout", "soon"], "'soon' is not a number of seconds", id="timeout-word"),
    pytest.param(["-p", "cat", "--retries", "11"], "11 is outside 0-10", id="retries-11"),
    pytest.param(["-p", "cat", "-m", "mask.png"], "--mask needs an input image", id="mask-alone"),
    pytest.param(["-p", "cat", "-i", "in.png", "--moderation", "low"], "text-to-image only", id="moderation-edit"),
    pytest.param(["-p", "cat", "-i", "missing.png"], "input image missing.png: not found", id="input-missing"),
    pytest.param(["-p", "cat", "-i", "folder"], "input image folder: is a folder", id="input-folder"),
    pytest.param(["-p", "cat", "-i", "anim.gif"], "anim.gif is not a PNG, JPEG or WebP image", id="input-gif"),
    pytest.param(["-p", "cat", "-i", "empty.png"], "empty.png is not a PNG, JPEG or WebP image", id="input-empty"),
    pytest.param(["-p", "cat", *many(17)], "17 input images given; at most 16", id="inputs-17"),
    pytest.param(["-p", "cat", "-i", "in.png", "-m", "mask.jpg"], "is JPEG; a mask must be a PNG", id="mask-jpeg"),
    pytest.param(["-p", "cat", "-i", "in.png", "-m", "mask_rgb.png"], "has no alpha channel", id="mask-no-alpha"),
    pytest.param(["-p", "cat", "-i", "in.png", "-m", "mask_small.png"],
                 "is 128x128 but the first input image is 256x256", id="mask-size"),
    pytest.param(["-p", "cat", "--base-url", "ftp://example.com/v1"], "is not an http(s) URL", id="base-url-ftp"),
    pytest.param(["-p", "cat", "--base-url", "http://127.0.0.1:9/v1/images/generations"],
                 "give the base only", id="base-url-endpoint"),
    pytest.param(["-p", "cat", "-f", "blocker/cat.png"], "the output folder blocker cannot be written",
                 id="output-folder"),
    pytest.param(["-p", "cat", "-f", "out/"], "-f out/ names a folder", id="output-is-folder"),
    pytest.param(["-p", "cat", "-j", "2"], "--jobs applies to --batch only", id="jobs-without-batch"),
    pytest.param(["-p", "cat", "--out-dir", "o"], "--out-dir applies to --batch only", id="out-dir-without-batch"),
    pytest.param(["--batch", "b.json", "-p", "cat"], "-p cannot be combined with --batch", id="batch-and-prompt"),
    pytest.param(["--batch", "b.json", "-f", "x.png"], "-f cannot be combined with --batch", id="batch-and-file"),
    pytest.param(["--batch", "b.json", "-j", "17"], "17 is outside 1-16", id="jobs-17"),
    pytest.param(["--batch", "none.json"], "--batch none.json: No such file", id="batch-missing"),
]


@pytest.mark.parametrize("args, message", INVALID)
def test_invalid_input_is_refused_before_sending(online: CliRunner, api: FakeImagesAPI, files: Path,
                                                 args: list[str], message: str) -> None:
    run = online(*args)
    assert (run.code, run.out) == (gi.EXIT_USAGE, "")
    first_line = run.err.splitlines()[0]
    assert first_line.startswith("generate_image.py: error: ")
    assert message in first_line
    assert api.requests == []
    assert not list(files.glob("*.png.json"))


@pytest.mark.parametrize("args, message", INVALID[:6] + INVALID[40:44])
def test_invalid_input_with_json_prints_one_error_object(online: CliRunner, api: FakeImagesAPI, files: Path,
                                                         args: list[str], message: str) -> None:
    run = online(*args, "--json")
    assert run.code == gi.EXIT_USAGE
    document = run.json()
    assert document["ok"] is False
    assert document["error"]["kind"] == "usage"
    assert document["error"]["exit_code"] == 2
    assert message in document["error"]["message"]
    assert api.requests == []


VALID_EDGES = [
    pytest.param(["-p", "x" * 32_000], id="prompt-32000"),
    pytest.param(["-p", "cat", "-s", "3840x2160"], id="size-max-edge-and-pixels"),
    pytest.param(["-p", "cat", "-s", "2880x2880"], id="size-max-pixels-square"),
    pytest.param(["-p", "cat", "-s", "3072x1024"], id="size-aspect-3"),
    pytest.param(["-p", "cat", "-s", "1024x640"], id="size-min-pixels"),
    pytest.param(["-p", "cat", "-s", "1536X1024"], id="size-capital-x"),
    pytest.param(["-p", "cat", "-s", " 1536 x 1024 "], id="size-spaces"),
    pytest.param(["-p", "cat", "-s", "AUTO"], id="size-auto"),
    pytest.param(["-p", "cat", "-s", "3:1"], id="ratio-3-1"),
    pytest.param(["-p", "cat", "-s", "16：9", "-r", "2k"], id="ratio-fullwidth-colon"),
    pytest.param(["-p", "cat", "-n", "1"], id="n-1"),
    pytest.param(["-p", "cat", "-n", "10"], id="n-10"),
    pytest.param(["-p", "cat", "-o", "jpeg", "-c", "0"], id="compression-0"),
    pytest.param(["-p", "cat", "-o", "webp", "-c", "100"], id="compression-100"),
    pytest.param(["-p", "cat", "-f", "a.jpg", "-c", "80"], id="compression-jpg-file"),
    pytest.param(["-p", "cat", "--retries", "0"], id="retries-0"),
    pytest.param(["-p", "cat", "--retries", "10"], id="retries-10"),
    pytest.param(["-p", "cat", "--background", "transparent", "-o", "webp"], id="transparent-webp"),
    pytest.param(["-p", "cat", *many(16)], id="inputs-16"),
    pytest.param(["-p", "cat", "-i", "in.png", "-m", "mask.png"], id="mask"),
    pytest.param(["-p", "cat", "-f", "new/deeper/cat.png"], id="output-folder-to-create"),
]


@pytest.mark.parametrize("args", VALID_EDGES)
def test_values_at_the_limits_are_accepted(cli: CliRunner, files: Path, args: list[str]) -> None:
    run = cli(*args, "--dry-run")
    assert run.code == gi.EXIT_OK, run.err
    assert run.out.startswith("POST https://api.apiyi.com/v1/images/")


def test_dry_run_creates_no_folder(cli: CliRunner, isolated: Path) -> None:
    assert cli("-p", "cat", "-f", "new/deeper/cat.png", "--dry-run").code == 0
    assert not (isolated / "new").exists()


@pytest.mark.parametrize("limit, name, accepted", [
    (gi.MAX_INPUT_BYTES - 1, "-i", True), (gi.MAX_INPUT_BYTES, "-i", False),
    (gi.MAX_MASK_BYTES - 1, "-m", True), (gi.MAX_MASK_BYTES, "-m", False),
], ids=["input-under-50MiB", "input-50MiB", "mask-under-4MiB", "mask-4MiB"])
def test_file_size_limits(cli: CliRunner, picture, isolated: Path, limit: int, name: str, accepted: bool) -> None:
    picture("in.png", "png", 1024, 1024)
    big = isolated / "big.png"
    big.write_bytes(make_png(1024, 1024, alpha=True))
    with open(big, "r+b") as handle:  # a sparse tail: the header stays a valid PNG
        handle.truncate(limit)
    args = ["-i", "big.png"] if name == "-i" else ["-i", "in.png", "-m", "big.png"]
    run = cli("-p", "cat", *args, "--dry-run")
    assert run.code == (gi.EXIT_OK if accepted else gi.EXIT_USAGE)
    if not accepted:
        assert f"it must be under {limit // 1048576} MiB" in run.err


def test_missing_key_exits_3_and_sends_nothing(cli: CliRunner, api: FakeImagesAPI) -> None:
    run = cli("-p", "cat", "--base-url", api.url)
    assert (run.code, run.out) == (gi.EXIT_AUTH, "")
    assert run.err == ("generate_image.py: error: no API key: set APIYI_API_KEY or pass -k\n"
                       "hint: get a key at https://api.apiyi.com (console -> API keys)\n")
    assert api.requests == []


def test_key_that_cannot_go_in_a_header_exits_3(cli: CliRunner, api: FakeImagesAPI) -> None:
    run = cli("-p", "cat", "--base-url", api.url, "-k", "sk-two words")
    assert run.code == gi.EXIT_AUTH
    assert "contains spaces" in run.err
    assert "two words" not in run.err
    assert api.requests == []


@pytest.mark.parametrize("quoted", ['"sk-quoted-key-1234"', "'sk-quoted-key-1234'"])
def test_quotes_around_the_key_are_removed_with_a_warning(cli: CliRunner, api: FakeImagesAPI,
                                                          monkeypatch: pytest.MonkeyPatch, quoted: str) -> None:
    monkeypatch.setenv("APIYI_API_KEY", quoted)
    run = cli("-p", "cat", "--base-url", api.url, "-f", "cat.png")
    assert run.code == 0
    assert api.requests[0].header("Authorization") == "Bearer sk-quoted-key-1234"
    assert "warning: the API key was wrapped in quotes; they were removed" in run.err
    assert "sk-quoted-key-1234" not in run.err


def test_certificate_failure_gets_a_hint() -> None:
    assert "Install Certificates.command" in gi.connect_hint(
        "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get local issuer certificate")
    assert gi.connect_hint("Connection refused") == "check the network, the proxy settings and --base-url"


def test_usage_errors_come_before_key_errors(cli: CliRunner) -> None:
    assert cli("-p", "cat", "-s", "1x1").code == gi.EXIT_USAGE


@pytest.mark.parametrize("size, resolution, expected", [
    ("1:1", None, "1024x1024"), ("1:1", "2K", "2048x2048"), ("1:1", "4K", "2880x2880"),
    ("16:9", "1K", "1088x608"), ("16:9", "2K", "2048x1152"), ("16:9", "4K", "3840x2160"),
    ("9:16", "4K", "2160x3840"), ("3:2", "1K", "1024x688"), ("3:1", "1K", "1408x480"),
    ("1:3", "4K", "1280x3840"), ("4:3", "4K", "3312x2496"),
])
def test_ratio_and_resolution_map_to_a_valid_size(cli: CliRunner, size: str, resolution: str,
                                                  expected: str) -> None:
    run = cli("-p", "cat", "-s", size, *(["-r", resolution] if resolution else []), "--dry-run", "--json")
    assert run.code == 0
    assert run.json()["request"]["json"]["size"] == expected
    assert f"size {size} at {resolution or '1K'} -> {expected}" in run.err
    width, height = map(int, expected.split("x"))
    assert gi.size_rule_violations(width, height) == []


@pytest.mark.parametrize("rw, rh", [(a, b) for a in range(1, 22) for b in range(1, 22) if max(a, b) <= 3 * min(a, b)])
def test_every_ratio_maps_to_a_size_the_rules_accept(rw: int, rh: int) -> None:
    for resolution in gi.RESOLUTION_LONG_EDGES:
        width, height = gi.size_for_ratio(rw, rh, resolution)
        assert gi.size_rule_violations(width, height) == []
        assert (width >= height) == (rw >= rh) or rw == rh


def test_nearest_valid_size_is_itself_valid() -> None:
    for width, height in [(999, 1), (1, 999), (5000, 5000), (16, 16), (4000, 1000), (1000, 1000)]:
        assert gi.size_rule_violations(*gi.nearest_valid_size(width, height)) == []


def test_stdin_prompt_drops_one_newline_only(online: CliRunner, api: FakeImagesAPI) -> None:
    assert online("-p", "-", "-f", "a.png", stdin="第一行\n  second line  \n\n".encode()).code == 0
    assert online("-p", "-", "-f", "b.png", stdin=b"windows line\r\n").code == 0
    assert [r.json()["prompt"] for r in api.requests] == ["第一行\n  second line  \n", "windows line"]


@pytest.mark.parametrize("stdin, message", [
    (b"\xff\xfe not utf-8", "not UTF-8"), (b"\n", "the prompt is empty"),
], ids=["not-utf8", "only-newline"])
def test_bad_stdin_prompt(online: CliRunner, api: FakeImagesAPI, stdin: bytes, message: str) -> None:
    run = online("-p", "-", stdin=stdin)
    assert run.code == gi.EXIT_USAGE
    assert message in run.err
    assert api.requests == []


def test_help_documents_every_exit_code(cli: CliRunner) -> None:
    run = cli("--help")
    assert run.code == 0
    for code in (gi.EXIT_OK, gi.EXIT_BUG, gi.EXIT_USAGE, gi.EXIT_AUTH, gi.EXIT_REFUSED, gi.EXIT_UNAVAILABLE,
                 gi.EXIT_MAYBE_BILLED, gi.EXIT_FALLBACK, gi.EXIT_BATCH_PARTIAL, gi.EXIT_STILL_RUNNING,
                 *gi.SIGNAL_EXITS.values()):
        assert f"\n  {code:<4} " in run.out


def test_version(cli: CliRunner) -> None:
    assert cli("--version") == Run(0, f"generate_image.py {gi.VERSION}\n", "")


def test_plain_http_base_url_that_is_not_loopback_warns(cli: CliRunner) -> None:
    run = cli("-p", "cat", "--base-url", "http://gateway.example/v1", "--dry-run")
    assert run.code == 0
    assert "warning: gateway.example is plain http: the API key travels unencrypted" in run.err
    assert cli("-p", "cat", "--base-url", "http://localhost:8/v1", "--dry-run").err == ""


def test_dry_run_shows_request_without_key(cli: CliRunner, monkeypatch: pytest.MonkeyPatch, isolated: Path) -> None:
    monkeypatch.setenv("APIYI_API_KEY", "sk-test-NOT-A-REAL-KEY-0123456789abcdef")
    run = cli("-p", "橘猫", "-f", "cat.jpg", "-s", "1536x1024", "-q", "high", "-c", "80", "--dry-run")
    assert run.code == 0
    head, body, outputs = run.out.split("\n\n")
    assert head.splitlines()[:2] == ["POST https://api.apiyi.com/v1/images/generations",
                                     "Authorization: Bearer ***"]
    assert json.loads(body) == {"model": "gpt-image-2", "prompt": "橘猫", "size": "1536x1024", "quality": "high",
                                "output_format": "jpeg", "output_compression": 80}
    assert outputs == "output: cat.jpg\nestimated cost $0.1647 (from the token tables)\n"   # 5488 tokens x $30/M
    assert not (isolated / "cat.jpg").exists()


def test_dry_run_of_an_edit_lists_parts(cli: CliRunner, picture) -> None:
    picture("a.png", "png", 1024, 1024)
    picture("b.jpg", "jpeg", 640, 1024)
    picture("m.png", "png", 1024, 1024, alpha=True)
    run = cli("-p", "fuse", "-i", "a.png", "-i", "b.jpg", "-m", "m.png", "-f", "out.png", "--dry-run")
    assert run.code == 0, run.err
    lines = run.out.splitlines()
    assert lines[0] == "POST https://api.apiyi.com/v1/images/edits"
    assert "Authorization: Bearer <no key: set APIYI_API_KEY>" in lines
    assert [l for l in lines if l.startswith(("field", "file"))] == [
        "field model = gpt-image-2", "field prompt = fuse", "field output_format = png",
        f"file image[]: a.png (image/png, {os.path.getsize('a.png'):,} bytes, 1024x1024)",
        f"file image[]: b.jpg (image/jpeg, {os.path.getsize('b.jpg'):,} bytes, 640x1024)",
        f"file mask: m.png (image/png, {os.path.getsize('m.png'):,} bytes, 1024x1024)"]
