"""The model table drives what is sent: every profile's settings (taken, ignored, refused), GIF and
SVG, -s match, requested versus real, --list-models, and the refusal kinds told apart."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest

import generate_image as gi
from conftest import CliRunner
from fake_api import (PROFILE_FIELDS, FakeImagesAPI, Reply, api_error, channel_reply, images_answer, make_gif,
                      make_png, make_svg, sse_event, stream_reply)

# One way to give each setting, valid wherever the setting is taken, and what the server then sees.
SETTING_ARGS = {
    "size": ["-s", "1:1"], "quality": ["-q", "high"], "n": ["-n", "2"], "background": ["--background", "opaque"],
    "moderation": ["--moderation", "low"], "output_compression": ["-o", "jpeg", "-c", "80"],
    "mask": ["-i", "in.png", "--mask", "mask.png"], "stream": ["--stream"], "complexity": ["--complexity", "low"],
    "frames": ["-o", "gif", "--frames", "4", "--frame-ms", "120", "-s", "512x512"],
    "svg_model": ["-o", "svg", "--svg-model", "gpt-5.6-terra"],
}
CASES = [pytest.param(model, setting, id=f"{model}-{setting}")
         for model in gi.MODEL_PROFILES for setting in SETTING_ARGS]


@pytest.fixture
def inputs(picture: Callable[..., Path]) -> None:
    picture("in.png", "png", 512, 512)
    picture("mask.png", "png", 512, 512, alpha=True)


def sent_fields(request) -> set[str]:
    multipart = (request.header("Content-Type") or "").startswith("multipart/")
    return set(request.fields()) | {p.name for p in request.files()} if multipart else set(request.json())


@pytest.mark.parametrize("model, setting", CASES)
def test_every_profile_takes_ignores_or_refuses_each_setting(online: CliRunner, api: FakeImagesAPI, inputs: None,
                                                             model: str, setting: str) -> None:
    """Taken: sent. Ignored by the channel: not sent, one warning. Otherwise: exit 2, nothing sent, and
    the message names the models that take it. The fake server refuses what the profile does not take."""
    api.route = channel_reply(gi.MODEL_PROFILES)
    profile = gi.profile_for(model)
    run = online("-p", "cat", "--model", model, "-f", "out", *SETTING_ARGS[setting])
    wire = PROFILE_FIELDS[setting]
    if setting == "n" and profile.max_n < 2:
        assert (run.code, api.requests) == (gi.EXIT_USAGE, [])
        assert f"-n 2: {model} makes at most 1 per request (a flat channel bills every n it is sent)" in run.err
    elif setting in profile.accepts:
        assert run.code == 0, run.err
        assert set(wire) & sent_fields(api.requests[0])
    elif setting in profile.ignores:
        assert run.code == 0, run.err
        assert not set(wire) & sent_fields(api.requests[0])
        assert f"warning: {model} ignores {gi.SETTING_FLAGS[setting]}: it was not sent" in run.err
    else:
        assert (run.code, api.requests) == (gi.EXIT_USAGE, [])
        takers = [name for name in gi.MODEL_PROFILES if setting in gi.MODEL_PROFILES[name]["accepts"]]
        assert f"error: {model} does not take {gi.SETTING_FLAGS[setting]}\n" in run.err
        assert f"hint: models that do: {', '.join(takers)}" in run.err


@pytest.mark.parametrize("model", list(gi.MODEL_PROFILES))
def test_every_profile_refuses_a_quality_or_format_it_lacks(online: CliRunner, api: FakeImagesAPI, model: str) -> None:
    profile = gi.profile_for(model)
    missing = next((f for f in gi.OUTPUT_FORMATS if f not in profile.formats), None)
    if missing:
        run = online("-p", "cat", "--model", model, "-o", missing)
        assert run.code == gi.EXIT_USAGE and f"{model} does not make {missing} images" in run.err
    if "quality" in profile.accepts and "max" not in profile.qualities:
        run = online("-p", "cat", "--model", model, "-q", "max")
        assert run.code == gi.EXIT_USAGE and f"{model} does not take -q max" in run.err
        assert "models that do: gpt-image-2.5-flare, gpt-image-2.5-sunburst, gpt-image-2.6-flare" in run.err
    assert api.requests == []


def test_a_model_not_in_the_table_is_sent_as_given_with_one_warning(online: CliRunner, api: FakeImagesAPI) -> None:
    run = online("-p", "cat", "--model", "gpt-image-9", "-s", "4976x1664", "--complexity", "low")
    assert run.code == 0, run.err
    assert run.err.count("warning: model gpt-image-9 is not in the table") == 1
    assert api.requests[0].json() == {"model": "gpt-image-9", "prompt": "cat", "size": "4976x1664", "complexity": "low"}


@pytest.mark.parametrize("env, args, model", [("gpt-image-2.6-flare", [], "gpt-image-2.6-flare"),
                                              ("gpt-image-2.6-flare", ["--model", "gpt-image-2"], "gpt-image-2"),
                                              ("", [], "gpt-image-2")])
def test_the_default_model_comes_from_the_environment(online: CliRunner, api: FakeImagesAPI,
                                                      monkeypatch: pytest.MonkeyPatch, env: str, args: list[str],
                                                      model: str) -> None:
    monkeypatch.setenv("APIYI_IMAGE_MODEL", env)
    assert online("-p", "cat", *args).code == 0
    assert api.requests[0].json()["model"] == model


def test_list_models_prints_the_table(cli: CliRunner) -> None:
    text = cli("--list-models")
    assert text.code == 0 and [line.split()[0] for line in text.out.splitlines()[::2]] == list(gi.MODEL_PROFILES)
    document = cli("--list-models", "--json").json()
    rows = {row["name"]: row for row in document["models"]}
    assert document["default"] == "gpt-image-2" and list(rows) == list(gi.MODEL_PROFILES)
    assert rows["gpt-image-2.6-all"]["billing"] == "$0.025 per image" and rows["gpt-image-2.6-all"]["max_n"] == 4
    assert rows["gpt-image-2-vip"]["size_tiers"]["4K"][-1] == "3840x1632"


@pytest.mark.parametrize("frames, size, problem", [
    (9, "960x960", None), (9, "976x960", "a frame's longest edge must be at most 960"),
    (12, "816x816", None), (10, "832x832", "with 10 frames a frame holds at most 665,856 pixels (got 692,224)"),
    (16, "720x720", None), (13, "736x736", "with 13 frames a frame holds at most 518,400 pixels"),
    (4, "960x544", None), (4, "500x500", "frame edges must be multiples of 16"),
    (2, "960x320", None), (2, "960x304", "the aspect ratio must be at most 3:1"),
])
def test_gif_frame_rules_on_both_sides_of_each_limit(online: CliRunner, api: FakeImagesAPI, frames: int, size: str,
                                                     problem: str) -> None:
    run = online("-p", "cat", "--model", "gpt-image-2.6-flare", "-o", "gif", "--frames", frames, "-s", size)
    if problem is None:
        assert run.code == 0, run.err
        assert api.requests[0].json()["size"] == size and api.requests[0].json()["frame_count"] == frames
        return
    assert (run.code, api.requests) == (gi.EXIT_USAGE, [])
    assert problem in run.err and "nearest valid frame is" in run.err


@pytest.mark.parametrize("args, message", [
    (["--frames", "1"], "1 is outside 2-16"), (["--frames", "17"], "17 is outside 2-16"),
    (["--frame-ms", "10"], "10 is outside 20-2000"), (["--frame-ms", "125"], "125 is not a multiple of 10"),
    (["--frame-ms", "2010"], "2010 is outside 20-2000"),
    (["-o", "png", "--frames", "4"], "--frames/--frame-ms applies to -o gif only"),
    (["--stream"], "GIF output cannot be combined with --stream"),
    (["-s", "16:9", "-r", "2K"], "--resolution does not apply to a GIF"),
])
def test_gif_settings_are_checked_before_sending(online: CliRunner, api: FakeImagesAPI, args: list[str],
                                                 message: str) -> None:
    fmt = [] if "-o" in args else ["-o", "gif"]
    run = online("-p", "cat", "--model", "gpt-image-2.6-flare", *fmt, *args)
    assert (run.code, api.requests) == (gi.EXIT_USAGE, []) and message in run.err


def test_a_gif_ratio_becomes_the_largest_frame_that_fits(online: CliRunner, api: FakeImagesAPI) -> None:
    run = online("-p", "cat", "--model", "gpt-image-2.6-flare", "-o", "gif", "--frames", "12", "-s", "16:9")
    assert run.code == 0 and "GIF frame for 16:9 with 12 frames -> 960x528" in run.err
    assert api.requests[0].json()["size"] == "960x528"


def test_a_gif_and_an_svg_are_saved_as_they_came(online: CliRunner, api: FakeImagesAPI, isolated: Path) -> None:
    gif, svg = make_gif(64, 48, 5), make_svg(1024, 768)
    api.queue(Reply(body=images_answer([gif])), Reply(body=images_answer([svg])))
    run = online("-p", "cat", "--model", "gpt-image-2.6-flare", "-o", "gif", "--frames", "5", "-s", "64x48",
                 "-f", "cat", "--json")
    assert run.code == 0, run.err
    assert (isolated / "cat.gif").read_bytes() == gif
    assert {k: run.json()["files"][0][k] for k in ("format", "frames_requested", "frames_real")} == \
        {"format": "gif", "frames_requested": 5, "frames_real": 5}
    run = online("-p", "logo", "--model", "gpt-image-2.6-flare", "-o", "svg", "--svg-model", "gpt-5.6-terra",
                 "-f", "logo.svg")
    assert (run.code, run.out) == (0, "logo.svg\n") and (isolated / "logo.svg").read_bytes() == svg
    assert api.requests[1].json()["svg"] == {"model": "gpt-5.6-terra"}


def test_svg_rules(online: CliRunner, api: FakeImagesAPI, picture: Callable[..., Path]) -> None:
    picture("in.png")
    for args, message in [([], "-o svg with gpt-image-2.6-flare needs --svg-model NAME"),
                          (["--svg-model", "m", "-n", "2"], "SVG output makes one image per request"),
                          (["--svg-model", "m", "-i", "in.png"], "SVG output cannot be combined with -i")]:
        run = online("-p", "logo", "--model", "gpt-image-2.6-flare", "-o", "svg", *args)
        assert run.code == gi.EXIT_USAGE and message in run.err
    assert online("-p", "logo", "--model", "gpt-image-2.6-all", "-o", "svg").code == 0   # no author model there
    assert "svg" not in api.requests[0].json()


@pytest.mark.parametrize("shape, args, size", [
    ((3000, 2000), [], "3008x2000"), ((1000, 3000), [], "1008x3008"), ((1024, 1024), [], "1024x1024"),
    ((3000, 2000), ["-r", "2K"], "2048x1360"), ((640, 800), [], "720x912"),
])
def test_size_match_takes_the_shape_of_the_first_input(online: CliRunner, api: FakeImagesAPI,
                                                       picture: Callable[..., Path], shape: tuple[int, int],
                                                       args: list[str], size: str) -> None:
    picture("in.png", "png", *shape)
    run = online("-p", "edit", "-i", "in.png", "-s", "match", *args)
    assert run.code == 0, run.err
    assert f"size match (first input image {shape[0]}x{shape[1]}) -> {size}" in run.err
    assert api.requests[0].fields()["size"] == size


def test_size_match_needs_an_input_and_vip_sizes_are_fixed(online: CliRunner, api: FakeImagesAPI,
                                                          picture: Callable[..., Path]) -> None:
    run = online("-p", "x", "-s", "match")
    assert "-s match takes the shape of the first input image, but there is none" in run.err
    run = online("-p", "x", "--model", "gpt-image-2-vip", "-s", "2000x1000")
    assert run.code == gi.EXIT_USAGE and "takes only its fixed sizes; nearest is 2048x1152" in run.err
    picture("in.png", "png", 1600, 900)
    run = online("-p", "x", "--model", "gpt-image-2-vip", "-i", "in.png", "-s", "match", "-r", "4K")
    assert run.code == 0 and api.requests[0].fields()["size"] == "3840x2160"


@pytest.mark.parametrize("strict", [False, True])
def test_another_size_than_asked_is_told_and_strict_size_makes_it_exit_10(online: CliRunner, api: FakeImagesAPI,
                                                                         isolated: Path, strict: bool) -> None:
    api.queue(Reply(body=images_answer([make_png(1365, 2048)])))
    run = online("-p", "cat", "--model", "gpt-image-2.6-all", "-s", "1152x2048", "-f", "cat.png", "--json",
                 "--metadata", *(["--strict-size"] if strict else []))
    assert run.code == (gi.EXIT_MISMATCH if strict else 0)
    both = run.json()["files"][0]
    assert (both["size_requested"], both["size_real"]) == ("1152x2048", "1365x2048")
    assert "asked for size 1152x2048 but cat.png has 1365x2048" in run.err
    assert (isolated / "cat.png").is_file()
    assert json.loads((isolated / "cat.png.json").read_text())["size_real"] == "1365x2048"
    if strict:
        assert run.json()["error"]["kind"] == "size_mismatch"


REFUSALS = [
    pytest.param(Reply(status=400, body=api_error(
        "Your request was rejected by the safety system. safety_violations=[violence, weapons].",
        code="moderation_blocked")), "safety_refusal", gi.EXIT_REFUSED, 1,
        {"categories": ["violence", "weapons"]}, id="safety-400"),
    pytest.param(Reply(status=400, body=api_error("Your request was rejected by the safety system: an input "
                                                       "image may contain content that is not allowed.", code="400")),
                 "safety_refusal", gi.EXIT_REFUSED, 1, {"source": "image"}, id="safety-code-rewritten"),
    pytest.param(Reply(status=500, body=api_error("Your request was rejected by the safety system", code=None)),
                 "safety_refusal", gi.EXIT_REFUSED, 1, {}, id="safety-500-not-retried"),
    pytest.param(stream_reply([sse_event("error", {"type": "error", "error": {
        "message": "Your prompt was rejected by the safety system.", "code": "moderation_blocked"}})]),
        "safety_refusal", gi.EXIT_REFUSED, 1, {"source": "prompt"}, id="safety-in-a-stream"),
    pytest.param(Reply(body={"created": 1, "data": []}), "silent_refusal", gi.EXIT_UNAVAILABLE, 1, {},
                 id="silent"),
    pytest.param(Reply(status=429, body=api_error("slow down", code="rate_limit_exceeded"),
                       headers={"Retry-After": "120"}), "rate_limited", gi.EXIT_UNAVAILABLE, 6, {}, id="rate-limited"),
    pytest.param(Reply(status=401, body=api_error("bad key", code="invalid_api_key")), "account",
                 gi.EXIT_AUTH, 1, {}, id="account"),
    pytest.param(Reply(status=400, body=api_error("bad size", code="invalid_value")), "bad_request",
                 gi.EXIT_REFUSED, 1, {}, id="bad-request"),
    pytest.param(Reply(drop=True), "possibly_billed", gi.EXIT_MAYBE_BILLED, 1, {}, id="possibly-billed"),
    pytest.param(Reply(status=503, body=b"down"), "service", gi.EXIT_UNAVAILABLE, 3, {}, id="service"),
]


@pytest.mark.parametrize("reply, kind, code, requests, details", REFUSALS)
def test_refusal_kinds_are_told_apart(online: CliRunner, api: FakeImagesAPI, reply: Reply, kind: str, code: int,
                                      requests: int, details: dict) -> None:
    api.route = lambda request: reply
    stream = ["--stream"] if reply.pieces is not None else []
    run = online("-p", "cat", "--json", *stream)
    error = run.json()["error"]
    assert (run.code, error["kind"], len(api.requests)) == (code, kind, requests)
    assert {k: error[k] for k in details} == details
    if kind == "safety_refusal":
        assert error["hint"] == gi.SAFETY_HINT


@pytest.mark.parametrize("args, message", [
    (["--model", "gpt-image-2.6-flare", "-o", "gif", "-s", "0x16"], "--size 0x16: width and height must be above 0"),
    (["--model", "gpt-image-2-vip", "-s", "0x100"], "--size 0x100: width and height must be above 0"),
    (["--model", "gpt-image-2.6-all", "-s", "1920x1080"], "the longest edge must be at most 1536"),
    (["--model", "gpt-image-2-all", "-s", "16:9", "-r", "2K"],
     "-r 2K: gpt-image-2-all takes a long edge of at most 1536"),
    (["--model", ""], "the model name is empty"),
    (["--model", "gpt image"], "'gpt image' is not a model name"),
])
def test_sizes_and_names_a_model_cannot_take_are_refused(online: CliRunner, api: FakeImagesAPI, args: list[str],
                                                         message: str) -> None:
    run = online("-p", "cat", *args)
    assert (run.code, api.requests) == (gi.EXIT_USAGE, []) and message in run.err and "Traceback" not in run.err


@pytest.mark.parametrize("args, size", [
    (["-s", "2048x1152"], "2048x1152"), (["-s", "1600x896"], None), (["-s", "16:9", "-r", "4K"], "3840x2160"),
    (["-s", "1:1", "-r", "2K"], "2048x2048"), (["-s", "3:2"], "1024x683"),
])
def test_gpt_image_2_6_all_takes_free_sizes_to_1536_and_its_2k_and_4k_tiers(online: CliRunner, api: FakeImagesAPI,
                                                                            args: list[str], size: str) -> None:
    run = online("-p", "cat", "--model", "gpt-image-2.6-all", *args)
    if size is None:
        assert run.code == gi.EXIT_USAGE and "nearest valid size is 1536x860" in run.err
        return
    assert run.code == 0, run.err
    assert api.requests[0].json()["size"] == size
    assert "warning: gpt-image-2.6-all may return another size than asked" in run.err


def test_an_unknown_model_is_not_held_to_a_known_ones_format_rules(online: CliRunner, api: FakeImagesAPI) -> None:
    api.queue(Reply(body=images_answer([make_svg(0, 0)])))
    run = online("-p", "logo", "--model", "gpt-image-9", "-o", "svg", "-f", "logo.svg")
    assert run.code == 0, run.err
    assert api.requests[0].json()["output_format"] == "svg" and "svg" not in api.requests[0].json()


@pytest.mark.parametrize("reply", [
    Reply(body={"created": 1, "data": [{}]}), Reply(body={"created": 1, "data": [{"revised_prompt": "a cat"}]}),
    stream_reply([b"data: [DONE]\n\n"]),
], ids=["empty-item", "only-revised-prompt", "stream-done-without-image"])
def test_an_answer_with_no_image_at_all_is_a_silent_refusal(online: CliRunner, api: FakeImagesAPI,
                                                            reply: Reply) -> None:
    api.queue(reply)
    run = online("-p", "cat", "--json", *(["--stream"] if reply.pieces is not None else []))
    assert (run.code, run.json()["error"]["kind"]) == (gi.EXIT_UNAVAILABLE, "silent_refusal")


def test_a_gif_where_a_png_was_asked_counts_no_frames(online: CliRunner, api: FakeImagesAPI, isolated: Path) -> None:
    api.queue(Reply(body=images_answer([make_gif(64, 64, 3)])))
    run = online("-p", "cat", "-f", "cat.png", "--json", "--strict-size")
    assert run.code == gi.EXIT_MISMATCH and run.json()["files"][0]["format_real"] == "gif"
    assert "frames_requested" not in run.json()["files"][0] and "asked for format png but cat.gif has gif" in run.err


def test_a_hostile_svg_header_is_read_quickly_and_kept(online: CliRunner, api: FakeImagesAPI, isolated: Path) -> None:
    svg = b'<svg xmlns="http://www.w3.org/2000/svg" width="' + b"9" * 400 + b'" height="3"/>'
    api.queue(Reply(body=images_answer([svg])))
    run = online("-p", "logo", "--model", "gpt-image-2.6-all", "-o", "svg", "-f", "logo.svg")
    assert run.code == 0 and (isolated / "logo.svg").read_bytes() == svg
