"""HTTP failures: exit codes, retries (and what is never retried), timeouts, drops, redirects."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from email.utils import formatdate
from pathlib import Path

import pytest

import generate_image as gi
from conftest import TEST_KEY, CliRunner
from fake_api import FakeImagesAPI, Recorded, Reply, api_error, make_png, sse_images, stream_reply


STATUSES = [
    pytest.param(400, api_error("Invalid value: '999x1'.", param="size", code="invalid_value"), gi.EXIT_REFUSED,
                 "HTTP 400: Invalid value: '999x1'. (type invalid_request_error, param size, code invalid_value, "
                 "request id req_e)", "change the prompt or the parameters", 1, id="400"),
    pytest.param(400, api_error("Your request was rejected by the safety system.", type_="image_generation_user_error",
                                code="moderation_blocked"), gi.EXIT_REFUSED,
                 "HTTP 400: Your request was rejected by the safety system.",
                 "rephrase the prompt", 1, id="400-moderation"),
    pytest.param(401, api_error("Incorrect API key provided: sk-te***ef", code="invalid_api_key"), gi.EXIT_AUTH,
                 "HTTP 401: Incorrect API key provided", "check APIYI_API_KEY", 1, id="401"),
    pytest.param(403, api_error("forbidden"), gi.EXIT_AUTH, "HTTP 403: forbidden", "check APIYI_API_KEY", 1, id="403"),
    pytest.param(404, api_error("model not found"), gi.EXIT_REFUSED, "HTTP 404", "check --base-url", 1, id="404"),
    pytest.param(413, b"<html><body><h1>413 Request Entity Too Large</h1></body></html>", gi.EXIT_REFUSED,
                 "HTTP 413: 413 Request Entity Too Large (request id req_e)", "smaller input images", 1, id="413-html"),
    pytest.param(415, api_error("unsupported mimetype"), gi.EXIT_REFUSED, "HTTP 415", "", 1, id="415"),
    pytest.param(422, api_error("bad"), gi.EXIT_REFUSED, "HTTP 422", "", 1, id="422"),
    pytest.param(429, api_error("quota", type_="insufficient_quota", code="insufficient_quota"), gi.EXIT_AUTH,
                 "HTTP 429: quota", "balance", 1, id="429-quota"),
    pytest.param(408, b"", gi.EXIT_UNAVAILABLE, "HTTP 408: (empty body)", "", 3, id="408"),
    pytest.param(409, api_error("conflict"), gi.EXIT_UNAVAILABLE, "HTTP 409", "", 3, id="409"),
    pytest.param(500, api_error("server_error", type_="server_error"), gi.EXIT_UNAVAILABLE, "HTTP 500", "", 3,
                 id="500"),
    pytest.param(502, b"<html>\n<head><title>502 Bad Gateway</title></head>\n<body>nginx</body></html>",
                 gi.EXIT_UNAVAILABLE, "HTTP 502: 502 Bad Gateway nginx", "retry later", 3, id="502-html"),
    pytest.param(524, b"<html>A timeout occurred</html>", gi.EXIT_MAYBE_BILLED, "HTTP 524: A timeout occurred",
                 "direct endpoint", 1, id="524"),
]


@pytest.mark.parametrize("status, body, code, message, hint, attempts", STATUSES)
def test_status_maps_to_exit_code(online: CliRunner, api: FakeImagesAPI, isolated: Path, pauses: list[float],
                                  status: int, body: object, code: int, message: str, hint: str,
                                  attempts: int) -> None:
    api.queue(*[Reply(status=status, body=body, headers={"x-request-id": "req_e"}) for _ in range(3)])
    run = online("-p", "cat", "-f", "cat.png")
    assert (run.code, run.out) == (code, "")
    error_line, *rest = [line for line in run.err.splitlines() if line.startswith(("generate_image.py", "hint"))]
    assert error_line.startswith(f"generate_image.py: error: {message}")
    assert hint in "".join(rest)
    assert len(api.requests) == attempts
    assert len(pauses) == attempts - 1
    assert list(isolated.iterdir()) == []


@pytest.mark.parametrize("status, kind", [(400, "bad_request"), (401, "account"), (503, "service"),
                                          (524, "possibly_billed")])
def test_json_error_document(online: CliRunner, api: FakeImagesAPI, status: int, kind: str) -> None:
    api.route = lambda request: Reply(status=status, body=api_error("nope", code="some_code"),
                                      headers={"Retry-After": "120"})
    run = online("-p", "cat", "--json")
    assert run.json() == {"ok": False, "error": {
        "kind": kind, "message": f"HTTP {status}: nope (type invalid_request_error, code some_code)",
        "status": status, "code": "some_code", "hint": run.json()["error"]["hint"], "exit_code": run.code,
        "body": json.dumps(api_error("nope", code="some_code"))}}


def test_429s_spend_no_retries_but_are_waited_out_for_ten_minutes_at_most(online: CliRunner, api: FakeImagesAPI,
                                                                          pauses: list[float]) -> None:
    api.route = lambda request: Reply(status=429, body=api_error("slow down", code="rate_limit_exceeded"),
                                      headers={"Retry-After": "120"})
    run = online("-p", "cat", "--retries", "0", "--json")
    assert (run.code, run.json()["error"]["kind"]) == (gi.EXIT_UNAVAILABLE, "rate_limited")
    assert (len(api.requests), pauses) == (6, [pytest.approx(120, abs=0.5)] * 5)   # 5 x 120 s = 600 s
    assert run.json()["error"]["message"].startswith("HTTP 429 for 10 minutes: the gateway still refuses")


def test_transient_failure_then_success(online: CliRunner, api: FakeImagesAPI, pauses: list[float]) -> None:
    api.queue(Reply(status=503, body=api_error("busy")), Reply(status=502, body=b"bad gateway"))
    run = online("-p", "cat", "-f", "cat.png")
    assert (run.code, run.out) == (0, "cat.png\n")
    assert len(api.requests) == 3
    assert [r.body for r in api.requests] == [api.requests[0].body] * 3
    assert 0.375 <= pauses[0] <= 0.5 and 0.75 <= pauses[1] <= 1.0
    assert "HTTP 503; retry 1 of 2 in" in run.err and "HTTP 502; retry 2 of 2 in" in run.err


def test_multipart_body_is_replayed_whole_on_retry(online: CliRunner, api: FakeImagesAPI, picture) -> None:
    picture("a.png", "png", 512, 512)
    api.queue(Reply(status=500, body=api_error("oops")))
    assert online("-p", "x", "-i", "a.png").code == 0
    first, second = api.requests
    assert first.files()[0].data == second.files()[0].data == Path("a.png").read_bytes()


def test_backoff_grows_and_is_capped() -> None:
    delays = [gi.backoff_delay(attempt) for attempt in range(8)]
    assert all(0.375 <= d <= 0.5 for d in delays[:1])
    assert all(6.0 <= d <= 8.0 for d in delays[4:])


@pytest.mark.parametrize("header, expected", [("3", [3.0]), ("0", [1.0]), ("120", [120.0])])   # 1 s at least
def test_retry_after_seconds_is_honoured(online: CliRunner, api: FakeImagesAPI, pauses: list[float],
                                         header: str, expected: list[float]) -> None:
    api.queue(Reply(status=429, body=api_error("slow"), headers={"Retry-After": header}))
    assert online("-p", "cat").code == 0
    assert pauses == [pytest.approx(wait, abs=0.05) for wait in expected]
    assert len(api.requests) == 2


def test_retry_after_http_date_is_honoured(online: CliRunner, api: FakeImagesAPI, pauses: list[float]) -> None:
    import time

    api.queue(Reply(status=503, body=b"", headers={"Retry-After": formatdate(time.time() + 30, usegmt=True)}))
    assert online("-p", "cat").code == 0
    assert 25 <= pauses[0] <= 31


def test_retry_after_beyond_120_s_stops_with_exit_5(online: CliRunner, api: FakeImagesAPI,
                                                    pauses: list[float]) -> None:
    api.queue(Reply(status=429, body=api_error("slow"), headers={"Retry-After": "600"}))
    run = online("-p", "cat")
    assert run.code == gi.EXIT_UNAVAILABLE
    assert "the server asks to wait 600 s before retrying" in run.err
    assert "hint: try again after " in run.err
    assert (len(api.requests), pauses) == (1, [])


def test_retries_zero_sends_once(online: CliRunner, api: FakeImagesAPI) -> None:
    api.queue(Reply(status=500, body=b""))
    assert online("-p", "cat", "--retries", "0").code == gi.EXIT_UNAVAILABLE
    assert len(api.requests) == 1


def closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def test_connection_refused_is_retried_then_exits_5(cli: CliRunner, pauses: list[float]) -> None:
    run = cli("-p", "cat", "--base-url", closed_port_url(), "-k", TEST_KEY)
    assert run.code == gi.EXIT_UNAVAILABLE
    assert "could not reach 127.0.0.1:" in run.err
    assert "hint: check the network" in run.err
    assert len(pauses) == 2


NOT_RETRIED = [
    pytest.param(Reply(delay=1.5), ["--timeout", "0.3"], "no complete answer from 127.0.0.1", id="slow-answer"),
    pytest.param(Reply(trickle=0.05, body=b"x" * 30_000), ["--timeout", "0.5"], "no complete answer",
                 id="trickling-body"),
    pytest.param(Reply(drop=True), [], "dropped after the request was sent", id="dropped"),
    pytest.param(Reply(truncate=10, body=b'{"created": 1, "data": []}'), [], "dropped after the request was sent",
                 id="truncated"),
    pytest.param(Reply(truncate=10, reset=True, body=b'{"created": 1, "data": []}'), [],
                 "dropped after the request was sent", id="reset"),
]


@pytest.mark.parametrize("reply, args, message", NOT_RETRIED)
def test_timeout_or_drop_after_sending_is_not_retried(online: CliRunner, api: FakeImagesAPI, isolated: Path,
                                                      pauses: list[float], reply: Reply, args: list[str],
                                                      message: str) -> None:
    api.queue(reply)
    run = online("-p", "cat", "-f", "cat.png", *args)
    assert (run.code, run.out) == (gi.EXIT_MAYBE_BILLED, "")
    assert message in run.err
    assert "hint: the request may already have been billed" in run.err
    # a longer --timeout is suggested only when the time ran out, never for a dropped connection
    assert ("retry with a longer --timeout" in run.err) == ("no complete answer" in message)
    assert (len(api.requests), pauses) == (1, [])
    assert list(isolated.iterdir()) == []


@pytest.mark.parametrize("reply", [Reply(status=400, body=api_error("x" * 5000), truncate=100),
                                   Reply(status=400, body=api_error("x" * 5000), truncate=100, reset=True),
                                   Reply(status=400, body=b"")],
                         ids=["error-body-cut-off", "error-body-reset", "empty-error-body"])
def test_error_status_with_a_broken_body_still_maps_by_status(online: CliRunner, api: FakeImagesAPI,
                                                              reply: Reply) -> None:
    api.queue(reply)
    run = online("-p", "cat")
    assert run.code == gi.EXIT_REFUSED
    assert run.err.startswith("Generating") and "generate_image.py: error: HTTP 400: " in run.err


def test_redirect_is_not_followed_with_the_key(online: CliRunner, api: FakeImagesAPI) -> None:
    with FakeImagesAPI() as elsewhere:
        api.queue(Reply(status=307, headers={"Location": elsewhere.url + "/images/generations"}))
        run = online("-p", "cat")
        assert run.code == gi.EXIT_REFUSED
        assert f"HTTP 307: redirected to {elsewhere.url}/images/generations" in run.err
        assert elsewhere.requests == []
    assert len(api.requests) == 1


PARTIALS = [make_png(64, 64)]


def interrupt_after(seconds: float) -> Callable[[Recorded], None]:
    import _thread

    return lambda request: threading.Timer(seconds, _thread.interrupt_main).start()


IN_PROCESS_INTERRUPTS = [
    pytest.param(Reply(drop=True, before=interrupt_after(0)), [],
                 "interrupted after the request was sent: it may be billed, and with no worker process its answer "
                 "is lost with this command", "check your APIYI usage before sending it again", [], id="sent"),
    pytest.param(stream_reply([*sse_images(PARTIALS, None)[:1], b""], gap=2.0), ["--stream"],
                 "interrupted after the request was sent: it may be billed, and with no worker process its answer "
                 "is lost with this command; the last preview is kept at cat.partial.png",
                 "check your APIYI usage", ["cat.partial.png"], id="sent-with-a-preview"),
]


@pytest.mark.parametrize("reply, args, message, hint, left", IN_PROCESS_INTERRUPTS)
def test_ctrl_c_in_process_says_what_is_left(online: CliRunner, api: FakeImagesAPI, isolated: Path, reply: Reply,
                                            args: list[str], message: str, hint: str, left: list[str]) -> None:
    """With the job in a thread of the command, Ctrl-C ends both; the detached case is in test_jobs."""
    if reply.before is None:
        reply.before = interrupt_after(0.5)     # once the first preview is on disk
    api.queue(reply)
    run = online("-p", "cat", "-f", "cat.png", "--json", *args)
    assert run.code == gi.EXIT_INTERRUPTED
    assert run.json()["error"]["kind"] == "interrupted"
    assert f"error: {message}\nhint: {hint}" in run.err
    assert sorted(p.name for p in isolated.iterdir()) == left
    wait_for_the_worker_thread(isolated.parent / "state")


def wait_for_the_worker_thread(state: Path) -> None:
    """In the tests the job's thread outlives the interrupted main(): let it end before the folder is checked."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not all(r["state"] in gi.FINISHED_STATES for r in gi.list_records(state)):
        time.sleep(0.05)


