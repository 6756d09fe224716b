"""The spool: an answer on disk gives the images and events the in-memory parsers of version 1.0
found (tests/reference_parsers.py), at any read boundary, in bounded memory."""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import os
import random
import tracemalloc
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import pytest

import generate_image as gi
from fake_api import make_png, sse_images
from reference_parsers import EventStreamParser, split_base64_values

Span = tuple[int, int]


def piece_sizes(length: int) -> list[int]:
    """Every size up to the whole (and one over) for short inputs; a spread for long ones."""
    return list(range(1, length + 2)) if length <= 120 else [1, 2, 3, 4, 5, 7, 64, 255, 1000, length + 1]


def scan(body: bytes, piece: int, *, margin: bytes = b"") -> tuple[bytes, list[bytes]]:
    """Scan body placed between margins in a file; values come back as the bytes of their spans."""
    data = margin + body + margin
    skeleton, spans = gi.scan_b64_values(io.BytesIO(data), len(margin), len(margin) + len(body), piece=piece)
    return skeleton, [data[begin:end] for begin, end in spans]


def decode(raw: bytes, piece: int) -> tuple[int, str, bytes]:
    data = b'{"b64_json":"' + raw + b'"}'
    out = io.BytesIO()
    written, digest = gi.decode_b64_span(io.BytesIO(data), (13, 13 + len(raw)), out, piece=piece)
    return written, digest, out.getvalue()


def reference_decode(raw: bytes) -> bytes:
    """What the script decodes in memory: the JSON-unescaped value, data: prefix cut, b64decode."""
    text = json.loads(b'"' + raw + b'"', strict=False)
    if text.startswith("data:"):
        text = text[text.index(",") + 1:]
    return base64.b64decode(text)


# --- scan_b64_values ---


@pytest.mark.parametrize("body, skeleton, values", [
    pytest.param(b'{"created":1,"data":[{"url":"https://x.test/a.png"}]}',
                 b'{"created":1,"data":[{"url":"https://x.test/a.png"}]}', [], id="no-b64_json"),
    pytest.param(b'{"data":[{"b64_json":"QUJD","revised_prompt":"r"}]}',
                 b'{"data":[{"b64_json":"","revised_prompt":"r"}]}', [b"QUJD"], id="one"),
    pytest.param(b'{"data":[{"b64_json" :\r\n\t "QUJD"}]}', b'{"data":[{"b64_json" :\r\n\t ""}]}',
                 [b"QUJD"], id="spaces-around-colon"),
    pytest.param(b'{"data":[{"b64_json":"QQ=="},{"b64_json": "Qg=="}],"usage":{"total_tokens":3}}',
                 b'{"data":[{"b64_json":""},{"b64_json": ""}],"usage":{"total_tokens":3}}',
                 [b"QQ==", b"Qg=="], id="two"),
    pytest.param(rb'{"b64_json":"QU\/J\nD\r\n","k":1}', b'{"b64_json":"","k":1}', [rb"QU\/J\nD\r\n"],
                 id="escapes"),
    pytest.param(rb'{"b64_json":"a\"b","k":"c"}', b'{"b64_json":"","k":"c"}', [rb'a\"b'], id="escaped-quote"),
    pytest.param(rb'{"b64_json":"a\\","k":"c"}', b'{"b64_json":"","k":"c"}', [rb"a\\"],
                 id="escaped-backslash-then-quote"),
    pytest.param(rb'{"b64_json":"\\\\\"\\"}', b'{"b64_json":""}', [rb'\\\\\"\\'], id="escape-runs"),
    pytest.param(rb'{"revised_prompt":"say \"b64_json\": \"x\"","b64_json":"QQ=="}',
                 rb'{"revised_prompt":"say \"b64_json\": \"x\"","b64_json":""}', [b"QQ=="],
                 id="key-quoted-in-a-string"),
    pytest.param(b'{"b64_json":""}', b'{"b64_json":""}', [b""], id="empty-value"),
    pytest.param(b'"b64_j" "b64_json"  x "b64_json"\n:\n"AB"', b'"b64_j" "b64_json"  x "b64_json"\n:\n""',
                 [b"AB"], id="near-misses-before-the-key"),
    pytest.param(b'{"b64_json": ', b'{"b64_json": ', [], id="key-without-value-at-the-end"),
])
def test_scan_whatever_the_piece_size(body: bytes, skeleton: bytes, values: list[bytes]) -> None:
    for size in piece_sizes(len(body)):
        assert scan(body, size, margin=b"xx 0") == (skeleton, values), size


