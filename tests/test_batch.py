"""--batch: many images from one file, in parallel, resumable, with a manifest."""

from __future__ import annotations

import io
import json
import re
import sys
from pathlib import Path
from typing import Any, Optional

import pytest

import generate_image as gi
from conftest import CliRunner
from fake_api import FakeImagesAPI, Recorded, Reply, images_answer, make_image, make_png, quota_route

SMALL_ANSWER = images_answer([make_png(64, 64)])


def write_batch(path: Path, content: Any) -> Path:
    """A dict or list is written as JSON, a str as is (JSONL); returns the path relative to the work folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content if isinstance(content, str) else json.dumps(content, ensure_ascii=False),
                    encoding="utf-8")
    return path.relative_to(Path.cwd())


def sent_by_prompt(api: FakeImagesAPI) -> dict[str, dict[str, Any]]:
    """What the server received, keyed by prompt: JSON fields, or multipart fields plus file names."""
    sent = {}
    for request in api.requests:
        if (request.header("Content-Type") or "").startswith("multipart/"):
            fields: dict[str, Any] = dict(request.fields())
            fields["files"] = [(p.name, p.filename) for p in request.files()]
        else:
            fields = request.json()
        sent[str(fields["prompt"])] = fields
    return sent


def manifest_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def fail_prompt(prompt: str, reply: Reply) -> Any:
    return lambda request: reply if request.prompt() == prompt else None


SEED = {"description": "三种风格的日出", "global": {"quality": "low", "size": "1536x1024"},
        "prompts": ["sunrise watercolor", {"prompt": "日出,油画风格", "filename": "oil.png"},
                    {"prompt": "sunrise pixel art", "quality": "high", "size": "1024x1024"}]}


@pytest.mark.parametrize("name, content", [
    pytest.param("set.json", SEED, id="seed-format"),
    pytest.param("set.json", [SEED["global"] | {"prompt": "sunrise watercolor"},
                              SEED["global"] | SEED["prompts"][1],
                              SEED["global"] | SEED["prompts"][2]], id="bare-list"),
    pytest.param("set.jsonl", "# sunrise styles\n"
                              + "\n".join(json.dumps(SEED["global"] | ({"prompt": p} if isinstance(p, str) else p),
                                                     ensure_ascii=False) for p in SEED["prompts"])
                              + "\n\n# end\n", id="jsonl-with-comments"),
])
def test_batch_formats_write_every_image(online: CliRunner, api: FakeImagesAPI, isolated: Path,
                                         name: str, content: Any) -> None:
    batch = write_batch(isolated / "sets" / name, content)
    run = online("--batch", batch, "-j", "1")
    assert run.code == 0, run.err
    folder = isolated / "sets"
    expected = [folder / "01-sunrise-watercolor.png", folder / "oil.png", folder / "03-sunrise-pixel-art.png"]
    assert run.out.splitlines() == [str(Path("sets") / p.name) for p in expected]
    assert [gi.read_image_info(p) for p in expected] == [gi.ImageInfo("png", 1536, 1024),
                                                         gi.ImageInfo("png", 1536, 1024),
                                                         gi.ImageInfo("png", 1024, 1024)]
    sent = sent_by_prompt(api)
    assert {p: (f["quality"], f["size"]) for p, f in sent.items()} == {
        "sunrise watercolor": ("low", "1536x1024"), "日出,油画风格": ("low", "1536x1024"),
        "sunrise pixel art": ("high", "1024x1024")}


@pytest.mark.parametrize("cli_flags, global_block, item, expected", [
    pytest.param([], {}, {}, {}, id="defaults-send-nothing"),
    pytest.param(["-q", "low"], {}, {}, {"quality": "low"}, id="cli"),
    pytest.param(["-q", "low"], {"quality": "medium"}, {}, {"quality": "medium"}, id="global-over-cli"),
    pytest.param(["-q", "low"], {"quality": "medium"}, {"quality": "high"}, {"quality": "high"}, id="item-over-all"),
    pytest.param(["-s", "16:9", "-r", "2K"], {}, {}, {"size": "2048x1152"}, id="cli-ratio"),
    pytest.param(["-r", "2K"], {"size": "16:9"}, {}, {"size": "2048x1152"}, id="cli-resolution-global-ratio"),
    pytest.param([], {"size": "16:9", "resolution": "2K"}, {"size": "1024x1024"}, {"size": "1024x1024"},
                 id="inherited-resolution-dropped-for-wxh"),
    pytest.param(["-o", "jpeg", "-c", "70"], {}, {"output_format": "png"}, {"output_format": "png"},
                 id="inherited-compression-dropped-for-png"),
    pytest.param([], {"model": "gpt-image-2-beta", "n": 2}, {"moderation": "low"},
                 {"model": "gpt-image-2-beta", "n": 2, "moderation": "low"}, id="model-n-moderation"),
])
def test_precedence_item_then_global_then_flags_then_defaults(online: CliRunner, api: FakeImagesAPI, isolated: Path,
                                                              cli_flags: list[str], global_block: dict,
                                                              item: dict, expected: dict) -> None:
    batch = write_batch(isolated / "b.json", {"global": global_block, "prompts": [{"prompt": "cat", **item}]})
    run = online("--batch", batch, *cli_flags)
    assert run.code == 0, run.err
    sent = api.requests[0].json()
    assert sent == {"model": "gpt-image-2", "prompt": "cat", **expected}


def test_relative_paths_are_resolved_against_the_batch_folder(online: CliRunner, api: FakeImagesAPI,
                                                              isolated: Path, picture) -> None:
    picture("project/refs/cat.png", "png", 256, 256)
    picture("project/refs/garden.png", "png", 512, 256)
    picture("project/refs/mask.png", "png", 256, 256, alpha=True)
    batch = write_batch(isolated / "project" / "batch.json", {"prompts": [
        {"prompt": "fuse", "input_images": ["refs/cat.png", "refs/garden.png"], "filename": "out/fused.png"},
        {"prompt": "edit", "input_images": ["refs/cat.png"], "mask": "refs/mask.png"}]})
    run = online("--batch", batch, "-j", "1")
    assert run.code == 0, run.err
    sent = sent_by_prompt(api)
    assert sent["fuse"]["files"] == [("image[]", "cat.png"), ("image[]", "garden.png")]
    assert sent["edit"]["files"] == [("image", "cat.png"), ("mask", "mask.png")]
    assert (isolated / "project" / "out" / "fused.png").is_file()
    assert (isolated / "project" / "02-edit.png").is_file()
    assert (isolated / "project" / "batch.results.jsonl").is_file()


def test_out_dir_receives_images_and_manifest(online: CliRunner, isolated: Path) -> None:
    batch = write_batch(isolated / "in" / "b.json", ["a red fox", {"prompt": "owl", "filename": "birds/owl.png"}])
    run = online("--batch", batch, "--out-dir", "results", "-j", "1")
    assert run.code == 0, run.err
    results = isolated / "results"
    assert run.out.splitlines() == [str(Path("results") / "01-a-red-fox.png"), str(Path("results") / "birds/owl.png")]
    assert sorted(p.relative_to(results).as_posix() for p in results.rglob("*")) == [
        "01-a-red-fox.png", "b.html", "b.results.jsonl", "birds", "birds/owl.png"]
    assert not list((isolated / "in").glob("*.png"))


@pytest.mark.parametrize("prompts, problems", [
    pytest.param([{"prompt": "a", "filename": "x.png"}, {"prompt": "b", "filename": "X.PNG"}],
                 ["item 2, filename: X.PNG is also written by item 1"], id="same-file-any-case"),
    pytest.param([{"prompt": "a", "filename": "x.png", "n": 2}, {"prompt": "b", "filename": "x-2.png"}],
                 ["item 2, filename: x-2.png is also written by item 1"], id="n-outputs-collide"),
    pytest.param([{"prompt": "a", "filename": "x"}, {"prompt": "b", "filename": "x.png"}],
                 ["item 2, filename: x.png is also written by item 1"], id="extension-added"),
])
def test_two_items_writing_one_file_is_an_error(online: CliRunner, api: FakeImagesAPI, isolated: Path,
                                                prompts: list, problems: list[str]) -> None:
    batch = write_batch(isolated / "b.json", prompts)
    run = online("--batch", batch)
    assert run.code == gi.EXIT_USAGE
    assert [line.strip() for line in run.err.splitlines()[1:-1]] == problems
    assert api.requests == []


def test_every_invalid_item_is_reported_and_nothing_is_sent(online: CliRunner, api: FakeImagesAPI,
                                                             isolated: Path) -> None:
    batch = write_batch(isolated / "b.json", {"global": {"qualty": "low"}, "prompts": [
        "fine", {"prompt": "x", "quality": "ultra", "n": 0}, {"filename": "y.png"}, 42,
        {"prompt": "z", "size": "1000x1000"}, {"prompt": "w", "input_images": ["nope.png"]},
        {"prompt": "v", "output_format": "jpeg", "background": "transparent"}, {"prompt": "", "_note": "ok"},
        {"prompt": "r", "size": "1024x1024", "resolution": "2K"}, {"prompt": "m", "mask": "m.png"}]})
    run = online("--batch", batch, "--json")
    assert run.code == gi.EXIT_USAGE
    problems = run.json()["error"]["problems"]
    assert problems == [
        "global, qualty: unknown field; the fields are size, resolution, quality, output_format, "
        "output_compression, input_images, mask, n, background, moderation, model, complexity, frame_count, "
        "frame_duration_ms, svg_model",
        "item 2, quality: 'ultra' is not one of auto, low, medium, high, xhigh, max",
        "item 2, n: 0 is outside 1-10",
        "item 3, prompt: missing",
        "item 4: must be a prompt or a JSON object",
        "item 5, size: --size 1000x1000: width and height must be multiples of 16; nearest valid size is 1008x1008",
        "item 6, input_images: input image nope.png: not found",
        "item 7, background: --background transparent needs png or webp; jpeg has no transparency",
        "item 8, prompt: the prompt is empty",
        "item 9, resolution: --resolution applies to a ratio like 16:9, not to 1024x1024",
        "item 10, mask: --mask needs an input image to apply to"]
    assert api.requests == []
    assert not (isolated / "b.results.jsonl").exists()


@pytest.mark.parametrize("content, message", [
    pytest.param("{not json", "is not valid JSON or JSONL: Expecting property name", id="broken-json"),
    pytest.param('"a"\n{"prompt": "b"\nc', "line 2 is not valid JSON or JSONL", id="broken-jsonl-line"),
    pytest.param('{"prompts": [], "description": "x"}', "has no prompts", id="empty"),
    pytest.param('{"items": ["a"]}', "unknown top-level key 'items'", id="unknown-key"),
    pytest.param('"just a string"', "holds a JSON str, not a batch", id="string"),
    pytest.param('{"global": ["x"], "prompts": ["a"]}', "global: must be a JSON object", id="global-list"),
    pytest.param("[" * 100_000 + "]" * 100_000, "nested too deeply", id="nested-too-deeply"),
])
def test_a_malformed_batch_file_is_refused(online: CliRunner, api: FakeImagesAPI, isolated: Path,
                                          content: str, message: str) -> None:
    run = online("--batch", write_batch(isolated / "b.json", content))
    assert run.code == gi.EXIT_USAGE
    assert message in run.err
    assert api.requests == []


def test_a_batch_file_that_is_not_utf8_is_refused(online: CliRunner, isolated: Path) -> None:
    (isolated / "b.json").write_bytes('["中文"]'.encode("gbk"))
    run = online("--batch", "b.json")
    assert (run.code, run.err.splitlines()[0]) == (gi.EXIT_USAGE, "generate_image.py: error: --batch b.json is "
                                                                  "not UTF-8 (byte 2)")


@pytest.mark.parametrize("jobs, items", [(1, 3), (3, 7), (4, 4)])
def test_requests_overlap_up_to_jobs_and_never_more(online: CliRunner, api: FakeImagesAPI, isolated: Path,
                                                    jobs: int, items: int) -> None:
    api.route = lambda request: Reply(body=SMALL_ANSWER, delay=0.25)
    batch = write_batch(isolated / "b.json", [f"picture {i}" for i in range(items)])
    run = online("--batch", batch, "-j", jobs)
    assert run.code == 0, run.err
    assert (len(api.requests), api.peak) == (items, min(jobs, items))
    assert sorted(run.out.splitlines()) == [f"{i + 1:02d}-picture-{i}.png" for i in range(items)]


def test_a_429_pauses_every_worker_and_the_limit_falls_to_what_was_in_flight(
        online: CliRunner, api: FakeImagesAPI, isolated: Path, pauses: list[float]) -> None:
    throttled = []

    def route(request: Recorded) -> Optional[Reply]:
        if not throttled:
            throttled.append(request)
            return Reply(status=429, body={"error": {"message": "slow down"}}, headers={"Retry-After": "30"})
        return Reply(body=SMALL_ANSWER, delay=0.2)

    api.route = route
    batch = write_batch(isolated / "b.json", [f"p{i}" for i in range(6)])
    run = online("--batch", batch, "-j", "4")
    assert run.code == 0, run.err
    after = api.requests[api.requests.index(throttled[0]) + 1:]
    assert len(after) == 6
    assert len(pauses) >= 2 and all(25 < p <= 30 for p in pauses)     # every worker held, the queued ones too
    notices = [line for line in run.err.splitlines() if "429" in line]
    # the limit falls to the requests still in flight when the 429 came (the 3 others, or fewer under load)
    found = re.fullmatch(r"item \d: 429: pausing all workers 30\.0 s(?:; at most (\d) in flight now)?", notices[0])
    assert len(notices) == 1 and found, run.err
    limit = int(found.group(1) or 4)
    assert max(r.in_flight for r in after[limit:]) <= limit   # (4: none were in flight yet, a pause)


@pytest.mark.parametrize("quota, jobs", [(2, 8), (4, 8), (2, 16)])
def test_a_batch_finds_the_gateways_quota_and_keeps_to_it(online: CliRunner, api: FakeImagesAPI, isolated: Path,
                                                          quota: int, jobs: int) -> None:
    refused: list[int] = []
    api.route = quota_route(quota, 0.15, refused)
    run = online("--batch", write_batch(isolated / "b.json", [f"p{i}" for i in range(16)]), "-j", jobs, "--json")
    assert run.code == 0, run.err
    assert run.json()["counts"]["ok"] == 16                       # no item failed, no --retries spent
    assert len(refused) <= 2 * jobs, len(refused)                 # one wave to find it, a few probes after


def test_resume_skips_what_the_manifest_proves_and_never_takes_a_foreign_file(online: CliRunner, api: FakeImagesAPI,
                                                                             isolated: Path) -> None:
    batch = write_batch(isolated / "b.json", ["one", {"prompt": "two", "filename": "two.png", "n": 2}, "three"])
    foreign = make_png(8, 8)
    (isolated / "01-one.png").write_bytes(foreign)
    first = online("--batch", batch, "-j", "1")
    assert first.code == 0, first.err
    assert [r.prompt() for r in api.requests] == ["one", "two", "three"]
    assert first.out.splitlines() == ["01-one-2.png", "two-1.png", "two-2.png", "03-three.png"]
    assert "warning: item 1: 01-one.png exists: saved as 01-one-2.png" in first.err
    assert (isolated / "01-one.png").read_bytes() == foreign
    run = online("--batch", batch, "--json")
    assert run.code == 0, run.err
    assert len(api.requests) == 3
    document = run.json()
    assert document["counts"] == {"total": 3, "ok": 0, "failed": 0, "skipped": 3, "not_run": 0}
    assert [(i["item"], i["status"], i["paths"]) for i in document["items"]] == [
        (1, "skipped", ["01-one-2.png"]), (2, "skipped", ["two-1.png", "two-2.png"]), (3, "skipped", ["03-three.png"])]
    (isolated / "two-2.png").write_bytes(foreign)
    changed = online("--batch", batch, "-j", "1")
    assert [r.prompt() for r in api.requests[3:]] == ["two"]
    assert changed.out.splitlines() == ["two-1-2.png", "two-2-2.png"]
    again = online("--batch", batch, "--overwrite", "-j", "1")
    assert again.code == 0
    assert [r.prompt() for r in api.requests[4:]] == ["one", "two", "three"]
    assert again.out.splitlines() == ["01-one.png", "two-1.png", "two-2.png", "03-three.png"]
    assert (isolated / "01-one.png").read_bytes() != foreign


def test_a_changed_prompt_is_made_again_and_keeps_the_earlier_image(online: CliRunner, api: FakeImagesAPI,
                                                                    isolated: Path) -> None:
    write_batch(isolated / "b.json", [{"prompt": "a cat", "filename": "pet.png"}])
    assert online("--batch", "b.json").out == "pet.png\n"
    earlier = (isolated / "pet.png").read_bytes()
    write_batch(isolated / "b.json", [{"prompt": "a dog", "filename": "pet.png"}])
    run = online("--batch", "b.json")
    assert (run.code, run.out) == (0, "pet-2.png\n")
    assert [r.prompt() for r in api.requests] == ["a cat", "a dog"]
    assert (isolated / "pet.png").read_bytes() == earlier


def test_a_torn_last_manifest_line_is_ignored_and_the_next_record_starts_a_line(online: CliRunner,
                                                                                 isolated: Path) -> None:
    batch = write_batch(isolated / "b.json", ["cat", "dog"])
    online("--batch", batch)
    manifest = isolated / "b.results.jsonl"
    lines = manifest.read_text(encoding="utf-8").splitlines()
    dog = next(line for line in lines if '"dog"' in line)
    manifest.write_text(next(line for line in lines if '"cat"' in line) + "\n" + dog[:40], encoding="utf-8")
    run = online("--batch", batch)
    assert run.code == 0
    assert f"warning: line 2 of {Path('b.results.jsonl')} is incomplete (a crash while writing it?); ignored" in run.err
    assert "item 1 skipped" in run.err and run.out == "02-dog-2.png\n"
    records = manifest.read_text(encoding="utf-8").splitlines()
    assert records[1] == dog[:40] and [json.loads(r)["status"] for r in records[2:]] == ["skipped", "ok"]


def test_manifest_paths_are_relative_to_its_folder_wherever_the_command_ran(online: CliRunner, isolated: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    write_batch(isolated / "jobs" / "b.json", ["cat"])
    (isolated / "elsewhere").mkdir()
    monkeypatch.chdir(isolated / "elsewhere")
    run = online("--batch", "../jobs/b.json")
    assert run.out == str(Path("../jobs/01-cat.png")) + "\n"
    [record] = manifest_lines(isolated / "jobs" / "b.results.jsonl")
    assert (record["target"], record["paths"]) == ("01-cat.png", ["01-cat.png"])
    monkeypatch.chdir(isolated / "jobs")
    again = online("--batch", "b.json")
    assert (again.code, again.out) == (0, "") and "skipped, already done: 01-cat.png" in again.err


def test_resume_trusts_the_manifest_when_the_server_changed_the_format(online: CliRunner, api: FakeImagesAPI,
                                                                       isolated: Path) -> None:
    api.queue(Reply(body=images_answer([make_image("jpeg", 64, 64)])))
    batch = write_batch(isolated / "b.json", ["a photo"])
    first = online("--batch", batch)
    assert (first.code, first.out) == (0, "01-a-photo.jpg\n")
    second = online("--batch", batch)
    assert (second.code, second.out, len(api.requests)) == (0, "", 1)
    assert "item 1 skipped, already done: 01-a-photo.jpg" in second.err


def test_an_image_saved_to_the_fallback_folder_is_not_paid_for_again(online: CliRunner, api: FakeImagesAPI,
                                                                      isolated: Path, tmp_path: Path) -> None:
    def block_the_folder(request: Recorded) -> None:
        (isolated / "out").write_bytes(b"a file where the folder should be")

    api.route = lambda request: (Reply(body=images_answer([make_png(64, 64)]), before=block_the_folder)
                                 if request.prompt() == "cat" else Reply(body=images_answer([make_png(64, 64)])))
    batch = write_batch(isolated / "b.json", [{"prompt": "cat", "filename": "out/cat.png"},
                                              {"prompt": "dogs", "filename": "dogs.png", "n": 2}])
    first = online("--batch", batch, "--json", "-j", "1")
    saved = tmp_path / "tmp" / "apiyi-gpt-image-2" / "cat.png"
    assert first.code == gi.EXIT_BATCH_PARTIAL
    assert [(i["status"], i["paths"]) for i in first.json()["items"]] == [("failed", [str(saved)]),
                                                                          ("failed", ["dogs-1.png"])]
    (isolated / "out").unlink()
    api.route = None
    run = online("--batch", batch, "--json")
    assert run.code == 0, run.err
    assert [r.prompt() for r in api.requests] == ["cat", "dogs", "dogs"]
    assert [(i["status"], i["paths"]) for i in run.json()["items"]] == [
        ("skipped", [str(saved)]), ("ok", ["dogs-1-2.png", "dogs-2.png"])]


@pytest.mark.parametrize("flags, name, sent_format", [
    ([], "01-a-fox.png", None), (["-o", "jpeg"], "01-a-fox.jpg", "jpeg"), (["-o", "webp", "-c", "50"], "01-a-fox.webp",
                                                                         "webp")])
def test_auto_names_follow_the_format_and_send_it_only_when_given(online: CliRunner, isolated: Path, flags: list,
                                                                  name: str, sent_format: Optional[str]) -> None:
    document = online("--batch", write_batch(isolated / "b.json", ["a fox"]), "--dry-run", "--json", *flags).json()
    [item] = document["items"]
    assert (item["outputs"], item["request"]["json"].get("output_format")) == ([name], sent_format)


def test_a_failing_item_among_good_ones_exits_8_and_a_rerun_completes_it(online: CliRunner, api: FakeImagesAPI,
                                                                         isolated: Path) -> None:
    api.route = fail_prompt("bad", Reply(status=400, body={"error": {"message": "unsafe", "code":
                                                                     "moderation_blocked"}}))
    batch = write_batch(isolated / "b.json", ["good one", "bad", "good two"])
    run = online("--batch", batch, "--json", "-j", "2")
    assert run.code == gi.EXIT_BATCH_PARTIAL
    document = run.json()
    assert document["ok"] is False and document["counts"]["failed"] == 1
    failed = [i for i in document["items"] if i["status"] == "failed"]
    assert [(i["item"], i["error"]["exit_code"], i["error"]["code"]) for i in failed] == [(2, 4, "moderation_blocked")]
    assert document["error"]["exit_code"] == 8
    assert document["usage"] == {"input_tokens": 100, "output_tokens": 8320, "total_tokens": 8420}
    assert sorted(p.name for p in isolated.glob("*.png")) == ["01-good-one.png", "03-good-two.png"]
    api.route = None
    again = online("--batch", batch)
    assert (again.code, again.out) == (0, "02-bad.png\n")
    assert [r.prompt() for r in api.requests[3:]] == ["bad"]


def test_the_manifest_records_each_item_as_it_ends(online: CliRunner, api: FakeImagesAPI, isolated: Path) -> None:
    api.route = fail_prompt("slow", Reply(status=200, body=b"", drop=True))
    batch = write_batch(isolated / "b.json", ["fine", "slow"])
    (isolated / "b.results.jsonl").write_text('{"item": 9, "status": "ok"}\n', encoding="utf-8")
    run = online("--batch", batch, "-j", "1")
    assert run.code == gi.EXIT_BATCH_PARTIAL
    lines = manifest_lines(isolated / "b.results.jsonl")
    assert lines[0] == {"item": 9, "status": "ok"}
    ok, failed = lines[1:]
    assert {k: ok[k] for k in ("item", "prompt", "status", "target", "paths", "sizes", "request_id", "error")} == {
        "item": 1, "prompt": "fine", "status": "ok", "target": "01-fine.png", "paths": ["01-fine.png"],
        "sizes": ["1024x1024"], "request_id": "req_fake_123", "error": None}
    assert ok["usage"]["total_tokens"] == 4210 and ok["elapsed_s"] >= 0
    assert (failed["item"], failed["status"], failed["paths"]) == (2, "failed", [])
    assert (failed["error"]["kind"], failed["error"]["exit_code"]) == ("possibly_billed", 6)
    assert "item 2 failed (exit 6)" in run.err


def test_a_refused_key_stops_the_batch_at_the_first_401(online: CliRunner, api: FakeImagesAPI,
                                                        isolated: Path) -> None:
    api.route = lambda request: Reply(status=401, body={"error": {"message": "invalid key"}})
    batch = write_batch(isolated / "b.json", ["a", "b", "c", "d"])
    run = online("--batch", batch, "-j", "1")
    assert run.code == gi.EXIT_AUTH
    assert len(api.requests) == 1
    assert "HTTP 401: invalid key" in run.err.splitlines()[-2]


def test_a_missing_key_sends_nothing(cli: CliRunner, isolated: Path) -> None:
    run = cli("--batch", write_batch(isolated / "b.json", ["a"]))
    assert run.code == gi.EXIT_AUTH
    assert not (isolated / "b.results.jsonl").exists()


def test_dry_run_prints_each_request_output_and_estimate(online: CliRunner, api: FakeImagesAPI,
                                                         isolated: Path) -> None:
    batch = write_batch(isolated / "b.json", {"global": {"quality": "low"}, "prompts": ["x", "b"]})
    assert online("--batch", batch).code == 0       # item 2 is done, as the manifest proves
    batch = write_batch(isolated / "b.json", {"global": {"quality": "low"}, "prompts": ["a", "b", "c", "d", "e"]})
    (isolated / "03-c.png").write_bytes(make_png(8, 8))     # not this batch's: item 3 is still sent
    run = online("--batch", batch, "-j", "2", "--dry-run")
    assert run.code == 0
    assert len(api.requests) == 2
    lines = run.out.splitlines()
    assert lines[0] == f"item 1: POST {api.url}/images/generations"
    assert "item 2: already done, skipped: 02-b.png" in lines
    assert [line for line in lines if line.startswith("output: ")] == [
        "output: 01-a.png", "output: 03-c.png", "output: 04-d.png", "output: 05-e.png"]
    assert lines[-2:] == ["manifest: b.results.jsonl",
                          "5 items: 4 to send, 1 already done; about 4:00-5:00 (2 rounds of 120-150 s at -j 2; "
                          "longer at high quality or 4K); estimated cost $0.4992 (from the items' estimates)"]
    # the two items made before used 4160 output tokens each: the estimate of the same shape now follows them
    assert lines.count("estimated cost $0.1248 (from 2 earlier runs)") == 4
    assert len(manifest_lines(isolated / "b.results.jsonl")) == 2
    document = online("--batch", batch, "--dry-run", "--json").json()
    assert (document["to_send"], document["jobs"], len(document["items"])) == (4, 4, 5)
    assert document["items"][0]["request"]["json"] == {"model": "gpt-image-2", "prompt": "a", "quality": "low"}


def test_json_summary_of_a_clean_batch(online: CliRunner, isolated: Path) -> None:
    batch = write_batch(isolated / "b.json", {"description": "pets", "prompts": ["cat", "dog"]})
    run = online("--batch", batch, "--json")
    assert run.code == 0
    document = run.json()
    assert {k: document[k] for k in ("ok", "batch", "description", "manifest", "counts")} == {
        "ok": True, "batch": "b.json", "description": "pets", "manifest": "b.results.jsonl",
        "counts": {"total": 2, "ok": 2, "failed": 0, "skipped": 0, "not_run": 0}}
    assert [i["paths"] for i in document["items"]] == [["01-cat.png"], ["02-dog.png"]]


def test_progress_lines_on_stderr_when_not_a_terminal(online: CliRunner, isolated: Path) -> None:
    batch = write_batch(isolated / "b.json", ["cat", "dog"])
    run = online("--batch", batch, "-j", "1")
    lines = run.err.splitlines()
    assert lines[0].startswith("batch b.json: 2 items, 0 already done, 2 to generate at -j 1: about 4:00-5:00")
    assert lines[1].startswith("[1/2] item 1 ok in 0 s: 01-cat.png")
    assert lines[2].startswith("[2/2] item 2 ok in 0 s: 02-dog.png")
    assert lines[3].startswith("batch: 2 ok, 0 failed, 0 skipped, 0 not run, of 2 in 0:0")
    assert "tokens: 100 input, 8320 output, 8420 total; cost $0.2501; manifest b.results.jsonl" in lines[3]


def test_a_terminal_gets_one_live_status_line(online: CliRunner, api: FakeImagesAPI, isolated: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    api.route = lambda request: Reply(body=SMALL_ANSWER, delay=0.4)
    monkeypatch.setattr(gi, "PROGRESS_TTY_INTERVAL_S", 0.05)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    run = online("--batch", write_batch(isolated / "b.json", ["cat", "dog", "owl"]), "-j", "2")
    assert run.code == 0
    assert "\rbatch: 0 done, 0 failed, 2 running, 3 total; 0:00 elapsed, ~4:30 left" in run.err
    assert "\rbatch: 2 done, 0 failed, 1 running, 3 total; 0:00 elapsed, ~0:00 left" in run.err


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_the_status_line_is_cleared_before_a_path(online: CliRunner, api: FakeImagesAPI, isolated: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    api.route = lambda request: Reply(body=SMALL_ANSWER, delay=0.3)
    monkeypatch.setattr(gi, "PROGRESS_TTY_INTERVAL_S", 0.05)
    screen = Terminal()     # stdout and stderr on one terminal, as a person sees them
    monkeypatch.setattr(sys, "stdout", screen)
    monkeypatch.setattr(sys, "stderr", screen)
    assert gi.main(["--batch", str(write_batch(isolated / "b.json", ["cat", "dog", "owl"])), "-j", "2"]) == 0
    lines = [line.split("\r")[-1] for line in screen.getvalue().split("\n")]
    assert "\rbatch: 0 done" in screen.getvalue()
    assert sorted(line for line in lines if line.endswith(".png") and "] item " not in line) == [
        "01-cat.png", "02-dog.png", "03-owl.png"]


@pytest.mark.parametrize("inside", [False, True], ids=["link-out-of-the-folder", "link-within-it"])
def test_a_manifest_linked_out_of_the_batch_folder_is_refused(online: CliRunner, api: FakeImagesAPI,
                                                              isolated: Path, tmp_path: Path, inside: bool) -> None:
    elsewhere = (isolated / "kept.jsonl") if inside else (tmp_path / "elsewhere.jsonl")
    elsewhere.write_text("")
    (isolated / "b.results.jsonl").symlink_to(elsewhere)
    run = online("--batch", write_batch(isolated / "b.json", ["cat"]))
    if inside:
        assert run.code == 0 and json.loads(elsewhere.read_text())["status"] == "ok"
        return
    assert (run.code, api.requests, elsewhere.read_text()) == (gi.EXIT_USAGE, [], "")
    assert f"error: the manifest b.results.jsonl is a symlink to {elsewhere}, outside {isolated}" in run.err


@pytest.mark.parametrize("window", [(0.0, 0.3), (0.12, 0.4)], ids=["burst-at-the-start", "outage-midway"])
def test_a_spell_of_429s_fails_no_item_even_with_no_retries(online: CliRunner, api: FakeImagesAPI, isolated: Path,
                                                            window: tuple[float, float]) -> None:
    refused: list[int] = []
    api.route = quota_route(8, 0.1, refused, outage=window)
    run = online("--batch", write_batch(isolated / "b.json", [f"p{i}" for i in range(24)]), "-j", "8",
                 "--retries", "0", "--json")
    assert run.code == 0, run.err
    assert run.json()["counts"]["ok"] == 24 and refused        # every 429 waited out, none spent a retry


def test_the_time_left_follows_the_limit_the_gateway_allows(isolated: Path) -> None:
    """16 items at -j 8 are 2 rounds; once a 429 brings the limit to 2, they are 8."""
    items = tuple(gi.BatchItem(n, None, ()) for n in range(1, 17))     # the monitor reads only their count
    plan = gi.BatchPlan(isolated / "b.json", "", items, isolated / "b.results.jsonl", 8)
    monitor = gi.BatchMonitor(plan, gi.Console(json_mode=False))
    monitor.records = {n: {"item": n, "status": "ok", "elapsed_s": 60.0} for n in (98, 99)}   # two ended: 1 min each
    before = monitor.time_left()
    monitor.on_event({"event": "retry", "item": 3, "message": "429: pausing all workers 5.0 s; at most 2 in flight now",
                      "in_flight": 2})
    after = monitor.time_left()
    monitor.on_event({"event": "retry", "item": 4, "message": "back to 4 in flight", "in_flight": 4})
    assert (before, after, monitor.time_left()) == (2 * 60.0, 7 * 60.0, 4 * 60.0)
