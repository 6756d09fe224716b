"""Hostile servers and odd answers: every read is capped, nothing crashes, messages are clean."""

from __future__ import annotations

import base64
import json
import os
import shlex
import subprocess
import ssl
import time
from pathlib import Path

import pytest

import generate_image as gi
from conftest import TEST_KEY, CliRunner
from fake_api import FakeImagesAPI, Reply, images_answer, make_png, sse_images, stream_reply
from peak import measured_run
from test_subprocess import find_python
from twins import twin_command



def folder_turned_into_a_file(folder: Path):
    """A fake-server hook: the output folder, checked and made before sending, is a file by the answer."""
    def block(request: object) -> None:
        folder.rmdir()
        folder.write_bytes(b"a file where the folder should be")

    return block


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def no_leftovers(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if p.suffix in (".png", ".spool", ".part")]


@pytest.mark.parametrize("reply, message", [
    pytest.param(Reply(body=b"{}", headers={"Content-Length": str(10 ** 12)}),
                 "the answer announces 1,000,000,000,000 bytes, past the", id="content-length-far-above-the-cap"),
    pytest.param(Reply(body=b"{}", headers={"Content-Length": "\u00b2"}),
                 "the server sent a Content-Length that is not a number", id="content-length-not-ascii-digits"),
    pytest.param(Reply(body=b"[" * 100_000 + b"]" * 100_000), "the answer is not JSON", id="json-nested-too-deep"),
    pytest.param(Reply(body=b"\xff\xfe{\"data\": []}"), "the answer is not JSON", id="not-utf-8"),
    pytest.param(Reply(body=b"\x1f\x8b\x08\x00junk", headers={"Content-Encoding": "gzip"}), "the answer is not JSON",
                 id="gzip-body"),
])
def test_unusable_answers_are_one_line_exit_5_and_leave_nothing(online: CliRunner, api: FakeImagesAPI,
                                                                 isolated: Path, tmp_path: Path,
                                                                 reply: Reply, message: str) -> None:
    api.queue(reply)
    run = online("-p", "cat", "-f", "cat.png")
    assert run.code == gi.EXIT_UNAVAILABLE, run.err
    assert message in run.err and "Traceback" not in run.err
    assert len(api.requests) == 1 and no_leftovers(isolated) and not list((tmp_path / "state").glob("*.spool"))


