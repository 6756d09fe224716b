"""--stream: server-sent events, previews written while the image forms, the final image as usual."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

import generate_image as gi
from conftest import CliRunner
from fake_api import FakeImagesAPI, Reply, images_answer, make_png, sse_event, sse_images, stream_reply

PARTIALS = [make_png(64, 64, rgb=(40 * i, 90, 200)) for i in range(1, 4)]
FINAL = make_png(1024, 1024, rgb=(250, 250, 250))


@pytest.mark.parametrize("partials", [0, 1, 3])
def test_stream_writes_previews_then_the_final_image(online: CliRunner, api: FakeImagesAPI, isolated: Path,
                                                     partials: int) -> None:
    api.queue(stream_reply(sse_images(PARTIALS[:partials], FINAL)))
    run = online("-p", "cat", "-f", "cat.png", "--stream", "--partial-images", partials, "--json")
    assert run.code == 0, run.err
    assert (isolated / "cat.png").read_bytes() == FINAL
    assert list(isolated.glob("*.partial*")) == []
    sent = api.requests[0]
    assert (sent.json()["stream"], sent.json()["partial_images"]) == (True, partials)
    assert sent.header("Accept") == "text/event-stream, application/json"
    document = run.json()
    assert (document["files"][0]["path"], document["previews"], "partials" in document) == ("cat.png", partials,
                                                                                           False)
    assert document["usage"]["total_tokens"] == 4210
    shown = [line.split(" after ")[0] for line in run.err.splitlines() if line.startswith("preview ")]
    assert shown == [f"preview {i}/{partials}" for i in range(1, partials + 1)]


def test_stream_defaults_to_two_previews_and_partial_images_implies_stream(online: CliRunner,
                                                                           api: FakeImagesAPI) -> None:
    api.queue(stream_reply(sse_images(PARTIALS[:2], FINAL)), stream_reply(sse_images([], FINAL)))
    assert online("-p", "cat", "--stream").code == 0
    assert online("-p", "cat", "--partial-images", "0").code == 0
    assert [(r.json()["stream"], r.json()["partial_images"]) for r in api.requests] == [(True, 2), (True, 0)]


def test_keep_partials_names_each_preview(online: CliRunner, api: FakeImagesAPI, isolated: Path) -> None:
    api.queue(stream_reply(sse_images(PARTIALS, FINAL, done=True)))
    run = online("-p", "cat", "-f", "out/cat.png", "--partial-images", "3", "--keep-partials", "--json")
    assert run.code == 0, run.err
    kept = [isolated / "out" / f"cat.partial-{i}.png" for i in (1, 2, 3)]
    assert [p.read_bytes() for p in kept] == PARTIALS
    assert run.json()["partials"] == [str(Path("out") / p.name) for p in kept]
    assert run.out and (isolated / "out" / "cat.png").read_bytes() == FINAL


FINALS = [make_png(1024, 1024, rgb=(250, 250, i)) for i in (1, 2)]
ONE_AFTER_ANOTHER = [*sse_images(PARTIALS[:2], FINALS[0]), *sse_images(PARTIALS[1:3], FINALS[1])]
PREVIEWS_FIRST = [*sse_images(PARTIALS[:2], None), *sse_images(PARTIALS[1:3], None),
                  *sse_images([], FINALS[0]), *sse_images([], FINALS[1])]


@pytest.mark.parametrize("events", [ONE_AFTER_ANOTHER, PREVIEWS_FIRST], ids=["one-after-another", "previews-first"])
@pytest.mark.parametrize("keep", [False, True], ids=["replaced", "kept"])
def test_two_streamed_images_get_previews_of_their_own(online: CliRunner, api: FakeImagesAPI, isolated: Path,
                                                      events: list[bytes], keep: bool) -> None:
    api.queue(stream_reply(events))
    run = online("-p", "cat", "-f", "cat.png", "-n", "2", "--partial-images", "2", "--json",
                 *(["--keep-partials"] if keep else []))
    assert run.code == 0, run.err
    assert [(isolated / f"cat-{i}.png").read_bytes() for i in (1, 2)] == FINALS
    shown = [line.split(" after ")[0] for line in run.err.splitlines() if line.startswith("image ")]
    assert shown == ["image 1, preview 1/2", "image 1, preview 2/2", "image 2, preview 1/2", "image 2, preview 2/2"]
    document = run.json()
    assert (document["previews"], document["usage"]["total_tokens"]) == (4, 2 * 4210)
    kept = {p.name: p.read_bytes() for p in isolated.glob("*.partial*")}
    assert kept == ({"cat-1.partial-1.png": PARTIALS[0], "cat-1.partial-2.png": PARTIALS[1],
                     "cat-2.partial-1.png": PARTIALS[1], "cat-2.partial-2.png": PARTIALS[2]} if keep else {})


def test_a_missing_image_keeps_its_last_preview(online: CliRunner, api: FakeImagesAPI, isolated: Path) -> None:
    api.queue(stream_reply([*sse_images(PARTIALS[:2], FINALS[0]), *sse_images(PARTIALS[2:3], None)]))
    run = online("-p", "cat", "-f", "cat.png", "-n", "2", "--partial-images", "2")
    assert (run.code, run.out) == (gi.EXIT_UNAVAILABLE, "cat-1.png\n")
    assert "preview kept: cat-2.partial.png" in run.err and "asked for 2 images but the answer held 1" in run.err
    assert {p.name: p.read_bytes() for p in isolated.iterdir()} == {"cat-1.png": FINALS[0],
                                                                    "cat-2.partial.png": PARTIALS[2]}


def test_a_broken_stream_of_two_images_keeps_the_last_preview_of_each(online: CliRunner, api: FakeImagesAPI,
                                                                     isolated: Path) -> None:
    api.queue(stream_reply([*sse_images(PARTIALS[:2], None), *sse_images(PARTIALS[2:3], None)]))
    run = online("-p", "cat", "-f", "cat.png", "-n", "2", "--partial-images", "2")
    assert (run.code, run.out) == (gi.EXIT_MAYBE_BILLED, "")
    assert "the last preview is kept at cat-1.partial.png, cat-2.partial.png" in run.err
    assert {p.name: p.read_bytes() for p in isolated.iterdir()} == {"cat-1.partial.png": PARTIALS[1],
                                                                    "cat-2.partial.png": PARTIALS[2]}


@pytest.mark.parametrize("newline, size", [("\n", 7), ("\r\n", 1000), ("\r\n", 3), ("\r", 4096)])
def test_events_split_across_reads_at_awkward_places(online: CliRunner, api: FakeImagesAPI, isolated: Path,
                                                     newline: str, size: int) -> None:
    raw = b"".join(sse_images(PARTIALS[:2], FINAL, newline=newline))
    api.queue(stream_reply([raw[i:i + size] for i in range(0, len(raw), size)]))
    run = online("-p", "cat", "-f", "cat.png", "--keep-partials")
    assert (run.code, run.out) == (0, "cat.png\n"), run.err
    assert [(isolated / f"cat.partial-{i}.png").read_bytes() for i in (1, 2)] == PARTIALS[:2]
    assert (isolated / "cat.png").read_bytes() == FINAL


@pytest.mark.parametrize("error, code", [
    ({"type": "image_generation_user_error", "code": "moderation_blocked", "message": "rejected by safety"},
     gi.EXIT_REFUSED),
    ({"type": "server_error", "message": "the model crashed"}, gi.EXIT_UNAVAILABLE),
])
def test_an_error_event_mid_stream(online: CliRunner, api: FakeImagesAPI, isolated: Path,
                                   error: dict, code: int) -> None:
    api.queue(stream_reply(sse_images(PARTIALS[:1], None) + [sse_event("error", {"error": error})]))
    run = online("-p", "cat", "-f", "cat.png", "--stream")
    assert (run.code, run.out) == (code, "")
    assert f"the stream reported an error: {error['message']}" in run.err
    assert "the last preview is kept at cat.partial.png" in run.err
    assert (isolated / "cat.partial.png").read_bytes() == PARTIALS[0]
    assert not (isolated / "cat.png").exists()
    assert len(api.requests) == 1


def test_a_typed_error_event_without_an_error_key(online: CliRunner, api: FakeImagesAPI) -> None:
    api.queue(stream_reply([sse_event("message", {"type": "error", "message": "quota", "code": "x"})]))
    run = online("-p", "cat", "--stream")
    assert run.code == gi.EXIT_UNAVAILABLE
    assert "the stream reported an error: quota (x)" in run.err


def test_a_stream_dropped_after_a_preview_exits_6_and_keeps_it(online: CliRunner, api: FakeImagesAPI,
                                                               isolated: Path) -> None:
    api.queue(stream_reply(sse_images(PARTIALS[:2], None)))
    run = online("-p", "cat", "-f", "cat.png", "--stream", "--json")
    assert run.code == gi.EXIT_MAYBE_BILLED
    error = run.json()["error"]
    assert error["kind"] == "possibly_billed"
    assert error["message"].endswith("the stream ended before the final image; the last preview is kept at "
                                     "cat.partial.png")
    assert (isolated / "cat.partial.png").read_bytes() == PARTIALS[1]
    assert len(api.requests) == 1


def test_a_silent_stream_times_out_and_keeps_the_preview(online: CliRunner, api: FakeImagesAPI,
                                                         isolated: Path) -> None:
    api.queue(stream_reply(sse_images(PARTIALS[:1], FINAL), gap=1.5))
    run = online("-p", "cat", "-f", "cat.png", "--stream", "--timeout", "0.5")
    assert run.code == gi.EXIT_MAYBE_BILLED
    assert "no complete answer" in run.err and "the last preview is kept at cat.partial.png" in run.err
    assert (isolated / "cat.partial.png").read_bytes() == PARTIALS[0]


def test_a_server_that_ignores_stream_gets_a_normal_run(online: CliRunner, api: FakeImagesAPI,
                                                        isolated: Path) -> None:
    api.queue(Reply(body=images_answer([FINAL])))
    run = online("-p", "cat", "-f", "cat.png", "--stream", "--json")
    assert run.code == 0
    assert (run.json()["previews"], (isolated / "cat.png").read_bytes()) == (0, FINAL)


def test_an_error_status_on_a_stream_request_is_an_ordinary_error(online: CliRunner, api: FakeImagesAPI) -> None:
    api.queue(Reply(status=400, body={"error": {"message": "bad size", "type": "invalid_request_error"}}))
    run = online("-p", "cat", "--stream")
    assert run.code == gi.EXIT_REFUSED
    assert "HTTP 400: bad size" in run.err


def test_edits_stream_too(online: CliRunner, api: FakeImagesAPI, isolated: Path, picture) -> None:
    picture("in.png", "png", 256, 256)
    api.queue(stream_reply(sse_images(PARTIALS[:1], FINAL, kind="image_edit")))
    run = online("-p", "make it blue", "-i", "in.png", "-f", "blue.png", "--stream", "--partial-images", "1")
    assert run.code == 0, run.err
    assert {k: v for k, v in api.requests[0].fields().items() if k in ("stream", "partial_images")} == {
        "stream": "true", "partial_images": "1"}
    assert (isolated / "blue.png").read_bytes() == FINAL
    assert "preview 1/1 after 0 s: blue.partial.png" in run.err


def test_a_reader_never_sees_a_half_written_preview(online: CliRunner, api: FakeImagesAPI, isolated: Path) -> None:
    big = [make_png(64, 64, rgb=(i, 90, 200)) + os.urandom(2_000_000) for i in (10, 60, 110)]  # trailing noise
    api.queue(stream_reply(sse_images(big, FINAL), gap=0.15))
    seen, stop = [], threading.Event()

    def watch() -> None:
        preview = isolated / "cat.partial.png"
        while not stop.is_set():
            try:
                seen.append(preview.read_bytes())
            except FileNotFoundError:
                pass

    reader = threading.Thread(target=watch)
    reader.start()
    try:
        run = online("-p", "cat", "-f", "cat.png", "--partial-images", "3")
    finally:
        stop.set()
        reader.join()
    assert run.code == 0
    assert seen and all(content in big for content in seen)
    assert {big.index(content) for content in seen} == {0, 1, 2}


def test_dry_run_shows_the_stream_fields(online: CliRunner, api: FakeImagesAPI) -> None:
    run = online("-p", "cat", "--keep-partials", "--dry-run", "--json")
    assert run.json()["request"]["json"] == {"model": "gpt-image-2", "prompt": "cat", "stream": True,
                                             "partial_images": 2}
    assert run.json()["request"]["headers"]["Accept"] == "text/event-stream, application/json"
    assert api.requests == []


@pytest.mark.parametrize("reply", [
    Reply(status=500, body={"error": {"message": "litellm: cannot stream image generation"}}),
    Reply(status=500, body={"error": {"message": "upstream error"}}, headers={"x-litellm-call-id": "c1"}),
    Reply(status=400, body={"error": {"message": "stream is not supported for this model"}}),
], ids=["words", "litellm-500", "400-naming-stream"])
def test_a_gateway_that_cannot_relay_a_stream_is_not_retried(online: CliRunner, api: FakeImagesAPI,
                                                             pauses: list[float], reply: Reply) -> None:
    api.queue(reply, reply, reply)
    run = online("-p", "cat", "--stream", "--json")
    assert (run.code, len(api.requests), pauses) == (gi.EXIT_MAYBE_BILLED, 1, [])
    error = run.json()["error"]
    assert "the gateway did not accept a streamed request" in error["message"]
    assert error["hint"].startswith("run it again without --stream")


def test_a_500_without_streaming_words_is_still_retried_when_not_streaming(online: CliRunner, api: FakeImagesAPI,
                                                                          pauses: list[float]) -> None:
    api.queue(Reply(status=500, body={"error": {"message": "upstream error"}}, headers={"x-litellm-call-id": "c1"}))
    assert online("-p", "cat").code == 0 and len(api.requests) == 2
