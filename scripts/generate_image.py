#!/usr/bin/env python3
# /// script
# requires-python = ">=3.9"
# dependencies = []
# ///
"""Generate and edit images with gpt-image-2 through the APIYI gateway.

Text-to-image sends the prompt to {base}/images/generations; with -i the input
images (one to edit, several to fuse; order kept, "image 1", "image 2"...) go
to {base}/images/edits. A generation takes 120-150 s, up to 5 min at high
quality and 4K, and is billed by token: everything is checked before sending,
and a received image is never thrown away.

With --batch FILE, every item of a JSON/JSONL file is made, -j at a time;
existing outputs are skipped, so running it again finishes what is missing.

examples:
  generate_image.py -p "一只可爱的橘猫在草地上玩耍" -f cat.png
  generate_image.py -p "Put the cat of image 1 in the garden of image 2" \\
      -i cat.png garden.jpg -f fused.png -s 16:9 -r 2K -q high
  generate_image.py --batch styles.json -j 4

stdout carries only the saved paths (or one JSON document with --json);
progress, warnings and errors go to stderr.

environment:
  APIYI_API_KEY    the API key (or -k); never printed, sent only to the base URL
  APIYI_BASE_URL   the API base (or --base-url), default https://api.apiyi.com/v1

exit codes:
  0    every requested image written
  1    a bug: report it with the traceback
  2    bad arguments or input; nothing was sent
  3    no API key, or the key was refused (401/403)
  4    the API refused the request (400/404/413/415/422, content policy)
  5    service unavailable or unusable answer, after retries: retry later
  6    timed out or dropped after sending: may have been billed, not retried
  7    image received but saved only to the fallback path printed
  8    batch finished, but some items failed: run it again to make only those
  130  interrupted
"""

from __future__ import annotations

import argparse
import binascii
import contextlib
import dataclasses
import json
import math
import os
import re
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Callable, NoReturn, Optional, Union

# --- Constants ---

VERSION = "1.0.0"
PROG = "generate_image.py"
TOOL_NAME = "apiyi-gpt-image-2-gen"

DEFAULT_BASE_URL = "https://api.apiyi.com/v1"
DEFAULT_MODEL = "gpt-image-2"
DEFAULT_TIMEOUT_S = 600.0
DEFAULT_RETRIES = 2
ENV_API_KEY = "APIYI_API_KEY"
ENV_BASE_URL = "APIYI_BASE_URL"
GENERATIONS_PATH = "/images/generations"
EDITS_PATH = "/images/edits"

QUALITIES = ("auto", "low", "medium", "high")
OUTPUT_FORMATS = ("png", "jpeg", "webp")
FORMAT_ALIASES = {"jpg": "jpeg"}
BACKGROUNDS = ("auto", "opaque", "transparent")
MODERATIONS = ("auto", "low")
# A W:H size is mapped to a long edge of 1024, 2048 or 3840 pixels.
RESOLUTION_LONG_EDGES = {"1K": 1024, "2K": 2048, "4K": 3840}
SIZE_PRESETS = ("1024x1024", "1536x1024", "1024x1536", "2048x2048", "2048x1152", "3840x2160", "2160x3840")
FORMAT_EXTENSIONS = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}
EXTENSION_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}
CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}

# gpt-image-2 size rules, as APIYI and OpenAI publish them for free sizes.
SIZE_MULTIPLE = 16
MAX_EDGE = 3840
MAX_ASPECT = 3.0
MIN_PIXELS = 655_360
MAX_PIXELS = 8_294_400
# Images API limits for GPT image models (openai-images-api.md, sections 1-2).
MAX_PROMPT_CHARS = 32_000
MAX_INPUT_IMAGES = 16
MAX_INPUT_BYTES = 50 * 1024 * 1024
MAX_MASK_BYTES = 4 * 1024 * 1024
MIN_N, MAX_N = 1, 10
MAX_RETRIES = 10

# Retry policy mirrors the official SDK: 408/409/429/5xx, 0.5 s doubling to 8 s,
# Retry-After honoured up to 120 s. 524 is left out: the CDN gave up but the
# origin keeps generating (and billing), so a retry could pay twice.
RETRY_STATUSES = frozenset({408, 409, 429})
NOT_RETRIED_5XX = frozenset({524})
BACKOFF_INITIAL_S = 0.5
BACKOFF_MAX_S = 8.0
RETRY_AFTER_MAX_S = 120.0
REFUSED_STATUSES = frozenset({400, 404, 413, 415, 422})
AUTH_STATUSES = frozenset({401, 402, 403})
QUOTA_ERROR_CODE = "insufficient_quota"

READ_CHUNK = 1024 * 1024
ERROR_BODY_LIMIT = 64 * 1024
ERROR_EXCERPT_CHARS = 200
PROGRESS_TTY_INTERVAL_S = 1.0
PROGRESS_LOG_INTERVAL_S = 15.0
FALLBACK_FOLDER = "apiyi-gpt-image-2"
TYPICAL_SECONDS = (120, 150)
MAX_PARTIAL_IMAGES = 3
DEFAULT_PARTIAL_IMAGES = 2
DEFAULT_JOBS = 4
MAX_JOBS = 16
# A batch field and the flag for the same setting share one argparse destination.
BATCH_ITEM_FIELDS = {"prompt": "prompt", "filename": "filename", "size": "size", "resolution": "resolution",
                     "quality": "quality", "output_format": "output_format",
                     "output_compression": "output_compression", "input_images": "input_image",
                     "mask": "mask", "n": "n", "background": "background", "moderation": "moderation",
                     "model": "model"}
BATCH_GLOBAL_FIELDS = tuple(f for f in BATCH_ITEM_FIELDS if f not in ("prompt", "filename"))
BATCH_TOP_KEYS = ("description", "global", "prompts")
REQUEST_ID_HEADERS = ("x-request-id", "request-id", "openai-request-id", "x-oneapi-request-id")

EXIT_OK = 0
EXIT_BUG = 1
EXIT_USAGE = 2
EXIT_AUTH = 3
EXIT_REFUSED = 4
EXIT_UNAVAILABLE = 5
EXIT_MAYBE_BILLED = 6
EXIT_FALLBACK = 7
EXIT_BATCH_PARTIAL = 8
EXIT_INTERRUPTED = 130

# --- Exceptions ---