def test_ctrl_c_in_process_before_sending_stops_the_upload(online: CliRunner, api: FakeImagesAPI,
                                                           isolated: Path) -> None:
    import _thread

    api.stall_upload = 1.0
    big = isolated / "big.png"
    big.write_bytes(make_png(64, 64) + b"\0" * (40 << 20))
    threading.Timer(0.3, _thread.interrupt_main).start()
    run = online("-p", "cat", "-i", big, "-f", "cat.png")
    assert run.code == gi.EXIT_INTERRUPTED
    assert "error: interrupted before the request was completely sent: nothing was billed\n" \
           "hint: run the same command again to send it" in run.err
    time.sleep(1.5)     # the server reads what came, finds it cut short, and records nothing
    assert api.requests == [] and sorted(p.name for p in isolated.iterdir()) == ["big.png"]
    wait_for_the_worker_thread(isolated.parent / "state")


def test_key_is_not_sent_to_a_url_item_on_another_host(online: CliRunner, api: FakeImagesAPI) -> None:
    from fake_api import make_png

    with FakeImagesAPI() as cdn:
        cdn.queue(Reply(body=make_png(1024, 1024)))
        api.queue(Reply(body={"created": 1, "data": [{"url": cdn.url + "/img.png"}]}))
        assert online("-p", "cat", "-f", "cat.png").code == 0
        [download] = cdn.requests
        assert all(TEST_KEY not in value for value in download.headers.values())


