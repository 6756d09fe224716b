"""Wire compatibility: for the same parameters, the official openai SDK and this script must send
requests that a server parses to the same JSON fields, or the same multipart fields and files."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from conftest import TEST_KEY, CliRunner
from fake_api import FakeImagesAPI, Recorded, make_png, sse_images, stream_reply


def sdk_client(api: FakeImagesAPI) -> openai.OpenAI:
    return openai.OpenAI(api_key=TEST_KEY, base_url=api.url, max_retries=0)


def file_parts(request: Recorded) -> list[tuple[str, str, str, bytes]]:
    return [(p.name, p.filename, p.content_type, p.data) for p in request.files()]


GENERATIONS = [
    pytest.param([], {}, id="minimal"),
    pytest.param(["-s", "1536x1024", "-q", "high", "-n", "2"], {"size": "1536x1024", "quality": "high", "n": 2},
                 id="size-quality-n"),
    pytest.param(["-o", "jpeg", "-c", "85", "--background", "opaque", "--moderation", "low"],
                 {"output_format": "jpeg", "output_compression": 85, "background": "opaque", "moderation": "low"},
                 id="format-compression-background-moderation"),
    pytest.param(["-s", "16:9", "-r", "4K", "-o", "webp"], {"size": "3840x2160", "output_format": "webp"},
                 id="ratio-4k-webp"),
]


@pytest.mark.parametrize("args, sdk_kwargs", GENERATIONS)
def test_generation_matches_the_sdk(online: CliRunner, api: FakeImagesAPI, args: list[str],
                                    sdk_kwargs: dict) -> None:
    prompt = "一只可爱的橘猫在草地上玩耍 \"quoted\" \\ and\nnewline"
    sdk_client(api).images.generate(model="gpt-image-2", prompt=prompt, **sdk_kwargs)
    assert online("-p", prompt, *args, "--quiet").code == 0
    sdk, ours = api.requests
    assert (ours.method, ours.path) == (sdk.method, sdk.path)
    assert ours.header("Content-Type") == sdk.header("Content-Type")
    assert ours.json() == sdk.json()


def test_single_image_edit_matches_the_sdk(online: CliRunner, api: FakeImagesAPI, picture) -> None:
    image = picture("portrait.jpg", "jpeg", 640, 800)
    sdk_client(api).images.edit(model="gpt-image-2", image=image, prompt="将背景换成海滩", size="1024x1536",
                                quality="medium")
    assert online("-p", "将背景换成海滩", "-i", image, "-s", "1024x1536", "-q", "medium", "--quiet").code == 0
    sdk, ours = api.requests
    assert ours.path == sdk.path
    assert ours.header("Content-Type").split(";")[0] == sdk.header("Content-Type").split(";")[0]
    assert ours.fields() == sdk.fields()
    assert file_parts(ours) == file_parts(sdk)
    assert file_parts(ours)[0][:3] == ("image", "portrait.jpg", "image/jpeg")


def test_fusion_with_mask_matches_the_sdk(online: CliRunner, api: FakeImagesAPI, picture) -> None:
    images = [picture("图1.png", "png", 512, 512), picture("scene.webp", "webp", 700, 400),
              picture("third.jpeg", "jpeg", 300, 300)]
    mask = picture("mask.png", "png", 512, 512, alpha=True)
    sdk_client(api).images.edit(model="gpt-image-2", image=images, mask=mask, prompt="把图1的人物放进图2的场景",
                                n=2, output_format="webp", output_compression=60, background="auto")
    run = online("-p", "把图1的人物放进图2的场景", "-i", *images, "-m", mask, "-n", "2", "-o", "webp", "-c", "60",
                 "--background", "auto", "--quiet", "-f", "fused")
    assert run.code == 0, run.err
    sdk, ours = api.requests
    assert ours.fields() == sdk.fields()
    assert file_parts(ours) == file_parts(sdk)
    assert [name for name, *_ in file_parts(ours)] == ["image[]", "image[]", "image[]", "mask"]


def test_sdk_reads_the_fake_servers_answer(api: FakeImagesAPI) -> None:
    """The fake API answers in a shape the official SDK accepts, so the tests above test a realistic server."""
    answer = sdk_client(api).images.generate(model="gpt-image-2", prompt="cat", size="1024x1536")
    assert answer.data[0].b64_json
    assert answer.usage.total_tokens == 4210


def test_content_length_and_boundary_are_well_formed(online: CliRunner, api: FakeImagesAPI, picture: Path) -> None:
    picture("a.png", "png", 64, 64)
    assert online("-p", "x", "-i", "a.png", "--quiet").code == 0
    [request] = api.requests
    boundary = request.header("Content-Type").split("boundary=")[1]
    assert len(request.body) == int(request.header("Content-Length"))
    assert request.body.startswith(f"--{boundary}\r\n".encode())
    assert request.body.endswith(f"--{boundary}--\r\n".encode())


@pytest.mark.parametrize("kind", ["image_generation", "image_edit"])
def test_streaming_matches_the_sdk_and_the_sdk_reads_the_fake_stream(online: CliRunner, api: FakeImagesAPI,
                                                                     picture, kind: str) -> None:
    image = picture("in.png", "png", 64, 64)
    pieces = sse_images([make_png(32, 32)], make_png(64, 64), kind=kind)
    api.queue(stream_reply(pieces), stream_reply(pieces))
    client = sdk_client(api)
    if kind == "image_edit":
        events = list(client.images.edit(model="gpt-image-2", image=image, prompt="blue", stream=True,
                                         partial_images=1))
        assert online("-p", "blue", "-i", image, "--partial-images", "1", "--quiet").code == 0
    else:
        events = list(client.images.generate(model="gpt-image-2", prompt="blue", stream=True, partial_images=1))
        assert online("-p", "blue", "--partial-images", "1", "--quiet").code == 0
    assert [e.type for e in events] == [f"{kind}.partial_image", f"{kind}.completed"]
    sdk, ours = api.requests
    if kind == "image_edit":
        assert (ours.fields(), file_parts(ours)) == (sdk.fields(), file_parts(sdk))
    else:
        assert ours.json() == sdk.json()


def sdk_knows(*names: str) -> bool:
    import inspect

    parameters = inspect.signature(openai.resources.images.Images.generate).parameters
    return all(name in parameters for name in names)


NEWER_LINE = [
    pytest.param(["--complexity", "low", "-q", "xhigh", "-s", "1536x1024"],
                 {"complexity": "low", "quality": "xhigh", "size": "1536x1024"}, id="complexity-xhigh"),
    pytest.param(["-o", "gif", "--frames", "6", "--frame-ms", "120", "-s", "640x640"],
                 {"output_format": "gif", "frame_count": 6, "frame_duration_ms": 120, "size": "640x640"}, id="gif"),
    pytest.param(["-o", "svg", "--svg-model", "gpt-5.6-terra"],
                 {"output_format": "svg", "svg": {"model": "gpt-5.6-terra"}}, id="svg"),
]


@pytest.mark.skipif(not sdk_knows("complexity", "frame_count", "frame_duration_ms", "svg"),
                    reason="the installed openai package predates gpt-image-2.6 (complexity, GIF, SVG)")
@pytest.mark.parametrize("args, sdk_kwargs", NEWER_LINE)
def test_the_newer_lines_fields_match_the_sdk(online: CliRunner, api: FakeImagesAPI, args: list[str],
                                              sdk_kwargs: dict) -> None:
    sdk_client(api).images.generate(model="gpt-image-2.6-flare", prompt="a fox", **sdk_kwargs)
    assert online("-p", "a fox", "--model", "gpt-image-2.6-flare", *args, "--quiet").code == 0
    sdk, ours = api.requests
    assert ours.json() == sdk.json()