class ToolError(Exception):
    """An expected failure: main() prints it on one line and returns exit_code."""

    exit_code = EXIT_BUG
    kind = "error"

    def __init__(self, message: str, *, hint: str = "", status: Optional[int] = None,
                 code: Optional[str] = None, kind: str = "", problems: Sequence[str] = (),
                 field: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.status = status
        self.code = code
        self.problems = tuple(problems)
        self.field = field  # the setting at fault, as a batch file names it
        if kind:
            self.kind = kind


class UsageError(ToolError):
    exit_code = EXIT_USAGE
    kind = "usage"


@contextlib.contextmanager
def about(field: str) -> Iterator[None]:
    """A UsageError raised inside is about this setting, unless it already names one."""
    try:
        yield
    except UsageError as err:
        err.field = err.field or field
        raise


class AuthError(ToolError):
    exit_code = EXIT_AUTH
    kind = "auth"


class RefusedError(ToolError):
    exit_code = EXIT_REFUSED
    kind = "refused"


class ServiceError(ToolError):
    exit_code = EXIT_UNAVAILABLE
    kind = "unavailable"


class ConnectError(ServiceError):
    """Nothing reached the server (refused, DNS, reset while sending): safe to retry."""

    kind = "connect"


class MaybeBilledError(ToolError):
    exit_code = EXIT_MAYBE_BILLED
    kind = "timeout"


class FallbackSaveError(ToolError):
    exit_code = EXIT_FALLBACK
    kind = "saved_to_fallback"


class BatchPartialError(ToolError):
    exit_code = EXIT_BATCH_PARTIAL
    kind = "batch_partial"


class InterruptedRun(ToolError):
    exit_code = EXIT_INTERRUPTED
    kind = "interrupted"


class ParserExit(Exception):
    """argparse finished on its own (--help, --version) with this status."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


# --- Data ---

Fields = dict[str, Union[str, int, bool]]


@dataclasses.dataclass(frozen=True)
class ImageInfo:
    format: str
    width: int
    height: int

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.format]


@dataclasses.dataclass(frozen=True)
class InputFile:
    path: Path
    info: ImageInfo
    size_bytes: int


@dataclasses.dataclass(frozen=True)
class OutputPlan:
    path: Path
    format: str
    overwrite: bool
    metadata: bool
    keep_partials: bool = False


@dataclasses.dataclass(frozen=True)
class ImageJob:
    """A fully validated request: what to send and where to write."""

    prompt: str
    fields: Fields
    images: tuple[InputFile, ...]
    mask: Optional[InputFile]
    output: OutputPlan
    notes: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()

    @property
    def n(self) -> int:
        return int(self.fields.get("n", 1))

    @property
    def size_explicit(self) -> bool:
        return self.fields.get("size", "auto") != "auto"

    @property
    def mode(self) -> str:
        return "edit" if self.images else "generate"

    @property
    def endpoint(self) -> str:
        return EDITS_PATH if self.images else GENERATIONS_PATH

    @property
    def streamed(self) -> bool:
        return bool(self.fields.get("stream"))


@dataclasses.dataclass(frozen=True)
class ApiConfig:
    base_url: str
    api_key: str
    timeout_s: float
    retries: int


@dataclasses.dataclass(frozen=True)
class MultipartBody:
    """multipart/form-data streamed from disk; iterating again replays it for a retry."""

    boundary: str
    segments: tuple[Union[bytes, InputFile], ...]

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"

    @property
    def length(self) -> int:
        return sum(s.size_bytes if isinstance(s, InputFile) else len(s) for s in self.segments)

    def __iter__(self) -> Iterator[bytes]:
        for segment in self.segments:
            if isinstance(segment, InputFile):
                yield from read_file_chunks(segment)
            else:
                yield segment


@dataclasses.dataclass(frozen=True)
class HttpRequest:
    method: str
    url: str
    headers: dict[str, str]
    body: Union[bytes, MultipartBody]


@dataclasses.dataclass(frozen=True)
class HttpResponse:
    status: int
    headers: dict[str, str]
    body: Union[bytes, bytearray]
    payload: Optional[ImagesPayload] = None     # already decoded from an event stream


@dataclasses.dataclass(frozen=True)
class Fetched:
    """A 2xx answer, how long it took, and the previews a stream delivered before it."""

    response: HttpResponse
    elapsed_s: float
    previews: Optional[PreviewWriter] = None


@dataclasses.dataclass(frozen=True)
class ImagesPayload:
    """A 200 answer: its JSON without the base64, and each image as base64 or a URL."""

    meta: dict[str, Any]
    sources: tuple[Union[memoryview, str], ...]


@dataclasses.dataclass(frozen=True)
class SavedImage:
    path: Path
    info: ImageInfo
    size_bytes: int
    sha256: str
    fallback_reason: str = ""


@dataclasses.dataclass(frozen=True)
class RunResult:
    job: ImageJob
    files: tuple[SavedImage, ...]
    meta: dict[str, Any]
    request_id: str
    elapsed_s: float
    warnings: tuple[str, ...]
    error: Optional[ToolError] = None
    previews: Optional[int] = None             # previews received, when streamed
    partials: tuple[Path, ...] = ()            # preview files kept (--keep-partials)


@dataclasses.dataclass(frozen=True)
class BatchItem:
    number: int
    job: ImageJob
    done_paths: tuple[Path, ...] = ()

    @property
    def skipped(self) -> bool:
        return bool(self.done_paths)


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    source: Path
    description: str
    items: tuple[BatchItem, ...]
    manifest: Path
    jobs: int

    @property
    def to_run(self) -> list[BatchItem]:
        return [item for item in self.items if not item.skipped]


# --- Validation ---


def int_in_range(low: int, high: int) -> Callable[[str], int]:
    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is outside {low}-{high}")
        return value

    return convert


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"{text} must be above 0")
    return value


def choice_of(choices: Sequence[str], *, transform: Callable[[str], str] = str.lower) -> Callable[[str], str]:
    def convert(text: str) -> str:
        value = transform(text.strip())
        if value not in choices:
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(choices)}")
        return value

    return convert


def setting_converters() -> dict[str, Callable[[str], Any]]:
    """One converter per setting: argparse's type= for a flag, and the check of a batch field."""
    return {"resolution": choice_of(tuple(RESOLUTION_LONG_EDGES), transform=str.upper),
            "quality": choice_of(QUALITIES), "n": int_in_range(MIN_N, MAX_N),
            "background": choice_of(BACKGROUNDS), "moderation": choice_of(MODERATIONS),
            "output_format": choice_of(OUTPUT_FORMATS + tuple(FORMAT_ALIASES)),
            "output_compression": int_in_range(0, 100)}


def parse_size_text(text: str) -> tuple[str, int, int]:
    """Split a -s value into ('auto'|'wxh'|'ratio', a, b); X, × and spaces tolerated."""
    cleaned = re.sub(r"\s+", "", text).lower().replace("×", "x").replace("：", ":")
    if cleaned == "auto":
        return "auto", 0, 0
    match = re.fullmatch(r"(\d+)([x:])(\d+)", cleaned)
    if not match:
        raise UsageError(f"--size {text!r} is not a size: use auto, WxH (e.g. 1536x1024) or a ratio W:H (e.g. 16:9)",
                         hint=f"presets: {' '.join(SIZE_PRESETS)}")
    kind = "wxh" if match.group(2) == "x" else "ratio"
    return kind, int(match.group(1)), int(match.group(3))


def size_rule_violations(width: int, height: int) -> list[str]:
    rules = []
    if width % SIZE_MULTIPLE or height % SIZE_MULTIPLE:
        rules.append(f"width and height must be multiples of {SIZE_MULTIPLE}")
    if max(width, height) > MAX_EDGE:
        rules.append(f"the longest edge must be at most {MAX_EDGE}")
    if min(width, height) == 0 or max(width, height) / min(width, height) > MAX_ASPECT:
        rules.append("the aspect ratio must be at most 3:1")
    if not MIN_PIXELS <= width * height <= MAX_PIXELS:
        rules.append(f"the total pixels must be between {MIN_PIXELS:,} and {MAX_PIXELS:,} (got {width * height:,})")
    return rules


def valid_heights_for(width: int) -> range:
    low = max(SIZE_MULTIPLE, math.ceil(width / MAX_ASPECT / SIZE_MULTIPLE) * SIZE_MULTIPLE,
              math.ceil(MIN_PIXELS / width / SIZE_MULTIPLE) * SIZE_MULTIPLE)
    high = min(MAX_EDGE, int(width * MAX_ASPECT) // SIZE_MULTIPLE * SIZE_MULTIPLE,
               MAX_PIXELS // width // SIZE_MULTIPLE * SIZE_MULTIPLE)
    return range(low, high + 1, SIZE_MULTIPLE)


def nearest_valid_size(width: float, height: float) -> tuple[int, int]:
    """The valid size closest to width x height, measured as relative change of each edge,
    after the shape is brought within the ratio and pixel limits (so 17x3 stays landscape)."""
    width, height = fit_within_limits(max(width, 1.0), max(height, 1.0))
    best: tuple[float, int, int] = (math.inf, 0, 0)
    for w in range(SIZE_MULTIPLE, MAX_EDGE + 1, SIZE_MULTIPLE):
        heights = valid_heights_for(w)
        if not heights:
            continue
        below = min(max(heights[0], int(height) // SIZE_MULTIPLE * SIZE_MULTIPLE), heights[-1])
        for h in (below, min(below + SIZE_MULTIPLE, heights[-1])):
            cost = abs(math.log(w / width)) + abs(math.log(h / height))
            best = min(best, (cost, w, h))
    return best[1], best[2]


def fit_within_limits(width: float, height: float) -> tuple[float, float]:
    if max(width, height) / min(width, height) > MAX_ASPECT:
        width, height = (height * MAX_ASPECT, height) if width > height else (width, width * MAX_ASPECT)
    pixels = width * height
    if not MIN_PIXELS <= pixels <= MAX_PIXELS:
        factor = math.sqrt((MAX_PIXELS if pixels > MAX_PIXELS else MIN_PIXELS) / pixels)
        width, height = width * factor, height * factor
    return width, height


def size_for_ratio(ratio_w: int, ratio_h: int, resolution: str) -> tuple[int, int]:
    """Long edge from the resolution, short edge from the ratio, then into the limits."""
    long_edge = RESOLUTION_LONG_EDGES[resolution]
    scale = long_edge / max(ratio_w, ratio_h)
    return nearest_valid_size(ratio_w * scale, ratio_h * scale)


def resolve_size(text: Optional[str], resolution: Optional[str]) -> tuple[Optional[str], str]:
    """The size to send (None: not sent) and a note saying how a ratio was mapped."""
    if text is None:
        if resolution:
            raise UsageError("--resolution needs an aspect ratio size", hint="e.g. -s 16:9 -r 2K",
                             field="resolution")
        return None, ""
    kind, a, b = parse_size_text(text)
    if kind == "auto":
        if resolution:
            raise UsageError("--resolution needs an aspect ratio size, not auto", hint="e.g. -s 16:9 -r 2K",
                             field="resolution")
        return "auto", ""
    if kind == "wxh":
        if resolution:
            raise UsageError(f"--resolution applies to a ratio like 16:9, not to {a}x{b}",
                             hint=f"drop -r, or use -s {a}:{b} -r {resolution}", field="resolution")
        problems = size_rule_violations(a, b)
        if problems:
            w, h = nearest_valid_size(a, b)
            raise UsageError(f"--size {a}x{b}: {'; '.join(problems)}; nearest valid size is {w}x{h}")
        return f"{a}x{b}", ""
    return resolve_ratio(a, b, resolution or "1K")


def resolve_ratio(ratio_w: int, ratio_h: int, resolution: str) -> tuple[str, str]:
    if ratio_w == 0 or ratio_h == 0:
        raise UsageError(f"--size {ratio_w}:{ratio_h}: both sides of a ratio must be above 0", hint="e.g. -s 16:9")
    if max(ratio_w, ratio_h) / min(ratio_w, ratio_h) > MAX_ASPECT:
        widest = "3:1" if ratio_w > ratio_h else "1:3"
        raise UsageError(f"--size {ratio_w}:{ratio_h}: the aspect ratio must be at most 3:1; "
                         f"nearest valid ratio is {widest}")
    width, height = size_for_ratio(ratio_w, ratio_h, resolution)
    return f"{width}x{height}", f"size {ratio_w}:{ratio_h} at {resolution} -> {width}x{height}"


def read_prompt(value: str, stdin: Optional[IO[str]]) -> str:
    """The prompt exactly as given; '-' reads UTF-8 from stdin and drops one trailing newline."""
    if value == "-":
        if stdin is None:
            raise UsageError("-p - reads the prompt from standard input, but there is none")
        raw = stdin.buffer.read() if hasattr(stdin, "buffer") else stdin.read().encode("utf-8")
        try:
            value = raw.decode("utf-8-sig")
        except UnicodeDecodeError as err:
            raise UsageError(f"the prompt on standard input is not UTF-8 (byte {err.start})",
                             hint="save or pipe it as UTF-8") from None
        value = value[:-2] if value.endswith("\r\n") else value[:-1] if value.endswith("\n") else value
    if not value.strip():
        raise UsageError("the prompt is empty", hint='describe the image: -p "a cute orange cat"')
    if len(value) > MAX_PROMPT_CHARS:
        raise UsageError(f"the prompt has {len(value):,} characters; the limit is {MAX_PROMPT_CHARS:,}",
                         hint="shorten it")
    return value


def read_image_info(path: Path) -> Optional[ImageInfo]:
    """Format, width and height from the file's first bytes (None when not PNG, JPEG or WebP)."""
    with open(path, "rb") as handle:
        return image_info_from_stream(handle)


def image_info_from_stream(handle: IO[bytes]) -> Optional[ImageInfo]:
    head = handle.read(32)
    if head.startswith(b"\x89PNG\r\n\x1a\n") and head[12:16] == b"IHDR":
        return ImageInfo("png", int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big"))
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return webp_info(head)
    if head.startswith(b"\xff\xd8\xff"):
        handle.seek(2)
        return jpeg_info(handle)
    return None


def webp_info(head: bytes) -> Optional[ImageInfo]:
    chunk = head[12:16]
    if chunk == b"VP8 " and head[23:26] == b"\x9d\x01\x2a":
        width = int.from_bytes(head[26:28], "little") & 0x3FFF
        height = int.from_bytes(head[28:30], "little") & 0x3FFF
    elif chunk == b"VP8L" and head[20] == 0x2F:
        bits = int.from_bytes(head[21:25], "little")
        width, height = (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    elif chunk == b"VP8X":
        width = int.from_bytes(head[24:27], "little") + 1
        height = int.from_bytes(head[27:30], "little") + 1
    else:
        return None
    return ImageInfo("webp", width, height)


# Start-of-frame markers carry the size; C4 (DHT), C8 (JPG) and CC (DAC) share the range but do not.
JPEG_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def jpeg_info(handle: IO[bytes]) -> Optional[ImageInfo]:
    """Walk the JPEG segments (skipping EXIF and friends) to the first start-of-frame."""
    while True:
        byte = handle.read(1)
        while byte == b"\xff":
            byte = handle.read(1)
        if not byte:
            return None
        marker = byte[0]
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:
            continue
        header = handle.read(2)
        if len(header) < 2:
            return None
        length = int.from_bytes(header, "big")
        if marker in JPEG_SOF_MARKERS:
            frame = handle.read(5)
            if len(frame) < 5:
                return None
            return ImageInfo("jpeg", int.from_bytes(frame[3:5], "big"), int.from_bytes(frame[1:3], "big"))
        handle.seek(length - 2, os.SEEK_CUR)
        if handle.read(1) != b"\xff":
            return None


def png_has_alpha(path: Path) -> bool:
    """Colour type 4/6 carries alpha; any other type has it only through a tRNS chunk."""
    with open(path, "rb") as handle:
        handle.seek(8)
        while True:
            header = handle.read(8)
            if len(header) < 8:
                return False
            length, name = int.from_bytes(header[:4], "big"), header[4:]
            if name == b"IHDR":
                ihdr = handle.read(length)
                if ihdr[9] in (4, 6):
                    return True
                handle.seek(4, os.SEEK_CUR)
            elif name in (b"tRNS", b"IDAT", b"IEND"):
                return name == b"tRNS"
            else:
                handle.seek(length + 4, os.SEEK_CUR)


def check_input_file(text: str, *, role: str, limit: int) -> InputFile:
    path = Path(text).expanduser()
    if not path.is_file():
        problem = "is a folder" if path.is_dir() else "not found"
        raise UsageError(f"{role} {text}: {problem}", hint="check the path")
    size = path.stat().st_size
    if size >= limit:
        raise UsageError(f"{role} {text} is {size / 1048576:.1f} MiB; it must be under {limit // 1048576} MiB",
                         hint="resize or compress it")
    try:
        info = read_image_info(path)
    except OSError as err:
        raise UsageError(f"{role} {text} cannot be read: {err.strerror or err}") from None
    if info is None or not info.width or not info.height:
        raise UsageError(f"{role} {text} is not a PNG, JPEG or WebP image (by its content)",
                         hint="convert it to PNG, JPEG or WebP")
    return InputFile(path, info, size)


def check_mask(text: str, first_image: InputFile) -> InputFile:
    mask = check_input_file(text, role="--mask", limit=MAX_MASK_BYTES)
    if mask.info.format != "png":
        raise UsageError(f"--mask {text} is {mask.info.format.upper()}; a mask must be a PNG with an alpha channel")
    if not png_has_alpha(mask.path):
        raise UsageError(f"--mask {text} has no alpha channel",
                         hint="make the areas to edit fully transparent in an RGBA PNG")
    first = first_image.info
    if (mask.info.width, mask.info.height) != (first.width, first.height):
        raise UsageError(f"--mask {text} is {mask.info.width}x{mask.info.height} but the first input image is "
                         f"{first.width}x{first.height}", hint="the mask must have the same size as image 1")
    return mask


def normalise_format(value: Optional[str]) -> Optional[str]:
    return None if value is None else FORMAT_ALIASES.get(value.lower(), value.lower())


def plan_output_path(filename: Optional[str], format_flag: Optional[str], prompt: str, *,
                     default_stem: Optional[Path] = None) -> tuple[Path, str, bool, list[str]]:
    """The planned output path, its format, whether the format was given, and warnings. Without a
    file name: default_stem (else TIMESTAMP-SLUG-RANDOM) plus the format's extension, and the format
    counts as given only if -o gave it."""
    if filename is None:
        fmt = format_flag or "png"
        stem = default_stem or Path(default_stem_for(prompt))
        return stem.with_name(stem.name + FORMAT_EXTENSIONS[fmt]), fmt, format_flag is not None, []
    path = Path(filename).expanduser()
    if not path.name or filename.endswith(("/", "\\")):
        raise UsageError(f"-f {filename} names a folder", hint="give a file name, e.g. -f out/cat.png")
    from_extension = EXTENSION_FORMATS.get(path.suffix.lower())
    fmt = format_flag or from_extension or "png"
    if from_extension == fmt:
        return path, fmt, True, []
    if from_extension:
        fixed = path.with_suffix(FORMAT_EXTENSIONS[fmt])
        return fixed, fmt, True, [f"-o {fmt} does not match {path.name}: the file will be {fixed.name}"]
    fixed = path.with_name(path.name + FORMAT_EXTENSIONS[fmt])
    warnings = [f"{path.name} has no image extension: the file will be {fixed.name}"] if path.suffix else []
    return fixed, fmt, format_flag is not None, warnings


def default_stem_for(prompt: str) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{prompt_slug(prompt)}-{random_hex(3)}"


def random_hex(nbytes: int) -> str:
    return os.urandom(nbytes).hex()


def prompt_slug(prompt: str, *, max_words: int = 6, max_chars: int = 40) -> str:
    words = re.findall(r"[a-z0-9]+", prompt.lower())[:max_words]
    slug = ""
    for word in words:
        candidate = f"{slug}-{word}" if slug else word
        if len(candidate) > max_chars:
            break
        slug = candidate
    return slug or "image"


def check_output_folder(folder: Path, *, create: bool) -> None:
    """The folder exists (or can be created) and accepts a new file; dry runs create nothing."""
    try:
        if create:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".{TOOL_NAME}-probe-{random_hex(4)}"
            probe.touch(exist_ok=False)
            probe.unlink()
            return
        existing = next(p for p in (folder, *folder.parents) if p.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK):
            raise PermissionError(f"{existing} is not a writable folder")
    except OSError as err:
        raise UsageError(f"the output folder {folder} cannot be written: {err.strerror or err}",
                         hint="choose another -f path") from None


def collect_fields(args: argparse.Namespace, *, prompt: str, size: Optional[str], fmt: str,
                   format_given: bool) -> Fields:
    """Only what the user gave goes on the wire (the server's defaults apply); model always does."""
    fields: Fields = {"model": args.model, "prompt": prompt}
    optional = {"n": args.n, "size": size, "quality": args.quality,
                "output_format": fmt if format_given else None,
                "output_compression": args.output_compression,
                "background": args.background, "moderation": args.moderation}
    if streaming(args):
        partials = DEFAULT_PARTIAL_IMAGES if args.partial_images is None else args.partial_images
        optional.update({"stream": True, "partial_images": partials})
    fields.update({k: v for k, v in optional.items() if v is not None})
    return fields


def streaming(args: argparse.Namespace) -> bool:
    """--partial-images and --keep-partials only make sense with a stream, so they ask for one."""
    return bool(args.stream or args.partial_images is not None or args.keep_partials)


def check_combinations(args: argparse.Namespace, fmt: str) -> list[str]:
    """Cross-flag rules; returns warnings for what is allowed but risky."""
    if args.output_compression is not None and fmt == "png":
        raise UsageError("--output-compression applies to jpeg or webp, but the output format is png",
                         hint="add -o jpeg or -o webp, or drop -c", field="output_compression")
    if args.mask and not args.input_image:
        raise UsageError("--mask needs an input image to apply to", hint="add -i IMAGE", field="mask")
    if args.moderation and args.input_image:
        raise UsageError("--moderation applies to text-to-image only (the edits endpoint has no such field)",
                         hint="drop --moderation", field="moderation")
    if len(args.input_image or ()) > MAX_INPUT_IMAGES:
        raise UsageError(f"{len(args.input_image)} input images given; at most {MAX_INPUT_IMAGES} are allowed",
                         field="input_images")
    if args.background == "transparent":
        if fmt == "jpeg":
            raise UsageError("--background transparent needs png or webp; jpeg has no transparency",
                             hint="use -o png or -o webp", field="background")
        return ["transparent backgrounds are in preview for gpt-image-2: some gateways refuse them"]
    return []


def build_job(args: argparse.Namespace, *, stdin: Optional[IO[str]], create_folder: bool,
              default_stem: Optional[Path] = None) -> ImageJob:
    """Every check that needs no network, in the order a user would fix them; each error says
    which setting it is about."""
    with about("prompt"):
        prompt = read_prompt(args.prompt, stdin)
    with about("size"):
        size, size_note = resolve_size(args.size, args.resolution)
    with about("filename"):
        path, fmt, format_given, warnings = plan_output_path(args.filename, normalise_format(args.output_format),
                                                             prompt, default_stem=default_stem)
    warnings += check_combinations(args, fmt)
    with about("input_images"):
        images = tuple(check_input_file(p, role="input image", limit=MAX_INPUT_BYTES) for p in args.input_image or ())
    with about("mask"):
        mask = check_mask(args.mask, images[0]) if args.mask else None
    with about("filename"):
        check_output_folder(path.parent, create=create_folder)
    fields = collect_fields(args, prompt=prompt, size=size, fmt=fmt, format_given=format_given)
    return ImageJob(prompt=prompt, fields=fields, images=images, mask=mask,
                    output=OutputPlan(path, fmt, args.overwrite, args.metadata, args.keep_partials),
                    notes=(size_note,) if size_note else (),
                    warnings=tuple(warnings))


def read_batch_file(path: Path) -> tuple[str, Any, list[Any]]:
    """The description, the global settings and the raw items of a JSON, JSONL or bare-list file."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as err:
        raise UsageError(f"--batch {path}: {err.strerror or err}", hint="check the path") from None
    except UnicodeDecodeError as err:
        raise UsageError(f"--batch {path} is not UTF-8 (byte {err.start})", hint="save it as UTF-8") from None
    try:
        document = json.loads(text)
    except ValueError as err:
        document = parse_jsonl(text, path, err)
    if isinstance(document, list):
        items, description, settings = document, "", {}
    elif isinstance(document, dict):
        unknown = sorted(set(document) - set(BATCH_TOP_KEYS))
        if unknown:
            raise UsageError(f"--batch {path}: unknown top-level key {unknown[0]!r}",
                             hint=f"the keys are {', '.join(BATCH_TOP_KEYS)} (see references/batch-template.md)")
        items = document.get("prompts")
        description, settings = document.get("description", ""), document.get("global", {})
    else:
        raise UsageError(f"--batch {path} holds a JSON {type(document).__name__}, not a batch",
                         hint='use {"prompts": [...]}, a list, or one item per line (JSONL)')
    if not isinstance(items, list) or not items:
        raise UsageError(f"--batch {path} has no prompts", hint='add "prompts": ["a cat", "a dog"]')
    return str(description), settings, items


def parse_jsonl(text: str, path: Path, json_error: ValueError) -> list[Any]:
    """One item per line; blank lines and lines starting with # are skipped."""
    items: list[Any] = []
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        try:
            items.append(json.loads(stripped))
        except ValueError as err:
            failure = err if items else json_error
            where = f"line {number}" if items else "it"
            raise UsageError(f"--batch {path}: {where} is not valid JSON or JSONL: {failure}",
                             hint="see references/batch-template.md") from None
    return items


def batch_settings(raw: Any, *, allowed: Sequence[str],
                   converters: Mapping[str, Callable[[str], Any]]) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """A batch item or the global block as checked settings, with (field, problem) pairs."""
    if isinstance(raw, str) and "prompt" in allowed:
        raw = {"prompt": raw}
    if not isinstance(raw, dict):
        return {}, [("", "must be " + ("a prompt or " if "prompt" in allowed else "") + "a JSON object")]
    settings, problems = {}, []
    for field, value in raw.items():
        if field.startswith(("_", "#")):
            continue
        if field not in allowed:
            problems.append((field, f"unknown field; the fields are {', '.join(allowed)}"))
            continue
        try:
            settings[field] = convert_batch_value(field, value, converters)
        except argparse.ArgumentTypeError as err:
            problems.append((field, str(err)))
    if "prompt" in allowed and "prompt" not in settings and not any(f == "prompt" for f, _ in problems):
        problems.append(("prompt", "missing"))
    return settings, problems


def convert_batch_value(field: str, value: Any, converters: Mapping[str, Callable[[str], Any]]) -> Any:
    """The same checks as the flag's: choices, ranges; input_images is a list of paths."""
    if field == "input_images":
        paths = [value] if isinstance(value, str) else value
        if not isinstance(paths, list) or not all(isinstance(p, str) and p.strip() for p in paths):
            raise argparse.ArgumentTypeError("must be a list of image paths")
        return paths
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise argparse.ArgumentTypeError(f"must be text or a whole number, not {json.dumps(value)[:40]}")
    return converters.get(field, str)(str(value))


def merge_item_args(args: argparse.Namespace, layers: Sequence[Mapping[str, Any]], *,
                    folder: Path, out_dir: Optional[Path]) -> argparse.Namespace:
    """Command-line flags, then global, then the item; relative paths from the batch file's folder
    (outputs from --out-dir). An inherited -r or -c is dropped where it cannot apply to the item."""
    def under(base: Path, value: str) -> str:
        return str(base / Path(value).expanduser())

    merged = argparse.Namespace(**vars(args))
    for layer in layers:
        for field, value in layer.items():
            if field == "filename":
                value = under(out_dir or folder, value)
            elif field == "mask":
                value = under(folder, value)
            elif field == "input_images":
                value = [under(folder, v) for v in value]
            setattr(merged, BATCH_ITEM_FIELDS[field], value)
    own = layers[-1]
    if "resolution" not in own and merged.resolution and not is_ratio_size(merged.size):
        merged.resolution = None
    if "output_compression" not in own and merged.output_compression is not None \
            and planned_format(merged) == "png":
        merged.output_compression = None
    return merged


def is_ratio_size(text: Optional[str]) -> bool:
    try:
        return text is not None and parse_size_text(text)[0] == "ratio"
    except UsageError:
        return False  # build_job reports it


def planned_format(args: argparse.Namespace) -> str:
    suffix = Path(args.filename or "").suffix.lower()
    return normalise_format(args.output_format) or EXTENSION_FORMATS.get(suffix, "png")


def batch_problem(where: str, field: str, problem: str) -> str:
    return f"{where}{', ' + field if field else ''}: {problem}"


def duplicate_targets(jobs: Sequence[tuple[int, ImageJob]]) -> list[str]:
    """Two items writing one file would pay twice for one image; case-insensitive as on Windows and macOS."""
    owners: dict[str, int] = {}
    problems = []
    for number, job in jobs:
        for path in output_paths(job.output, job.n):
            owner = owners.setdefault(os.path.abspath(path).casefold(), number)
            if owner != number:
                problems.append(batch_problem(f"item {number}", "filename", f"{path} is also written by item {owner}"))
    return problems


def batch_jobs(args: argparse.Namespace, source: Path,
               global_raw: Any, raw_items: Sequence[Any]) -> tuple[list[tuple[int, ImageJob]], list[str]]:
    """Every item checked as a single run would be; all problems are collected, not just the first."""
    out_dir = Path(args.out_dir).expanduser() if args.out_dir else None
    converters = setting_converters()
    global_settings, global_problems = batch_settings(global_raw, allowed=BATCH_GLOBAL_FIELDS, converters=converters)
    problems = [batch_problem("global", field, text) for field, text in global_problems]
    jobs, width = [], max(2, len(str(len(raw_items))))
    for number, raw in enumerate(raw_items, 1):
        settings, item_problems = batch_settings(raw, allowed=tuple(BATCH_ITEM_FIELDS), converters=converters)
        problems += [batch_problem(f"item {number}", field, text) for field, text in item_problems]
        if item_problems:
            continue
        merged = merge_item_args(args, (global_settings, settings), folder=source.parent, out_dir=out_dir)
        stem = (out_dir or source.parent) / f"{number:0{width}d}-{prompt_slug(merged.prompt)}"
        try:
            jobs.append((number, build_job(merged, stdin=None, create_folder=False, default_stem=stem)))
        except UsageError as err:
            problems.append(batch_problem(f"item {number}", err.field, err.message))
    return jobs, problems + duplicate_targets(jobs)


def recorded_outputs(manifest: Path) -> dict[str, list[str]]:
    """Planned path -> files written, from an earlier run's manifest (also a failed item's files: an
    image saved to the fallback folder, exit 7, was paid for)."""
    done: dict[str, list[str]] = {}
    try:
        lines = manifest.read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return done
    except OSError as err:
        raise UsageError(f"the manifest {manifest} cannot be read: {err.strerror or err}") from None
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("target") and record.get("paths"):
            done[str(record["target"])] = [str(p) for p in record["paths"]]
    return done


def existing_outputs(job: ImageJob, recorded: Mapping[str, list[str]]) -> tuple[Path, ...]:
    """The item's n files when all are on disk: under the planned names, or the names the manifest
    recorded (another format than asked, or the fallback folder); an answer with fewer images is redone."""
    for paths in ([str(p) for p in output_paths(job.output, job.n)], recorded.get(str(job.output.path), [])):
        if len(paths) == job.n and all(Path(p).is_file() for p in paths):
            return tuple(Path(p) for p in paths)
    return ()


def plan_batch(args: argparse.Namespace) -> BatchPlan:
    source = Path(args.batch).expanduser()
    description, global_raw, raw_items = read_batch_file(source)
    jobs, problems = batch_jobs(args, source, global_raw, raw_items)
    if problems:
        raise UsageError(f"--batch {source}: {len(problems)} problem{'s' if len(problems) > 1 else ''}, "
                         "nothing was sent:\n  " + "\n  ".join(problems), problems=problems,
                         hint="fix the items named, then run the same command again")
    manifest = (Path(args.out_dir).expanduser() if args.out_dir else source.parent) / f"{source.stem}.results.jsonl"
    check_output_folder(manifest.parent, create=False)
    recorded = {} if args.overwrite else recorded_outputs(manifest)
    items = tuple(BatchItem(number, job, () if args.overwrite else existing_outputs(job, recorded))
                  for number, job in jobs)
    return BatchPlan(source, description, items, manifest, args.jobs or DEFAULT_JOBS)


def is_loopback_host(host: str) -> bool:
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_base_url(text: str) -> tuple[str, list[str]]:
    from urllib.parse import urlsplit

    url = text.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"--base-url {text!r} is not an http(s) URL", hint=f"e.g. {DEFAULT_BASE_URL}")
    if parts.query or parts.fragment:
        raise UsageError(f"--base-url {text!r} has a query or fragment", hint=f"e.g. {DEFAULT_BASE_URL}")
    for endpoint in (GENERATIONS_PATH, EDITS_PATH):
        if url.endswith(endpoint):
            raise UsageError(f"--base-url ends with {endpoint}: give the base only",
                             hint=f"use {url[:-len(endpoint)]}")
    if parts.scheme == "http" and not is_loopback_host(parts.hostname):
        return url, [f"{parts.hostname} is plain http: the API key travels unencrypted"]
    return url, []


def resolve_api_key(flag: Optional[str], env: Mapping[str, str], *, required: bool) -> tuple[str, list[str]]:
    """The key and warnings. Windows CMD keeps the quotes of set KEY="..." in the value; no key has them."""
    key = (flag if flag is not None else env.get(ENV_API_KEY, "")).strip()
    warnings = []
    if len(key) >= 2 and key[0] == key[-1] and key[0] in "'\"":
        key = key[1:-1].strip()
        warnings.append(f"the API key was wrapped in quotes; they were removed "
                        f"(in Windows CMD write: set {ENV_API_KEY}=sk-... without quotes)")
    if not key:
        if required:
            raise AuthError(f"no API key: set {ENV_API_KEY} or pass -k",
                            hint="get a key at https://api.apiyi.com (console -> API keys)")
        return "", warnings
    if any(ch.isspace() or not 0x21 <= ord(ch) <= 0x7E for ch in key):
        raise AuthError("the API key contains spaces or characters that cannot go in a header",
                        hint=f"copy the key again into {ENV_API_KEY}")
    return key, warnings


def build_config(args: argparse.Namespace, env: Mapping[str, str]) -> tuple[ApiConfig, list[str]]:
    base_url, url_warnings = check_base_url(args.base_url or env.get(ENV_BASE_URL) or DEFAULT_BASE_URL)
    key, key_warnings = resolve_api_key(args.api_key, env, required=not args.dry_run)
    return ApiConfig(base_url, key, args.timeout, args.retries), url_warnings + key_warnings


# --- Request building ---


def user_agent() -> str:
    return f"{TOOL_NAME}/{VERSION} (python {sys.version_info[0]}.{sys.version_info[1]})"


def build_json_body(fields: Fields) -> bytes:
    return json.dumps(fields, ensure_ascii=False).encode("utf-8")


def form_value(value: Union[str, int, bool]) -> str:
    """Form fields are text; booleans as the SDK writes them (stream=true)."""
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def quote_form_param(value: str) -> str:
    """HTML5 form escaping, as browsers and httpx (the SDK's transport) do it."""
    escaped = value.replace("\\", "\\\\").replace('"', "%22")
    return "".join(f"%{ord(ch):02X}" if ord(ch) < 0x20 and ch != "\x1b" else ch for ch in escaped)


def encode_multipart(fields: Fields, files: Sequence[tuple[str, InputFile]], *,
                     boundary: Optional[str] = None) -> MultipartBody:
    """Text fields first, then file parts; file bytes stay on disk until sent."""
    boundary = boundary or random_hex(16)
    segments: list[Union[bytes, InputFile]] = []
    for name, value in fields.items():
        segments.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{quote_form_param(name)}"\r\n\r\n'
                        f"{form_value(value)}\r\n".encode("utf-8"))
    for name, upload in files:
        segments.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{quote_form_param(name)}"; '
                        f'filename="{quote_form_param(upload.path.name)}"\r\n'
                        f"Content-Type: {upload.info.content_type}\r\n\r\n".encode("utf-8"))
        segments.extend((upload, b"\r\n"))
    segments.append(f"--{boundary}--\r\n".encode("ascii"))
    return MultipartBody(boundary, tuple(segments))


def read_file_chunks(upload: InputFile) -> Iterator[bytes]:
    remaining = upload.size_bytes
    with open(upload.path, "rb") as handle:
        while remaining:
            chunk = handle.read(min(READ_CHUNK, remaining))
            if not chunk:
                raise UsageError(f"{upload.path} shrank while it was being sent", hint="run again")
            remaining -= len(chunk)
            yield chunk


def upload_parts(job: ImageJob) -> list[tuple[str, InputFile]]:
    """One image is a part named image; several are parts named image[], as the SDK sends them."""
    name = "image" if len(job.images) == 1 else "image[]"
    parts = [(name, image) for image in job.images]
    return parts + ([("mask", job.mask)] if job.mask else [])


def build_request(job: ImageJob, config: ApiConfig) -> HttpRequest:
    accept = "text/event-stream, application/json" if job.streamed else "application/json"
    headers = {"Authorization": f"Bearer {config.api_key}", "User-Agent": user_agent(), "Accept": accept}
    url = config.base_url + job.endpoint
    if job.images:
        body: Union[bytes, MultipartBody] = encode_multipart(job.fields, upload_parts(job))
        headers.update({"Content-Type": body.content_type, "Content-Length": str(body.length)})
    else:
        body = build_json_body(job.fields)
        headers.update({"Content-Type": "application/json", "Content-Length": str(len(body))})
    return HttpRequest("POST", url, headers, body)


def describe_request(request: HttpRequest, job: ImageJob, config: ApiConfig) -> dict[str, Any]:
    """What --dry-run shows: the request with the key redacted and file parts summarised."""
    headers = dict(request.headers)
    headers["Authorization"] = "Bearer <redacted>" if config.api_key else f"Bearer <no key: set {ENV_API_KEY}>"
    described: dict[str, Any] = {"method": request.method, "url": request.url, "headers": headers}
    if isinstance(request.body, MultipartBody):
        described["fields"] = {k: form_value(v) for k, v in job.fields.items()}
        described["files"] = [{"name": name, "filename": f.path.name, "content_type": f.info.content_type,
                               "bytes": f.size_bytes, "width": f.info.width, "height": f.info.height}
                              for name, f in upload_parts(job)]
    else:
        described["json"] = job.fields
    return described


# --- Transport ---


def open_url(request: HttpRequest, *, timeout_s: float, follow_redirects: bool) -> Any:
    """urllib with the environment's proxies; without follow_redirects a 3xx comes back as an
    HTTPError, because urllib would resend the Authorization header to the new host."""
    import urllib.request

    class RefuseRedirects(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any, **kwargs: Any) -> None:
            return None

    opener = urllib.request.build_opener(*([] if follow_redirects else [RefuseRedirects()]))
    data = request.body or None
    urllib_request = urllib.request.Request(request.url, data=data, headers=request.headers, method=request.method)
    return opener.open(urllib_request, timeout=timeout_s)


def read_body(response: Any, *, deadline: float, limit: Optional[int] = None) -> bytearray:
    """Read piece by piece (read1: one network read each) so the total --timeout holds even
    while data trickles in; with a Content-Length the buffer is allocated once."""
    read_piece = getattr(response, "read1", response.read)
    length = response.headers.get("Content-Length", "")
    expected = int(length) if length.isdigit() and limit is None else 0
    buffer, position = bytearray(expected), 0
    while limit is None or position < limit:
        check_deadline(deadline)
        piece = read_piece(READ_CHUNK)
        if not piece:
            break
        buffer[position:position + len(piece)] = piece
        position += len(piece)
    if position < expected:
        raise ConnectionResetError("the connection closed before the whole answer arrived")
    del buffer[position:]
    return buffer


def check_deadline(deadline: float) -> None:
    if time.monotonic() > deadline:
        raise TimeoutError("the answer took longer than --timeout")


PreviewSink = Callable[[memoryview], None]


def send_request(request: HttpRequest, *, timeout_s: float, follow_redirects: bool = False,
                 on_preview: Optional[PreviewSink] = None) -> HttpResponse:
    """One HTTP exchange. Failures before the request is delivered raise ConnectError (retryable);
    after it, MaybeBilledError (the gateway may already be generating and billing). The socket
    timeout is also the idle limit of an event stream: silence for timeout_s ends it."""
    import http.client
    import socket
    import urllib.error

    deadline = time.monotonic() + timeout_s
    try:
        with open_url(request, timeout_s=timeout_s, follow_redirects=follow_redirects) as response:
            headers = lowercase_headers(response.headers)
            if on_preview and headers.get("content-type", "").startswith("text/event-stream"):
                payload = read_event_stream(response, on_preview, deadline=deadline)
                return HttpResponse(response.status, headers, b"", payload)
            return HttpResponse(response.status, headers, read_body(response, deadline=deadline))
    except urllib.error.HTTPError as err:
        return HttpResponse(err.code, lowercase_headers(err.headers), read_error_body(err, deadline=deadline))
    except urllib.error.URLError as err:
        raise ConnectError(f"could not reach {host_of(request.url)}: {reason_text(err.reason)}",
                           hint=connect_hint(reason_text(err.reason))) from None
    except (socket.timeout, TimeoutError):
        raise MaybeBilledError(f"no complete answer from {host_of(request.url)} within {timeout_s:g} s",
                               hint=billed_hint(timeout_s)) from None
    except (http.client.HTTPException, OSError) as err:
        raise MaybeBilledError(f"the connection to {host_of(request.url)} dropped after the request was sent: "
                               f"{reason_text(err)}", kind="dropped", hint=billed_hint(timeout_s)) from None


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


def read_event_stream(response: Any, on_preview: PreviewSink, *, deadline: float) -> ImagesPayload:
    """Previews go to on_preview as they come; the completed event(s) become the payload."""
    parser, completed = EventStreamParser(), []
    read_piece = getattr(response, "read1", response.read)
    ended = False
    while not ended:
        check_deadline(deadline)
        piece = read_piece(READ_CHUNK)
        ended = not piece
        for name, data in parser.feed(piece) if piece else parser.finish():
            kind, event, raw = decode_stream_event(name, data)
            if kind == "done":
                ended = True
                break
            if kind == "partial" and raw is not None:
                on_preview(raw)
            elif kind == "completed":
                completed.append((event, raw))
    if not completed:
        raise ConnectionResetError("the stream ended before the final image")
    meta = {k: v for k, v in completed[-1][0].items() if k != "type"}
    meta["data"] = [event for event, _ in completed]
    return ImagesPayload(meta, tuple(image_source(event, raw) for event, raw in completed))


def decode_stream_event(name: str, data: bytes) -> tuple[str, dict[str, Any], Optional[memoryview]]:
    """('partial' | 'completed' | 'done' | 'other', the event's JSON without base64, the base64)."""
    if data.strip() == b"[DONE]":
        return "done", {}, None
    skeleton, values = split_base64_values(data)
    try:
        event = json.loads(skeleton)
    except ValueError:
        raise ServiceError(f"the stream sent an event that is not JSON: {body_excerpt(data)}",
                           hint="retry without --stream") from None
    if not isinstance(event, dict):
        return "other", {}, None
    if event.get("error") or name == "error" or event.get("type") == "error":
        raise stream_error(event)
    kind = str(event.get("type") or name)
    raw = values[0] if values else None
    if kind.endswith(".partial_image"):
        return "partial", event, raw
    return ("completed" if kind.endswith(".completed") else "other"), event, raw


def stream_error(event: Mapping[str, Any]) -> ToolError:
    """An error event: refused (exit 4) when the request itself was at fault, else the service (5)."""
    error = event.get("error") if isinstance(event.get("error"), dict) else event
    message = str(error.get("message") or event.get("error") or "the stream reported an error")
    kind, code = str(error.get("type") or ""), str(error.get("code") or "")
    refused = kind in ("invalid_request_error", "image_generation_user_error") or \
        code in ("moderation_blocked", "content_policy_violation")
    cls = RefusedError if refused else ServiceError
    label = code or (kind if kind != "error" else "")
    return cls(f"the stream reported an error: {message}" + (f" ({label})" if label else ""),
               code=code or None, hint="change the prompt or parameters" if refused else "retry later")


def connect_hint(reason: str) -> str:
    if "CERTIFICATE_VERIFY_FAILED" in reason:
        return ("Python cannot verify HTTPS certificates here: on macOS run 'Install Certificates.command' "
                "from the Python folder, or point SSL_CERT_FILE at a CA bundle")
    return "check the network, the proxy settings and --base-url"


def read_error_body(error: Any, *, deadline: float) -> bytes:
    """The status decides what happens next; an error body that is cut off only loses its message."""
    import http.client

    try:
        return bytes(read_body(error, deadline=deadline, limit=ERROR_BODY_LIMIT)) if error.fp else b""
    except (OSError, http.client.HTTPException):
        return b""


def billed_hint(timeout_s: float) -> str:
    return (f"the request may already have been billed; check your APIYI usage before retrying, "
            f"then retry with a longer --timeout (now {timeout_s:g} s)")


def lowercase_headers(headers: Any) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()} if headers else {}


def host_of(url: str) -> str:
    from urllib.parse import urlsplit

    return urlsplit(url).netloc


def reason_text(reason: object) -> str:
    text = getattr(reason, "strerror", None) or str(reason) or type(reason).__name__
    return str(text)


def pause(seconds: float) -> None:
    time.sleep(seconds)


def parse_retry_after(value: Optional[str]) -> Optional[float]:
    """Retry-After as seconds or an HTTP date, in seconds from now (None when absent or unreadable)."""
    if not value:
        return None
    value = value.strip()
    if re.fullmatch(r"\d+(\.\d+)?", value):
        return float(value)
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - time.time())


def backoff_delay(attempt: int) -> float:
    """Exponential from 0.5 s to 8 s with jitter, so parallel clients do not retry in step."""
    import random

    return min(BACKOFF_MAX_S, BACKOFF_INITIAL_S * 2 ** attempt) * random.uniform(0.75, 1.0)


def is_retryable(status: int) -> bool:
    return status in RETRY_STATUSES or (status >= 500 and status not in NOT_RETRIED_5XX)


def is_account_problem(status: int, code: str) -> bool:
    """A refused key, or an empty balance: that one comes as 429, but waiting does not refill it."""
    return status in AUTH_STATUSES or code == QUOTA_ERROR_CODE


def should_retry(response: HttpResponse) -> bool:
    """Status first: parsing a 200's body here would copy and decode a 33 MB image answer."""
    if not is_retryable(response.status):
        return False
    code = str(parse_error_body(response.body).get("code") or "")
    return not is_account_problem(response.status, code)


def retry_delay(response: HttpResponse, attempt: int) -> float:
    wait = parse_retry_after(response.headers.get("retry-after"))
    if wait is None:
        return backoff_delay(attempt)
    if wait > RETRY_AFTER_MAX_S:
        when = time.strftime("%H:%M:%S", time.localtime(time.time() + wait))
        raise ServiceError(f"HTTP {response.status}: the server asks to wait {wait:.0f} s before retrying",
                           status=response.status, hint=f"try again after {when}")
    return wait


class Gate:
    """Admits requests: at most `limit` in flight, none before `resume_at`. The workers of a
    batch share one, so a 429 slows the whole batch, not just the worker that received it."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0
        self.resume_at = 0.0
        self.changed = threading.Condition()

    def enter(self) -> None:
        with self.changed:
            wait = self.resume_at - time.monotonic()
        if wait > 0:
            pause(wait)
        with self.changed:
            while self.active >= self.limit:
                self.changed.wait()
            self.active += 1

    def leave(self) -> None:
        with self.changed:
            self.active -= 1
            self.changed.notify_all()

    def hold_off(self, delay: float, *, throttled: bool) -> Optional[int]:
        """Nobody sends for `delay` s; a 429 also halves the concurrency for the rest of the run.
        Returns the new limit when it changed."""
        with self.changed:
            self.resume_at = max(self.resume_at, time.monotonic() + delay)
            if not throttled or self.limit == 1:
                return None
            self.limit = max(1, self.limit // 2)
            return self.limit


def send_with_retries(request: HttpRequest, config: ApiConfig, *, notify: Callable[[str], None],
                      gate: Optional[Gate] = None, on_preview: Optional[PreviewSink] = None) -> HttpResponse:
    """Retry what cannot have been billed: connection failures, 408/409/429 and 5xx."""
    gate = gate or Gate(1)
    for attempt in range(config.retries + 1):
        last = attempt == config.retries
        gate.enter()
        try:
            response = send_request(request, timeout_s=config.timeout_s, on_preview=on_preview)
        except ConnectError as err:
            if last:
                raise
            delay, reason, status = backoff_delay(attempt), err.message, 0
        else:
            if last or not should_retry(response):
                return response
            delay, reason, status = retry_delay(response, attempt), f"HTTP {response.status}", response.status
        finally:
            gate.leave()
        limit = gate.hold_off(delay, throttled=status == 429)
        slower = f"; at most {limit} requests in flight from now" if limit else ""
        notify(f"{reason}; retry {attempt + 1} of {config.retries} in {delay:.1f} s{slower}")
    raise AssertionError("unreachable: the last attempt returns or raises")


# --- Response decoding and file output ---


def parse_error_body(body: Union[bytes, bytearray]) -> dict[str, Any]:
    try:
        payload = json.loads(bytes(body).decode("utf-8", "replace"))
    except ValueError:
        return {}
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict):
        return error
    return {"message": error} if isinstance(error, str) else {}


def body_excerpt(body: Union[bytes, bytearray]) -> str:
    text = re.sub(r"<[^>]*>", " ", bytes(body[:4096]).decode("utf-8", "replace"))
    text = re.sub(r"\s+", " ", text).strip()
    return text[:ERROR_EXCERPT_CHARS] + ("..." if len(text) > ERROR_EXCERPT_CHARS else "")


def request_id_of(headers: Mapping[str, str]) -> str:
    return next((headers[h] for h in REQUEST_ID_HEADERS if headers.get(h)), "")


def status_hint(status: int, code: str, config: ApiConfig) -> str:
    if is_account_problem(status, code):
        return f"check {ENV_API_KEY} (or -k) and the balance of the account at https://api.apiyi.com"
    if code in ("moderation_blocked", "content_policy_violation"):
        return "the safety system refused it: rephrase the prompt"
    if status == 404:
        return f"check --base-url ({config.base_url}) and --model"
    if status == 413:
        return "the upload is too large: use smaller input images"
    if status == 524:
        return ("a CDN in front of the gateway gave up waiting; the image may still be generated and billed: "
                "use the gateway's direct endpoint as --base-url, and check usage before retrying")
    if 300 <= status < 400:
        return "the key is never sent to a redirect target; if you trust it, use it as --base-url"
    if status in REFUSED_STATUSES:
        return "change the prompt or the parameters the message names"
    return "retry later"


def error_for_status(response: HttpResponse, config: ApiConfig) -> ToolError:
    """Map a non-2xx answer to the exit code the agent acts on."""
    status, error = response.status, parse_error_body(response.body)
    code = str(error.get("code") or "")
    details = [f"{k} {error[k]}" for k in ("type", "param", "code") if error.get(k)]
    request_id = request_id_of(response.headers)
    details += [f"request id {request_id}"] if request_id else []
    if 300 <= status < 400:
        text = f"redirected to {response.headers.get('location', '(no location)')}"
    else:
        text = str(error.get("message") or "") or body_excerpt(response.body) or "(empty body)"
    message = f"HTTP {status}: {text}" + (f" ({', '.join(details)})" if details else "")
    cls: type[ToolError] = ServiceError
    if is_account_problem(status, code):
        cls = AuthError
    elif status == 524:
        cls = MaybeBilledError
    elif 300 <= status < 500 and not is_retryable(status):
        cls = RefusedError
    return cls(message, status=status, code=code or None, hint=status_hint(status, code, config))


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


def parse_images_response(body: Union[bytes, bytearray]) -> ImagesPayload:
    skeleton, values = split_base64_values(body)
    meta = load_json_object(skeleton)
    items = meta.get("data")
    if not isinstance(items, list) or not items:
        error = meta.get("error")
        if error:
            message = error.get("message") if isinstance(error, dict) else error
            raise ServiceError(f"the answer holds an error instead of images: {message}")
        raise ServiceError("the answer has no images (no data)", hint="retry later")
    carriers = [item for item in items if isinstance(item, dict) and "b64_json" in item]
    if len(carriers) != len(values):
        meta = load_json_object(body)
        return ImagesPayload(meta, tuple(image_source(item, None) for item in meta["data"]))
    found = iter(values)
    return ImagesPayload(meta, tuple(image_source(item, next(found) if "b64_json" in item else None)
                                     for item in items))


def load_json_object(raw: Union[bytes, bytearray]) -> dict[str, Any]:
    try:
        payload = json.loads(raw)
    except ValueError:
        raise ServiceError(f"the answer is not JSON: {body_excerpt(raw)}", hint="retry later") from None
    if not isinstance(payload, dict):
        raise ServiceError("the answer is not a JSON object", hint="retry later")
    return payload


def image_source(item: Any, raw_b64: Optional[memoryview]) -> Union[memoryview, str]:
    if not isinstance(item, dict):
        raise ServiceError("the answer's data holds something other than images")
    if raw_b64 is not None:
        return raw_b64
    value = item.get("b64_json")
    if isinstance(value, str) and value:
        return memoryview(value.encode("ascii", "ignore"))
    if isinstance(item.get("url"), str) and item["url"]:
        return item["url"]
    raise ServiceError("an image in the answer is empty (no b64_json or url)", hint="retry later")


def decode_base64_image(raw: memoryview) -> tuple[bytes, ImageInfo]:
    """Decode one b64_json value (a data:image/...;base64, prefix tolerated) and check its signature."""
    if raw[:5].tobytes() == b"data:":
        comma = raw[:200].tobytes().find(b",")
        raw = raw[comma + 1:]
    if not len(raw):
        raise ServiceError("an image in the answer is empty (b64_json is blank)", hint="retry later")
    try:
        data = binascii.a2b_base64(raw)
    except binascii.Error as err:
        raise ServiceError(f"an image in the answer is not valid base64: {err}", hint="retry later") from None
    return data, check_image_bytes(data)


def check_image_bytes(data: bytes) -> ImageInfo:
    import io

    info = image_info_from_stream(io.BytesIO(data))
    if info is None:
        raise ServiceError(f"the answer's image is not a PNG, JPEG or WebP ({len(data)} bytes starting "
                           f"{data[:8].hex()})", hint="retry later")
    return info


def download_image(url: str, *, timeout_s: float) -> tuple[bytes, ImageInfo]:
    """A url-only answer item is fetched without the key (it may point anywhere)."""
    if not url.lower().startswith(("http://", "https://")):
        raise ServiceError(f"the answer's image URL is not http(s): {url[:200]}")
    request = HttpRequest("GET", url, {"User-Agent": user_agent()}, b"")
    response = send_request(request, timeout_s=timeout_s, follow_redirects=True)
    if response.status != 200:
        raise ServiceError(f"downloading the image failed with HTTP {response.status}: {url}",
                           hint="open the URL in a browser within 60 minutes to save it")
    data = bytes(response.body)
    return data, check_image_bytes(data)


def output_paths(plan: OutputPlan, count: int) -> list[Path]:
    if count == 1:
        return [plan.path]
    return [plan.path.with_name(f"{plan.path.stem}-{i}{plan.path.suffix}") for i in range(1, count + 1)]


def path_for_format(path: Path, fmt: str) -> Path:
    return path if EXTENSION_FORMATS.get(path.suffix.lower()) == fmt else path.with_suffix(FORMAT_EXTENSIONS[fmt])


def next_free_path(path: Path) -> Path:
    candidate, number = path, 2
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}-{number}{path.suffix}")
        number += 1
    return candidate


def write_file_atomic(path: Path, data: bytes) -> None:
    """Write beside the target, then rename: readers never see half a file."""
    temporary = path.with_name(f".{path.name}.{random_hex(4)}.part")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    done = False
    try:
        with os.fdopen(os.open(temporary, flags, 0o666), "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        done = True
    finally:
        if not done:
            try:
                os.unlink(temporary)
            except OSError:
                pass


class PreviewWriter:
    """Streamed previews beside the target, written atomically: one NAME.partial.png replaced by
    each newer preview (an image viewer showing it updates), or NAME.partial-1.png, -2, ... kept."""

    def __init__(self, job: ImageJob, console: Console, started: float) -> None:
        self.target = job.output.path
        self.keep = job.output.keep_partials
        self.expected = int(job.fields.get("partial_images", 0))
        self.console = console
        self.started = started
        self.count = 0
        self.paths: list[Path] = []

    def save(self, raw: memoryview) -> None:
        self.count += 1
        try:
            data, info = decode_base64_image(raw)
        except ServiceError as err:
            self.console.warn(f"preview {self.count} skipped: {err.message}")
            return
        label = f"partial-{self.count}" if self.keep else "partial"
        path = self.target.with_name(f"{self.target.stem}.{label}{FORMAT_EXTENSIONS[info.format]}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_file_atomic(path, data)
        except OSError as err:
            self.console.warn(f"preview {self.count} could not be written: {err.strerror or err}")
            return
        if path not in self.paths:
            self.paths.append(path)
        self.console.progress(f"preview {self.count}/{self.expected} after "
                              f"{time.monotonic() - self.started:.0f} s: {path}")

    def settle(self, *, final_saved: bool) -> tuple[Path, ...]:
        """The preview files left on disk: all when kept, the last one when no final image came."""
        if self.keep or not final_saved:
            return tuple(self.paths)
        for path in self.paths:
            try:
                path.unlink()
            except OSError:
                pass
        return ()


def fallback_folder() -> Path:
    import tempfile

    return Path(tempfile.gettempdir()) / FALLBACK_FOLDER


def write_image(data: bytes, target: Path, *, overwrite: bool) -> tuple[Path, str]:
    """Write where asked; if that fails, to the temp folder. Returns the path and why it fell back."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        path = target if overwrite else next_free_path(target)
        write_file_atomic(path, data)
        return path, ""
    except OSError as err:
        reason = f"{target} could not be written ({err.strerror or err})"
    folder = fallback_folder()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path = next_free_path(folder / target.name)
        write_file_atomic(path, data)
    except OSError as err:
        raise ServiceError(f"the image was received but could not be saved: {reason}; "
                           f"the fallback {folder} failed too ({err.strerror or err})", kind="save_failed",
                           hint="free disk space or choose another -f, then run again") from None
    return path, reason


def save_image(data: bytes, info: ImageInfo, target: Path, *, overwrite: bool) -> SavedImage:
    import hashlib

    path, reason = write_image(data, target, overwrite=overwrite)
    return SavedImage(path, info, len(data), hashlib.sha256(data).hexdigest(), reason)


def build_metadata(job: ImageJob, saved: SavedImage, result_meta: Mapping[str, Any], *,
                   request_id: str, elapsed_s: float) -> dict[str, Any]:
    """What the .json sidecar records; the key is never part of the job, so it cannot leak here."""
    parameters = {k: v for k, v in job.fields.items() if k != "prompt"}
    return {"tool": f"{TOOL_NAME} {VERSION}", "prompt": job.prompt, "model": job.fields["model"],
            "mode": job.mode, "endpoint": job.endpoint, "parameters": parameters,
            "input_images": [str(f.path) for f in job.images],
            "mask": str(job.mask.path) if job.mask else None,
            "requested_size": job.fields.get("size"), "size": f"{saved.info.width}x{saved.info.height}",
            "format": saved.info.format, "bytes": saved.size_bytes, "sha256": saved.sha256,
            "usage": result_meta.get("usage"), "revised_prompt": first_revised_prompt(result_meta),
            "request_id": request_id or None, "created": result_meta.get("created"),
            "elapsed_s": round(elapsed_s, 3)}


def write_metadata(saved: SavedImage, metadata: Mapping[str, Any]) -> Path:
    path = saved.path.with_name(saved.path.name + ".json")
    write_file_atomic(path, json.dumps(metadata, ensure_ascii=False, indent=2).encode("utf-8") + b"\n")
    return path


def first_revised_prompt(meta: Mapping[str, Any]) -> Optional[str]:
    items = meta.get("data") or []
    return next((i["revised_prompt"] for i in items if isinstance(i, dict) and i.get("revised_prompt")), None)


# --- Commands ---


class Console:
    """All printing goes through here: stdout for results, stderr for the rest; the key is masked."""

    def __init__(self, *, json_mode: bool, quiet: bool = False) -> None:
        self.json_mode = json_mode
        self.quiet = quiet
        self.secrets: list[str] = []
        self._live = False

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "<redacted>")
        return text

    def _write(self, stream: IO[str], text: str) -> None:
        stream.write(self.redact(text))
        stream.flush()

    def progress(self, text: str) -> None:
        if not self.quiet:
            self.end_live()
            self._write(sys.stderr, text + "\n")

    def live(self, text: str) -> None:
        self._live = True
        self._write(sys.stderr, "\r" + text.ljust(60))

    def end_live(self) -> None:
        if self._live:
            self._live = False
            self._write(sys.stderr, "\r" + " " * 60 + "\r")

    def warn(self, text: str) -> None:
        self.end_live()
        self._write(sys.stderr, f"warning: {text}\n")

    def result(self, text: str) -> None:
        if not self.json_mode:
            self._write(sys.stdout, text + "\n")

    def document(self, payload: Mapping[str, Any]) -> None:
        self._write(sys.stdout, json.dumps(payload, indent=2) + "\n")

    def error(self, err: ToolError) -> None:
        self.end_live()
        self._write(sys.stderr, f"{PROG}: error: {err.message}\n" + (f"hint: {err.hint}\n" if err.hint else ""))