@pytest.mark.parametrize("body", [b'{"b64_json":"QUJD', rb'{"b64_json":"QU\"', b'{"b64_json":"QU\\',
                                  b'{"b64_json":"'])
def test_scan_refuses_an_unterminated_value(body: bytes) -> None:
    for size in piece_sizes(len(body)):
        with pytest.raises(ValueError, match="not terminated"):
            gi.scan_b64_values(io.BytesIO(body), 0, len(body), piece=size)


def test_scan_refuses_a_range_past_the_end_of_the_file() -> None:
    with pytest.raises(ValueError, match="file ends"):
        gi.scan_b64_values(io.BytesIO(b'{"a":1}'), 0, 10)


def random_answer(rng: random.Random) -> bytes:
    """Answers as gateways write them: compact or indented, '/' escaped or not, lines wrapped."""
    items = []
    for _ in range(rng.randint(0, 3)):
        value = base64.b64encode(rng.randbytes(rng.randint(0, 200))).decode()
        if rng.random() < 0.3:
            value = "\n".join(value[i:i + 76] for i in range(0, len(value), 76))
        item = {"b64_json": value, "revised_prompt": rng.choice(['say "b64_json": "x"', "a/b", "中文"])}
        items.append(item if rng.random() < 0.8 else {"url": "https://x.test/i.png"})
    answer = {"created": 1, "data": items, "usage": {"total_tokens": rng.randint(0, 9999)}}
    separators = rng.choice([(",", ":"), (", ", ": "), (",", " :\n  "), (",", "\t:\t")])
    text = json.dumps(answer, indent=rng.choice([None, 2]), separators=separators,
                      ensure_ascii=rng.random() < 0.5).encode()
    return text.replace(b"/", b"\\/") if rng.random() < 0.3 else text


def test_scan_agrees_with_the_in_memory_split_at_random_piece_sizes() -> None:
    rng = random.Random(1)
    for _ in range(300):
        body = random_answer(rng)
        expected_skeleton, expected_values = split_base64_values(body)
        for size in [rng.randint(1, 40), rng.randint(1, len(body) + 1), gi.SPOOL_PIECE]:
            skeleton, values = scan(body, size, margin=b"\n" * rng.randint(0, 3))
            assert skeleton == expected_skeleton
            unescaped = [json.loads(b'"' + v + b'"').encode("ascii", "ignore") for v in values]
            assert unescaped == [v.tobytes() for v in expected_values]
            items = json.loads(skeleton)["data"]
            assert all(item["b64_json"] == "" for item in items if "b64_json" in item)


# --- decode_b64_span ---

ALL_BYTES = bytes(range(256)) * 3
ALL_B64 = base64.b64encode(ALL_BYTES)  # holds '+' and '/'
WRAPPED = b"".join(ALL_B64[i:i + 76] + b"\n" for i in range(0, len(ALL_B64), 76))


@pytest.mark.parametrize("raw, expected", [
    pytest.param(b"QUJD", b"ABC", id="plain"),
    pytest.param(b"QUI=", b"AB", id="one-pad"),
    pytest.param(b"QQ==", b"A", id="two-pads"),
    pytest.param(ALL_B64, ALL_BYTES, id="all-byte-values"),
    pytest.param(b"data:image/png;base64," + ALL_B64, ALL_BYTES, id="data-url"),
    pytest.param(rb"data:image\/png;base64," + ALL_B64.replace(b"/", rb"\/"), ALL_BYTES, id="data-url-escaped"),
    pytest.param(ALL_B64.replace(b"/", rb"\/"), ALL_BYTES, id="escaped-slashes"),
    pytest.param(WRAPPED.replace(b"\n", rb"\n"), ALL_BYTES, id="escaped-lf"),
    pytest.param(WRAPPED.replace(b"\n", rb"\r\n"), ALL_BYTES, id="escaped-crlf"),
    pytest.param(WRAPPED.replace(b"\n", rb"\t"), ALL_BYTES, id="escaped-tab"),
    pytest.param(WRAPPED.replace(b"\n", b"\r\n "), ALL_BYTES, id="raw-whitespace"),
    pytest.param(b"QUJD\\nQUI=\\n", b"ABCAB", id="escape-after-padding"),
    pytest.param(b"QQ==QUJD", b"A", id="data-after-padding-ignored"),
    pytest.param(b"Q=Q==", base64.b64decode(b"Q=Q=="), id="stray-pad-in-first-places"),
    pytest.param(b"QU=JD", base64.b64decode(b"QU=JD"), id="single-pad-in-third-place-skipped"),
])
def test_decode_whatever_the_piece_size(raw: bytes, expected: bytes) -> None:
    assert reference_decode(raw) == expected
    for size in piece_sizes(len(raw)):
        assert decode(raw, size) == (len(expected), hashlib.sha256(expected).hexdigest(), expected), size