def test_failed_download_names_the_url(online: CliRunner, api: FakeImagesAPI) -> None:
    api.queue(Reply(body={"created": 1, "data": [{"url": api.url + "/gone.png"}]}), Reply(status=404, body=b""))
    run = online("-p", "cat", "-f", "cat.png")
    assert run.code == gi.EXIT_UNAVAILABLE
    assert f"downloading the image failed with HTTP 404: {api.url}/gone.png" in run.err


@pytest.mark.parametrize("reply, wait", [
    (Reply(status=429, headers={"retry-after-ms": "2500"}, body=b""), 2.5),
    (Reply(status=429, body=api_error("Rate limited, please try again in 5 seconds")), 5.0),
    (Reply(status=503, body=api_error("上游繁忙,请在 7 秒后重试")), 7.0),
    (Reply(status=503, body=api_error("retry after 300ms")), 0.3),
], ids=["retry-after-ms", "words", "chinese-words", "milliseconds-in-words"])
def test_the_wait_a_gateway_asks_for_is_honoured(online: CliRunner, api: FakeImagesAPI, pauses: list[float],
                                                 reply: Reply, wait: float) -> None:
    api.queue(reply)
    assert online("-p", "cat", "--retries", "1").code == 0
    assert pauses == [pytest.approx(wait, abs=0.05)]   # the gate pauses what is left of the wait