class ProgressTicker:
    """Shows elapsed time while waiting: a live line on a terminal, a line every 15 s in a log."""

    def __init__(self, console: Console, started: float) -> None:
        self.console = console
        self.started = started
        self.stop = threading.Event()
        self.tty = sys.stderr.isatty()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ProgressTicker:
        if not self.console.quiet:
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()
        self.console.end_live()

    def _run(self) -> None:
        interval = PROGRESS_TTY_INTERVAL_S if self.tty else PROGRESS_LOG_INTERVAL_S
        while not self.stop.wait(interval):
            elapsed = time.monotonic() - self.started
            if self.tty:
                self.console.live(f"waiting for the image... {elapsed:.0f} s")
            else:
                self.console.progress(f"still waiting: {elapsed:.0f} s elapsed")


def start_line(job: ImageJob) -> str:
    count = f"{job.n} image{'s' if job.n > 1 else ''}"
    action = {0: "Generating", 1: "Editing 1 image into"}.get(len(job.images), f"Fusing {len(job.images)} images into")
    settings = ", ".join(f"{label}{job.fields[k]}" for k, label in (("size", ""), ("quality", "quality "),
                                                                   ("output_format", "")) if k in job.fields)
    stream = f", streaming {job.fields['partial_images']} previews" if job.streamed else ""
    return (f"{action} {count} with {job.fields['model']}" + (f" ({settings})" if settings else "") + stream
            + ": usually 120-150 s, up to 5 min at high quality or 4K")


