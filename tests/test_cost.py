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
    ("gpt-image-2.5-all", None, "2", {"usd": 0.06, "basis": "per_image", "prices": {"per_image": 0.03,
                                                                                   "multiplier": 2.0}}),
    ("gpt-image-2.6-all", None, "2", {"usd": 0.05, "basis": "per_image", "prices": {"per_image": 0.025,
                                                                                   "multiplier": 2.0}}),
    ("gpt-image-2", None, "", {"usd": None, "basis": "tokens", "note": "the answer reported no usage"}),
    ("gpt-image-9", USAGE, "", {"usd": None, "basis": "unknown", "note": "no published price"}),
    ("gpt-image-2", {"input_tokens": "abc", "output_tokens": 10 ** 400}, "",
     {"usd": None, "basis": "tokens", "note": "the answer's usage is unreadable"}),
    ("gpt-image-2", {"input_tokens": 5, "output_tokens": -1000}, "",
     {"usd": None, "basis": "tokens", "note": "the answer's usage is unreadable"}),
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
    usd = [round((tokens_in * 5 + tokens_out * 30) / 1e6, 4) for tokens_in, tokens_out in zip(text, (low, high))]
    assert estimate == {"low": usd[0], "high": usd[1], "basis": "tokens", "source": "the token tables"}


def test_an_estimate_with_no_published_figure_says_unknown_and_n_multiplies(cli: CliRunner) -> None:
    unknown = cli("-p", "x", "--model", "gpt-image-2.6-flare", "-q", "low", "--dry-run")
    assert "cost unknown (no published figure for this model and quality)" in unknown.out
    gif = cli("-p", "x", "--model", "gpt-image-2.6-flare", "-q", "high", "-o", "gif", "--dry-run")
    assert "cost unknown (GIF frames have no published token figure)" in gif.out
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
    """Each item is estimated at up to $0.0527 (1024x1024 medium, 1756 tokens) but really costs $0.1251
    (the fake's 50 and 4160 tokens): with $0.2 the first item runs; the next ones are then held to what
    the first really cost, and do not fit; exit 8 with the items not run named."""
    prompts = [f"item {i}" for i in range(1, 6)]
    (isolated / "b.json").write_text(json.dumps({"global": {"size": "1024x1024", "quality": "medium"},
                                                 "prompts": prompts}), encoding="utf-8")
    run = online("--batch", "b.json", "-j", "1", "--max-cost", "0.2", "--json")
    assert run.code == gi.EXIT_BATCH_PARTIAL, run.err
    document = run.json()
    assert [item["status"] for item in document["items"]] == ["ok", "not_run", "not_run", "not_run", "not_run"]
    assert len(api.requests) == 1 and document["error"]["kind"] == "budget"
    assert "--max-cost $0.2 reached: $0.1250 spent, and item 2 may cost up to $0.1250; not run: item 2, 3, 4, " \
           "5" in document["error"]["message"]
    assert document["cost"]["usd"] == 0.12505


@pytest.mark.parametrize("jobs", ["1", "2", "4"])
def test_the_budget_makes_the_same_items_at_any_concurrency(online: CliRunner, api: FakeImagesAPI, isolated: Path,
                                                           jobs: str) -> None:
    (isolated / "b.json").write_text(json.dumps({"global": {"model": "gpt-image-2.6-all"},
                                                 "prompts": [f"p{i}" for i in range(6)]}), encoding="utf-8")
    run = online("--batch", "b.json", "-j", jobs, "--max-cost", "0.1", "--json")    # 4 x $0.025
    assert run.code == gi.EXIT_BATCH_PARTIAL and len(api.requests) == 4
    assert [item["status"] for item in run.json()["items"]].count("ok") == 4


def test_a_batch_whose_first_item_does_not_fit_is_refused_before_sending(online: CliRunner, api: FakeImagesAPI,
                                                                        isolated: Path) -> None:
    (isolated / "b.json").write_text('["a", "b"]', encoding="utf-8")
    run = online("--batch", "b.json", "-s", "1024x1024", "-q", "high", "--max-cost", "0.1")
    assert (run.code, api.requests) == (gi.EXIT_USAGE, []) and "item 1 may cost up to $0.2108" in run.err
    assert not (isolated / "b.results.jsonl").exists()


def test_odd_records_in_the_state_folder_do_not_stop_a_run(online: CliRunner, api: FakeImagesAPI,
                                                           tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    for number, record in enumerate([{"id": "a", "kind": "single", "spec": "x", "result": {}},
                                     {"id": "b", "kind": "single", "spec": {"fields": {"n": "x"}},
                                      "result": {"meta": {"usage": {"output_tokens": -10 ** 9}}}},
                                     {"id": "c", "kind": "single", "spec": {"fields": []}, "result": []}]):
        (state / f"2026-{number}.json").write_text(json.dumps(record), encoding="utf-8")
    run = online("-p", "cat", "-s", "1024x1024", "-q", "high", "--dry-run", "--max-cost", "1")
    assert run.code == 0 and "estimated cost $0.2107-$0.2108 (from the token tables)" in run.out


def test_a_price_multiplier_that_is_not_a_number_is_bad_input(online: CliRunner, api: FakeImagesAPI,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APIYI_PRICE_MULTIPLIER", "lots")
    run = online("-p", "cat")
    assert (run.code, api.requests) == (gi.EXIT_USAGE, [])
    assert "APIYI_PRICE_MULTIPLIER='lots' is not a price multiplier" in run.err
