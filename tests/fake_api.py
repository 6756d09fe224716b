"""A fake OpenAI-compatible Images API on 127.0.0.1 for tests and benchmarks.

It records every request (method, path, headers, body) and answers with scripted
replies, or by default with real images of the requested size and format.
Multipart bodies are parsed with the standard library's email parser, so a test
proves that an ordinary server can read what the client sent.
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import email.parser
import email.policy
import io
import json
import socket
import ssl
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Optional


def make_png(width: int, height: int, *, alpha: bool = False, rgb: tuple[int, int, int] = (200, 120, 40)) -> bytes:
    """A real PNG of one colour, built with zlib (no image library needed)."""
    channels = bytes(rgb) + (b"\xff" if alpha else b"")
    row = b"\x00" + channels * width
    raw = zlib.compress(row * height, 6)

    def chunk(name: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + name + data + struct.pack(">I", zlib.crc32(name + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6 if alpha else 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def make_svg(width: int, height: int) -> bytes:
    """A small real SVG document, as gpt-image-2.6 answers (its text, base64-encoded in b64_json)."""
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="{width}" '
            f'height="{height}" viewBox="0 0 {width} {height}"><rect width="100%" height="100%" fill="#e8a040"/>'
            f'<text x="10" y="40">猫</text></svg>\n').encode()


def make_gif(width: int, height: int, frames: int) -> bytes:
    """A real animated GIF (Pillow, a test extra) of this many frames."""
    from PIL import Image

    sheet = [Image.new("RGB", (width, height), (index * 15 % 256, 90, 200)) for index in range(frames)]
    buffer = io.BytesIO()
    sheet[0].save(buffer, format="GIF", save_all=True, append_images=sheet[1:], duration=100, loop=0)
    return buffer.getvalue()


def make_image(fmt: str, width: int, height: int, *, alpha: bool = False, frames: int = 9) -> bytes:
    """A real image in png, jpeg, webp, gif or svg; jpeg, webp and gif need Pillow (a test extra)."""
    if fmt == "png":
        return make_png(width, height, alpha=alpha)
    if fmt == "svg":
        return make_svg(width, height)
    if fmt == "gif":
        return make_gif(width, height, frames)
    from PIL import Image

    buffer = io.BytesIO()
    mode = "RGBA" if alpha and fmt == "webp" else "RGB"
    Image.new(mode, (width, height), (30, 160, 90)).save(buffer, format=fmt.upper())
    return buffer.getvalue()


@dataclasses.dataclass
class Part:
    name: str
    filename: Optional[str]
    content_type: Optional[str]
    data: bytes


@dataclasses.dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    in_flight: int = 1          # requests being answered when this one arrived, itself included

    def header(self, name: str) -> Optional[str]:
        return next((v for k, v in self.headers.items() if k.lower() == name.lower()), None)

    def json(self) -> Any:
        return json.loads(self.body)

    def parts(self) -> list[Part]:
        head = f"Content-Type: {self.header('Content-Type')}\r\n\r\n".encode()
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + self.body)
        assert message.is_multipart(), "body is not multipart"
        return [Part(p.get_param("name", header="content-disposition"), p.get_filename(),
                     p.get("Content-Type"), p.get_payload(decode=True)) for p in message.iter_parts()]

    def fields(self) -> dict[str, str]:
        return {p.name: p.data.decode() for p in self.parts() if p.filename is None}

    def files(self) -> list[Part]:
        return [p for p in self.parts() if p.filename is not None]

    def prompt(self) -> str:
        multipart = (self.header("Content-Type") or "").startswith("multipart/")
        return str(self.fields()["prompt"] if multipart else self.json()["prompt"])


@dataclasses.dataclass
class Reply:
    """One scripted answer. body: bytes as is, anything else as JSON."""

    status: int = 200
    body: Any = b""
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    delay: float = 0.0
    drop: bool = False                  # close the connection without answering
    truncate: Optional[int] = None      # send only this many body bytes, then close
    reset: bool = False                 # with truncate: abort the connection (RST) instead of closing it
    trickle: Optional[float] = None     # pause this long between 1 KB pieces of the body
    trickle_head: Optional[float] = None  # send the status line and headers a byte at a time, this far apart
    pieces: Optional[list[bytes]] = None  # an event stream: these pieces (body ignored), no Content-Length
    gap: float = 0.0                    # pause between pieces
    before: Optional[Callable[[Recorded], None]] = None


def images_answer(images: list[bytes], *, usage: Optional[dict] = None, prefix: str = "", **extra: Any) -> dict:
    data = [{"b64_json": prefix + base64.b64encode(img).decode()} for img in images]
    answer = {"created": 1_800_000_000, "data": data,
              "usage": usage or {"input_tokens": 50, "output_tokens": 4160, "total_tokens": 4210,
                                 "input_tokens_details": {"text_tokens": 50, "image_tokens": 0}}}
    answer.update(extra)
    return answer


def api_error(message: str, *, type_: str = "invalid_request_error", param: object = None,
              code: object = None) -> dict:
    """An error body as the Images API sends it."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def sse_event(name: str, payload: Any, *, newline: str = "\n") -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return f"event: {name}{newline}data: {data}{newline}{newline}".encode()