def test_a_429_without_a_wait_backs_off_from_two_seconds(online: CliRunner, api: FakeImagesAPI,
                                                         pauses: list[float]) -> None:
    api.queue(Reply(status=429, body=b""), Reply(status=429, body=b""))
    assert online("-p", "cat", "--retries", "2").code == 0
    assert 2.0 <= pauses[0] <= 2.5 and 4.0 <= pauses[1] <= 5.0


@pytest.mark.parametrize("headers, request_id, header", [
    ({"x-litellm-call-id": "lite-1", "cf-ray": "ray-1"}, "lite-1", "x-litellm-call-id"),
    ({"cf-ray": "ray-2"}, "ray-2", "cf-ray"),
    ({"x-new-api-request-id": "new-3"}, "new-3", "x-new-api-request-id"),
])
def test_the_request_id_is_read_where_gateways_put_it(online: CliRunner, api: FakeImagesAPI, headers: dict,
                                                      request_id: str, header: str) -> None:
    from fake_api import images_answer, make_png

    api.queue(Reply(body=images_answer([make_png(64, 64)]), headers=headers))
    document = online("-p", "cat", "--json").json()
    assert (document["request_id"], document["request_id_header"]) == (request_id, header)


@pytest.mark.parametrize("body, kind", [
    (api_error("您的请求违反了内容安全政策", code="400"), "safety_refusal"),
    (api_error("Invalid value for 'moderation': 'strict'.", param="moderation", code="invalid_value"), "bad_request"),
])
def test_safety_words_in_any_language_but_not_a_bad_moderation_value(online: CliRunner, api: FakeImagesAPI,
                                                                     body: dict, kind: str) -> None:
    api.queue(Reply(status=400, body=body))
    assert online("-p", "cat", "--json").json()["error"]["kind"] == kind


