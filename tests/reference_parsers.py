"""The in-memory parsers of version 1.0 of the script, kept as oracles: the spooled parsers that
replaced them (EventSpanParser, scan_b64_values) must find the same events and values."""

from __future__ import annotations

import json
import re
from typing import Optional, Union


class EventStreamParser:
    """Server-sent events from pieces split anywhere: event and data fields, multi-line data,
    comments, CR, LF or CRLF line ends; a blank line ends an event. Data stays bytes, so the
    base64 of a 4K image is not decoded to str."""

    LINE_END = re.compile(rb"[\r\n]")

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.scanned = 0
        self.name = ""
        self.data: list[bytes] = []

    def feed(self, piece: bytes) -> list[tuple[str, bytes]]:
        self.buffer += piece
        events, start = [], 0
        while True:
            found = self.LINE_END.search(self.buffer, max(start, self.scanned))
            if not found:
                self.scanned = len(self.buffer)
                break
            end = found.start()
            if self.buffer[end] == 0x0D and end + 1 == len(self.buffer):
                self.scanned = end  # a CR at the end may be half of a CRLF
                break
            crlf = self.buffer[end:end + 2] == b"\r\n"
            event = self.take_line(bytes(self.buffer[start:end]))
            start = end + (2 if crlf else 1)
            events += [event] if event else []
        del self.buffer[:start]
        self.scanned = max(0, self.scanned - start)
        return events

    def finish(self) -> list[tuple[str, bytes]]:
        """At the end of the stream, a last event without its blank line still counts."""
        events = [] if not self.buffer else self.feed(b"\n")
        last = self.take_line(b"")
        return events + ([last] if last else [])

    def take_line(self, line: bytes) -> Optional[tuple[str, bytes]]:
        if not line:
            event = (self.name or "message", b"\n".join(self.data)) if self.data else None
            self.name, self.data = "", []
            return event
        if line.startswith(b":"):
            return None
        field, _, value = line.partition(b":")
        value = value[1:] if value.startswith(b" ") else value
        if field == b"event":
            self.name = value.decode("utf-8", "replace").strip()
        elif field == b"data":
            self.data.append(value)
        return None


B64_KEY = re.compile(rb'"b64_json"\s*:\s*"')


def split_base64_values(body: Union[bytes, bytearray]) -> tuple[bytes, list[memoryview]]:
    """Cut each b64_json value out of the raw JSON so the rest parses small and the
    33 MB of a 4K image is never copied into a str (base64 has no quotes to escape)."""
    view, pieces, values, position = memoryview(body), [], [], 0
    while True:
        match = B64_KEY.search(body, position)
        if not match:
            break
        start = match.end()
        end = body.find(b'"', start)
        if end < 0:
            break
        pieces.append(view[position:start])
        values.append(view[start:end] if body.find(b"\\", start, end) < 0 else unescape_json_string(view[start:end]))
        position = end
    pieces.append(view[position:])
    return b"".join(pieces), values


def unescape_json_string(raw: memoryview) -> memoryview:
    """Some gateways escape '/' as '\\/' or wrap lines with '\\n': decode those rare values properly."""
    return memoryview(json.loads(b'"' + raw.tobytes() + b'"').encode("ascii", "ignore"))
