"""Jobs: the request runs in a detached worker that outlives the command. Real processes, real
signals, a fake Images API on 127.0.0.1: a paid image is never lost and never paid for twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest

import generate_image as gi
from conftest import TEST_KEY, CliRunner
from fake_api import FakeImagesAPI, Recorded, Reply, images_answer, make_png
from twins import script_env, twin_command

PYTHON = twin_command("python")     # the script as an agent runs it: python -I -S scripts/generate_image.py
POSIX_ONLY = pytest.mark.skipif(os.name == "nt", reason="sends POSIX signals to process groups")
SLOW = Reply(body=images_answer([make_png(64, 64)]), delay=1.5)


@pytest.fixture
def env(api: FakeImagesAPI, tmp_path: Path) -> dict[str, str]:
    """What an agent's shell gives the command: the key, the base URL, a state folder of its own."""
    return script_env(APIYI_API_KEY=TEST_KEY, APIYI_BASE_URL=api.url, APIYI_STATE_DIR=str(tmp_path / "state"),
                      TMPDIR=str(tmp_path / "tmp"))


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


def start(env: dict[str, str], *args: str) -> subprocess.Popen:
    """The command in a process group of its own, as an agent's shell runs it (and may kill it)."""
    return subprocess.Popen([*PYTHON, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, start_new_session=True)


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([*PYTHON, *args], capture_output=True, env=env,
                          timeout=60)
    assert TEST_KEY.encode() not in done.stdout + done.stderr
    return done


def wait_until(condition: Callable[[], Any], what: str, timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return condition()


def records(state: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(state.glob("*.json"))]


def only_record(state: Path) -> dict[str, Any]:
    [record] = records(state)
    return record


def finished(state: Path) -> bool:
    found = records(state)
    return bool(found) and all(r["state"] in gi.FINISHED_STATES and r.get("peak_rss_kib") for r in found)


def no_key_in(folder: Path) -> bool:
    return all(TEST_KEY.encode() not in p.read_bytes() for p in folder.rglob("*") if p.is_file())


@POSIX_ONLY
def test_killing_the_command_group_loses_nothing_and_a_rerun_attaches_instead_of_paying(
        api: FakeImagesAPI, env: dict[str, str], state: Path, isolated: Path) -> None:
    api.queue(SLOW)
    command = start(env, "-p", "cat", "-f", "cat.png")
    wait_until(lambda: api.requests, "the request")
    os.killpg(command.pid, signal.SIGKILL)
    command.communicate(timeout=10)
    wait_until(lambda: finished(state), "the job to finish")
    assert (isolated / "cat.png").is_file()
    assert (only_record(state)["state"], only_record(state)["sent"]) == ("done", True)
    again = run(env, "-p", "cat", "-f", "cat.png")
    assert (again.returncode, again.stdout) == (0, b"cat.png\n"), again.stderr.decode()
    assert "nothing new was sent" in again.stderr.decode()
    assert len(api.requests) == 1
    third = run(env, "-p", "cat", "-f", "cat.png")
    assert (third.returncode, third.stdout, len(api.requests)) == (0, b"cat-2.png\n", 2)
    assert no_key_in(state)


@POSIX_ONLY
def test_a_worker_killed_after_sending_is_reported_as_maybe_billed_then_a_rerun_sends_again(
        api: FakeImagesAPI, env: dict[str, str], state: Path) -> None:
    api.queue(Reply(body=images_answer([make_png(64, 64)]), delay=3))
    detached = run(env, "-p", "cat", "-f", "cat.png", "--detach")
    wait_until(lambda: records(state) and records(state)[0]["sent"], "the request to be sent")
    os.kill(only_record(state)["pid"], signal.SIGKILL)
    lost = run(env, "-p", "cat", "-f", "cat.png")
    assert lost.returncode == gi.EXIT_MAYBE_BILLED, lost.stderr.decode()
    assert "stopped after the request was sent; the answer is lost" in lost.stderr.decode()
    assert detached.stdout.decode().split()[1] == only_record(state)["id"]
    again = run(env, "-p", "cat", "-f", "cat.png")
    assert (again.returncode, again.stdout, len(api.requests)) == (0, b"cat.png\n", 2)


@POSIX_ONLY
@pytest.mark.parametrize("name, code", [("SIGINT", 130), ("SIGTERM", 143), ("SIGHUP", 129)])
def test_a_signal_after_sending_leaves_the_job_running_and_attach_collects_it(
        api: FakeImagesAPI, env: dict[str, str], state: Path, isolated: Path, name: str, code: int) -> None:
    api.queue(SLOW)
    command = start(env, "-p", "cat", "-f", "cat.png")
    wait_until(lambda: api.requests, "the request")
    wait_until(lambda: records(state) and records(state)[0]["sent"], "the record to say sent")
    command.send_signal(getattr(signal, name))
    out, err = command.communicate(timeout=10)
    job = only_record(state)["id"]
    assert (command.returncode, out) == (code, f"job {job}\n".encode()), err.decode()
    assert f"interrupted ({name}); the request goes on as job {job}" in err.decode()
    assert f"--attach {job}" in err.decode()
    collected = run(env, "--attach", job)
    assert (collected.returncode, collected.stdout) == (0, b"cat.png\n"), collected.stderr.decode()
    assert len(api.requests) == 1 and (isolated / "cat.png").is_file()


@POSIX_ONLY
@pytest.mark.parametrize("name, code", [("SIGINT", 130), ("SIGTERM", 143), ("SIGHUP", 129)])
def test_a_signal_before_the_upload_is_complete_cancels_the_job_and_nothing_is_billed(
        api: FakeImagesAPI, env: dict[str, str], state: Path, isolated: Path, name: str, code: int) -> None:
    big = isolated / "big.png"
    big.write_bytes(make_png(16, 16) + bytes(30 * 1024 * 1024))    # more than the socket buffers hold
    api.stall_upload = 3.0
    command = start(env, "-p", "edit it", "-i", "big.png", "-f", "out.png")
    wait_until(lambda: api.connections, "the upload to begin")
    wait_until(lambda: records(state) and records(state)[0]["state"] == "sending", "the worker")
    command.send_signal(getattr(signal, name))
    out, err = command.communicate(timeout=15)
    assert (command.returncode, out) == (code, b""), err.decode()
    assert "before the request was completely sent" in err.decode() and "nothing was billed" in err.decode()
    wait_until(lambda: finished(state), "the worker to stop")
    assert (only_record(state)["state"], only_record(state)["sent"]) == ("cancelled", False)
    time.sleep(api.stall_upload)
    assert api.requests == [] and not (isolated / "out.png").exists()
    api.stall_upload = 0
    again = run(env, "-p", "edit it", "-i", "big.png", "-f", "out.png")     # cancelled: sent anew
    assert (again.returncode, again.stdout, len(api.requests)) == (0, b"out.png\n", 1), again.stderr.decode()


def test_detach_returns_at_once_and_attach_reports_the_job_as_its_own(
        api: FakeImagesAPI, env: dict[str, str], state: Path) -> None:
    api.queue(SLOW)
    detached = run(env, "-p", "cat", "-f", "cat.png", "--detach", "--json")
    document = json.loads(detached.stdout)
    assert (detached.returncode, document["ok"], document["state"]) == (0, True, "starting")
    assert document["job"] == only_record(state)["id"] and not (state.parent / "work" / "cat.png").exists()
    assert only_record(state)["state"] not in gi.FINISHED_STATES  # run() read stdout to its end: no worker holds it
    attached = run(env, "--attach", "last", "--json")
    assert attached.returncode == 0, attached.stderr.decode()
    assert json.loads(attached.stdout)["files"][0]["path"] == "cat.png"
    assert f"attached to job {document['job']}" in attached.stderr.decode()
    plain = run(env, "-p", "dog", "-f", "dog.png", "--detach")
    assert plain.stdout.decode().startswith("job ") and plain.returncode == 0
    wait_until(lambda: finished(state), "the second job")
    assert len(api.requests) == 2


def test_max_wait_exits_9_and_the_same_command_then_collects_the_image(
        api: FakeImagesAPI, env: dict[str, str], state: Path) -> None:
    api.queue(SLOW)
    waited = run(env, "-p", "cat", "-f", "cat.png", "--max-wait", "0.3", "--json")
    job = only_record(state)["id"]
    document = json.loads(waited.stdout)
    assert (waited.returncode, document["ok"], document["job"]) == (9, False, job)
    assert document["error"]["kind"] == "still_running"
    assert "still running after --max-wait 0.3 s; the request goes on as job" in waited.stderr.decode()
    again = run(env, "-p", "cat", "-f", "cat.png", "--max-wait", "30")
    assert (again.returncode, again.stdout, len(api.requests)) == (0, b"cat.png\n", 1), again.stderr.decode()


def test_list_jobs_and_cancel(api: FakeImagesAPI, env: dict[str, str], state: Path) -> None:
    api.queue(Reply(body=images_answer([make_png(64, 64)]), delay=20))
    job = run(env, "-p", "a slow cat", "-f", "slow.png", "--detach").stdout.decode().split()[1]
    wait_until(lambda: only_record(state)["sent"], "the request to be sent")
    listed = run(env, "--list-jobs")
    assert listed.stdout.decode().startswith(f"{job}  waiting  ")
    assert "'a slow cat'  slow.png" in listed.stdout.decode()
    cancelled = run(env, "--cancel", job)
    assert (cancelled.returncode, cancelled.stdout) == (0, f"job {job} cancelled\n".encode())
    assert "may still be billed" in cancelled.stderr.decode()
    [summary] = json.loads(run(env, "--list-jobs", "--json").stdout)["jobs"]
    assert (summary["id"], summary["state"], summary["sent"]) == (job, "cancelled", True)
    assert summary["peak_rss_kib"] > 0
    report = run(env, "--attach", job)
    assert report.returncode == gi.EXIT_INTERRUPTED and f"job {job} was cancelled" in report.stderr.decode()


def test_two_commands_finishing_together_never_overwrite_each_other(
        api: FakeImagesAPI, env: dict[str, str], isolated: Path) -> None:
    for round_ in range(20):
        barrier = threading.Barrier(2, timeout=20)
        api.route = lambda request: Reply(body=images_answer([make_png(32, 32, rgb=(len(request.prompt()), 0, 0))]),
                                          before=lambda request: barrier.wait())
        first, second = (start(env, "-p", prompt, "-f", f"race{round_}.png") for prompt in ("a", "bb"))
        outputs = sorted(p.communicate(timeout=30)[0].decode().strip() for p in (first, second))
        assert outputs == [f"race{round_}-2.png", f"race{round_}.png"], f"round {round_}"
        reds = {(isolated / name).read_bytes() for name in outputs}
        assert reds == {make_png(32, 32, rgb=(1, 0, 0)), make_png(32, 32, rgb=(2, 0, 0))}


def test_two_runs_of_one_batch_send_each_item_once(api: FakeImagesAPI, env: dict[str, str],
                                                   isolated: Path) -> None:
    api.route = lambda request: Reply(body=images_answer([make_png(64, 64)]), delay=0.5)
    (isolated / "b.json").write_text(json.dumps(["one", "two", "three"]), encoding="utf-8")
    env = {**env, "PWD": str(isolated)}
    first = subprocess.Popen([*PYTHON, "--batch", "b.json", "-j", "2"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=isolated)
    wait_until(lambda: api.requests, "the first item")
    second = subprocess.run([*PYTHON, "--batch", "b.json", "-j", "2"],
                            capture_output=True, env=env, cwd=isolated, timeout=60)
    out, err = first.communicate(timeout=60)
    assert (first.returncode, second.returncode) == (0, 0), err.decode() + second.stderr.decode()
    assert sorted(r.prompt() for r in api.requests) == ["one", "three", "two"]
    assert sorted(out.split()) == sorted(second.stdout.split()) == [b"01-one.png", b"02-two.png", b"03-three.png"]
    assert b"nothing new was sent" in second.stderr
    other = subprocess.run([*PYTHON, "--batch", "b.json", "-q", "high"],
                           capture_output=True, env=env, cwd=isolated, timeout=60)
    assert other.returncode == 0 and len(api.requests) == 6     # other settings: other items, once it is done


def test_a_batch_with_other_settings_is_refused_while_one_runs_on_its_manifest(
        api: FakeImagesAPI, env: dict[str, str], isolated: Path) -> None:
    api.route = lambda request: Reply(body=images_answer([make_png(64, 64)]), delay=1.0)
    (isolated / "b.json").write_text(json.dumps(["one"]), encoding="utf-8")
    first = subprocess.Popen([*PYTHON, "--batch", "b.json"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=env, cwd=isolated)
    wait_until(lambda: api.requests, "the first batch")
    other = subprocess.run([*PYTHON, "--batch", "b.json", "-q", "low"],
                           capture_output=True, env=env, cwd=isolated, timeout=60)
    assert other.returncode == gi.EXIT_USAGE
    assert b"is running this batch with other settings" in other.stderr
    first.communicate(timeout=30)
    assert first.returncode == 0 and len(api.requests) == 1


@POSIX_ONLY
def test_ctrl_c_during_a_batch_leaves_it_running_and_the_same_command_collects_it(
        api: FakeImagesAPI, env: dict[str, str], state: Path, isolated: Path) -> None:
    api.route = lambda request: Reply(body=images_answer([make_png(64, 64)]), delay=1.0)
    (isolated / "b.json").write_text(json.dumps(["one", "two", "three", "four"]), encoding="utf-8")
    batch = subprocess.Popen([*PYTHON, "--batch", "b.json", "-j", "2"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=isolated)
    wait_until(lambda: len(api.requests) >= 2, "two items in flight")
    batch.send_signal(signal.SIGINT)
    out, err = batch.communicate(timeout=30)
    job = only_record(state)["id"]
    assert (batch.returncode, out) == (130, f"job {job}\n".encode()), err.decode()
    again = subprocess.run([*PYTHON, "--batch", "b.json", "-j", "2"],
                           capture_output=True, env=env, cwd=isolated, timeout=60)
    assert again.returncode == 0, again.stderr.decode()
    assert sorted(again.stdout.split()) == [b"01-one.png", b"02-two.png", b"03-three.png", b"04-four.png"]
    assert sorted(r.prompt() for r in api.requests) == ["four", "one", "three", "two"]


def test_a_save_that_fails_keeps_the_answer_and_a_rerun_saves_it_without_a_request(
        online: CliRunner, api: FakeImagesAPI, isolated: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        state: Path) -> None:
    import tempfile

    def block_folders(request: Recorded) -> None:
        (isolated / "out").rmdir()          # checked and created before sending; gone after
        (isolated / "out").write_bytes(b"a file where the folder should be")

    monkeypatch.setattr(tempfile, "tempdir", str(isolated / "out" / "tmp"))
    (Path.home() / ".apiyi-gpt-image-2").write_bytes(b"not a folder")      # no fallback at all
    api.queue(Reply(body=images_answer([make_png(64, 64)]), before=block_folders))
    failed = online("-p", "cat", "-f", "out/cat.png")
    assert failed.code == gi.EXIT_UNAVAILABLE
    spool = next(state.glob("*.spool"))
    assert f"the answer is kept in {spool}" in failed.err
    assert "received, not saved" in online("--list-jobs").out
    (isolated / "out").unlink()
    saved = online("-p", "cat", "-f", "out/cat.png")
    assert (saved.code, saved.out, len(api.requests)) == (0, "out/cat.png\n", 1), saved.err
    assert "saving the answer received earlier; nothing new is sent" in saved.err
    assert not spool.exists() and (isolated / "out" / "cat.png").read_bytes() == make_png(64, 64)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_worker_that_died_while_saving_is_finished_by_attach(online: CliRunner, api: FakeImagesAPI, state: Path,
                                                               isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    finish_single = gi.finish_single

    def die(*args: object, **kwargs: object) -> None:
        raise SystemExit("killed while saving")   # what SIGKILL leaves: state 'saving', the spool, no result

    monkeypatch.setattr(gi, "finish_single", die)
    with pytest.raises(SystemExit):
        gi.main(["-p", "cat", "-f", "cat.png"])
    record = only_record(state)
    assert (record["state"], record["received"], record["result"]) == ("saving", True, None)
    monkeypatch.setattr(gi, "finish_single", finish_single)
    (isolated / f".cat.png.{record['id']}-0badc0de.part").write_bytes(b"half an image")   # what the kill left
    (isolated / ".cat.png.other-job-0badc0de.part").write_bytes(b"another job's")
    listed = online("--list-jobs")
    assert f"{record['id']}  saving (worker gone)" in listed.out
    attached = online("--attach", record["id"])
    assert (attached.code, attached.out, len(api.requests)) == (0, "cat.png\n", 1), attached.err
    assert not list(state.glob("*.spool"))
    assert [p.name for p in isolated.glob(".*.part")] == [".cat.png.other-job-0badc0de.part"]
    (isolated / ".cat.png.other-job-0badc0de.part").unlink()


def test_a_bug_in_the_worker_is_exit_1_never_success(online: CliRunner, api: FakeImagesAPI, isolated: Path,
                                                     monkeypatch: pytest.MonkeyPatch, state: Path) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(gi, "save_spooled_answer", broken)
    run = online("-p", "cat", "-f", "cat.png")
    assert run.code == gi.EXIT_BUG
    assert "a bug in the worker: RuntimeError: boom" in run.err
    assert "RuntimeError: boom" in next(state.glob("*.log")).read_text()
    (isolated / "b.json").write_text(json.dumps(["one", "two"]), encoding="utf-8")
    batch = online("--batch", "b.json", "--json")
    assert batch.code == gi.EXIT_BUG
    assert [(i["status"], i["error"]["exit_code"]) for i in batch.json()["items"]] == [("failed", 1)] * 2
    manifest = [json.loads(line) for line in (isolated / "b.results.jsonl").read_text().splitlines()]
    assert [m["status"] for m in manifest] == ["failed", "failed"]


def test_events_are_json_lines_in_order(online: CliRunner, state: Path) -> None:
    run = online("-p", "cat", "-f", "cat.png", "--events")
    assert (run.code, run.out) == (0, "cat.png\n")
    events = [json.loads(line) for line in run.err.splitlines()]
    names = [e["event"] for e in events]
    assert names == ["validated", "job_started", "sent", "received", "saved"]
    assert events[2]["possibly_billed"] is True and events[4]["path"] == "cat.png"
    job = only_record(state)["id"]
    assert all(e["job"] == job for e in events[1:]) and all(e["t"] >= 0 for e in events)
    assert [e["t"] for e in events] == sorted(e["t"] for e in events)
    failed = online("-p", "cat", "-s", "999x1", "--events")
    assert [json.loads(line)["event"] for line in failed.err.splitlines()] == ["error"]


def test_heartbeats_while_waiting(online: CliRunner, api: FakeImagesAPI, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gi, "HEARTBEAT_S", 0.1)
    api.queue(Reply(body=images_answer([make_png(64, 64)]), delay=0.5))
    events = [json.loads(line)["event"] for line in online("-p", "cat", "--events").err.splitlines()]
    assert events.count("heartbeat") >= 3 and events[-1] == "saved"


def test_without_a_worker_process_the_command_says_so_once_and_still_works(
        api: FakeImagesAPI, env: dict[str, str], isolated: Path) -> None:
    done = run({**env, "APIYI_WORKER": "unavailable"}, "-p", "cat", "-f", "cat.png")
    assert (done.returncode, done.stdout) == (0, b"cat.png\n")
    assert done.stderr.decode().count("the request runs inside this command") == 1


@pytest.mark.parametrize("platform, expected", [
    ("posix", [{"start_new_session": True}]),
    ("nt", [{"creationflags": 0x01000208}, {"creationflags": 0x00000208}]),
])
def test_workers_are_detached_the_way_each_platform_allows(platform: str, expected: list) -> None:
    """Windows: DETACHED_PROCESS | CREATE_NEW_PROCESS_GROUP, first with CREATE_BREAKAWAY_FROM_JOB."""
    assert gi.spawn_attempts(platform) == expected


def test_the_state_folder_follows_the_platform(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert gi.state_folder({"APIYI_STATE_DIR": str(tmp_path)}) == tmp_path
    monkeypatch.setattr(os, "name", "posix")
    assert gi.state_folder({"XDG_STATE_HOME": "/x/state"}) == Path("/x/state/apiyi-gpt-image-2-gen")
    assert gi.state_folder({}) == Path.home() / ".local" / "state" / "apiyi-gpt-image-2-gen"
    monkeypatch.setattr(sys, "platform", "darwin")
    assert gi.state_folder({}) == Path.home() / "Library" / "Application Support" / "apiyi-gpt-image-2-gen"


def test_the_state_folder_is_private(online: CliRunner, state: Path) -> None:
    assert online("-p", "cat").code == 0
    if os.name != "nt":
        assert state.stat().st_mode & 0o077 == 0


@pytest.mark.parametrize("setup, message", [
    pytest.param(lambda state: (state.mkdir(), (state / "jobs.lock").mkdir()), "the state folder", id="lock-is-a-folder"),
    pytest.param(lambda state: state.write_text("a file"), "the state folder", id="state-is-a-file"),
])
def test_an_unusable_state_folder_is_one_line_and_exit_2(online: CliRunner, api: FakeImagesAPI, state: Path,
                                                         setup: Callable[[Path], Any], message: str) -> None:
    setup(state)
    run = online("-p", "cat", "-f", "cat.png")
    assert run.code == gi.EXIT_USAGE and api.requests == []
    assert run.err.splitlines()[-2].startswith(f"generate_image.py: error: {message}")
    assert run.err.splitlines()[-1] == "hint: set APIYI_STATE_DIR to a writable folder of your own"


def test_a_mistyped_worker_switch_is_refused(online: CliRunner, api: FakeImagesAPI, state: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APIYI_WORKER", "thread")
    run = online("-p", "cat")
    assert run.code == gi.EXIT_USAGE and api.requests == [] and records(state) == []
    assert "APIYI_WORKER='thread' is not one of process, inprocess, unavailable" in run.err


def test_an_answer_without_images_is_kept_aside_and_does_not_block_the_next_run(
        online: CliRunner, api: FakeImagesAPI, state: Path) -> None:
    api.queue(Reply(body={"error": {"message": "upstream busy"}}))
    first = online("-p", "cat", "-f", "cat.png")
    assert first.code == gi.EXIT_UNAVAILABLE and "upstream busy" in first.err
    [kept] = state.glob("*.answer")
    assert b"upstream busy" in kept.read_bytes() and not list(state.glob("*.spool"))
    assert f"the raw answer is kept in {kept}" in online("--list-jobs").out
    second = online("-p", "cat", "-f", "cat.png")
    assert (second.code, second.out, len(api.requests)) == (0, "cat.png\n", 2)


def test_a_key_echoed_by_the_server_is_in_no_job_file(online: CliRunner, api: FakeImagesAPI, state: Path,
                                                      isolated: Path) -> None:
    def echo(request: Recorded) -> Reply:
        return Reply(status=400, body={"error": {"message": f"bad request from {request.header('Authorization')}"}})

    api.route = echo
    assert online("-p", "cat", "-f", "cat.png").code == gi.EXIT_REFUSED
    (isolated / "b.json").write_text(json.dumps(["one"]), encoding="utf-8")
    assert online("--batch", "b.json").code == gi.EXIT_BATCH_PARTIAL
    assert "***" in (isolated / "b.results.jsonl").read_text()
    assert no_key_in(state) and no_key_in(isolated)


def test_old_finished_jobs_are_pruned_but_an_unsaved_answer_never(online: CliRunner, state: Path) -> None:
    assert online("-p", "old cat").code == 0 and online("-p", "old dog").code == 0
    old, unsaved = sorted(records(state), key=lambda r: r["created_at"])
    for record in (old, unsaved):
        record["updated_at"] -= gi.JOB_KEEP_S + 1
        (state / f"{record['id']}.json").write_text(json.dumps(record))
    (state / f"{unsaved['id']}.spool").write_bytes(b"{}")
    (state / f"{old['id']}.answer").write_bytes(b"{}")
    run = online("-p", "new cat")
    assert run.code == 0
    assert f"removed {state / (old['id'] + '.answer')}, the raw answer of a job that ended 7 days ago" in run.err
    assert sorted(r["prompt"] for r in records(state)) == ["new cat", "old dog"]
    assert not list(state.glob(f"{old['id']}.*"))
