"""What goes over the wire: method, path, headers, JSON body, multipart parts."""

from __future__ import annotations

from pathlib import Path

import pytest

import generate_image as gi
from conftest import TEST_KEY, CliRunner
from fake_api import FakeImagesAPI


def test_minimal_generation_sends_only_model_and_prompt(online: CliRunner, api: FakeImagesAPI) -> None:
    run = online("-p", "一只可爱的橘猫在草地上玩耍", "--quiet")
    assert run.code == 0, run.err
    [request] = api.requests
    assert (request.method, request.path) == ("POST", "/v1/images/generations")
    assert request.json() == {"model": "gpt-image-2", "prompt": "一只可爱的橘猫在草地上玩耍"}
    assert request.header("Authorization") == f"Bearer {TEST_KEY}"
    assert request.header("Content-Type") == "application/json"
    assert request.header("User-Agent").startswith(f"apiyi-gpt-image-2-gen/{gi.VERSION} (python 3.")
    assert int(request.header("Content-Length")) == len(request.body)


def test_every_generation_flag_goes_on_the_wire(online: CliRunner, api: FakeImagesAPI) -> None:
    run = online("-p", "  spaces and\nnewlines are kept  ", "-f", "x.webp", "-s", "2048x1152", "-q", "high",
                 "-c", "70", "-n", "2", "--background", "opaque", "--moderation", "low", "--model", "gpt-image-2-x")
    assert run.code == 0, run.err
    assert api.requests[0].json() == {
        "model": "gpt-image-2-x", "prompt": "  spaces and\nnewlines are kept  ", "n": 2, "size": "2048x1152",
        "quality": "high", "output_format": "webp", "output_compression": 70, "background": "opaque",
        "moderation": "low"}


@pytest.mark.parametrize("args, output_format", [
    (["-f", "a.png"], "png"), (["-f", "a.JPG"], "jpeg"), (["-f", "a.jpeg"], "jpeg"), (["-o", "jpg"], "jpeg"),
    (["-o", "WEBP"], "webp"), (["-f", "a.webp", "-o", "webp"], "webp"), ([], None), (["-f", "noext"], None),
], ids=["png-ext", "JPG-ext", "jpeg-ext", "jpg-alias", "upper", "same", "none", "no-ext"])
def test_output_format_is_sent_when_given_or_taken_from_the_extension(
        online: CliRunner, api: FakeImagesAPI, args: list[str], output_format: str) -> None:
    assert online("-p", "cat", *args).code == 0
    assert api.requests[0].json().get("output_format") == output_format


def test_size_auto_given_explicitly_is_sent(online: CliRunner, api: FakeImagesAPI) -> None:
    assert online("-p", "cat", "-s", "auto").code == 0
    assert api.requests[0].json()["size"] == "auto"


def test_base_url_with_trailing_slash(cli: CliRunner, api: FakeImagesAPI) -> None:
    assert cli("-p", "cat", "--base-url", api.url + "/", "-k", TEST_KEY).code == 0
    assert api.requests[0].path == "/v1/images/generations"


def test_single_edit_sends_one_image_part_typed_by_content(online: CliRunner, api: FakeImagesAPI, picture) -> None:
    source = picture("photo.png", "jpeg", 640, 480)  # JPEG bytes behind a .png name
    run = online("-p", "将图片转换成水彩画风格", "-i", "photo.png", "-f", "out.png", "-q", "low")
    assert run.code == 0, run.err
    [request] = api.requests
    assert request.path == "/v1/images/edits"
    assert request.header("Content-Type").startswith("multipart/form-data; boundary=")
    assert int(request.header("Content-Length")) == len(request.body)
    assert request.fields() == {"model": "gpt-image-2", "prompt": "将图片转换成水彩画风格", "quality": "low",
                                "output_format": "png"}
    [part] = request.files()
    assert (part.name, part.filename, part.content_type, part.data) == (
        "image", "photo.jpg", "image/jpeg", source.read_bytes())   # named for what it is (new-api reads the name)