def fetch_images(job: ImageJob, config: ApiConfig, console: Console, *, gate: Optional[Gate] = None) -> Fetched:
    request = build_request(job, config)
    console.progress(start_line(job))
    started = time.monotonic()
    previews = PreviewWriter(job, console, started) if job.streamed else None
    try:
        with ProgressTicker(console, started):
            response = send_with_retries(request, config, notify=console.progress, gate=gate,
                                         on_preview=previews.save if previews else None)
        if not 200 <= response.status < 300:
            raise error_for_status(response, config)
    except ToolError as err:
        if previews and previews.paths:
            err.message += f"; the last preview is kept at {previews.paths[-1]}"
        raise
    return Fetched(response, time.monotonic() - started, previews)


def image_bytes(source: Union[memoryview, str], config: ApiConfig) -> tuple[bytes, ImageInfo]:
    if isinstance(source, str):
        return download_image(source, timeout_s=config.timeout_s)
    return decode_base64_image(source)


def save_all(job: ImageJob, payload: ImagesPayload,
             config: ApiConfig) -> tuple[list[SavedImage], list[str], Optional[ToolError]]:
    """Save every image that decodes; a bad one does not cost the good ones."""
    targets = output_paths(job.output, max(job.n, len(payload.sources)))
    saved, warnings, problem = [], [], None
    for source, target in zip(payload.sources, targets):
        try:
            data, info = image_bytes(source, config)
        except ToolError as err:
            problem = err
            continue
        intended = path_for_format(target, info.format)
        if info.format != job.output.format:
            warnings.append(f"expected {job.output.format} but the image is {info.format}: saved as {intended.name}")
        saved.append(save_image(data, info, intended, overwrite=job.output.overwrite))
        if saved[-1].path != intended and not saved[-1].fallback_reason:
            warnings.append(f"{intended.name} exists: saved as {saved[-1].path.name} (--overwrite replaces it)")
    if problem is None and len(saved) < job.n:
        problem = ServiceError(f"asked for {job.n} images but the answer held {len(saved)}", hint="retry later")
    return saved, warnings, problem


