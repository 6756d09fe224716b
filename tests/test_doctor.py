"""--doctor: the set-up checked without a billed call, one line per check, the exit code of the first failure."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

import generate_image as gi
from conftest import TEST_KEY, CliRunner
from fake_api import FakeImagesAPI, Reply


def statuses(run) -> dict[str, str]:
    return {check["check"]: check["status"] for check in run.json()["checks"]}


def test_a_good_set_up_passes_every_check(online: CliRunner, api: FakeImagesAPI) -> None:
    run = online("--doctor", "--json")
    assert run.code == 0, run.out
    assert statuses(run) == {"python": "OK", "base URL": "OK", "API key": "OK", "network": "OK", "model": "OK",
                             "clock": "OK", "state folder": "OK", "output folder": "OK"}
    assert [(r.method, r.path) for r in api.requests] == [("GET", "/v1/models")]
    assert api.requests[0].header("Authorization") == f"Bearer {TEST_KEY}"
    text = online("--doctor")
    assert text.code == 0 and "OK   model: gpt-image-2 is listed" in text.out and TEST_KEY not in text.out


def test_a_model_the_gateway_does_not_list_is_a_warning(online: CliRunner, api: FakeImagesAPI) -> None:
    run = online("--doctor", "--model", "gpt-image-2.5-flare", "--json")
    assert run.code == 0 and statuses(run)["model"] == "WARN"


@pytest.mark.parametrize("reply, failing, code", [
    (Reply(status=401, body={"error": {"message": "Incorrect API key", "code": "invalid_api_key"}}), "API key",
     gi.EXIT_AUTH),
    (Reply(status=429, body={"error": {"message": "quota", "code": "insufficient_quota"}}), "API key", gi.EXIT_AUTH),
    (Reply(status=503, body=b"down"), "GET /models", gi.EXIT_UNAVAILABLE),
], ids=["wrong-key", "no-balance", "gateway-down"])
def test_what_get_models_answers_decides_the_check(online: CliRunner, api: FakeImagesAPI, reply: Reply,
                                                   failing: str, code: int) -> None:
    api.route = lambda request: reply
    run = online("--doctor", "--json", "--retries", "0")
    assert run.code == code and statuses(run)[failing] == "FAIL"
    assert all(r.method == "GET" for r in api.requests)          # never a billed call


def test_a_closed_port_and_a_missing_key_fail_with_their_codes(cli: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    run = cli("--doctor", "--json", "--base-url", f"http://127.0.0.1:{port}/v1", "-k", TEST_KEY)
    assert run.code == gi.EXIT_UNAVAILABLE and statuses(run)["network"] == "FAIL"
    run = cli("--doctor", "--json", "--base-url", f"http://127.0.0.1:{port}/v1")
    assert run.code == gi.EXIT_AUTH and statuses(run)["API key"] == "FAIL"


@pytest.mark.parametrize("url, warning", [("https://api-cf.apiyi.com/v1", "cuts requests at about 100 s"),
                                          ("https://api.apiyi.com", "no /v1 at the end"),
                                          ("https://api.apiyi.com/v1", None)])
def test_the_base_urls_shape(url: str, warning: str, tmp_path: Path) -> None:
    seen: list[tuple] = []
    args = gi.build_parser().parse_args(["--doctor", "--base-url", url])
    assert gi.doctor_base_url(args, {}, lambda *a: seen.append(a)) == url.rstrip("/")
    assert seen[0][1] == ("WARN" if warning else "OK") and (warning or "") in seen[0][2]