@pytest.mark.parametrize("raw, message", [
    pytest.param(b"", "empty", id="empty"),
    pytest.param(b"data:image/png;base64,", "empty", id="data-url-only"),
    pytest.param(rb"\n\r\t  ", "empty", id="only-wrapping"),
    pytest.param(b"data:image/png;base64" + b"A" * 300, "data: URL", id="data-url-without-comma"),
    pytest.param(rb"QUJD\u0041", "JSON escape", id="unicode-escape"),
    pytest.param(rb"QU\\JD", "JSON escape", id="escaped-backslash"),
    pytest.param(rb'QU\"JD', "JSON escape", id="escaped-quote"),
    pytest.param(rb"QUJD\b", "JSON escape", id="other-escape"),
    pytest.param(rb"QQ==\x", "JSON escape", id="bad-escape-after-padding"),
    pytest.param(b"QUJD\\", "inside an escape", id="trailing-backslash"),
    pytest.param(b"QUJDQ", "padding", id="one-extra-character"),
    pytest.param(b"QUJDQQ", "padding", id="missing-padding"),
    pytest.param(b"QQ=", "padding", id="half-padding"),
])
def test_decode_refuses(raw: bytes, message: str) -> None:
    for size in piece_sizes(len(raw)):
        with pytest.raises(ValueError, match=message):
            decode(raw, size)


def mangle(rng: random.Random, encoded: bytes) -> bytes:
    """Base64 as a gateway (or a broken one) may send it: escapes, wrapping, stray '=' and junk."""
    tokens = [bytes([c]) for c in encoded]
    for _ in range(rng.randint(0, 6)):
        tokens.insert(rng.randint(0, len(tokens)), rng.choice([rb"\n", rb"\r\n", rb"\t", b" ", b"\n", b"=",
                                                               b"==", b"!", b"-", b"_", b"*"]))
    if rng.random() < 0.5:
        tokens = [rb"\/" if t == b"/" else t for t in tokens]
    raw = b"".join(tokens)
    if rng.random() < 0.2:
        raw = raw.rstrip(b"=")
    if rng.random() < 0.1:
        raw = raw[:rng.randint(0, len(raw))].rstrip(b"\\")
    return (rb"data:image\/png;base64," if rng.random() < 0.1 else b"") + raw


def test_decode_agrees_with_b64decode_at_random_piece_sizes() -> None:
    rng = random.Random(2)
    for _ in range(1500):
        raw = mangle(rng, base64.b64encode(rng.randbytes(rng.randint(0, 40))))
        try:
            expected: Optional[bytes] = reference_decode(raw) or None
        except binascii.Error:
            expected = None
        for size in {rng.randint(1, 9), rng.randint(1, len(raw) + 1), gi.SPOOL_PIECE}:
            if expected is None:
                with pytest.raises(ValueError):
                    decode(raw, size)
            else:
                assert decode(raw, size) == (len(expected), hashlib.sha256(expected).hexdigest(), expected)


def test_decode_groups_agrees_with_a2b_base64_on_pads_anywhere() -> None:
    """The '=' rules, exhaustively over short strings: carry plus the rest must decode as one call."""
    rng = random.Random(3)
    for _ in range(20000):
        text = bytes(rng.choice(b"QUJD=") for _ in range(rng.randint(0, 12)))
        cut = rng.randint(0, len(text))
        decoded, carry, ended = gi.decode_groups(text[:cut])
        if not ended:
            decoded2, carry, ended = gi.decode_groups(carry + text[cut:])
            decoded += decoded2
        try:
            expected: Optional[bytes] = binascii.a2b_base64(text)
        except binascii.Error:
            expected = None
        assert (decoded if ended or not carry else None) == expected, text


# --- EventSpanParser ---


def parse_spans(raw: bytes, size: int) -> list[tuple[str, bytes]]:
    """Events from the span parser, their data read back as EventStreamParser would give it."""
    parser, events = gi.EventSpanParser(), []
    handle = io.BytesIO(raw)
    for start in range(0, len(raw), size):
        events += parser.feed(raw[start:start + size], start)
    events += parser.finish()
    return [(name, b"\n".join(gi.read_span(handle, span) for span in spans)) for name, spans in events]