def size_warnings(job: ImageJob, saved: Sequence[SavedImage]) -> list[str]:
    if not job.size_explicit:
        return []
    requested = job.fields["size"]
    return [f"asked for {requested} but {s.path.name} is {s.info.width}x{s.info.height}"
            for s in saved if f"{s.info.width}x{s.info.height}" != requested]


def run_job(job: ImageJob, config: ApiConfig, console: Console) -> RunResult:
    """One request, every image in its answer saved."""
    return save_answer(job, fetch_images(job, config, console), config)


def save_answer(job: ImageJob, fetched: Fetched, config: ApiConfig) -> RunResult:
    """Decode and write what a 2xx answer holds; a single run and a batch item alike."""
    response, elapsed, previews = fetched.response, fetched.elapsed_s, fetched.previews
    payload = response.payload or parse_images_response(response.body)
    saved, warnings, problem = save_all(job, payload, config)
    request_id = request_id_of(response.headers)
    for image in saved if job.output.metadata else ():
        try:
            write_metadata(image, build_metadata(job, image, payload.meta, request_id=request_id, elapsed_s=elapsed))
        except OSError as err:
            warnings.append(f"the metadata of {image.path.name} could not be written: {err.strerror or err}")
    fallbacks = [s for s in saved if s.fallback_reason]
    if fallbacks and problem is None:
        problem = FallbackSaveError(f"{fallbacks[0].fallback_reason}; saved to the fallback {fallbacks[0].path}",
                                    hint="use the printed path, or move the file where you want it")
    return RunResult(job, tuple(saved), payload.meta, request_id, elapsed,
                     tuple(warnings + size_warnings(job, saved)), problem,
                     previews=previews.count if previews else None,
                     partials=previews.settle(final_saved=bool(saved)) if previews else ())


