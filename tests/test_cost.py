"""What a run costs: after (from usage, or a flat price), before (the estimate and its bounds), and
--max-cost, which refuses a run before sending and stops a batch part-way."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import generate_image as gi
from conftest import CliRunner
from fake_api import FakeImagesAPI, Reply, images_answer, make_png

USAGE = {"input_tokens": 1100, "output_tokens": 7024, "total_tokens": 8124,
         "input_tokens_details": {"text_tokens": 100, "image_tokens": 1000}}


@pytest.mark.parametrize("model, usage, multiplier, cost", [
    # (100 x $5 + 1000 x $8 + 7024 x $30) per million tokens
    ("gpt-image-2", USAGE, "", {"usd": 0.21922, "basis": "tokens", "prices": {
        "text_input": 5.0, "image_input": 8.0, "image_output": 30.0, "multiplier": 1.0}}),
    ("gpt-image-2.5-flare", USAGE, "1.2", {"usd": 0.263064, "basis": "tokens", "prices": {
        "text_input": 5.0, "image_input": 8.0, "image_output": 30.0, "multiplier": 1.2}}),
    # no details: all input counted as text
    ("gpt-image-2", {"input_tokens": 40, "output_tokens": 196}, "", {"usd": 0.00608, "basis": "tokens", "prices": {
        "text_input": 5.0, "image_input": 8.0, "image_output": 30.0, "multiplier": 1.0}}),
    ("gpt-image-2-vip", USAGE, "", {"usd": 0.03, "basis": "per_image", "prices": {"per_image": 0.03,
                                                                                  "multiplier": 1.0}}),
    ("gpt-image-2.6-all", None, "2", {"usd": 0.05, "basis": "per_image", "prices": {"per_image": 0.025,
                                                                                   "multiplier": 2.0}}),
    ("gpt-image-2", None, "", {"usd": None, "basis": "tokens", "note": "the answer reported no usage"}),
    ("gpt-image-2.5-all", USAGE, "", {"usd": None, "basis": "unknown", "note": "no published price"}),
])
def test_the_cost_of_a_run_by_each_billing_basis(online: CliRunner, api: FakeImagesAPI, isolated: Path,
                                                  monkeypatch: pytest.MonkeyPatch, model: str, usage: dict,
                                                  multiplier: str, cost: dict) -> None:
    monkeypatch.setenv("APIYI_PRICE_MULTIPLIER", multiplier)
    body = images_answer([make_png(64, 64)], usage=usage)
    if usage is None:
        del body["usage"]
    api.queue(Reply(body=body))
    run = online("-p", "cat", "--model", model, "-f", "cat.png", "--json", "--metadata")
    assert run.code == 0, run.err
    assert run.json()["cost"] == cost
    assert json.loads((isolated / "cat.png.json").read_text())["cost"] == cost
    shown = f"cost ${cost['usd']:.4f}" if cost["usd"] is not None else f"cost unknown ({cost['note']})"
    assert shown in run.err


@pytest.mark.parametrize("args, low, high", [
    (["-s", "1024x1024", "-q", "high"], 7024, 7024),
    (["-s", "3840x2160", "-q", "high"], 13342, 13342),
    (["-s", "1024x1024"], 196, 7024),                       # quality auto: low to high
    (["-q", "low"], 158, 196),                               # size auto: the three sizes it picks from
    (["-s", "1024x1024", "-q", "high", "--partial-images", "2"], 7224, 7224),
    (["--model", "gpt-image-2.5-sunburst", "-s", "1024x1024", "-q", "xhigh"], 3122, 3122),
    (["--model", "gpt-image-2.5-flare", "-s", "2048x1152", "-q", "medium"], 367, 367),
])
def test_the_estimate_follows_the_published_token_tables(cli: CliRunner, args: list[str], low: int,
                                                         high: int) -> None:
    estimate = cli("-p", "abcd", *args, "--dry-run", "--json").json()["estimate"]
    text = (len(b"abcd") // 4 + 6, len("abcd") + 6)
    assert estimate == {"low": round((text[0] * 5 + low * 30) / 1e6, 4), "high": round((text[1] * 5 + high * 30) / 1e6, 4),
                        "basis": "tokens", "source": "the token tables"}


def test_an_estimate_with_no_published_figure_says_unknown_and_n_multiplies(cli: CliRunner) -> None:
    unknown = cli("-p", "x", "--model", "gpt-image-2.6-flare", "-q", "low", "--dry-run")
    assert "cost unknown (no published figure for this model and quality)" in unknown.out
    flat = cli("-p", "x", "--model", "gpt-image-2.6-all", "-n", "3", "--dry-run", "--json").json()["estimate"]
    assert flat == {"low": 0.075, "high": 0.075, "basis": "per_image", "source": "the flat price"}


def test_max_cost_refuses_a_run_before_sending(online: CliRunner, api: FakeImagesAPI) -> None:
    run = online("-p", "cat", "-s", "1024x1024", "-q", "high", "--max-cost", "0.2")
    assert (run.code, api.requests) == (gi.EXIT_USAGE, [])
    assert "error: --max-cost $0.2: this request may cost up to $0.2108" in run.err
    run = online("-p", "cat", "--model", "gpt-image-2.6-flare", "-q", "low", "--max-cost", "5")
    assert (run.code, api.requests) == (gi.EXIT_USAGE, []) and "cannot be estimated" in run.err
    assert online("-p", "cat", "-s", "1024x1024", "-q", "high", "--max-cost", "0.25").code == 0


def test_max_cost_stops_a_batch_part_way(online: CliRunner, api: FakeImagesAPI, isolated: Path) -> None:
    """Each item may cost up to $0.0527 (1024x1024 medium, 1756 tokens) and really costs $0.1251 (the
    fake's 50 and 4160 tokens): with $0.2 the first item runs, the second still fits ($0.1251 spent plus
    its estimate), the third does not; exit 8 and the rest not run."""
    prompts = [f"item {i}" for i in range(1, 6)]
    (isolated / "b.json").write_text(json.dumps({"global": {"size": "1024x1024", "quality": "medium"},
                                                 "prompts": prompts}), encoding="utf-8")
    run = online("--batch", "b.json", "-j", "1", "--max-cost", "0.2", "--json")
    assert run.code == gi.EXIT_BATCH_PARTIAL, run.err
    document = run.json()
    assert [item["status"] for item in document["items"]] == ["ok", "ok", "not_run", "not_run", "not_run"]
    assert len(api.requests) == 2 and document["error"]["kind"] == "budget"
    assert "--max-cost $0.2 reached: $0.2501 spent" in document["error"]["message"]
    assert "3 items not run" in document["error"]["message"] and document["cost"]["usd"] == 0.2501


def test_a_price_multiplier_that_is_not_a_number_is_bad_input(online: CliRunner, api: FakeImagesAPI,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APIYI_PRICE_MULTIPLIER", "lots")
    run = online("-p", "cat")
    assert (run.code, api.requests) == (gi.EXIT_USAGE, [])
    assert "APIYI_PRICE_MULTIPLIER='lots' is not a price multiplier" in run.err