def test_the_gate_learns_a_quota_from_one_wave_and_climbs_back() -> None:
    gate = gi.Gate(8)
    for _ in range(8):
        gate.enter()
    changes = []
    for _ in range(6):          # six refused at once; two stay in flight: the quota is 2
        changes.append(gate.hold_off(0, throttled=True))      # a refused request holds, then leaves
        gate.leave()
    assert (gate.limit, [c for c in changes if c]) == (2, [7, 6, 5, 4, 3, 2])
    assert gate.succeeded() is None and gate.quota == 2     # the wave ended: it was a quota
    raised = [gate.succeeded() for _ in range(4 * 2 - 1)]
    assert raised[-1] == 3 and all(r is None for r in raised[:-1])     # a step above the quota, after 4 rounds


def test_a_wave_that_refuses_everything_is_a_pause_not_a_quota() -> None:
    gate = gi.Gate(4)
    for _ in range(4):
        gate.enter()
    for _ in range(4):
        gate.hold_off(0, throttled=True)
        gate.leave()
    assert gate.limit == 4 and gate.quota is None


def test_a_worker_waiting_for_a_slot_is_held_by_a_pause_set_meanwhile(monkeypatch: pytest.MonkeyPatch) -> None:
    waited: list[float] = []
    gate = gi.Gate(1)
    gate.enter()

    def hold_then_free(seconds: float) -> None:
        waited.append(round(seconds))

    monkeypatch.setattr(gi, "pause", hold_then_free)
    import threading

    entered = threading.Event()
    worker = threading.Thread(target=lambda: (gate.enter(), entered.set()))
    worker.start()
    time.sleep(0.1)                              # the worker waits for the slot
    gate.hold_off(60, throttled=False)           # a Retry-After arrives meanwhile
    gate.leave()                                 # the slot frees: the worker must now wait out the pause
    worker.join(5)
    assert entered.is_set() and waited == [60]


REAL_PAUSE = gi.pause       # taken at import, before the fixtures put a recorder in its place


def test_a_wait_that_ran_out_meanwhile_is_no_wait() -> None:
    """The gate computes a wait, then sleeps outside its lock: by then it may be negative (a bug once,
    under load in CI: time.sleep raises on a negative length)."""
    started = time.monotonic()
    REAL_PAUSE(-0.5)
    assert time.monotonic() - started < 0.1


@pytest.mark.parametrize("headers, body, expected", [
    ({"Retry-After": "0"}, b"", gi.RATE_LIMIT_MIN_S),                     # "now" would flood the gateway
    ({"Retry-After": "9" * 400}, b"", None),                             # past any clock: an error, not a crash
])
def test_429_waits_have_a_floor_and_a_ceiling(online: CliRunner, api: FakeImagesAPI, pauses: list[float],
                                              headers: dict, body: bytes, expected: float) -> None:
    api.queue(Reply(status=429, headers=headers, body=body))
    run = online("-p", "cat", "--retries", "0")
    if expected is None:
        assert run.code == gi.EXIT_UNAVAILABLE and "the server asks to wait" in run.err and "Traceback" not in run.err
    else:
        assert run.code == 0 and pauses == [pytest.approx(expected, abs=0.05)]


def test_a_429_naming_streams_is_still_a_429(online: CliRunner, api: FakeImagesAPI, pauses: list[float]) -> None:
    api.queue(Reply(status=429, body=api_error("too many concurrent stream requests"), headers={"Retry-After": "2"}))
    assert online("-p", "cat", "--stream").code == 0 and len(api.requests) == 2


def test_a_host_name_no_resolver_takes_is_bad_input(online: CliRunner, api: FakeImagesAPI) -> None:
    run = online("-p", "cat", "--base-url", f"https://{'a' * 64}.com/v1")
    assert (run.code, api.requests) == (gi.EXIT_USAGE, []) and "not a valid domain name" in run.err