def usage_text(usage: Any) -> str:
    if not isinstance(usage, dict):
        return ""
    parts = [f"{usage[k]} {label}" for k, label in (("input_tokens", "input"), ("output_tokens", "output"),
                                                     ("total_tokens", "total")) if k in usage]
    return "tokens: " + ", ".join(parts) if parts else ""


def report_result(result: RunResult, console: Console) -> int:
    for warning in result.warnings:
        console.warn(warning)
    for saved in result.files:
        info = saved.info
        console.progress(f"saved {saved.path} ({info.width}x{info.height}, {info.format}, "
                         f"{saved.size_bytes / 1024:,.0f} KB)")
        console.result(str(saved.path))
    for partial in result.partials:
        console.progress(f"preview kept: {partial}")
    revised = first_revised_prompt(result.meta)
    for line in (usage_text(result.meta.get("usage")), f"revised prompt: {revised}" if revised else "",
                 f"done in {result.elapsed_s:.0f} s"
                 + (f" (request id {result.request_id})" if result.request_id else "")):
        if line:
            console.progress(line)
    if console.json_mode:
        console.document(result_document(result))
    if result.error:
        console.error(result.error)
        return result.error.exit_code
    return EXIT_OK


def result_document(result: RunResult) -> dict[str, Any]:
    files = [{"path": str(s.path), "format": s.info.format, "width": s.info.width, "height": s.info.height,
              "bytes": s.size_bytes} for s in result.files]
    document: dict[str, Any] = {"ok": result.error is None, "files": files,
                                "model": result.job.fields["model"], "mode": result.job.mode,
                                "size": result.job.fields.get("size", "auto"),
                                "quality": result.job.fields.get("quality", "auto"),
                                "usage": result.meta.get("usage"),
                                "revised_prompt": first_revised_prompt(result.meta),
                                "request_id": result.request_id or None,
                                "elapsed_s": round(result.elapsed_s, 3), "warnings": list(result.warnings)}
    if result.previews is not None:
        document["previews"] = result.previews
    if result.partials:
        document["partials"] = [str(p) for p in result.partials]
    if result.error:
        document["error"] = error_document(result.error)
    return document