@pytest.mark.parametrize("style", ["-i a b c", "-i a -i b -i c"])
def test_fusion_sends_images_in_order_then_mask(online: CliRunner, api: FakeImagesAPI, picture,
                                                style: str) -> None:
    sources = [picture("a.png", "png", 512, 512), picture("b.webp", "webp", 300, 200),
               picture("参考图.jpg", "jpeg", 200, 300)]
    mask = picture("mask.png", "png", 512, 512, alpha=True)
    names = iter(["a.png", "b.webp", "参考图.jpg"])
    args = [next(names) if token in "abc" else token for token in style.split()]
    run = online("-p", "把图1的人物放进图2的场景", *args, "-m", "mask.png", "-n", "2", "-f", "merged.png")
    assert run.code == 0, run.err
    parts = api.requests[0].parts()
    assert [p.name for p in parts] == ["model", "prompt", "n", "output_format", "image[]", "image[]", "image[]",
                                       "mask"]
    files = [(p.filename, p.content_type, p.data) for p in parts if p.filename]
    assert files == [("a.png", "image/png", sources[0].read_bytes()),
                     ("b.webp", "image/webp", sources[1].read_bytes()),
                     ("参考图.jpg", "image/jpeg", sources[2].read_bytes()),
                     ("mask.png", "image/png", mask.read_bytes())]


def test_upload_is_streamed_from_disk_not_read_whole(picture, monkeypatch: pytest.MonkeyPatch) -> None:
    """The body is a replayable sequence of small pieces whose length is known up front."""
    picture("big.png", "png", 2048, 2048)
    job_args = gi.build_parser().parse_args(["-p", "x", "-i", "big.png", "--dry-run"])
    job = gi.build_job(job_args, stdin=None, create_folder=False)
    body = gi.encode_multipart(job.fields, gi.upload_parts(job), boundary="b0undary")
    monkeypatch.setattr(gi, "READ_CHUNK", 4096)
    chunks = list(body)
    assert max(len(c) for c in chunks) <= 4096
    assert sum(len(c) for c in chunks) == body.length
    assert b"".join(chunks) == b"".join(body)  # a retry replays the same bytes
    assert b"".join(chunks).endswith(b"\r\n--b0undary--\r\n")


def test_file_names_with_quotes_are_escaped_like_browsers_do(online: CliRunner, api: FakeImagesAPI,
                                                            picture) -> None:
    picture('say "cheese".png', "png", 64, 64)
    assert online("-p", "x", "-i", 'say "cheese".png').code == 0
    assert b'filename="say %22cheese%22.png"' in api.requests[0].body


def test_edit_with_mask_on_first_image_only(online: CliRunner, api: FakeImagesAPI, picture) -> None:
    picture("first.png", "png", 300, 200)
    picture("second.png", "png", 640, 640)
    picture("m.png", "png", 300, 200, alpha=True)
    assert online("-p", "x", "-i", "first.png", "second.png", "-m", "m.png").code == 0
    assert [p.name for p in api.requests[0].files()] == ["image[]", "image[]", "mask"]


def test_key_goes_only_in_the_authorization_header(online: CliRunner, api: FakeImagesAPI, picture) -> None:
    picture("a.png", "png", 64, 64)
    assert online("-p", "x", "-i", "a.png", "--metadata", "-f", "o.png").code == 0
    [request] = api.requests
    carriers = [name for name, value in request.headers.items() if TEST_KEY in value]
    assert carriers == ["Authorization"]
    assert TEST_KEY.encode() not in request.body
    assert TEST_KEY not in Path("o.png.json").read_text(encoding="utf-8")


@pytest.mark.parametrize("name, fmt, sent", [("photo.png", "jpeg", "photo.jpg"), ("scan", "png", "scan.png"),
                                             ("pic.jpeg", "jpeg", "pic.jpeg"), ("a.b.webp", "png", "a.b.png")])
def test_each_file_part_is_named_for_its_real_format(online: CliRunner, api: FakeImagesAPI, picture, name: str,
                                                     fmt: str, sent: str) -> None:
    picture(name, fmt, 64, 64)
    assert online("-p", "x", "-i", name).code == 0
    [part] = api.requests[0].files()
    assert (part.filename, part.content_type) == (sent, f"image/{fmt}")