@pytest.mark.parametrize("image", [
    pytest.param(b"RIFF\x0c\x00\x00\x00WEBPVP8L\x00\x00", id="webp-of-20-bytes"),
    pytest.param(b"\x89PNG\r\n\x1a\n\x00\x00\x00\x00IHDR", id="png-with-an-empty-ihdr"),
    pytest.param(make_png(1, 1)[:16] + b"\x00" * 8 + make_png(1, 1)[24:], id="png-of-zero-pixels"),
    pytest.param(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00\xff\xd9", id="jpeg-no-frame"),
    pytest.param(b"\xff\xd8\xff\xe1\x00\x00\xff\xe1\x00\x00", id="jpeg-segment-of-length-zero"),
])
def test_garbled_images_are_kept_as_bytes_not_crashed_on(online: CliRunner, api: FakeImagesAPI, isolated: Path,
                                                         image: bytes) -> None:
    api.queue(Reply(body=images_answer([image])))
    run = online("-p", "cat", "-f", "cat.png")
    assert (run.code, run.out) == (gi.EXIT_UNAVAILABLE, "")
    assert f"error: an image in the answer is not a PNG, JPEG, WebP, GIF or SVG: its {len(image)} bytes are kept " \
           f"in cat.bin\nhint: the request was probably billed" in run.err and "Traceback" not in run.err
    assert {p.name: p.read_bytes() for p in isolated.iterdir()} == {"cat.bin": image}


def test_an_answer_past_its_cap_is_refused_while_it_streams_in(online: CliRunner, api: FakeImagesAPI,
                                                              monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(gi, "MAX_IMAGE_BASE64", 4000)
    monkeypatch.setattr(gi, "ANSWER_JSON_ROOM", 1000)
    api.queue(stream_reply([b'{"data": [{"b64_json": "' + b"A" * 4000, b"A" * 4000, b'"}]}']))
    run = online("-p", "cat", "-f", "cat.png")
    assert run.code == gi.EXIT_UNAVAILABLE
    assert "the answer goes on, past the 6,000 bytes it can legitimately need; it was not kept" in run.err
    assert "probably billed, and retrying buys a new image" in run.err
    assert not list((tmp_path / "state").glob("*.spool"))


def test_a_stream_event_past_its_cap_is_refused(online: CliRunner, api: FakeImagesAPI,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gi, "MAX_IMAGE_BASE64", 3000)
    monkeypatch.setattr(gi, "ANSWER_JSON_ROOM", 1000)
    api.queue(stream_reply(sse_images([], make_png(256, 256)) + [b"data: " + b"B" * 5000]))
    run = online("-p", "cat", "-f", "cat.png", "--stream", "--partial-images", "1")
    assert run.code == gi.EXIT_UNAVAILABLE and "one event of the stream goes on" in run.err


def test_more_images_than_asked_are_not_saved(online: CliRunner, api: FakeImagesAPI, isolated: Path) -> None:
    api.queue(Reply(body=images_answer([make_png(64, 64)] * 3)))
    run = online("-p", "cat", "-f", "cat.png")
    assert (run.code, run.out) == (0, "cat.png\n")
    assert "warning: the answer held 3 images but 1 were asked for: only the first 1 are saved" in run.err
    assert sorted(p.name for p in isolated.iterdir()) == ["cat.png"]


def test_server_text_in_errors_is_cleaned_and_short(online: CliRunner, api: FakeImagesAPI) -> None:
    message = "\x1b[31mbad\x1b]0;owned\x07 request\r\n" + b64(make_png(64, 64)) * 20
    api.queue(Reply(status=400, body={"error": {"message": message, "code": "bad"}}))
    run = online("-p", "cat")
    error_line = next(line for line in run.err.splitlines() if line.startswith("generate_image.py: error"))
    assert error_line.startswith("generate_image.py: error: HTTP 400: bad request [base64]")
    assert "\x1b" not in run.err and "\x07" not in run.err and len(error_line) < 420


@pytest.mark.parametrize("body, shown", [
    (b'{"error": {"message": "bad \\u001b[31mrequest", "code": "x", "param": "size"}}',
     '{"error": {"message": "bad \\u001b[31mrequest", "code": "x", "param": "size"}}'),
    (b"<html>\x1b[2Jnot json</html>", "<html> not json</html>"),
    (b"x" * 2049, None),
    (b"see " + b"QUFB" * 60, None),
], ids=["json", "html-with-escape", "too-long", "image-data"])
def test_a_short_error_body_is_given_whole_in_json(online: CliRunner, api: FakeImagesAPI, body: bytes,
                                                   shown: str) -> None:
    api.queue(Reply(status=400, body=body))
    error = online("-p", "cat", "--json").json()["error"]
    assert error.get("body") == shown and error["exit_code"] == gi.EXIT_REFUSED


def test_an_error_body_is_read_to_64_kib_at_most(online: CliRunner, api: FakeImagesAPI) -> None:
    api.queue(Reply(status=500, body=b"<html>" + b"x" * 5_000_000), Reply(status=500, body=b"short"),
              Reply(status=500, body=b"short"))
    run = online("-p", "cat", "--retries", "2")
    assert run.code == gi.EXIT_UNAVAILABLE and "HTTP 500: short" in run.err


def test_too_many_headers_after_sending_is_exit_6(online: CliRunner, api: FakeImagesAPI) -> None:
    api.queue(Reply(body=b"{}", headers={f"X-Junk-{i}": "1" for i in range(150)}))
    run = online("-p", "cat")
    assert run.code == gi.EXIT_MAYBE_BILLED and "got more than 100 headers" in run.err


def test_a_trickled_status_line_is_cut_at_the_timeout(online: CliRunner, api: FakeImagesAPI,
                                                      isolated: Path) -> None:
    api.queue(Reply(body=images_answer([make_png(64, 64)]), trickle_head=0.05))   # ~6 s for the head alone
    started = time.monotonic()
    run = online("-p", "cat", "-f", "cat.png", "--timeout", "1")
    assert (run.code, run.out) == (gi.EXIT_MAYBE_BILLED, "")
    assert "no complete answer from 127.0.0.1" in run.err and "within 1 s" in run.err
    assert time.monotonic() - started < 4.5 and no_leftovers(isolated)


@pytest.fixture
def tls_api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeImagesAPI:
    """The fake API behind TLS with a certificate from a test authority the client is told to trust."""
    import trustme

    authority = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1").configure_cert(context)
    authority.cert_pem.write_to_path(str(tmp_path / "authority.pem"))
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "authority.pem"))
    with FakeImagesAPI(tls=context) as server:
        monkeypatch.setenv("APIYI_BASE_URL", server.url)
        monkeypatch.setenv("APIYI_API_KEY", TEST_KEY)
        yield server