def error_document(err: ToolError) -> dict[str, Any]:
    document = {"kind": err.kind, "message": err.message, "status": err.status, "code": err.code,
                "hint": err.hint or None, "exit_code": err.exit_code}
    return {**document, "problems": list(err.problems)} if err.problems else document


def body_lines(described: Mapping[str, Any]) -> list[str]:
    if "json" in described:
        return [json.dumps(described["json"], ensure_ascii=False, indent=2)]
    return ([f"field {k} = {v}" for k, v in described["fields"].items()]
            + [f"file {f['name']}: {f['filename']} ({f['content_type']}, {f['bytes']:,} bytes, "
               f"{f['width']}x{f['height']})" for f in described["files"]])


def run_dry(job: ImageJob, config: ApiConfig, console: Console) -> int:
    described = describe_request(build_request(job, config), job, config)
    outputs = [str(p) for p in output_paths(job.output, job.n)]
    if console.json_mode:
        console.document({"ok": True, "dry_run": True, "mode": job.mode, "request": described,
                          "outputs": outputs, "warnings": list(job.warnings)})
        return EXIT_OK
    lines = [f"{described['method']} {described['url']}"]
    lines += [f"{name}: {value}" for name, value in described["headers"].items()]
    lines += [""] + body_lines(described) + [""] + [f"output: {path}" for path in outputs]
    console.result("\n".join(lines))
    return EXIT_OK


def clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}" if minutes >= 60 else f"{minutes}:{secs:02d}"


def batch_estimate(count: int, jobs: int) -> str:
    rounds = math.ceil(count / jobs)
    low, high = (rounds * s for s in TYPICAL_SECONDS)
    return (f"about {clock(low)}-{clock(high)} ({rounds} round{'s' if rounds > 1 else ''} of "
            f"{TYPICAL_SECONDS[0]}-{TYPICAL_SECONDS[1]} s at -j {jobs}; longer at high quality or 4K)")