@pytest.mark.parametrize("raw, expected", [
    pytest.param(b"event: a\ndata: 1\n\n", [("a", b"1")], id="lf"),
    pytest.param(b"event: a\r\ndata: 1\r\n\r\n", [("a", b"1")], id="crlf"),
    pytest.param(b"event: a\rdata: 1\r\r", [("a", b"1")], id="cr"),
    pytest.param(b"data: {\ndata: \"k\": 2}\n\n", [("message", b"{\n\"k\": 2}")], id="multi-line-data"),
    pytest.param(b": keep-alive\n\n:comment\ndata:x\n\n", [("message", b"x")], id="comments-no-space"),
    pytest.param(b"event: lonely\n\ndata: y\n\n", [("message", b"y")], id="event-without-data-is-dropped"),
    pytest.param(b"id: 7\nretry: 100\ndata: z\n\n", [("message", b"z")], id="other-fields-ignored"),
    pytest.param(b"data: last\n", [("message", b"last")], id="no-blank-line-at-the-end"),
    pytest.param(b"data: last", [("message", b"last")], id="no-line-end-at-the-end"),
    pytest.param(b"data: a\n\ndata: [DONE]\n\n", [("message", b"a"), ("message", b"[DONE]")], id="done"),
    pytest.param("data: 中文\r\n\r\n".encode(), [("message", "中文".encode())], id="utf8"),
    pytest.param(b"data\ndata:\ndata:  two\n\n", [("message", b"\n\n two")], id="empty-values-one-space-cut"),
    pytest.param(b"event:\ndata: m\n\nevent: x  \ndata: n\n\n", [("message", b"m"), ("x", b"n")],
                 id="blank-and-padded-names"),
    pytest.param(b"data: x\n\r", [("message", b"x")], id="a-lone-cr-blank-line-at-the-end"),
    pytest.param(b"data: x\r\r\n\n", [("message", b"x")], id="cr-then-crlf"),
    pytest.param(b"data: y\r\n\nevent: b\ndata: z\n\n", [("message", b"y"), ("b", b"z")],
                 id="crlf-then-lf-blank-line"),
    pytest.param(b"data: y\r\n\r\nevent: b\r\ndata: z", [("message", b"y"), ("b", b"z")],
                 id="crlf-blank-line-between-events"),
    pytest.param(b"data: " + b"A" * 1000 + b"\n" + b"x" * 300 + b"\n\n", [("message", b"A" * 1000)],
                 id="long-lines"),
    pytest.param(b"event: " + b"e" * 240 + b"\ndata: 1\n\n", [("e" * 240, b"1")], id="long-event-name"),
])
def test_span_parser_whatever_the_read_boundaries(raw: bytes, expected: list) -> None:
    for size in piece_sizes(len(raw)):
        assert parse_spans(raw, size) == expected, size


def test_span_parser_keeps_only_a_line_head() -> None:
    parser = gi.EventSpanParser()
    parser.feed(b"data: " + b"A" * 5000, 0)
    assert len(parser.head) == parser.HEAD
    assert parser.feed(b"\n\n", 5006) == [("message", [(6, 5006)])]


def test_span_parser_refuses_pieces_out_of_order() -> None:
    parser = gi.EventSpanParser()
    parser.feed(b"data: a\n", 100)
    with pytest.raises(ValueError, match="consecutive"):
        parser.feed(b"\n", 107)


def random_stream(rng: random.Random) -> bytes:
    lines = [rng.choice([b"event: image_generation.partial_image", b"event:done", b"event", b"data: {\"a\": 1}",
                         b"data:x", b"data", b"data:  y", b": ping", b":", b"", b"", b"id: 3", b"retry",
                         b"data: " + b"B" * rng.randint(0, 600), b"event: " + b"n" * rng.randint(0, 300),
                         b"x" * rng.randint(250, 270), "data: 中".encode()])
             for _ in range(rng.randint(0, 20))]
    ends = [rng.choice([b"\n", b"\r", b"\r\n"]) for _ in lines]
    raw = b"".join(line + end for line, end in zip(lines, ends))
    return raw[:-1] if raw and rng.random() < 0.3 else raw