@pytest.mark.parametrize("reply, code", [(Reply(body=images_answer([make_png(64, 64)])), 0),
                                         (Reply(body=images_answer([make_png(64, 64)]), trickle_head=0.05),
                                          gi.EXIT_MAYBE_BILLED)], ids=["answer", "trickled-head"])
def test_over_tls_the_answer_arrives_and_the_deadline_holds(cli: CliRunner, tls_api: FakeImagesAPI,
                                                            reply: Reply, code: int) -> None:
    tls_api.queue(reply)
    started = time.monotonic()
    run = cli("-p", "cat", "-f", "cat.png", "--timeout", "1")
    assert run.code == code and tls_api.requests[0].header("Authorization") == f"Bearer {TEST_KEY}"
    assert time.monotonic() - started < 4.5
    assert ("within 1 s" in run.err) == bool(code)


def big_input(folder: Path, megabytes: int) -> Path:
    """A PNG the tool accepts, padded after its end: more than loopback buffers hold."""
    path = folder / "big.png"
    path.write_bytes(make_png(64, 64) + b"\0" * (megabytes << 20))
    return path


def test_a_slow_upload_does_not_eat_the_timeout(online: CliRunner, api: FakeImagesAPI, isolated: Path) -> None:
    api.stall_upload = 2.0      # the server reads nothing for 2 s: the send blocks until then
    api.queue(Reply(body=images_answer([make_png(64, 64)])))
    run = online("-p", "cat", "-i", str(big_input(isolated, 40)), "-f", "cat.png", "--timeout", "1")
    assert (run.code, run.out) == (0, "cat.png\n")
    assert len(api.requests[0].body) > 40 << 20


def test_an_upload_past_its_deadline_is_exit_5_and_nothing_billed(online: CliRunner, api: FakeImagesAPI,
                                                                  isolated: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gi, "UPLOAD_BASE_S", 0.5)
    monkeypatch.setattr(gi, "UPLOAD_MIN_BYTES_PER_S", 10 ** 12)
    api.stall_upload = 3.0
    run = online("-p", "cat", "-i", str(big_input(isolated, 40)), "-f", "cat.png", "--retries", "0")
    assert (run.code, run.out) == (gi.EXIT_UNAVAILABLE, "")
    assert "sending the request took longer than 1 s; nothing was billed" in run.err
    assert "hint: check the network, or send smaller input images" in run.err
    time.sleep(3)   # the server reads what arrived, finds it cut short, and records nothing
    assert api.requests == [] and sorted(p.name for p in isolated.iterdir()) == ["big.png"]