def item_record(item: BatchItem, status: str, *, result: Optional[RunResult] = None,
                error: Optional[ToolError] = None, elapsed_s: float = 0.0) -> dict[str, Any]:
    """One manifest line, and one entry of the --json summary."""
    files = result.files if result else ()
    paths = [str(s.path) for s in files] if result else [str(p) for p in item.done_paths]
    return {"item": item.number, "prompt": item.job.prompt, "status": status,
            "target": str(item.job.output.path), "paths": paths,
            "sizes": [f"{s.info.width}x{s.info.height}" for s in files],
            "usage": result.meta.get("usage") if result else None,
            "request_id": (result.request_id or None) if result else None,
            "elapsed_s": round(elapsed_s, 3), "error": error_document(error) if error else None,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def append_manifest(path: Path, record: Mapping[str, Any]) -> None:
    """Appended and synced as each item ends, never rewritten: a crash loses nothing recorded."""
    with open(path, "a", encoding="utf-8", newline="\n") as handle:
        handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def total_usage(records: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    totals: dict[str, int] = {}
    for record in records:
        usage = record.get("usage") if isinstance(record.get("usage"), dict) else {}
        for key in ("input_tokens", "output_tokens", "total_tokens"):
            if isinstance(usage.get(key), int):
                totals[key] = totals.get(key, 0) + usage[key]
    return totals


class BatchRun:
    """A batch in progress: workers take items in order and share one Gate; all state is under one lock."""

    def __init__(self, plan: BatchPlan, config: ApiConfig, console: Console) -> None:
        self.plan, self.config, self.console = plan, config, console
        self.gate = Gate(plan.jobs)
        self.lock = threading.Lock()
        self.pending = list(reversed(plan.to_run))
        self.records: dict[int, dict[str, Any]] = {}
        self.running: set[int] = set()
        self.saving = 0
        self.stop_error: Optional[ToolError] = None
        self.crashed = False
        self.workers_left = 0
        self.all_done = threading.Event()
        self.started = time.monotonic()
        self.item_console = Console(json_mode=True, quiet=True)  # items report through the batch, not alone

    def start(self) -> None:
        for item in self.plan.items:
            if item.skipped:
                self.finish(item, item_record(item, "skipped"))
        workers = min(self.plan.jobs, len(self.pending))
        self.workers_left = workers
        if not workers:
            self.all_done.set()
        for _ in range(workers):
            threading.Thread(target=self.work, daemon=True).start()

    def take(self) -> Optional[BatchItem]:
        with self.lock:
            if self.stop_error or not self.pending:
                return None
            item = self.pending.pop()
            self.running.add(item.number)
            return item

    def stop(self, error: ToolError) -> None:
        """No new item starts; those in flight finish (they are being paid for)."""
        with self.lock:
            self.stop_error = self.stop_error or error

    def work(self) -> None:
        try:
            item = self.take()
            while item is not None:
                self.run_item(item)
                item = self.take()
        finally:
            with self.lock:
                self.workers_left -= 1
                if not self.workers_left:
                    self.all_done.set()

    def run_item(self, item: BatchItem) -> None:
        started, done = time.monotonic(), False
        try:
            fetched = fetch_images(item.job, self.config, self.item_console, gate=self.gate)
        except ToolError as err:
            if isinstance(err, AuthError):
                self.stop(err)
            self.finish(item, item_record(item, "failed", error=err, elapsed_s=time.monotonic() - started))
            return
        with self.lock:
            self.saving += 1
        try:
            try:
                result = save_answer(item.job, fetched, self.config)
                record = item_record(item, "failed" if result.error else "ok", result=result,
                                     error=result.error, elapsed_s=fetched.elapsed_s)
            except ToolError as err:
                record = item_record(item, "failed", error=err, elapsed_s=fetched.elapsed_s)
            self.finish(item, record)
            done = True
        finally:
            with self.lock:
                self.saving -= 1
                self.crashed = self.crashed or not done

    def finish(self, item: BatchItem, record: dict[str, Any]) -> None:
        with self.lock:
            self.running.discard(item.number)
            self.records[item.number] = record
            try:
                append_manifest(self.plan.manifest, record)
            except OSError as err:
                self.console.warn(f"the manifest {self.plan.manifest} could not be written: {err.strerror or err}")
            self.report_item(record)

    def report_item(self, record: Mapping[str, Any]) -> None:
        position = f"[{len(self.records)}/{len(self.plan.items)}] item {record['item']}"
        if record["status"] == "skipped":
            self.console.progress(f"{position} skipped, already done: {', '.join(record['paths'])}")
            return
        for path in record["paths"]:
            self.console.result(path)
        if record["error"]:
            error = record["error"]
            self.console.progress(f"{position} failed (exit {error['exit_code']}, {error['kind']}): "
                                  f"{error['message']}")
        else:
            self.console.progress(f"{position} ok in {record['elapsed_s']:.0f} s: {', '.join(record['paths'])}")

    def status_line(self) -> str:
        with self.lock:
            ended = [r for r in self.records.values() if r["status"] != "skipped"]
            failed = sum(r["status"] == "failed" for r in ended)
            left = len(self.pending) + len(self.running)
            average = sum(r["elapsed_s"] for r in ended) / len(ended) if ended else sum(TYPICAL_SECONDS) / 2
            rounds = math.ceil(left / max(1, self.gate.limit))
            elapsed = time.monotonic() - self.started
            return (f"batch: {len(ended) - failed} done, {failed} failed, {len(self.running)} running, "
                    f"{len(self.plan.items)} total; {clock(elapsed)} elapsed, ~{clock(rounds * average)} left")

    def wait(self) -> None:
        live = sys.stderr.isatty() and not self.console.quiet
        while not self.all_done.wait(PROGRESS_TTY_INTERVAL_S if live else 0.1):
            if live:
                self.console.live(self.status_line())
        self.console.end_live()

    def abort(self) -> None:
        """A second Ctrl-C: leave now, but not in the middle of writing a file or a manifest line."""
        with self.lock:
            self.stop_error = InterruptedRun("aborted; the requests in flight were abandoned and may be billed",
                                             hint="run the same command again to finish what is missing")
        deadline = time.monotonic() + 10
        while self.saving and time.monotonic() < deadline:
            time.sleep(0.02)


def run_batch(plan: BatchPlan, config: ApiConfig, console: Console) -> int:
    runnable = len(plan.to_run)
    console.progress(f"batch {plan.source}: {len(plan.items)} items, {len(plan.items) - runnable} already done, "
                     f"{runnable} to generate at -j {plan.jobs}: {batch_estimate(runnable, plan.jobs)}"
                     if runnable else f"batch {plan.source}: all {len(plan.items)} items are already done")
    plan.manifest.parent.mkdir(parents=True, exist_ok=True)
    run = BatchRun(plan, config, console)
    run.start()
    try:
        run.wait()
    except KeyboardInterrupt:
        run.stop(InterruptedRun("interrupted; the items in flight were saved, run the same command to finish"))
        console.progress(f"interrupted: waiting for {len(run.running)} request(s) in flight, they are being "
                         "paid for (press Ctrl-C again to abort at once)")
        try:
            run.wait()
        except KeyboardInterrupt:
            run.abort()
    return report_batch(run, console)


def batch_outcome(run: BatchRun, failed: Sequence[Mapping[str, Any]]) -> Optional[ToolError]:
    if run.crashed:
        return ToolError("a batch worker crashed (traceback above); run the same command to finish")
    if run.stop_error:
        return run.stop_error
    if failed:
        return BatchPartialError(f"{len(failed)} of {len(run.plan.items)} items failed",
                                 hint="run the same command again: only what is missing is generated")
    return None


def report_batch(run: BatchRun, console: Console) -> int:
    plan = run.plan
    records = [run.records[item.number] for item in plan.items if item.number in run.records]
    counts = {status: sum(r["status"] == status for r in records) for status in ("ok", "failed", "skipped")}
    counts = {"total": len(plan.items), **counts, "not_run": len(plan.items) - len(records)}
    failed = [r for r in records if r["status"] == "failed"]
    for record in failed:
        console.progress(f"item {record['item']} failed (exit {record['error']['exit_code']}): "
                         f"{record['error']['message']}")
    elapsed = time.monotonic() - run.started
    usage = total_usage(records)
    console.progress(f"batch: {counts['ok']} ok, {counts['failed']} failed, {counts['skipped']} skipped, "
                     f"{counts['not_run']} not run, of {counts['total']} in {clock(elapsed)}"
                     + (f"; {usage_text(usage)}" if usage else "") + f"; manifest {plan.manifest}")
    outcome = batch_outcome(run, failed)
    if console.json_mode:
        not_run = [{"item": i.number, "prompt": i.job.prompt, "status": "not_run"}
                   for i in plan.items if i.number not in run.records]
        console.document({"ok": outcome is None, "batch": str(plan.source), "description": plan.description,
                          "manifest": str(plan.manifest), "counts": counts,
                          "items": sorted(records + not_run, key=lambda r: r["item"]), "usage": usage,
                          "elapsed_s": round(elapsed, 3),
                          **({"error": error_document(outcome)} if outcome else {})})
    if outcome:
        console.error(outcome)
        return outcome.exit_code
    return EXIT_OK


def run_batch_dry(plan: BatchPlan, config: ApiConfig, console: Console) -> int:
    entries = []
    for item in plan.items:
        outputs = [str(p) for p in item.done_paths or output_paths(item.job.output, item.job.n)]
        request = None if item.skipped else describe_request(build_request(item.job, config), item.job, config)
        entries.append({"item": item.number, "skip": item.skipped, "request": request, "outputs": outputs})
    runnable = len(plan.to_run)
    summary = (f"{len(plan.items)} items: {runnable} to send, {len(plan.items) - runnable} already done; "
               + batch_estimate(runnable, plan.jobs))
    if console.json_mode:
        console.document({"ok": True, "dry_run": True, "batch": str(plan.source), "manifest": str(plan.manifest),
                          "jobs": plan.jobs, "items": entries, "to_send": runnable, "estimate": summary})
        return EXIT_OK
    lines = []
    for entry in entries:
        request = entry["request"]
        if request is None:
            lines.append(f"item {entry['item']}: already done, skipped: {', '.join(entry['outputs'])}")
            continue
        lines += [f"item {entry['item']}: {request['method']} {request['url']}", *body_lines(request)]
        lines += [f"output: {path}" for path in entry["outputs"]] + [""]
    console.result("\n".join(lines + [f"manifest: {plan.manifest}", summary]))
    return EXIT_OK


def check_mode_flags(args: argparse.Namespace) -> None:
    if args.batch is None:
        if args.prompt is None:
            raise UsageError("no prompt: give -p TEXT, or --batch FILE for many images", hint=f"see {PROG} --help")
        extra = next((flag for flag, value in (("--out-dir", args.out_dir), ("--jobs", args.jobs)) if value), None)
        if extra:
            raise UsageError(f"{extra} applies to --batch only", hint=f"drop {extra}, or add --batch FILE")
        return
    given = next((flag for flag, value in (("-p", args.prompt), ("-f", args.filename)) if value is not None), None)
    if given:
        raise UsageError(f"{given} cannot be combined with --batch: each item of the file has its own",
                         hint=f"drop {given}; set prompt and filename in the batch file")


def connect(args: argparse.Namespace, console: Console, env: Mapping[str, str],
            job_warnings: Sequence[str]) -> ApiConfig:
    """The connection settings; from here on the key is masked in everything printed."""
    config, config_warnings = build_config(args, env)
    if config.api_key:
        console.secrets.append(config.api_key)
    for warning in (*job_warnings, *config_warnings):
        console.warn(warning)
    return config


def run_batch_command(args: argparse.Namespace, console: Console, env: Mapping[str, str]) -> int:
    plan = plan_batch(args)
    if plan.description:
        console.progress(plan.description)
    by_text: dict[str, list[str]] = {}
    for item in plan.items:
        for warning in item.job.warnings:
            by_text.setdefault(warning, []).append(str(item.number))
    config = connect(args, console, env, [f"item {', '.join(numbers)}: {text}" for text, numbers in by_text.items()])
    if args.dry_run:
        return run_batch_dry(plan, config, console)
    return run_batch(plan, config, console)


def run_command(args: argparse.Namespace, console: Console, env: Mapping[str, str]) -> int:
    check_mode_flags(args)
    if args.batch is not None:
        return run_batch_command(args, console, env)
    job = build_job(args, stdin=sys.stdin, create_folder=not args.dry_run)
    for note in job.notes:
        console.progress(note)
    config = connect(args, console, env, job.warnings)
    if args.dry_run:
        return run_dry(job, config, console)
    return report_result(run_job(job, config, console), console)


# --- CLI ---


class CliParser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so main() owns every exit code and --json sees usage errors."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message, hint=f"see {PROG} --help")

    def exit(self, status: int = 0, message: Optional[str] = None) -> NoReturn:
        if message:
            sys.stderr.write(message)
        raise ParserExit(status)


def build_parser() -> CliParser:
    parser = CliParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                       allow_abbrev=False)
    convert = setting_converters()
    what = parser.add_argument_group("what to make")
    what.add_argument("-p", "--prompt", metavar="TEXT",
                      help="the prompt, sent exactly as given; - reads it from stdin (UTF-8); at most 32000 characters")
    what.add_argument("-s", "--size", metavar="SIZE",
                      help=f"auto (the server's default), a preset ({', '.join(SIZE_PRESETS)}), any WxH (edges "
                           "multiples of 16, at most 3840, ratio at most 3:1, 655,360-8,294,400 pixels) or a ratio "
                           "W:H such as 16:9 with -r")
    what.add_argument("-r", "--resolution", type=convert["resolution"],
                      metavar="{1K,2K,4K}", help="long edge for a W:H size: 1K=1024, 2K=2048, 4K=3840 (default 1K)")
    what.add_argument("-q", "--quality", type=convert["quality"], metavar="{" + ",".join(QUALITIES) + "}",
                      help="low (drafts), medium, high (final, fine text) or auto (the server's default)")
    what.add_argument("-n", "--n", type=convert["n"], metavar="N",
                      help="images in one request, 1-10; files are then NAME-1, NAME-2, ...")
    what.add_argument("--background", type=convert["background"], metavar="{" + ",".join(BACKGROUNDS) + "}",
                      help="transparent needs png or webp (in preview for gpt-image-2)")
    what.add_argument("--moderation", type=convert["moderation"], metavar="{" + ",".join(MODERATIONS) + "}",
                      help="content filter strictness; text-to-image only")
    what.add_argument("--model", default=DEFAULT_MODEL, metavar="NAME", help="model name (default %(default)s)")
    inputs = parser.add_argument_group("input images (edit and fusion)")
    inputs.add_argument("-i", "--input-image", action="extend", nargs="+", metavar="PATH",
                        help="1-16 PNG/JPEG/WebP images under 50 MiB, in order (image 1, image 2, ...); "
                             "-i a b and -i a -i b both work")
    inputs.add_argument("-m", "--mask", metavar="PATH",
                        help="PNG with alpha, same size as the first input image, under 4 MiB; "
                             "transparent areas are edited")
    output = parser.add_argument_group("output")
    output.add_argument("-f", "--filename", metavar="PATH",
                        help="where to save (folders are created); default: TIMESTAMP-SLUG-RANDOM.png here")
    output.add_argument("-o", "--output-format", type=convert["output_format"],
                        metavar="{png,jpeg,jpg,webp}", help="default: from the -f extension, else png")
    output.add_argument("-c", "--output-compression", type=convert["output_compression"], metavar="N",
                        help="0-100, jpeg and webp only")
    output.add_argument("--overwrite", action="store_true",
                        help="replace an existing file (default: pick NAME-2, NAME-3, ... and say so)")
    output.add_argument("--metadata", action="store_true",
                        help="also write IMAGE.json beside each image (prompt, parameters, usage, sha256; "
                             "never the key)")
    output.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of paths")
    output.add_argument("--stream", action="store_true",
                        help="stream: write each preview as it arrives to NAME.partial.png (replaced by the next, "
                             "removed once the final image is saved)")
    output.add_argument("--partial-images", type=int_in_range(0, MAX_PARTIAL_IMAGES), metavar="N",
                        help=f"previews to ask for, 0-{MAX_PARTIAL_IMAGES} (default {DEFAULT_PARTIAL_IMAGES}); "
                             "implies --stream")
    output.add_argument("--keep-partials", action="store_true",
                        help="keep every preview as NAME.partial-1.png, NAME.partial-2.png, ...; implies --stream")
    output.add_argument("--quiet", action="store_true", help="no progress on stderr (warnings and errors stay)")
    batch = parser.add_argument_group("batch (many images from one file)")
    batch.add_argument("--batch", metavar="FILE",
                       help="JSON ({description, global, prompts}), a list, or JSONL; see references/batch-template.md. "
                            "Flags give defaults; the file's global block and items override them")
    batch.add_argument("--out-dir", metavar="DIR",
                       help="write the images and FILE.results.jsonl here (default: beside the batch file)")
    batch.add_argument("-j", "--jobs", type=int_in_range(1, MAX_JOBS), metavar="N",
                       help=f"requests in flight, 1-{MAX_JOBS} (default {DEFAULT_JOBS}); a 429 pauses all "
                            "and halves it")
    conn = parser.add_argument_group("connection")
    conn.add_argument("-k", "--api-key", metavar="KEY", help=f"API key (default: ${ENV_API_KEY})")
    conn.add_argument("--base-url", metavar="URL", help=f"API base (default: ${ENV_BASE_URL}, else {DEFAULT_BASE_URL})")
    conn.add_argument("--timeout", type=positive_seconds, default=DEFAULT_TIMEOUT_S, metavar="S",
                      help="seconds to wait for the answer (default %(default)g)")
    conn.add_argument("--retries", type=int_in_range(0, MAX_RETRIES), default=DEFAULT_RETRIES, metavar="N",
                      help="retries on connection failure, 408, 409, 429 and 5xx, never after a timeout "
                           "(default %(default)s)")
    conn.add_argument("--dry-run", action="store_true",
                      help="check everything and print the request (key redacted); needs no key, sends nothing")
    parser.add_argument("--version", action="version", version=f"%(prog)s {VERSION}")
    return parser


def make_streams_safe() -> None:
    """A console that cannot show a character (GBK, ASCII) prints '?' instead of crashing."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="replace")


def main(argv: Optional[Sequence[str]] = None) -> int:
    make_streams_safe()
    argv = list(sys.argv[1:] if argv is None else argv)
    console = Console(json_mode="--json" in argv)
    try:
        args = build_parser().parse_args(argv)
        console.quiet = args.quiet
        return run_command(args, console, os.environ)
    except ParserExit as done:
        return done.status
    except ToolError as err:
        failure: ToolError = err
    except KeyboardInterrupt:
        failure = InterruptedRun("interrupted; no partial file was left (a request already sent may be billed)")
    if console.json_mode:
        console.document({"ok": False, "error": error_document(failure)})
    console.error(failure)
    return failure.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