def test_span_parser_agrees_with_event_stream_parser_at_random_piece_sizes() -> None:
    rng = random.Random(4)
    for _ in range(1000):
        raw = random_stream(rng)
        for size in {rng.randint(1, 5), rng.randint(1, len(raw) + 1), 4096}:
            reference, pieces = EventStreamParser(), [raw[i:i + size] for i in range(0, len(raw), size)]
            expected = [event for piece in pieces for event in reference.feed(piece)] + reference.finish()
            # a name longer than the head is cut; EventStreamParser keeps it whole
            cut = [(name[:gi.EventSpanParser.HEAD - 7].strip() or "message", data) for name, data in expected]
            assert parse_spans(raw, size) == cut


# --- The whole way: a spooled answer to image files ---

IMAGES = [make_png(40, 30, rgb=(9, 99, 199)), make_png(64, 64)]


def test_a_spooled_json_answer_gives_the_images_and_metadata(tmp_path: Path) -> None:
    answer = {"created": 1_800_000_000, "usage": {"total_tokens": 4210},
              "data": [{"b64_json": base64.b64encode(image).decode(), "revised_prompt": "a cat"} for image in IMAGES]}
    spool = tmp_path / "answer.spool"
    spool.write_bytes(json.dumps(answer).replace("/", "\\/").encode())
    meta, sources = gi.read_spooled_answer(spool, streamed=False)
    assert meta == {**answer, "data": [{"b64_json": "", "revised_prompt": "a cat"}] * 2}
    with open(spool, "rb") as handle:
        for source, image in zip(sources, IMAGES):
            out = io.BytesIO()
            assert gi.decode_spooled_image(handle, source, out) == (len(image), hashlib.sha256(image).hexdigest())
            assert out.getvalue() == image


def test_a_spooled_event_stream_gives_each_preview_as_it_ends_then_the_final_image(tmp_path: Path) -> None:
    partials = [make_png(8, 8, rgb=(i, i, i)) for i in (10, 20)]
    final = make_png(300, 200)
    raw = b": keep-alive\r\n\r\n" + b"".join(sse_images(partials, final, newline="\r\n", done=True))
    previews: list[bytes] = []
    completed: list[str] = []

    def preview(fill: Optional[gi.ImageFill], event: Mapping[str, Any]) -> None:
        if fill is None:
            completed.append(event["type"])
            return
        out = io.BytesIO()
        fill(out)
        previews.append(out.getvalue())

    spool = tmp_path / "answer.spool"
    with open(spool, "w+b") as handle:
        gi.copy_event_stream(io.BufferedReader(io.BytesIO(raw), buffer_size=333), handle, preview, deadline=1e18,
                             limit=10**8)
    assert spool.read_bytes() == raw and previews == partials and completed == ["image_generation.completed"]
    meta, sources = gi.read_spooled_answer(spool, streamed=True)
    assert (meta["usage"]["total_tokens"], meta["data"][0]["type"]) == (4210, "image_generation.completed")
    out = io.BytesIO()
    with open(spool, "rb") as handle:
        gi.decode_spooled_image(handle, sources[0], out)
    assert out.getvalue() == final


@pytest.mark.parametrize("escaped", [False, True], ids=["plain", "every-slash-escaped-and-wrapped"])
def test_a_40_mb_value_is_scanned_and_decoded_in_a_few_mib(tmp_path: Path, escaped: bool) -> None:
    spool, image = tmp_path / "answer.json", tmp_path / "image.bin"
    digest, size = hashlib.sha256(), 0
    with open(spool, "wb") as handle:
        handle.write(b'{"created": 1, "data": [{"revised_prompt": "big", "b64_json": "')
        while size < 30_000_000:  # 30 MB of image, 40 MB of base64
            block = os.urandom(3 * 1024 * 1024)
            digest.update(block)
            size += len(block)
            text = base64.b64encode(block)
            if escaped:
                text = b"".join(text[i:i + 76] + rb"\n" for i in range(0, len(text), 76)).replace(b"/", rb"\/")
            handle.write(text)
        handle.write(b'"}], "usage": {"total_tokens": 4210}}')
    tracemalloc.start()
    try:
        with open(spool, "rb") as handle, open(image, "wb") as out:
            skeleton, spans = gi.scan_b64_values(handle, 0, os.path.getsize(spool))
            written, sha = gi.decode_b64_span(handle, spans[0], out)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert json.loads(skeleton)["usage"] == {"total_tokens": 4210}
    assert spans[0][1] - spans[0][0] >= 40_000_000
    assert (written, sha) == (size, digest.hexdigest()) and os.path.getsize(image) == size
    assert peak < 8 * 1024 * 1024, f"peak {peak / 2**20:.1f} MiB"