@pytest.mark.parametrize("version", ["3.7", "3.8"])
def test_an_older_python_is_told_to_upgrade(version: str) -> None:
    python = find_python(version)
    if not python:
        pytest.skip(f"CPython {version} is not installed here")
    done = subprocess.run([*twin_command("python", python), "--help"], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.startswith(f"generate_image.py: error: needs Python 3.9 or newer (this is Python {version})")


@pytest.mark.parametrize("url, message", [
    pytest.param("http://[::1/v1", "is not a usable URL", id="broken-ipv6"),
    pytest.param("http://host:abc/v1", "is not a usable URL", id="port-not-a-number"),
    pytest.param("http://host/v 1", "holds spaces or control characters", id="space"),
    pytest.param("http://host/v1\r\nX-Evil: 1", "holds spaces or control characters", id="crlf"),
    pytest.param("https://user:secret@api.example/v1", "holds a user name or password", id="credentials"),
])
def test_unusable_base_urls_are_exit_2_with_nothing_sent(online: CliRunner, api: FakeImagesAPI, url: str,
                                                         message: str) -> None:
    run = online("-p", "cat", "--base-url", url)
    assert run.code == gi.EXIT_USAGE and message in run.err and api.requests == []
    assert "secret" not in run.err


@pytest.fixture
def proxy(monkeypatch: pytest.MonkeyPatch) -> FakeImagesAPI:
    """A 'proxy' on loopback that records what reaches it; NO_PROXY is cleared so it would be used."""
    with FakeImagesAPI() as server:
        for name in ("NO_PROXY", "no_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HTTP_PROXY", server.url.rsplit("/v1", 1)[0])
        monkeypatch.setenv("http_proxy", server.url.rsplit("/v1", 1)[0])
        yield server


def test_a_loopback_base_url_never_goes_through_a_proxy(online: CliRunner, api: FakeImagesAPI,
                                                        proxy: FakeImagesAPI) -> None:
    assert online("-p", "cat", "-f", "cat.png").code == 0
    assert len(api.requests) == 1 and proxy.requests == []


def test_plain_http_through_an_http_proxy_is_refused_unless_allowed(online: CliRunner, api: FakeImagesAPI,
                                                                     proxy: FakeImagesAPI) -> None:
    run = online("-p", "cat", "-f", "cat.png", "--base-url", "http://images.example.invalid/v1")
    assert run.code == gi.EXIT_USAGE and "an HTTP proxy is set: the proxy would read the API key" in run.err
    assert proxy.requests == [] and api.requests == []
    allowed = online("-p", "cat", "-f", "cat.png", "--base-url", "http://images.example.invalid/v1",
                     "--allow-http-proxy")
    assert allowed.code == 0, allowed.err
    assert proxy.requests[0].path == "http://images.example.invalid/v1/images/generations"


@pytest.mark.parametrize("args, message", [
    pytest.param(["-f", "图" * 84 + ".png"], "is 262 bytes; file systems allow 255", id="chinese-name-too-long"),
    pytest.param(["-f", "a" * 245 + ".png"], "file systems allow 255", id="no-room-for-name-2"),
    pytest.param(["-f", "x" * 240 + ".png", "--metadata"], "file systems allow 255", id="no-room-for-the-sidecar"),
    pytest.param(["-f", "d" * 256 + "/cat.png"], "file systems allow 255", id="folder-name-too-long"),
])
def test_a_name_too_long_for_the_file_system_is_refused_before_sending(online: CliRunner, api: FakeImagesAPI,
                                                                       args: list, message: str) -> None:
    run = online("-p", "cat", *args)
    assert run.code == gi.EXIT_USAGE and message in run.err and api.requests == []
    assert "hint: use a file name of at most" in run.err


def test_a_long_chinese_prompt_still_gets_a_default_name_that_fits(online: CliRunner, isolated: Path) -> None:
    run = online("-p", "一只可爱的橘猫在草地上玩耍" * 20)
    assert run.code == 0 and len(run.out.strip().encode()) < 100


@pytest.mark.parametrize("name", ["../escape.png", "/tmp/abs.png", "~/home.png", "a/../../up.png", "C:/win.png",
                                  "..\\win.png"])
def test_a_batch_item_cannot_write_outside_its_folder(online: CliRunner, api: FakeImagesAPI, isolated: Path,
                                                      name: str) -> None:
    (isolated / "b.json").write_text(json.dumps([{"prompt": "cat", "filename": name}]), encoding="utf-8")
    run = online("--batch", "b.json")
    assert run.code == gi.EXIT_USAGE and api.requests == []
    assert "item 1, filename: " in run.err and "leaves the batch folder" in run.err


@pytest.mark.skipif(os.name == "nt", reason="POSIX shell redirections")
@pytest.mark.parametrize("shell", ["{ CMD; echo rc=$? >rc.txt; } | head -c1 >/dev/null", "CMD >&-; echo rc=$? >rc.txt",
                                   "CMD 2>&-; echo rc=$? >rc.txt", "CMD >/dev/full; echo rc=$? >rc.txt",
                                   "CMD >&- 2>&-; echo rc=$? >rc.txt"])
def test_output_streams_that_fail_do_not_lose_the_image_or_crash(agent_env: dict, isolated: Path, shell: str) -> None:
    command = shlex.join([*twin_command("python"), "-p", "cat", "-f", "cat.png"])
    done = subprocess.run(["sh", "-c", shell.replace("CMD", command)], env=agent_env, cwd=isolated,
                          capture_output=True, timeout=60)
    assert (isolated / "rc.txt").read_text().strip() == "rc=0", done.stderr.decode()
    assert b"Traceback" not in done.stderr and b"BrokenPipe" not in done.stderr
    assert (isolated / "cat.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, stdin, message", [
    pytest.param(["-p", "-"], b"a\x00b", "the prompt holds a NUL character", id="nul-in-stdin-prompt"),
    pytest.param(["-p", b"\xff\xfe"], b"", "the prompt holds bytes that are not UTF-8", id="argv-not-utf-8"),
    pytest.param(["-p", "cat", "-f", b"\xffcat.png"], b"", "holds bytes that are not UTF-8", id="filename-not-utf-8"),
    pytest.param(["-p", "cat", "-s", "1" * 5000 + "x1024"], b"", "is not a size", id="a-5000-digit-size"),
    pytest.param(["-p", "cat", "--timeout", "1e20"], b"", "must be above 0 and at most 86400", id="timeout-1e20"),
])
def test_hostile_inputs_are_exit_2_with_nothing_sent(agent_env: dict, api: FakeImagesAPI, isolated: Path,
                                                     args: list, stdin: bytes, message: str) -> None:
    argv = [a if isinstance(a, bytes) else a.encode() for a in args]
    done = subprocess.run([*map(os.fsencode, twin_command("python")), *argv], input=stdin,
                          capture_output=True, env=agent_env, cwd=isolated, timeout=60)
    assert done.returncode == gi.EXIT_USAGE, done.stderr.decode(errors="replace")
    assert message in done.stderr.decode(errors="replace") and b"Traceback" not in done.stderr
    assert api.requests == []


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_a_prompt_from_an_endless_stdin_is_capped(agent_env: dict, api: FakeImagesAPI, isolated: Path) -> None:
    with open("/dev/zero", "rb") as zero:
        done = subprocess.run([*twin_command("python"), "-p", "-"], stdin=zero, capture_output=True,
                              env=agent_env, cwd=isolated, timeout=60)
    assert done.returncode == gi.EXIT_USAGE and b"longer than 128,003 bytes" in done.stderr


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs a FIFO")
def test_a_fifo_as_batch_file_is_refused_without_blocking(online: CliRunner, isolated: Path) -> None:
    os.mkfifo(isolated / "b.json")
    run = online("--batch", "b.json")
    assert run.code == gi.EXIT_USAGE and "is not a regular file" in run.err


def test_a_nul_in_a_batch_prompt_names_the_item(online: CliRunner, api: FakeImagesAPI, isolated: Path) -> None:
    (isolated / "b.json").write_text(json.dumps(["fine", "a\u0000b"]), encoding="utf-8")
    run = online("--batch", "b.json")
    assert run.code == gi.EXIT_USAGE and "item 2, prompt: the prompt holds a NUL character" in run.err
    assert api.requests == []


def test_dry_run_shows_the_name_a_real_run_would_use(online: CliRunner, isolated: Path) -> None:
    (isolated / "cat.png").write_bytes(b"mine")
    run = online("-p", "cat", "-f", "cat.png", "--dry-run")
    assert run.out.splitlines()[-2] == "output: cat-2.png"
    assert "warning: cat.png exists: would save as cat-2.png (--overwrite replaces it)" in run.err
    document = online("-p", "cat", "-f", "cat.png", "--dry-run", "--json").json()
    assert document["outputs"] == ["cat-2.png"] and document["warnings"][-1].startswith("cat.png exists")


def test_a_jsonl_batch_of_one_line_is_one_item(online: CliRunner, isolated: Path, api: FakeImagesAPI) -> None:
    (isolated / "one.jsonl").write_text('{"prompt": "a lone cat", "filename": "lone.png"}\n', encoding="utf-8")
    run = online("--batch", "one.jsonl")
    assert (run.code, run.out) == (0, "lone.png\n") and api.requests[0].prompt() == "a lone cat"


def test_a_resolution_given_as_size_points_to_a_ratio(online: CliRunner) -> None:
    run = online("-p", "cat", "-s", "4K", "--dry-run")
    assert run.code == gi.EXIT_USAGE and "hint: for 4K give a ratio: -s 16:9 -r 4K" in run.err


@pytest.mark.parametrize("args, message", [
    pytest.param(["-p", "cat", "--api-ke", "sk-secret-typo"], "unrecognized option: --api-ke", id="mistyped-key-flag"),
    pytest.param(["-p", "cat", "-p", "dog"], "argument -p/--prompt: given twice", id="prompt-twice"),
    pytest.param(["-p", "cat", "-f", "."], "-f . names a folder", id="filename-is-a-folder"),
    pytest.param(["-p", "cat", "-i", "https://example.com/cat.png"], "URLs are not supported", id="input-url"),
    pytest.param(["-p", "cat", "-i", "in.png", "-m", os.devnull], "not a regular file", id="mask-dev-null"),
])
def test_common_mistakes_get_their_own_message(online: CliRunner, api: FakeImagesAPI, picture, args: list,
                                               message: str) -> None:
    picture("in.png")
    run = online(*args)
    assert run.code == gi.EXIT_USAGE and message in run.err and api.requests == []
    assert "sk-secret-typo" not in run.err


def test_a_key_echoed_in_revised_prompt_stays_out_of_the_sidecar(online: CliRunner, api: FakeImagesAPI,
                                                                 isolated: Path) -> None:
    from conftest import TEST_KEY

    api.queue(Reply(body={"created": 1, "data": [{"b64_json": b64(make_png(64, 64)),
                                                  "revised_prompt": f"key {TEST_KEY}"}]}))
    run = online("-p", "cat", "-f", "cat.png", "--metadata", "--json")
    assert run.code == 0
    sidecar = (isolated / "cat.png.json").read_text(encoding="utf-8")
    assert TEST_KEY not in sidecar and "key ***" in sidecar


def test_a_batch_refused_by_policy_is_not_told_to_rerun(online: CliRunner, api: FakeImagesAPI, isolated: Path) -> None:
    api.route = lambda request: Reply(status=400, body={"error": {"message": "no", "code": "moderation_blocked"}})
    (isolated / "b.json").write_text(json.dumps(["a", "b"]), encoding="utf-8")
    run = online("--batch", "b.json")
    assert run.code == gi.EXIT_BATCH_PARTIAL
    assert "hint: the API refused them: change their prompts or parameters" in run.err


def test_a_malformed_chunked_answer_is_exit_6(online: CliRunner, api: FakeImagesAPI) -> None:
    api.queue(Reply(pieces=[b"zz\r\nnot a chunk\r\n"], headers={"Transfer-Encoding": "chunked"}))
    run = online("-p", "cat")
    assert run.code == gi.EXIT_MAYBE_BILLED and "Traceback" not in run.err
    assert "dropped after the request was sent: the connection closed before the whole answer arrived" in run.err


@pytest.mark.parametrize("name", ["CON.png", "out/nul", "com1.jpg", "cat?.png", "ab:c.png", "trailing.png.",
                                  "space /cat.png"])
def test_a_batch_name_windows_refuses_is_refused_everywhere(online: CliRunner, api: FakeImagesAPI,
                                                           isolated: Path, name: str) -> None:
    (isolated / "b.json").write_text(json.dumps([{"prompt": "cat", "filename": name}]), encoding="utf-8")
    run = online("--batch", "b.json")
    assert run.code == gi.EXIT_USAGE and "is not a file name Windows accepts" in run.err and api.requests == []


@pytest.mark.skipif(os.name == "nt", reason="POSIX symlinks and owners")
def test_the_fallback_folder_is_private_and_never_a_link(online: CliRunner, api: FakeImagesAPI, isolated: Path,
                                                         tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    elsewhere, home = tmp_path / "elsewhere", tmp_path / "home"
    elsewhere.mkdir()
    (tmp_path / "tmp" / "apiyi-gpt-image-2").symlink_to(elsewhere)

    api.queue(Reply(body=images_answer([make_png(64, 64)]), before=folder_turned_into_a_file(isolated / "out")))
    run = online("-p", "cat", "-f", "out/cat.png")
    assert run.code == gi.EXIT_FALLBACK
    assert run.out.strip() == str(home / ".apiyi-gpt-image-2" / "cat.png")
    assert list(elsewhere.iterdir()) == [] and (home / ".apiyi-gpt-image-2").stat().st_mode & 0o077 == 0


def test_a_flag_written_with_its_value_is_named_without_it(online: CliRunner, api: FakeImagesAPI) -> None:
    run = online("-p", "cat", "--apikey=sk-secret-typo", "--json")
    assert run.code == gi.EXIT_USAGE and "unrecognized option: --apikey" in run.err
    assert "sk-secret-typo" not in run.err + run.out


def test_an_upper_case_http_scheme_is_still_plain_http(online: CliRunner, api: FakeImagesAPI,
                                                       proxy: FakeImagesAPI) -> None:
    run = online("-p", "cat", "--base-url", "HTTP://images.example.invalid/v1")
    assert run.code == gi.EXIT_USAGE and "the proxy would read the API key" in run.err and proxy.requests == []


def test_a_tilde_of_nobody_is_exit_2(online: CliRunner, api: FakeImagesAPI) -> None:
    run = online("-p", "cat", "-f", "~no-such-user-here/cat.png")
    assert run.code == gi.EXIT_USAGE and "names no home folder here" in run.err and api.requests == []


@pytest.mark.skipif(os.name == "nt", reason="POSIX modes")
def test_a_shared_fallback_folder_is_made_private(online: CliRunner, api: FakeImagesAPI, isolated: Path,
                                                  tmp_path: Path) -> None:
    shared = tmp_path / "tmp" / "apiyi-gpt-image-2"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)

    api.queue(Reply(body=images_answer([make_png(64, 64)]), before=folder_turned_into_a_file(isolated / "out")))
    run = online("-p", "cat", "-f", "out/cat.png")
    assert (run.code, run.out.strip()) == (gi.EXIT_FALLBACK, str(shared / "cat.png"))
    assert shared.stat().st_mode & 0o077 == 0


def test_temporary_names_stay_short_whatever_the_characters() -> None:
    name = "\U0001F431" * 57 + ".png"
    assert len(gi.temporary_beside(Path(name)).name.encode()) < 160


@pytest.mark.skipif(os.name == "nt", reason="POSIX symlinks")
@pytest.mark.parametrize("overwrite", [False, True], ids=["kept", "overwrite"])
def test_an_image_is_never_written_through_a_symlink(online: CliRunner, api: FakeImagesAPI, isolated: Path,
                                                     tmp_path: Path, overwrite: bool) -> None:
    elsewhere = tmp_path / "elsewhere.png"
    elsewhere.write_bytes(b"not yours")
    (isolated / "cat.png").symlink_to(elsewhere)
    api.queue(Reply(body=images_answer([make_png(64, 64)])))
    run = online("-p", "cat", "-f", "cat.png", *(["--overwrite"] if overwrite else []))
    assert run.code == 0 and elsewhere.read_bytes() == b"not yours"
    if overwrite:   # the link itself is replaced by the image
        assert run.out == "cat.png\n" and not (isolated / "cat.png").is_symlink()
        assert (isolated / "cat.png").read_bytes() == make_png(64, 64)
    else:
        assert run.out == "cat-2.png\n" and (isolated / "cat.png").is_symlink()


ONE_MIB = b"x" * (1 << 20)
ENDLESS = [
    pytest.param(Reply(pieces=[b'{"data": [{"b64_json": "'] + [ONE_MIB] * 300,
                       headers={"Content-Type": "application/json"}), [],
                 f"the answer goes on, past the {gi.MAX_IMAGE_BASE64 + 2 * gi.ANSWER_JSON_ROOM:,} bytes", id="json"),
    pytest.param(stream_reply([b"event: image_generation.partial_image\ndata: "] + [ONE_MIB] * 300),
                 ["--stream"], f"one event of the stream goes on, past the "
                               f"{gi.MAX_IMAGE_BASE64 + gi.ANSWER_JSON_ROOM:,} bytes", id="stream-event"),
]


@pytest.mark.skipif(not hasattr(os, "posix_spawnp"), reason="peak memory is read with posix_spawn and wait4")
@pytest.mark.parametrize("reply, args, message", ENDLESS)
def test_an_endless_answer_is_cut_at_its_cap_in_little_memory(api: FakeImagesAPI, agent_env: dict, isolated: Path,
                                                              reply: Reply, args: list[str], message: str) -> None:
    api.queue(reply)
    run = measured_run([*twin_command("python"), "-p", "cat", "-f", "cat.png", *args], cwd=isolated,
                       env={**agent_env, "APIYI_WORKER": "inprocess"})
    assert (run.code, run.stdout) == (gi.EXIT_UNAVAILABLE, "")
    assert message in run.stderr and "it can legitimately need; it was not kept" in run.stderr
    assert run.peak_bytes < 80 << 20, f"peak {run.peak_bytes / 2**20:.0f} MiB for an answer cut at 46 MiB of 300"
    assert sorted(p.name for p in isolated.iterdir()) == []


def test_a_key_echoed_as_a_name_is_masked_too(online: CliRunner, api: FakeImagesAPI, isolated: Path) -> None:
    assert gi.scrub({"usage": {TEST_KEY: 1, "echo": f"a {TEST_KEY}"}}, TEST_KEY) == {"usage": {"***": 1, "echo": "a ***"}}
    api.queue(Reply(body=images_answer([make_png(64, 64)], usage={TEST_KEY: 1, "total_tokens": 2})))
    run = online("-p", "cat", "-f", "cat.png", "--json", "--metadata")     # the runner checks stdout and stderr
    assert run.code == 0 and run.json()["usage"] == {"***": 1, "total_tokens": 2}
    assert TEST_KEY not in (isolated / "cat.png.json").read_text()


@pytest.mark.parametrize("key, problem", [("sk-1234", "has 7 characters; a key has at least 8"),
                                          ("output_format", "is a plain word, not a key")])
def test_a_key_that_cannot_be_one_is_refused(online: CliRunner, api: FakeImagesAPI, key: str, problem: str) -> None:
    run = online("-p", "cat", "-k", key)
    assert (run.code, api.requests) == (gi.EXIT_AUTH, [])
    assert f"error: the API key {problem}" in run.err
