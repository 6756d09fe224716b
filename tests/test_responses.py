"""What the answer becomes: files on disk, stdout, stderr, --json, --metadata, exit codes."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest

import generate_image as gi
from conftest import TEST_KEY, CliRunner
from fake_api import FakeImagesAPI, Recorded, Reply, images_answer, make_image, make_png


def test_generation_writes_the_served_image_and_prints_only_its_path(online: CliRunner, api: FakeImagesAPI,
                                                                     isolated: Path) -> None:
    image = make_png(1536, 1024)
    api.queue(Reply(body=images_answer([image], revised_prompt=None), headers={"x-request-id": "req_42"}))
    run = online("-p", "cat", "-f", "pics/cat.png", "-s", "1536x1024")
    assert run.code == 0
    assert run.out == "pics/cat.png\n"
    assert (isolated / "pics" / "cat.png").read_bytes() == image
    assert "Generating 1 image with gpt-image-2 (1536x1024, png): usually 120-150 s" in run.err
    assert f"saved pics/cat.png (1536x1024, png, {len(image) / 1024:,.0f} KB)" in run.err
    assert "tokens: 50 input, 4160 output, 4210 total" in run.err
    assert "warning" not in run.err


def test_quiet_keeps_stdout_and_silences_progress(online: CliRunner) -> None:
    run = online("-p", "cat", "-f", "cat.png", "--quiet")
    assert (run.code, run.out, run.err) == (0, "cat.png\n", "")


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_each_format_is_decoded_and_measured(online: CliRunner, api: FakeImagesAPI, isolated: Path,
                                             fmt: str) -> None:
    image = make_image(fmt, 1024, 1536)
    api.queue(Reply(body=images_answer([image])))
    run = online("-p", "cat", "-o", fmt, "-s", "1024x1536", "--json")
    assert run.code == 0, run.err
    [saved] = run.json()["files"]
    assert (saved["format"], saved["width"], saved["height"], saved["bytes"]) == (fmt, 1024, 1536, len(image))
    assert Path(saved["path"]).suffix == gi.FORMAT_EXTENSIONS[fmt]
    assert (isolated / saved["path"]).read_bytes() == image


def test_data_url_prefix_and_escaped_slashes_are_tolerated(online: CliRunner, api: FakeImagesAPI) -> None:
    image = make_png(1024, 1024)
    encoded = base64.b64encode(image).decode()
    api.queue(Reply(body=images_answer([image], prefix="data:image/png;base64,")),
              Reply(body=b'{"created": 1, "data": [{"b64_json": "' + encoded.replace("/", "\\/").encode() + b'"}]}',
                    headers={"Content-Type": "application/json"}))
    assert online("-p", "a", "-f", "a.png").code == 0
    assert online("-p", "b", "-f", "b.png").code == 0
    assert Path("a.png").read_bytes() == image == Path("b.png").read_bytes()


def test_url_only_item_is_downloaded_without_the_key(online: CliRunner, api: FakeImagesAPI) -> None:
    image = make_png(1024, 1024)
    api.queue(Reply(body={"created": 1, "data": [{"url": api.url + "/files/img.png"}]}), Reply(body=image))
    run = online("-p", "cat", "-f", "cat.png")
    assert run.code == 0, run.err
    assert Path("cat.png").read_bytes() == image
    post, get = api.requests
    assert (get.method, get.path) == ("GET", "/v1/files/img.png")
    assert get.header("Authorization") is None


def test_n_images_are_numbered(online: CliRunner, isolated: Path) -> None:
    run = online("-p", "cat", "-f", "cat.png", "-n", "3")
    assert run.code == 0
    assert run.out == "cat-1.png\ncat-2.png\ncat-3.png\n"
    assert sorted(p.name for p in isolated.iterdir()) == ["cat-1.png", "cat-2.png", "cat-3.png"]


def test_existing_file_is_never_overwritten_by_default(online: CliRunner, isolated: Path) -> None:
    (isolated / "cat.png").write_bytes(b"precious")
    (isolated / "cat-2.png").write_bytes(b"also precious")
    run = online("-p", "cat", "-f", "cat.png")
    assert run.code == 0
    assert run.out == "cat-3.png\n"
    assert (isolated / "cat.png").read_bytes() == b"precious"
    assert (isolated / "cat-2.png").read_bytes() == b"also precious"
    assert "warning: cat.png exists: saved as cat-3.png (--overwrite replaces it)" in run.err


def test_overwrite_replaces_the_file(online: CliRunner, isolated: Path) -> None:
    (isolated / "cat.png").write_bytes(b"old")
    run = online("-p", "cat", "-f", "cat.png", "--overwrite")
    assert (run.code, run.out) == (0, "cat.png\n")
    assert (isolated / "cat.png").read_bytes().startswith(b"\x89PNG")


def test_format_flag_that_contradicts_the_extension_renames_the_file(online: CliRunner, api: FakeImagesAPI,
                                                                     isolated: Path) -> None:
    run = online("-p", "cat", "-f", "cat.png", "-o", "jpeg")
    assert (run.code, run.out) == (0, "cat.jpg\n")
    assert api.requests[0].json()["output_format"] == "jpeg"
    assert "warning: -o jpeg does not match cat.png: the file will be cat.jpg" in run.err
    assert (isolated / "cat.jpg").read_bytes()[:3] == b"\xff\xd8\xff"
    assert not (isolated / "cat.png").exists()


def test_server_answering_another_format_is_saved_under_its_real_extension(online: CliRunner,
                                                                           api: FakeImagesAPI) -> None:
    api.queue(Reply(body=images_answer([make_image("jpeg", 1024, 1024)])))
    run = online("-p", "cat", "-f", "cat.png")
    assert (run.code, run.out) == (0, "cat.jpg\n")
    assert "warning: expected png but the image is jpeg: saved as cat.jpg" in run.err


def test_size_differing_from_an_explicit_request_warns(online: CliRunner, api: FakeImagesAPI) -> None:
    api.queue(Reply(body=images_answer([make_png(1024, 1024)])), Reply(body=images_answer([make_png(1024, 1024)])))
    run = online("-p", "cat", "-f", "a.png", "-s", "1536x1024")
    assert run.code == 0
    assert "warning: asked for size 1536x1024 but a.png has 1024x1024" in run.err
    assert "warning" not in online("-p", "cat", "-f", "b.png").err


def test_default_file_name_has_time_slug_and_random_part(online: CliRunner) -> None:
    english = online("-p", "A cute orange cat, playing on the grass!", "--quiet").out.strip()
    chinese = online("-p", "一只可爱的橘猫", "-o", "webp", "--quiet").out.strip()
    assert re.fullmatch(r"\d{8}-\d{6}-a-cute-orange-cat-playing-on-[0-9a-f]{6}\.png", english)
    assert re.fullmatch(r"\d{8}-\d{6}-image-[0-9a-f]{6}\.webp", chinese)
    assert Path(english).is_file() and Path(chinese).is_file()


BAD_ANSWERS = [
    pytest.param(Reply(body=b"<html>oops</html>"), "the answer is not JSON: oops", id="not-json"),
    pytest.param(Reply(body=[1, 2]), "not a JSON object", id="json-list"),
    pytest.param(Reply(body={"created": 1}), "the answer holds no image: the service declined without saying why "
                 "(a silent refusal)", id="no-data"),
    pytest.param(Reply(body={"created": 1, "data": []}), "(a silent refusal)", id="empty-data"),
    pytest.param(Reply(body={"created": 1, "data": [{"b64_json": ""}]}), "b64_json is blank", id="empty-b64"),
    pytest.param(Reply(body={"created": 1, "data": [{}]}), "(a silent refusal)", id="empty-item"),
    pytest.param(Reply(body={"created": 1, "data": [{}, {"b64_json": ""}]}), "no b64_json or url",
                 id="one-image-blank"),
    pytest.param(Reply(body={"error": {"message": "upstream busy"}}), "holds an error instead of images: upstream busy",
                 id="200-with-error"),
]


@pytest.mark.parametrize("reply, message", BAD_ANSWERS)
def test_unusable_answer_exits_5_and_leaves_no_file(online: CliRunner, api: FakeImagesAPI, isolated: Path,
                                                    reply: Reply, message: str) -> None:
    api.queue(reply)
    run = online("-p", "cat", "-f", "cat.png")
    assert (run.code, run.out) == (gi.EXIT_UNAVAILABLE, "")
    assert message in run.err
    assert list(isolated.iterdir()) == []
    assert len(api.requests) == 1


def test_fewer_images_than_asked_saves_them_and_exits_5(online: CliRunner, api: FakeImagesAPI) -> None:
    api.queue(Reply(body=images_answer([make_png(1024, 1024), make_png(1024, 1024)])))
    run = online("-p", "cat", "-f", "cat.png", "-n", "3")
    assert (run.code, run.out) == (gi.EXIT_UNAVAILABLE, "cat-1.png\ncat-2.png\n")
    assert "asked for 3 images but the answer held 2" in run.err


def test_one_bad_image_does_not_cost_the_good_one(online: CliRunner, api: FakeImagesAPI) -> None:
    good = base64.b64encode(make_png(1024, 1024)).decode()
    api.queue(Reply(body={"created": 1, "data": [{"b64_json": good}, {"b64_json": "bm90IGFuIGltYWdl"}]}))
    run = online("-p", "cat", "-f", "cat.png", "-n", "2")
    assert (run.code, run.out) == (gi.EXIT_UNAVAILABLE, "cat-1.png\n")
    assert not Path("cat-2.png").exists()


PRICES = {"text_input": 5.0, "image_input": 8.0, "image_output": 30.0, "multiplier": 1.0}


def test_metadata_sidecar(online: CliRunner, api: FakeImagesAPI, picture) -> None:
    picture("in.png", "png", 300, 300)
    image = make_png(1024, 1024)
    usage = {"input_tokens": 7, "output_tokens": 9, "total_tokens": 16}
    api.queue(Reply(body=images_answer([image], usage=usage, created=123), headers={"x-request-id": "req_9"}))
    run = online("-p", "猫", "-i", "in.png", "-f", "out/cat.png", "-s", "1024x1024", "-q", "high", "--metadata")
    assert run.code == 0, run.err
    meta = json.loads(Path("out/cat.png.json").read_text(encoding="utf-8"))
    elapsed = meta.pop("elapsed_s")
    assert 0 <= elapsed < 30
    assert meta == {
        "tool": f"apiyi-gpt-image-2-gen {gi.VERSION}", "prompt": "猫", "model": "gpt-image-2", "mode": "edit",
        "endpoint": "/images/edits",
        "parameters": {"model": "gpt-image-2", "size": "1024x1024", "quality": "high", "output_format": "png"},
        "input_images": ["in.png"], "mask": None, "size_requested": "1024x1024", "size_real": "1024x1024",
        "format_requested": "png", "format_real": "png", "bytes": len(image), "sha256": hashlib.sha256(image).hexdigest(), "usage": usage,
        "revised_prompt": None, "request_id": "req_9", "created": 123,
        "cost": {"usd": 0.000305, "basis": "tokens", "prices": PRICES}}   # (7 x $5 + 9 x $30) per million
    assert run.out == "out/cat.png\n"


def test_json_success_document(online: CliRunner, api: FakeImagesAPI) -> None:
    image = make_png(2048, 1152)
    api.queue(Reply(body=images_answer([image], revised_prompt="ignored at top level")))
    run = online("-p", "sunset", "-f", "sunset.png", "-s", "16:9", "-r", "2K", "-q", "high", "--json")
    assert run.code == 0
    document = run.json()
    assert document.pop("elapsed_s") >= 0
    assert document == {
        "ok": True, "files": [{"path": "sunset.png", "format": "png", "width": 2048, "height": 1152,
                               "bytes": len(image), "size_requested": "2048x1152", "size_real": "2048x1152",
                               "format_requested": "png", "format_real": "png"}],
        "model": "gpt-image-2", "mode": "generate", "size": "2048x1152", "quality": "high",
        "usage": {"input_tokens": 50, "output_tokens": 4160, "total_tokens": 4210,
                  "input_tokens_details": {"text_tokens": 50, "image_tokens": 0}},
        "revised_prompt": None, "request_id": None, "request_id_header": None, "warnings": [],
        "cost": {"usd": 0.12505, "basis": "tokens", "prices": PRICES}}   # (50 x $5 + 4160 x $30) per million


def test_revised_prompt_is_reported(online: CliRunner, api: FakeImagesAPI) -> None:
    answer = images_answer([make_png(1024, 1024)])
    answer["data"][0]["revised_prompt"] = "a cute orange cat on grass"
    api.queue(Reply(body=answer))
    run = online("-p", "cat", "-f", "cat.png", "--json")
    assert run.json()["revised_prompt"] == "a cute orange cat on grass"
    assert "revised prompt: a cute orange cat on grass" in run.err


def break_folder(folder: Path) -> Reply:
    """While the server 'generates', the output folder turns into a file: the write must fail."""

    def sabotage(_: Recorded) -> None:
        shutil.rmtree(folder)
        folder.write_text("not a folder any more")

    return Reply(body=images_answer([make_png(1024, 1024)]), before=sabotage)


def test_image_that_cannot_be_written_goes_to_the_fallback_with_exit_7(online: CliRunner, api: FakeImagesAPI,
                                                                       isolated: Path) -> None:
    (isolated / "out").mkdir()
    api.queue(break_folder(isolated / "out"))
    run = online("-p", "cat", "-f", "out/cat.png", "--json", "--metadata")
    assert run.code == gi.EXIT_FALLBACK
    document = run.json()
    [saved] = document["files"]
    fallback = Path(saved["path"])
    assert fallback.parent == isolated.parent / "tmp" / "apiyi-gpt-image-2"
    assert fallback.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(Path(f"{fallback}.json").read_text(encoding="utf-8"))["prompt"] == "cat"
    assert document["ok"] is False
    assert document["error"]["kind"] == "saved_to_fallback"
    assert document["error"]["exit_code"] == 7
    assert f"saved to the fallback {fallback}" in run.err


def test_fallback_prints_the_path_on_stdout(online: CliRunner, api: FakeImagesAPI, isolated: Path) -> None:
    (isolated / "out").mkdir()
    api.queue(break_folder(isolated / "out"))
    run = online("-p", "cat", "-f", "out/cat.png")
    assert run.code == gi.EXIT_FALLBACK
    assert run.out == f"{isolated.parent / 'tmp' / 'apiyi-gpt-image-2' / 'cat.png'}\n"
    assert "hint: use the printed path" in run.err


def test_atomic_write_leaves_nothing_when_the_rename_fails(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = isolated / "cat.png"
    target.write_bytes(b"old")

    def failing_replace(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError):
        gi.write_file_atomic(target, b"new image bytes")
    assert [p.name for p in isolated.iterdir()] == ["cat.png"]
    assert target.read_bytes() == b"old"


def test_error_body_echoing_the_key_is_redacted(online: CliRunner, api: FakeImagesAPI) -> None:
    api.queue(Reply(status=401, body={"error": {"message": f"Incorrect API key provided: {TEST_KEY}",
                                                "type": "invalid_request_error", "code": "invalid_api_key"}}))
    run = online("-p", "cat", "--json")
    assert run.code == gi.EXIT_AUTH
    assert "Incorrect API key provided: ***" in run.json()["error"]["message"]


def test_progress_in_a_log_is_one_line_per_interval(online: CliRunner, api: FakeImagesAPI,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gi, "PROGRESS_LOG_INTERVAL_S", 0.1)
    api.queue(Reply(body=images_answer([make_png(1024, 1024)]), delay=0.45))
    run = online("-p", "cat", "-f", "cat.png")
    assert run.code == 0
    waits = [line for line in run.err.splitlines() if line.startswith("still waiting: ")]
    assert 2 <= len(waits) <= 5
    assert "\r" not in run.err


def test_progress_on_a_terminal_is_one_live_line(online: CliRunner, api: FakeImagesAPI,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gi, "PROGRESS_TTY_INTERVAL_S", 0.1)
    monkeypatch.setattr(gi.sys.stderr, "isatty", lambda: True)
    api.queue(Reply(body=images_answer([make_png(1024, 1024)]), delay=0.35))
    run = online("-p", "cat", "-f", "cat.png")
    assert run.code == 0
    assert "\rwaiting for the image... 0 s" in run.err
    assert "still waiting" not in run.err
    before_saved = run.err.split("saved cat.png")[0]
    assert before_saved.endswith("\r" + " " * 60 + "\r")


def test_quiet_starts_no_progress(online: CliRunner, api: FakeImagesAPI, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gi, "PROGRESS_LOG_INTERVAL_S", 0.05)
    api.queue(Reply(body=images_answer([make_png(1024, 1024)]), delay=0.2))
    assert online("-p", "cat", "-f", "cat.png", "--quiet").err == ""


def test_transparent_background_warns_that_it_is_in_preview(online: CliRunner, api: FakeImagesAPI) -> None:
    run = online("-p", "sticker", "-f", "s.png", "--background", "transparent")
    assert run.code == 0
    assert "warning: transparent backgrounds are in preview for gpt-image-2: some gateways refuse them" in run.err
    assert api.requests[0].json()["background"] == "transparent"