def sse_images(partials: list[bytes], final: Optional[bytes], *, kind: str = "image_generation",
               newline: str = "\n", done: bool = False) -> list[bytes]:
    """A stream as the Images API sends it: partial_image events, then completed; one piece per event."""
    common = {"created_at": 1_800_000_000, "size": "1024x1024", "quality": "auto", "background": "opaque",
              "output_format": "png"}
    events = [sse_event(f"{kind}.partial_image", {"type": f"{kind}.partial_image", **common,
                                                  "b64_json": base64.b64encode(image).decode(),
                                                  "partial_image_index": index}, newline=newline)
              for index, image in enumerate(partials)]
    if final is not None:
        usage = {"input_tokens": 50, "output_tokens": 4160, "total_tokens": 4210,
                 "input_tokens_details": {"text_tokens": 50, "image_tokens": 0}}
        events.append(sse_event(f"{kind}.completed", {"type": f"{kind}.completed", **common, "usage": usage,
                                                      "b64_json": base64.b64encode(final).decode()}, newline=newline))
    return events + ([f"data: [DONE]{newline}{newline}".encode()] if done else [])


def stream_reply(pieces: list[bytes], *, gap: float = 0.0) -> Reply:
    return Reply(pieces=pieces, gap=gap, headers={"Content-Type": "text/event-stream"})


MODELS_LISTED = ("gpt-image-2", "gpt-image-2.6-flare", "gpt-image-2.6-all")


def default_reply(request: Recorded) -> Reply:
    """Answer like the real API: n images of the requested size and format; GET /models lists models."""
    if request.method == "GET" and request.path.endswith("/models"):
        return Reply(body={"object": "list", "data": [{"id": m, "object": "model"} for m in MODELS_LISTED]})
    if (request.header("Content-Type") or "").startswith("multipart/"):
        fields = request.fields()
    else:
        fields = request.json()
    size = str(fields.get("size", "auto"))
    width, height = (int(x) for x in size.split("x")) if "x" in size else (1024, 1024)
    fmt = str(fields.get("output_format", "png"))
    frames = int(fields.get("frame_count", 9))
    images = [make_image(fmt, width, height, frames=frames) for _ in range(int(fields.get("n", 1)))]
    if str(fields.get("stream", "")).lower() == "true":
        kind = "image_edit" if "multipart" in (request.header("Content-Type") or "") else "image_generation"
        previews = [make_image(fmt, 64, 64)] * int(fields.get("partial_images", 0))
        return stream_reply([event for image in images for event in sse_images(previews, image, kind=kind)])
    return Reply(body=images_answer(images), headers={"x-request-id": "req_fake_123"})


# What each line takes, as the real channels enforce it (references/models.md): a field the model does
# not take is a 400, so a test proves the tool never sent one. The flat channels answer one image.
COMMON_FIELDS = {"model", "prompt", "image", "image[]"}
PROFILE_FIELDS = {"size": ("size",), "quality": ("quality",), "n": ("n",), "background": ("background",),
                  "moderation": ("moderation",), "output_compression": ("output_compression",),
                  "mask": ("mask",), "stream": ("stream", "partial_images"), "complexity": ("complexity",),
                  "frames": ("frame_count", "frame_duration_ms"), "svg_model": ("svg",)}


def channel_reply(profiles: dict[str, dict[str, Any]]) -> Callable[[Recorded], Optional[Reply]]:
    """A route that refuses, like the real channel, any field the model's profile does not take."""
    def route(request: Recorded) -> Optional[Reply]:
        multipart = (request.header("Content-Type") or "").startswith("multipart/")
        sent = set(request.fields()) | {p.name for p in request.files()} if multipart else set(request.json())
        profile = profiles.get(str(request.fields()["model"] if multipart else request.json()["model"]))
        if profile is None:
            return None
        allowed = COMMON_FIELDS | {"output_format"} | {f for name in profile["accepts"] for f in PROFILE_FIELDS[name]}
        unknown = sorted(sent - allowed)
        return Reply(status=400, body={"error": {"message": f"Unknown parameter: '{unknown[0]}'.",
                                                 "type": "invalid_request_error", "param": unknown[0],
                                                 "code": "unknown_parameter"}}) if unknown else None
    return route


def quota_route(quota: int, seconds: float, refused: list[int], *, retry_after: str = "0",
                outage: tuple[float, float] = (0.0, 0.0)) -> Callable[[Recorded], Reply]:
    """A gateway with a concurrency quota: a request beyond it gets a 429 at once (counted in refused),
    and so does every request during the outage (from, to: seconds after the first request)."""
    answer = images_answer([make_png(64, 64)])
    first: list[float] = []

    def route(request: Recorded) -> Reply:
        first.append(first[0] if first else time.monotonic())
        elapsed = time.monotonic() - first[0]
        if request.in_flight > quota or outage[0] <= elapsed < outage[1]:
            refused.append(1)
            return Reply(status=429, body={"error": {"message": "concurrency quota"}},
                         headers={"Retry-After": retry_after})
        return Reply(body=answer, delay=seconds)
    return route


class Server(ThreadingHTTPServer):
    request_queue_size = 128  # the default backlog of 5 drops connections when 16 arrive at once


class FakeImagesAPI:
    """Start with `with FakeImagesAPI() as api:`; queue Replies with api.queue(...), or set
    api.route to a function that picks a Reply for a request (None: the queue, then the default)."""

    def __init__(self, *, tls: Optional[ssl.SSLContext] = None) -> None:
        self.requests: list[Recorded] = []
        self.replies: collections.deque[Reply] = collections.deque()
        self.route: Optional[Callable[[Recorded], Optional[Reply]]] = None
        self.active = 0
        self.peak = 0
        self.connections = 0        # requests whose headers arrived, complete or not
        self.stall_upload = 0.0     # wait this long before reading a request's body
        self.lock = threading.Lock()
        self.server = Server(("127.0.0.1", 0), self._handler_class())
        self.scheme = "https" if tls else "http"
        if tls:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.01},
                                       daemon=True)

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> FakeImagesAPI:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def queue(self, *replies: Reply) -> None:
        with self.lock:
            self.replies.extend(replies)

    def next_reply(self, request: Recorded) -> Reply:
        with self.lock:
            self.requests.append(request)
            routed = self.route(request) if self.route else None
            scripted = routed or (self.replies.popleft() if self.replies else None)
        return scripted or default_reply(request)

    def arrived(self) -> int:
        with self.lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
            return self.active

    def departed(self) -> None:
        with self.lock:
            self.active -= 1

    def _handler_class(self) -> type:
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self.answer()

            def do_POST(self) -> None:
                self.answer()

            def answer(self) -> None:
                with api.lock:
                    api.connections += 1
                time.sleep(api.stall_upload)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                if len(body) < length:      # the client went away while sending: nothing to answer
                    return
                request = Recorded(self.command, self.path, dict(self.headers.items()), body, api.arrived())
                try:
                    self.reply_to(request)
                finally:
                    api.departed()

            def reply_to(self, request: Recorded) -> None:
                reply = api.next_reply(request)
                if reply.before:
                    reply.before(request)
                time.sleep(reply.delay)
                if reply.drop:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                payload = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
                self.trickle_head = reply.trickle_head
                try:
                    self.send_response(reply.status)
                    content_type = "application/json" if not isinstance(reply.body, bytes) else "text/html"
                    length = {} if reply.pieces is not None else {"Content-Length": str(len(payload))}
                    headers = {"Content-Type": content_type, **length, **reply.headers}
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.send_body(payload, reply)
                except OSError:
                    pass

            def flush_headers(self) -> None:
                if getattr(self, "trickle_head", None) is None:
                    return super().flush_headers()
                for byte in b"".join(getattr(self, "_headers_buffer", [])):
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(self.trickle_head)
                self._headers_buffer = []

            def send_body(self, payload: bytes, reply: Reply) -> None:
                if reply.pieces is not None:
                    for piece in reply.pieces:
                        self.wfile.write(piece)
                        self.wfile.flush()
                        time.sleep(reply.gap)
                    self.close_connection = True
                    return
                if reply.truncate is not None:
                    self.wfile.write(payload[:reply.truncate])
                    self.wfile.flush()
                    self.close_connection = True
                    if reply.reset:
                        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        self.connection.close()
                    else:
                        self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if reply.trickle is None:
                    self.wfile.write(payload)
                    return
                for start in range(0, len(payload), 1024):
                    self.wfile.write(payload[start:start + 1024])
                    self.wfile.flush()
                    time.sleep(reply.trickle)

        return Handler
