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

Every request runs in a job: a worker process of its own that outlives the
command, so a shell that gives up (or Ctrl-C once the request is sent) costs
nothing: run the same command again and it attaches to the job instead of
paying twice, or collect it with --attach ID. --detach starts the job and
returns at once; --max-wait S returns with exit 9 while it goes on.

stdout carries only the saved paths (or one JSON document with --json);
progress, warnings and errors go to stderr (JSON Lines with --events).

environment:
  APIYI_API_KEY    the API key (or -k); never printed, sent only to the base URL
  APIYI_BASE_URL   the API base (or --base-url), default https://api.apiyi.com/v1
  APIYI_STATE_DIR  where job records live (default: the per-user state folder)
  APIYI_WORKER     process (default); inprocess runs the job inside the command
  APIYI_IMAGE_MODEL  the default --model (else gpt-image-2); see --list-models
  APIYI_PRICE_MULTIPLIER  scales every price (a token group billed at, e.g., 1.2)

exit codes:
  0    every requested image written
  1    a bug: report it with the traceback
  2    bad arguments or input; nothing was sent
  3    no API key, or the key was refused (401/402/403)
  4    the API refused the request (400/404/413/415/422), or the safety system did
  5    service unavailable or unusable answer, after retries: retry later
  6    timed out or dropped after sending: may have been billed, not retried
  7    image received but saved only to the fallback path printed
  8    batch finished, but some items failed or --max-cost stopped it: run it
       again to make only those
  9    still running (--max-wait): run the same command again, or --attach ID
  10   --strict-size: saved, but not the size, format or frame count asked
  129  hung up (SIGHUP)      after the request was sent, the job goes on:
  130  interrupted (Ctrl-C)  run the same command again to collect it;
  143  terminated (SIGTERM)  before, it was cancelled and nothing was billed
"""

from __future__ import annotations

import sys

# Before anything an older Python cannot run: one line and exit 2, as for any other bad input.
if sys.version_info < (3, 9):
    sys.stderr.write("generate_image.py: error: needs Python 3.9 or newer (this is Python %d.%d)\n"
                     "hint: install a newer Python from https://www.python.org/downloads/\n" % sys.version_info[:2])
    raise SystemExit(2)

import argparse
import binascii
import contextlib
import dataclasses
import functools
import json
import math
import os
import re
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Callable, NoReturn, Optional, Union

# --- Constants ---

VERSION = "1.0.0"
TOOL_NAME = "apiyi-gpt-image-2-gen"
SCRIPT_NAME = "generate_image.py"
# Run as a file (a checkout, a skill folder) the command is the script; installed by pip it has its own
# name, and messages and --help use the one the user typed.
PROG = TOOL_NAME if sys.argv and Path(sys.argv[0]).stem == TOOL_NAME else SCRIPT_NAME
# Where a reference the user has no copy of can be read (also [project.urls] in pyproject.toml).
REPOSITORY_URL = "https://github.com/apiyi/apiyi-gpt-image-2-gen"

DEFAULT_BASE_URL = "https://api.apiyi.com/v1"
DEFAULT_MODEL = "gpt-image-2"
DEFAULT_TIMEOUT_S = 600.0
DEFAULT_RETRIES = 2
ENV_API_KEY = "APIYI_API_KEY"
ENV_BASE_URL = "APIYI_BASE_URL"
ENV_MODEL = "APIYI_IMAGE_MODEL"
MODEL_NAME = re.compile(r"[\w.:/@+-]{1,100}", re.ASCII)
# What stands for the key wherever the tool shows or writes text that held it (a server may echo it).
KEY_MASK = "***"
# APIYI keys are sk- and 48 characters; anything shorter than this is a typo, and a key that short could
# not be masked in text without masking ordinary words.
MIN_KEY_CHARS = 8
GENERATIONS_PATH = "/images/generations"
EDITS_PATH = "/images/edits"

QUALITIES = ("auto", "low", "medium", "high", "xhigh", "max")
COMPLEXITIES = ("low", "medium", "high")
OUTPUT_FORMATS = ("png", "jpeg", "webp", "gif", "svg")
CLASSIC_FORMATS = ("png", "jpeg", "webp")       # what gpt-image-2 and 2.5 make
INPUT_FORMATS = CLASSIC_FORMATS                 # what the edits endpoint takes as an image or a mask
FORMAT_ALIASES = {"jpg": "jpeg"}
BACKGROUNDS = ("auto", "opaque", "transparent")
MODERATIONS = ("auto", "low")
# A W:H size is mapped to a long edge of 1024, 2048 or 3840 pixels.
RESOLUTION_LONG_EDGES = {"1K": 1024, "2K": 2048, "4K": 3840}
SIZE_PRESETS = ("1024x1024", "1536x1024", "1024x1536", "2048x2048", "2048x1152", "3840x2160", "2160x3840")
FORMAT_EXTENSIONS = {"png": ".png", "jpeg": ".jpg", "webp": ".webp", "gif": ".gif", "svg": ".svg", "bin": ".bin"}
EXTENSION_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp", ".gif": "gif", ".svg": "svg"}
CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp", "gif": "image/gif",
                 "svg": "image/svg+xml"}

# gpt-image-2 size rules, as APIYI and OpenAI publish them for free sizes.
SIZE_MULTIPLE = 16
MAX_EDGE = 3840
MAX_ASPECT = 3.0
MIN_PIXELS = 655_360
MAX_PIXELS = 8_294_400

# How each line takes a size (references/models.md): multiple of, longest edge (range), ratio, pixels.
# free: the official models; universal: a model not in the table (no edge limit, the rest kept);
# long-edge: the flat channels, where the size is a target whose longest edge lies in a range.
SIZE_RULES: dict[str, dict[str, Any]] = {
    "free": {"multiple": SIZE_MULTIPLE, "edges": (SIZE_MULTIPLE, MAX_EDGE), "pixels": (MIN_PIXELS, MAX_PIXELS)},
    "universal": {"multiple": SIZE_MULTIPLE, "edges": (SIZE_MULTIPLE, 4992), "pixels": (MIN_PIXELS, MAX_PIXELS)},
    "long-edge-1536": {"multiple": 1, "edges": (1, 1536), "long_edge_from": 512, "pixels": (1, MAX_PIXELS)},
}
# gpt-image-2-vip takes only these sizes, ten ratios at three tiers (-r picks the tier; 2K by default).
VIP_SIZES = {
    "1K": ("1280x1280", "848x1280", "1280x848", "960x1280", "1280x960", "1024x1280", "1280x1024", "720x1280",
           "1280x720", "1280x544"),
    "2K": ("2048x2048", "1360x2048", "2048x1360", "1536x2048", "2048x1536", "1632x2048", "2048x1632", "1152x2048",
           "2048x1152", "2048x864"),
    "4K": ("2880x2880", "2336x3520", "3520x2336", "2480x3312", "3312x2480", "2560x3216", "3216x2560", "2160x3840",
           "3840x2160", "3840x1632"),
}
# Channels that take fixed sizes as tiers, chosen by -r (a ratio or -s match takes the nearest ratio).
# gpt-image-2.6-all takes free sizes up to a long edge of 1536 and upscales to these 2K and 4K sizes.
SIZE_TIERS = {"vip": VIP_SIZES,
              "2.6-all": {"2K": ("2048x2048", "2048x1152", "1152x2048", "2048x1536", "1536x2048"),
                          "4K": ("3840x2160", "2160x3840", "2880x2880")}}
DEFAULT_TIER = "2K"
# GIF (gpt-image-2.6): the frames share one sheet within the pixel budget, four frames wide at most
# (6 frames of 1024 were refused: a 4096 sheet). Measured square caps by frame count: 960, 816, 720.
GIF_FRAMES = (2, 16)
GIF_DEFAULT_FRAMES = 9              # what the API makes when frame_count is not sent
GIF_FRAME_MS = (20, 2000, 10)       # from, to, step
GIF_SHEET_COLUMNS = 4
GIF_FRAME_CAPS = ((9, 960), (12, 816), (16, 720))   # up to this many frames: the largest square frame

# An SVG starts with its XML declaration, a comment, a doctype or the root element (after a byte order
# mark or white space); a document this long has its root's start tag in it.
SVG_START = re.compile(rb"(\xef\xbb\xbf)?\s*<(\?xml|!--|!DOCTYPE\s+svg|(?:[A-Za-z_][\w.-]*:)?svg[\s>/])", re.I)
SVG_HEAD_BYTES = 64 * 1024
SVG_PROLOG = {"<?": "?>", "<!--": "-->", "<!DOCTYPE": ">"}     # what may come before the root element
SVG_ROOT = re.compile(r"<(?:[A-Za-z_][\w.-]*:)?svg(\s[^>]*)?/?>")
SPACES = re.compile(r"\s*")
# Start-of-frame markers carry the size; C4 (DHT), C8 (JPG) and CC (DAC) share the range but do not.
JPEG_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


# Output formats with rules of their own (gpt-image-2.6): the settings they cannot be combined with.
FORMAT_EXCLUDES = {"gif": ("stream", "mask", "output_compression"),
                   "svg": ("stream", "output_compression", "input_images")}


FREE = SIZE_RULES["free"]
# A request field and the profile setting that stands for it, where the names differ.
FIELD_SETTINGS = {"frame_count": "frames", "frame_duration_ms": "frames", "svg": "svg_model",
                  "partial_images": "stream"}

# USD per million tokens on the official line (gpt-image-2, 2.5, 2.6), as OpenAI and APIYI publish them,
# checked 2026-11 (references/models.md). The Images API reports no cached tokens. A token group billed at
# another rate (APIYI's enterprise group: 1.2) sets APIYI_PRICE_MULTIPLIER.
TOKEN_PRICES = {"text_input": 5.0, "image_input": 8.0, "image_output": 30.0}
ENV_PRICE_MULTIPLIER = "APIYI_PRICE_MULTIPLIER"
PRICE_MULTIPLIER_RANGE = (0.01, 100.0)
MAX_COST_USD = 1_000_000.0
MAX_USAGE_TOKENS = 10 ** 8         # more than any image can use: a larger count in usage is unreadable
# Output tokens of one image, from OpenAI's calculator for gpt-image-2 (a forum reading of its code that
# reproduces every published figure): a factor by quality; 2.5 has its own (APIYI's measurements); 2.6 low
# and medium are not published (references/models.md). See output_tokens().
GPT_IMAGE_2_FACTORS = {"low": 16, "medium": 48, "high": 96}
GPT_IMAGE_2_5_FACTORS = {"low": 16, "medium": 24, "high": 48, "xhigh": 64, "max": 96}
GPT_IMAGE_2_6_FACTORS = {"high": 48, "xhigh": 64, "max": 96}
PARTIAL_IMAGE_TOKENS = 100          # each streamed preview is billed as this many output tokens
AUTO_SIZES = ("1024x1024", "1536x1024", "1024x1536")   # what "auto" may choose, for the bounds
INPUT_IMAGE_PATCH, INPUT_IMAGE_MAX_PATCHES = 32, 1536  # an input image costs a token per 32 px patch, at most
PROMPT_OVERHEAD_TOKENS = 6

# The models and channels APIYI serves on these endpoints, one row each (sources: references/models.md).
# A row drives validation, the request and the estimates: the settings it takes ("accepts"), those its
# channel ignores (not sent, one warning), its qualities and output formats, its size rule, the most
# images per request (flat channels bill every n but may make one), how it bills, and the usual
# seconds for one image. A model not in the table is sent as given under UNKNOWN_MODEL.
OFFICIAL_SETTINGS = ("size", "quality", "n", "background", "moderation", "output_compression", "mask", "stream")
BASE_QUALITIES = QUALITIES[:4]
OFFICIAL_ROW = {"line": "official", "billing": "tokens", "sizes": "free", "accepts": OFFICIAL_SETTINGS}
GPT_IMAGE_2_5_ROW = {**OFFICIAL_ROW, "token_factors": GPT_IMAGE_2_5_FACTORS, "qualities": QUALITIES,
                     "formats": CLASSIC_FORMATS}
GPT_IMAGE_2_6_ROW = {**OFFICIAL_ROW, "token_factors": GPT_IMAGE_2_6_FACTORS, "qualities": QUALITIES,
                     "formats": OUTPUT_FORMATS, "gif_rules": True, "needs_svg_model": True,
                     "accepts": (*OFFICIAL_SETTINGS, "complexity", "frames", "svg_model")}
# The flat channels of one image per request (they bill every n sent) that take a size and no quality.
ONE_IMAGE_ROW = {"line": "flat", "qualities": (), "formats": ("png",), "accepts": ("size",), "ignores": ("quality",),
                 "max_n": 1}
# gpt-image-2-all and 2.5-all: the size is a target whose long edge is 512-1536.
LONG_EDGE_ROW = {**ONE_IMAGE_ROW, "price_per_image": 0.03, "billing": "$0.03 per image", "seconds": (30, 90),
                 "sizes": "long-edge-1536", "real_size_differs": True,
                 "note": "flat price; size is a target (long edge 512-1536); no mask, no quality"}
MODEL_PROFILES: dict[str, dict[str, Any]] = {
    "gpt-image-2": {**OFFICIAL_ROW, "token_factors": GPT_IMAGE_2_FACTORS, "seconds": (120, 150),
                    "transparency_in_preview": True,
                    "qualities": BASE_QUALITIES, "formats": CLASSIC_FORMATS,
                    "note": "the default: best text rendering; up to 5 min at high quality and 4K"},
    "gpt-image-2.5-flare": {**GPT_IMAGE_2_5_ROW, "seconds": (40, 75),
                            "note": "faster 2.5; quality up to xhigh and max; native transparency"},
    "gpt-image-2.5-sunburst": {**GPT_IMAGE_2_5_ROW, "seconds": (60, 120),
                               "note": "detailed 2.5; quality up to xhigh and max; native transparency"},
    "gpt-image-2.6-flare": {**GPT_IMAGE_2_6_ROW, "seconds": (8, 15),
                            "note": "fastest; complexity, GIF and SVG (SVG needs --svg-model)"},
    "gpt-image-2.6-sunburst": {**GPT_IMAGE_2_6_ROW, "seconds": (20, 60),
                               "note": "detailed 2.6 and edits; complexity, GIF and SVG (SVG needs --svg-model)"},
    "gpt-image-2-all": LONG_EDGE_ROW,
    "gpt-image-2.5-all": LONG_EDGE_ROW,
    "gpt-image-2-vip": {**ONE_IMAGE_ROW, "price_per_image": 0.03, "billing": "$0.03 per image", "seconds": (90, 150),
                        "sizes": "", "tiers": "vip", "real_size_differs": True,
                        "note": "flat price at any of its 30 sizes up to 4K; no mask, no quality"},
    "gpt-image-2.6-all": {"line": "flat", "price_per_image": 0.025, "billing": "$0.025 per image", "seconds": (10, 46),
                          "qualities": BASE_QUALITIES,
                          "formats": ("png", "jpeg", "gif", "svg"), "max_n": 4, "sizes": "long-edge-1536",
                          "tiers": "2.6-all", "accepts": ("size", "quality", "n", "background", "mask", "frames"),
                          "ignores": ("complexity", "moderation", "svg_model"),
                          "real_size_differs": True,
                          "note": "flat price up to 4K; GIF and SVG (rough); the real size may differ"},
}
UNKNOWN_MODEL: dict[str, Any] = {
    "line": "unknown", "billing": "unknown", "seconds": (120, 150), "qualities": QUALITIES, "formats": OUTPUT_FORMATS,
    "accepts": (*OFFICIAL_SETTINGS, "complexity", "frames", "svg_model"), "sizes": "universal",
    "note": "not in the table: sent as given"}
# The flags of the settings a profile may refuse, for messages that name them.
SETTING_FLAGS = {"size": "-s", "quality": "-q", "n": "-n", "background": "--background", "moderation": "--moderation",
                 "output_compression": "-c", "mask": "--mask", "stream": "--stream", "complexity": "--complexity",
                 "frames": "--frames/--frame-ms", "svg_model": "--svg-model"}
# Images API limits for GPT image models (openai-images-api.md, sections 1-2).
MAX_PROMPT_CHARS = 32_000
MAX_INPUT_IMAGES = 16
MAX_INPUT_BYTES = 50 * 1024 * 1024
MAX_MASK_BYTES = 4 * 1024 * 1024
MIN_N, MAX_N = 1, 10
MAX_RETRIES = 10
MAX_WAIT_S = 86_400.0   # --timeout and --max-wait: a socket takes no more (and no image needs it)
# -p - reads at most this much of stdin: the longest prompt in the widest UTF-8, plus a byte order mark.
MAX_PROMPT_BYTES = MAX_PROMPT_CHARS * 4 + 3
# A path component may hold 255 bytes on ext4 and APFS (255 UTF-16 units on NTFS): a name must fit
# with the longest suffix the tool may add (NAME-99999.png, NAME.partial-3.png, NAME.png.json).
MAX_NAME_BYTES = 255
LONGEST_FREE_SUFFIX = "-99999"

# Retry policy mirrors the official SDK: 408/409/429/5xx, 0.5 s doubling to 8 s,
# Retry-After honoured up to 120 s. 524 is left out: the CDN gave up but the
# origin keeps generating (and billing), so a retry could pay twice.
RETRY_STATUSES = frozenset({408, 409, 429})
NOT_RETRIED_5XX = frozenset({524})
BACKOFF_INITIAL_S = 0.5
BACKOFF_MAX_S = 8.0
RETRY_AFTER_MAX_S = 120.0
# A 429 without Retry-After: at least this long, doubling (gateways answer 0.5 s retries with more 429s).
RATE_LIMIT_INITIAL_S = 2.0
# 429s cost nothing, so they do not spend --retries; each request waits them out this long at most.
MAX_THROTTLED_S = 600.0     # each request's own waits, so it is wall time however many workers wait
RATE_LIMIT_MIN_S = 1.0      # a 429 is never retried sooner, whatever wait the gateway names
# Gateways known to answer a streamed image request with a 500 after the upstream made the image,
# known by a header of theirs.
STREAM_BREAKING_GATEWAYS = ("x-litellm-call-id",)
# How long to wait, when a gateway says so only in words ("try again in 5 seconds", "请在 5 秒后重试").
WAIT_IN_WORDS = (re.compile(r"(?:try again|retry)(?: after| in)?\s*(\d+(?:\.\d+)?)\s*"
                            r"(ms|milliseconds?|s|secs?|seconds?)\b", re.I),
                 re.compile(r"(\d+(?:\.\d+)?)\s*(秒|毫秒)\s*后\s*(?:再)?重试"))
REFUSED_STATUSES = frozenset({400, 404, 413, 415, 422})
# A content-safety block: by its code, or by its words when a gateway rewrote the code (LiteLLM sends
# "400" with OpenAI's message). Never retried: the same request is refused again, and may be billed.
SAFETY_CODES = frozenset({"moderation_blocked", "content_policy_violation"})
SAFETY_WORDS = re.compile(r"safety system|moderation|content[ _]policy|safety_violations|违反|安全|审核", re.I)
SAFETY_HINT = ("the safety system refused it: rephrase the prompt or change the image (an agent asks the user "
               "how, and keeps their words); the same request is refused again")
AUTH_STATUSES = frozenset({401, 402, 403})
QUOTA_ERROR_CODE = "insufficient_quota"

READ_CHUNK = 1024 * 1024
# Connecting (TLS and a proxy tunnel included) and sending the request have a deadline of their own, so
# a slow upload never eats the time --timeout gives the server to generate: a minute, plus the body at
# the pace of a slow link (400 kbit/s).
CONNECT_TIMEOUT_S = 60.0
UPLOAD_BASE_S = 60.0
UPLOAD_MIN_BYTES_PER_S = 50_000
ERROR_BODY_LIMIT = 64 * 1024
# A 200 answer that holds no usable image was most likely billed all the same.
PAID_ANSWER_HINT = "the request was probably billed; retrying buys a new image"
# What a server may send, from the largest legitimate answer: a 3840x2160 RGBA PNG stored without
# compression is 33.2 MB (44.2 MB as base64); an answer holds n of them (each preview of a stream is
# one more) and some JSON. Past these caps the answer is refused, never held or written whole.
MAX_IMAGE_BYTES = MAX_PIXELS * 4 + 1024 * 1024
MAX_IMAGE_BASE64 = MAX_IMAGE_BYTES * 4 // 3 + 4
ANSWER_JSON_ROOM = 1024 * 1024
ERROR_EXCERPT_CHARS = 300
# An error body up to this size is given whole in --json ("body"), cleaned; a longer one only as excerpt.
ERROR_BODY_IN_JSON = 2048
PROGRESS_TTY_INTERVAL_S = 1.0
PROGRESS_LOG_INTERVAL_S = 15.0
FALLBACK_FOLDER = "apiyi-gpt-image-2"
MAX_PARTIAL_IMAGES = 3
DEFAULT_PARTIAL_IMAGES = 2
DEFAULT_JOBS = 4
MAX_JOBS = 16
# A batch field and the flag for the same setting share one argparse destination.
BATCH_ITEM_FIELDS = {"prompt": "prompt", "filename": "filename", "size": "size", "resolution": "resolution",
                     "quality": "quality", "output_format": "output_format",
                     "output_compression": "output_compression", "input_images": "input_image",
                     "mask": "mask", "n": "n", "background": "background", "moderation": "moderation",
                     "model": "model", "complexity": "complexity", "frame_count": "frames",
                     "frame_duration_ms": "frame_ms", "svg_model": "svg_model"}
# Settings given as text besides the prompt (batch field, flag): checked for NUL and bad UTF-8.
TEXT_SETTINGS = (("filename", "-f"), ("model", "--model"), ("mask", "-m"), ("input_images", "-i"),
                 ("svg_model", "--svg-model"))
BATCH_GLOBAL_FIELDS = tuple(f for f in BATCH_ITEM_FIELDS if f not in ("prompt", "filename"))
BATCH_TOP_KEYS = ("description", "global", "prompts")
# Where gateways put a request id, first found wins; cf-ray (Cloudflare's) only when nothing else is there.
REQUEST_ID_HEADERS = ("x-request-id", "request-id", "openai-request-id", "x-oneapi-request-id",
                      "x-new-api-request-id", "x-litellm-call-id", "cf-ray")

# The gallery page: one self-contained file (no script, font or style from anywhere), readable on a
# phone, light or dark as the system is. The policy lets it load nothing but its own images.
GALLERY_POLICY = "default-src 'none'; img-src 'self' file: data:; style-src 'unsafe-inline'"
# A page carrying this is ours to rewrite; any other file of that name is left alone.
GALLERY_REFRESH_S = 1.0    # at most once a second while a batch runs (each write is the whole page), and at the end
GALLERY_MARKER = '<meta name="generator" content="apiyi-gpt-image-2-gen gallery">'
GALLERY_STYLE = """
:root { color-scheme: light dark; --bg: #fafafa; --fg: #1d1d1f; --card: #fff; --muted: #6e6e73; --bad: #c62828; }
@media (prefers-color-scheme: dark) {
  :root { --bg: #161618; --fg: #f2f2f7; --card: #232326; --muted: #a1a1a6; --bad: #ff6b6b; } }
body { margin: 0; padding: 1rem; background: var(--bg); color: var(--fg); font: 15px/1.45 system-ui, sans-serif; }
h1 { font-size: 1.3rem; margin: 0 0 .3rem; }
.totals { color: var(--muted); margin: 0 0 1rem; }
main { display: grid; gap: 1rem; grid-template-columns: repeat(auto-fill, minmax(min(100%, 260px), 1fr)); }
article { background: var(--card); border-radius: 10px; padding: .7rem; box-shadow: 0 1px 3px #0002; }
article.failed { outline: 2px solid var(--bad); }
article img { display: block; width: 100%; height: 220px; object-fit: contain; background: #8881; }
.none { height: 220px; display: grid; place-items: center; color: var(--muted); background: #8881; }
h2 { font-size: 1rem; margin: .5rem 0 .2rem; }
.prompt { white-space: pre-wrap; overflow-wrap: anywhere; margin: .2rem 0; }
dl { display: grid; grid-template-columns: auto 1fr; gap: 0 .6rem; margin: .4rem 0 0; color: var(--muted); }
dd { margin: 0; overflow-wrap: anywhere; }
.error { color: var(--bad); overflow-wrap: anywhere; }
"""

# --doctor: a Cloudflare node cuts requests at about 100 s (a CDN 524), shorter than an image takes.
SHORT_CUT_HOSTS = ("api-cf.apiyi.com",)
CLOCK_SKEW_WARN_S = 120.0

# Jobs: one record per command in the state folder; the worker owns the request from sending to saving.
ENV_STATE_DIR = "APIYI_STATE_DIR"
ENV_WORKER = "APIYI_WORKER"
# process: a detached worker; inprocess: a thread of the command (the job ends with it);
# unavailable: as if a sandbox forbade new processes (in-process, with a warning; the tests use it).
WORKER_MODES = ("process", "inprocess", "unavailable")
# A job's state goes starting, sending, waiting (sent: it may be billed), receiving, saving, then ends.
FINISHED_STATES = frozenset({"done", "failed", "cancelled"})
JOB_KEEP_S = 7 * 24 * 3600
# A worker takes its lock within milliseconds; this long without it, it never came up.
WORKER_START_GRACE_S = 20.0
STATE_LOCK_WAIT_S = 30.0
POLL_INTERVALS_S = (0.01, 0.02, 0.05, 0.1)     # the wait loop starts fast: a local answer comes in ms
HEARTBEAT_S = 10.0
CANCEL_WAIT_S = 10.0
PROMPT_EXCERPT_CHARS = 60
# A spooled answer is copied and decoded this much at a time: 16 items of a batch decoding at once
# stay within a few MiB each.
SPOOL_PIECE = 256 * 1024

EXIT_OK = 0
EXIT_BUG = 1
EXIT_USAGE = 2
EXIT_AUTH = 3
EXIT_REFUSED = 4
EXIT_UNAVAILABLE = 5
EXIT_MAYBE_BILLED = 6
EXIT_FALLBACK = 7
EXIT_BATCH_PARTIAL = 8
EXIT_STILL_RUNNING = 9
EXIT_MISMATCH = 10
EXIT_INTERRUPTED = 130
# 128 + the signal number, as shells report a process ended by it.
SIGNAL_EXITS = {"SIGINT": 130, "SIGTERM": 143, "SIGHUP": 129}

# Answers: base64 values found by position in the spool (scan_b64_values, decode_b64_span).
B64_KEY = re.compile(rb'"b64_json"\s*:\s*"')
# A tail that may still grow into B64_KEY with the next piece: cut anywhere, even in its spaces.
B64_KEY_AT_END = re.compile(rb'"(?:b(?:6(?:4(?:_(?:j(?:s(?:o(?:n(?:"\s*(?::\s*)?)?)?)?)?)?)?)?)?)?\Z')
BAD_ESCAPE = re.compile(rb"\\(?![/nrt])")
ESCAPES = ((b"\\/", b"/"), (b"\\n", b""), (b"\\r", b""), (b"\\t", b""))
NOT_BASE64 = bytes(sorted(set(range(256)) - set(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")))
DATA_URL_LIMIT = 256  # the longest data:image/...;base64, prefix looked for

# Terminal escape sequences (CSI, OSC) and other control characters a server could send to the console.
CONTROL_TEXT = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|[\x00-\x1f\x7f-\x9f]")
# A run this long in server text is image data, never shown.
BASE64_RUN = re.compile(r"[A-Za-z0-9+/=]{200,}")

# Names Windows will not create; a batch file must work the same everywhere, so they are refused on
# every platform: reserved device names (with any extension), trailing dots or spaces, <>:"|?* and
# control characters.
WINDOWS_RESERVED = re.compile(r"^(con|prn|aux|nul|com[0-9]|lpt[0-9])(\..*)?$", re.I)
WINDOWS_FORBIDDEN = re.compile(r'[<>:"|?*\x00-\x1f]')
WINDOWS_NAME_RULE = ("is not a file name Windows accepts (reserved names like CON or NUL, <>:\"|?*, a trailing dot "
                     "or space)")

# Windows: no console, a process group of its own (Ctrl-C in the caller's console does not reach
# it), and out of the caller's job object where the job allows it (else the second try, without).
WINDOWS_DETACHED_PROCESS = 0x00000008
WINDOWS_NEW_PROCESS_GROUP = 0x00000200
WINDOWS_BREAKAWAY_FROM_JOB = 0x01000000
# Whether a process lives (pid_alive): open it to query, and read its exit code.
WINDOWS_QUERY_LIMITED_INFORMATION = 0x1000
WINDOWS_ACCESS_DENIED = 5
WINDOWS_STILL_ACTIVE = 259


# --- Exceptions ---


class ToolError(Exception):
    """An expected failure: main() prints it on one line and returns exit_code."""

    exit_code = EXIT_BUG
    kind = "error"

    def __init__(self, message: str, *, hint: str = "", status: Optional[int] = None,
                 code: Optional[str] = None, kind: str = "", problems: Sequence[str] = (),
                 field: str = "", body: str = "", details: Optional[Mapping[str, Any]] = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.status = status
        self.code = code
        self.problems = tuple(problems)
        self.field = field  # the setting at fault, as a batch file names it
        self.body = body  # a short error body from the server, whole and cleaned, for --json
        self.details = dict(details or {})  # more for --json: a safety refusal's categories and source
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
    kind = "account"


class RefusedError(ToolError):
    """The request was refused for what it asked (kind bad_request), or by the safety system
    (kind safety_refusal)."""

    exit_code = EXIT_REFUSED
    kind = "bad_request"


class ServiceError(ToolError):
    """The service failed or answered unusably (kinds service, rate_limited, silent_refusal, ...)."""

    exit_code = EXIT_UNAVAILABLE
    kind = "service"


class ConnectError(ServiceError):
    """Nothing reached the server (refused, DNS, reset while sending): safe to retry."""


class MaybeBilledError(ToolError):
    exit_code = EXIT_MAYBE_BILLED
    kind = "possibly_billed"


class FallbackSaveError(ToolError):
    exit_code = EXIT_FALLBACK
    kind = "saved_to_fallback"


class MismatchError(ToolError):
    """--strict-size: the image was saved but is not what was asked."""

    exit_code = EXIT_MISMATCH
    kind = "size_mismatch"


class BatchPartialError(ToolError):
    exit_code = EXIT_BATCH_PARTIAL
    kind = "batch_partial"


class InterruptedRun(ToolError):
    exit_code = EXIT_INTERRUPTED
    kind = "interrupted"


class StillRunning(ToolError):
    """--max-wait ran out, or the command was interrupted after sending: the job goes on."""

    exit_code = EXIT_STILL_RUNNING
    kind = "still_running"

    def __init__(self, message: str, *, job_id: str, hint: str = "", exit_code: int = EXIT_STILL_RUNNING) -> None:
        super().__init__(message, hint=hint)
        self.job_id = job_id
        self.exit_code = exit_code


class Signalled(BaseException):
    """SIGTERM or SIGHUP, raised in the main thread like KeyboardInterrupt is for SIGINT."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


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
    width: int                  # 0 for an SVG that states no size
    height: int
    frames: int = 1             # a GIF's frame count

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.format]


@dataclasses.dataclass(frozen=True)
class ModelProfile:
    """One row of MODEL_PROFILES (or UNKNOWN_MODEL for a name the table does not know)."""

    name: str
    known: bool
    line: str
    billing: str
    seconds: tuple[int, int]
    qualities: tuple[str, ...]
    formats: tuple[str, ...]
    accepts: tuple[str, ...]
    sizes: str                  # the SIZE_RULES for free sizes ("": fixed sizes only)
    note: str
    ignores: tuple[str, ...] = ()
    max_n: int = MAX_N
    real_size_differs: bool = False
    tiers: str = ""             # the SIZE_TIERS it takes besides (or instead of) free sizes
    gif_rules: bool = False     # the official GIF frame limits apply
    needs_svg_model: bool = False
    transparency_in_preview: bool = False       # --background transparent works, but not everywhere yet
    price_per_image: Optional[float] = None     # a flat channel's price (every n it is sent is billed)
    token_factors: Optional[Mapping[str, int]] = None   # by quality, for the output-token estimate


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
    auto_named: bool = False       # no -f: the name is made up, so a re-run would not repeat it
    strict: bool = False           # --strict-size: another size, format or frame count than asked is exit 10
    gallery: bool = False          # --gallery: NAME.html beside the image


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
    price_multiplier: float = 1.0       # APIYI_PRICE_MULTIPLIER: a token group billed at another rate


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
    streamed: bool = False                      # the spool holds an event stream, not a JSON body


@dataclasses.dataclass(frozen=True)
class Transfer:
    """Where a job's answer goes and who hears how far it got (the worker's record)."""

    spool: Optional[IO[bytes]] = None           # a 2xx body is written here as it arrives
    limit: int = MAX_IMAGE_BYTES                # the most a 2xx answer may hold (bytes)
    on_stage: Callable[[str], None] = lambda stage: None   # "sent", then "receiving"
    on_preview: Optional[Callable[[Any], None]] = None          # a PreviewSink


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
    cost: Optional[dict[str, Any]] = None      # what it cost, from usage or the flat price (cost_of)
    request_id_header: str = ""


@dataclasses.dataclass(frozen=True)
class BatchItem:
    number: int
    job: ImageJob
    done_paths: tuple[Path, ...] = ()
    fingerprint: str = ""           # what was asked, as the manifest records it for resume
    cost_high: Optional[float] = None   # the most it may cost (USD), for --max-cost

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
    warnings: tuple[str, ...] = ()
    max_cost: Optional[float] = None    # --max-cost: no item starts that could take the spend past it
    gallery: bool = True                # FILE.html beside the manifest (--no-gallery: none)

    @property
    def gallery_path(self) -> Path:
        return self.manifest.with_name(self.manifest.name[:-len(".results.jsonl")] + ".html")

    @property
    def to_run(self) -> list[BatchItem]:
        return [item for item in self.items if not item.skipped]


# --- Validation ---


def int_in_range(low: int, high: int, step: int = 1) -> Callable[[str], int]:
    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is outside {low}-{high}")
        if (value - low) % step:
            raise argparse.ArgumentTypeError(f"{value} is not a multiple of {step}")
        return value

    return convert


def positive_dollars(text: str) -> float:
    return positive_amount(text, MAX_COST_USD, "an amount in US dollars", f"{MAX_COST_USD:g}")


def positive_seconds(text: str) -> float:
    return positive_amount(text, MAX_WAIT_S, "a number of seconds", f"{MAX_WAIT_S:g} (a day)")


def positive_amount(text: str, most: float, what: str, limit: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{short_name(text)!r} is not {what}") from None
    if not 0 < value <= most:
        raise argparse.ArgumentTypeError(f"{short_name(text)} must be above 0 and at most {limit}")
    return value


def choice_of(choices: Sequence[str], *, transform: Callable[[str], str] = str.lower) -> Callable[[str], str]:
    def convert(text: str) -> str:
        value = transform(text.strip())
        if value not in choices:
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(choices)}")
        return value

    return convert


def model_name(text: str) -> str:
    """A model or channel name as APIYI spells them; anything else is a typo, not a name to send."""
    name = text.strip()
    if not name:
        raise argparse.ArgumentTypeError(f"the model name is empty (e.g. {DEFAULT_MODEL})")
    if not MODEL_NAME.fullmatch(name):
        raise argparse.ArgumentTypeError(f"{short_name(clean_text(name))!r} is not a model name "
                                         "(letters, digits and . _ - : / @ + only)")
    return name


def default_model(env: Mapping[str, str]) -> str:
    """APIYI_IMAGE_MODEL when set (an empty value counts as unset), else gpt-image-2."""
    text = env.get(ENV_MODEL, "")
    try:
        return model_name(text) if text.strip() else DEFAULT_MODEL
    except argparse.ArgumentTypeError as err:
        raise UsageError(f"{ENV_MODEL}: {err}", hint=f"set it to a name from {PROG} --list-models, or unset it",
                         field="model") from None


def setting_converters() -> dict[str, Callable[[str], Any]]:
    """One converter per setting: argparse's type= for a flag, and the check of a batch field."""
    return {"resolution": choice_of(tuple(RESOLUTION_LONG_EDGES), transform=str.upper),
            "quality": choice_of(QUALITIES), "n": int_in_range(MIN_N, MAX_N),
            "background": choice_of(BACKGROUNDS), "moderation": choice_of(MODERATIONS),
            "output_format": choice_of(OUTPUT_FORMATS + tuple(FORMAT_ALIASES)),
            "output_compression": int_in_range(0, 100), "filename": name_inside_the_batch,
            "complexity": choice_of(COMPLEXITIES), "frame_count": int_in_range(*GIF_FRAMES),
            "frame_duration_ms": int_in_range(*GIF_FRAME_MS), "model": model_name}


def name_inside_the_batch(text: str) -> str:
    """A batch item writes inside the batch folder (or --out-dir), whatever the file says, under names
    every platform accepts."""
    import posixpath

    normal = posixpath.normpath(text.replace("\\", "/"))    # the same rule on every platform
    if normal.startswith(("/", "~", "../")) or normal == ".." or re.match(r"^[A-Za-z]:", normal):
        raise argparse.ArgumentTypeError(f"{text!r} leaves the batch folder; give a name relative to it")
    refused = next((part for part in normal.split("/") if not windows_accepts(part)), None)
    if refused is not None:
        raise argparse.ArgumentTypeError(f"{text!r}: {refused!r} {WINDOWS_NAME_RULE}")
    return text


def windows_accepts(part: str) -> bool:
    return not (WINDOWS_RESERVED.match(part) or WINDOWS_FORBIDDEN.search(part) or part.endswith((".", " ")))


def parse_size_text(text: str) -> tuple[str, int, int]:
    """Split a -s value into ('auto'|'wxh'|'ratio', a, b); X, × and spaces tolerated."""
    cleaned = re.sub(r"\s+", "", text).lower().replace("×", "x").replace("：", ":")
    if cleaned == "auto":
        return "auto", 0, 0
    match = re.fullmatch(r"(\d{1,6})([x:])(\d{1,6})", cleaned)
    if not match:
        hint = f"for {text.upper()} give a ratio: -s 16:9 -r {cleaned.upper()}" if cleaned.upper() in \
            RESOLUTION_LONG_EDGES else f"presets: {' '.join(SIZE_PRESETS)}"
        raise UsageError(f"--size {short_name(text)!r} is not a size: use auto, WxH (e.g. 1536x1024) or a ratio "
                         "W:H (e.g. 16:9)",
                         hint=hint)
    kind = "wxh" if match.group(2) == "x" else "ratio"
    return kind, int(match.group(1)), int(match.group(3))


def size_rule_violations(width: int, height: int, rule: Mapping[str, Any] = FREE) -> list[str]:
    if min(width, height) == 0:
        return ["width and height must be above 0"]
    rules = []
    multiple, (_, longest), (fewest, most) = rule["multiple"], rule["edges"], rule["pixels"]
    if width % multiple or height % multiple:
        rules.append(f"width and height must be multiples of {multiple}")
    if max(width, height) > longest:
        rules.append(f"the longest edge must be at most {longest}")
    if max(width, height) < rule.get("long_edge_from", 0):
        rules.append(f"the longest edge must be at least {rule['long_edge_from']}")
    if max(width, height) / min(width, height) > MAX_ASPECT:
        rules.append("the aspect ratio must be at most 3:1")
    if not fewest <= width * height <= most:
        rules.append(f"the total pixels must be between {fewest:,} and {most:,} (got {width * height:,})")
    return rules


def valid_heights_for(width: int, rule: Mapping[str, Any] = FREE) -> range:
    multiple, (_, longest), (fewest, most) = rule["multiple"], rule["edges"], rule["pixels"]
    shortest_long = rule.get("long_edge_from", 0) if width < rule.get("long_edge_from", 0) else 0
    low = max(multiple, math.ceil(width / MAX_ASPECT / multiple) * multiple,
              math.ceil(fewest / width / multiple) * multiple, math.ceil(shortest_long / multiple) * multiple)
    high = min(longest, int(width * MAX_ASPECT) // multiple * multiple, most // width // multiple * multiple)
    return range(low, high + 1, multiple)


def nearest_valid_size(width: float, height: float, rule: Mapping[str, Any] = FREE) -> tuple[int, int]:
    """The valid size closest to width x height, measured as relative change of each edge,
    after the shape is brought within the ratio and pixel limits (so 17x3 stays landscape)."""
    width, height = fit_within_limits(max(width, 1.0), max(height, 1.0), rule)
    multiple, (_, longest) = rule["multiple"], rule["edges"]
    best: tuple[float, int, int] = (math.inf, 0, 0)
    for w in range(multiple, longest + 1, multiple):
        heights = valid_heights_for(w, rule)
        if not heights:
            continue
        below = min(max(heights[0], int(height) // multiple * multiple), heights[-1])
        for h in (below, min(below + multiple, heights[-1])):
            cost = abs(math.log(w / width)) + abs(math.log(h / height))
            best = min(best, (cost, w, h))
    return best[1], best[2]


def fit_within_limits(width: float, height: float, rule: Mapping[str, Any] = FREE) -> tuple[float, float]:
    """Ratio first, then scaled as a whole (so 6000x2000 keeps 3:1 as 3840x1280)."""
    (_, longest), (fewest, most) = rule["edges"], rule["pixels"]
    if max(width, height) / min(width, height) > MAX_ASPECT:
        width, height = (height * MAX_ASPECT, height) if width > height else (width, width * MAX_ASPECT)
    target = min(max(max(width, height), rule.get("long_edge_from", 0)), longest)
    width, height = width * target / max(width, height), height * target / max(width, height)
    pixels = width * height
    if not fewest <= pixels <= most:
        factor = math.sqrt((most if pixels > most else fewest) / pixels)
        width, height = width * factor, height * factor
    return width, height


def size_for_ratio(ratio_w: int, ratio_h: int, resolution: str, rule: Mapping[str, Any] = FREE) -> tuple[int, int]:
    """Long edge from the resolution, short edge from the ratio, then into the limits."""
    long_edge = RESOLUTION_LONG_EDGES[resolution]
    scale = long_edge / max(ratio_w, ratio_h)
    return nearest_valid_size(ratio_w * scale, ratio_h * scale, rule)


def resolve_size(text: Optional[str], resolution: Optional[str], profile: ModelProfile, *,
                 fmt: str = "png", frames: int = GIF_DEFAULT_FRAMES, first_input: Optional[InputFile] = None
                 ) -> tuple[Optional[str], str]:
    """The size to send (None: not sent) and a note saying how a ratio or 'match' was mapped, by
    the model's size rule (or the GIF frame rules)."""
    if text is None:
        if resolution:
            raise UsageError("--resolution needs an aspect ratio size", hint="e.g. -s 16:9 -r 2K",
                             field="resolution")
        return None, ""
    kind, a, b = size_request(text, first_input)
    if kind == "auto":
        if resolution:
            raise UsageError("--resolution needs an aspect ratio size, not auto", hint="e.g. -s 16:9 -r 2K",
                             field="resolution")
        return "auto", ""
    if kind == "wxh" and resolution:
        raise UsageError(f"--resolution applies to a ratio like 16:9, not to {a}x{b}",
                         hint=f"drop -r, or use -s {a}:{b} -r {resolution}", field="resolution")
    if 0 in (a, b):
        if kind == "wxh":
            raise UsageError(f"--size {a}x{b}: width and height must be above 0; e.g. 1024x1024")
        raise UsageError(f"--size {a}:{b}: both sides of a ratio must be above 0", hint="e.g. -s 16:9")
    if kind == "ratio" and max(a, b) / min(a, b) > MAX_ASPECT:
        widest = "3:1" if a > b else "1:3"
        raise UsageError(f"--size {a}:{b}: the aspect ratio must be at most 3:1; nearest valid ratio is {widest}")
    if fmt == "gif" and profile.gif_rules:
        return gif_size(kind, a, b, frames, resolution)
    return profile_size(kind, a, b, resolution, profile)


def profile_size(kind: str, a: int, b: int, resolution: Optional[str], profile: ModelProfile) -> tuple[str, str]:
    """A model's own sizes: a fixed tier size as it is, a free size by its rule; a ratio (or match)
    takes the nearest ratio in the tier -r names, or the rule's nearest valid size."""
    tiers, rule = SIZE_TIERS.get(profile.tiers, {}), SIZE_RULES.get(profile.sizes)
    if kind == "wxh" and any(f"{a}x{b}" in sizes for sizes in tiers.values()):
        return f"{a}x{b}", ""
    if rule and not (kind != "wxh" and resolution in tiers):
        return rule_size(kind, a, b, resolution, rule, model=profile.name)
    if kind == "wxh":
        every = [size for sizes in tiers.values() for size in sizes]
        raise UsageError(f"--size {a}x{b}: {profile.name} takes only its fixed sizes; nearest is "
                         f"{nearest_by_ratio(a, b, every, area=a * b)}",
                         hint=f"see {PROG} --list-models, or give a ratio such as -s 16:9 -r 2K")
    tier = resolution or DEFAULT_TIER
    if tier not in tiers:
        raise UsageError(f"-r {tier}: {profile.name} has no {tier} sizes (it has {', '.join(tiers)})",
                         field="resolution")
    size = nearest_by_ratio(a, b, tiers[tier])
    return size, f"size {'match' if kind == 'match' else f'{a}:{b}'} at {tier} -> {size} ({profile.name})"


def size_request(text: str, first_input: Optional[InputFile]) -> tuple[str, int, int]:
    """-s as ('auto'|'wxh'|'ratio'|'match', a, b); match takes the first input image's width and height."""
    if re.sub(r"\s+", "", text).lower() != "match":
        return parse_size_text(text)
    if first_input is None:
        raise UsageError("-s match takes the shape of the first input image, but there is none",
                         hint="add -i IMAGE, or give a size such as 16:9")
    return "match", first_input.info.width, first_input.info.height


def rule_size(kind: str, a: int, b: int, resolution: Optional[str], rule: Mapping[str, Any], *,
              model: str = DEFAULT_MODEL) -> tuple[str, str]:
    longest = rule["edges"][1]
    if resolution and RESOLUTION_LONG_EDGES[resolution] > longest:
        raise UsageError(f"-r {resolution}: {model} takes a long edge of at most {longest}", field="resolution",
                         hint="use -r 1K, or a model that makes larger images (see --list-models)")
    if kind == "wxh":
        problems = size_rule_violations(a, b, rule)
        if problems:
            nearest = "nearest valid size is %dx%d" % nearest_valid_size(a, b, rule)
            raise UsageError(f"--size {a}x{b}: {'; '.join(problems)}; {nearest}")
        return f"{a}x{b}", ""
    if kind == "match":
        scale = RESOLUTION_LONG_EDGES[resolution] / max(a, b) if resolution else 1.0
        width, height = nearest_valid_size(a * scale, b * scale, rule)
        return f"{width}x{height}", f"size match (first input image {a}x{b}) -> {width}x{height}"
    resolution = resolution or "1K"
    width, height = size_for_ratio(a, b, resolution, rule)
    return f"{width}x{height}", f"size {a}:{b} at {resolution} -> {width}x{height}"


def nearest_by_ratio(width: int, height: int, sizes: Sequence[str], *, area: int = 0) -> str:
    def distance(size: str) -> tuple[float, float]:
        w, h = (int(x) for x in size.split("x"))
        return abs(math.log((w / h) / (width / height))), abs(math.log(w * h / area)) if area else 0.0
    return min(sizes, key=distance)


def gif_limits(frames: int) -> tuple[int, int]:
    """The longest frame edge and the most pixels in one frame, for this many frames on one sheet."""
    cap = next(cap for most, cap in GIF_FRAME_CAPS if frames <= most)
    return MAX_EDGE // GIF_SHEET_COLUMNS, cap * cap


def gif_size(kind: str, a: int, b: int, frames: int, resolution: Optional[str]) -> tuple[str, str]:
    """A GIF's size is one frame's: edges multiples of 16, all frames within one sheet's budget."""
    if resolution:
        raise UsageError("--resolution does not apply to a GIF: its frames are at most 960 px",
                         hint="drop -r; give -s W:H or a frame size such as 720x720", field="resolution")
    longest, pixels = gif_limits(frames)
    if kind == "wxh":
        problems = [rule for rule, broken in (
            (f"frame edges must be multiples of {SIZE_MULTIPLE}", a % SIZE_MULTIPLE or b % SIZE_MULTIPLE),
            (f"a frame's longest edge must be at most {longest}", max(a, b) > longest),
            (f"with {frames} frames a frame holds at most {pixels:,} pixels (got {a * b:,})", a * b > pixels),
            ("the aspect ratio must be at most 3:1", max(a, b) / min(a, b) > MAX_ASPECT)) if broken]
        if problems:
            raise UsageError(f"--size {a}x{b} for a GIF of {frames} frames: {'; '.join(problems)}; nearest valid "
                             "frame is %dx%d" % largest_gif_frame(a, b, frames))
        return f"{a}x{b}", ""
    width, height = largest_gif_frame(a, b, frames)
    return f"{width}x{height}", f"GIF frame for {a}:{b} with {frames} frames -> {width}x{height}"


def largest_gif_frame(width: int, height: int, frames: int) -> tuple[int, int]:
    longest, pixels = gif_limits(frames)
    ratio = min(max(width / height, 1 / MAX_ASPECT), MAX_ASPECT)
    scale = min(longest / max(ratio, 1.0), math.sqrt(pixels / ratio))     # the height, at most
    return (max(SIZE_MULTIPLE, int(scale * ratio) // SIZE_MULTIPLE * SIZE_MULTIPLE),
            max(SIZE_MULTIPLE, int(scale) // SIZE_MULTIPLE * SIZE_MULTIPLE))


def expand_path(text: str) -> Path:
    """A path as given, ~ expanded; ~someone who does not exist is bad input, not a crash."""
    try:
        return Path(text).expanduser()
    except RuntimeError:
        raise UsageError(f"{text}: its ~ names no home folder here", hint="give the full path") from None


def check_text(value: str, what: str) -> None:
    """Text that can go on the wire and into a file name: no NUL, and valid Unicode (bytes that were
    not UTF-8 reach argv as lone surrogates)."""
    if "\x00" in value:
        raise UsageError(f"{what} holds a NUL character", hint="remove it")
    if re.search("[\ud800-\udfff]", value):
        raise UsageError(f"{what} holds bytes that are not UTF-8", hint="give it as UTF-8 text")


def read_prompt(value: str, stdin: Optional[IO[str]]) -> str:
    """The prompt exactly as given; '-' reads UTF-8 from stdin and drops one trailing newline."""
    if value == "-":
        if stdin is None:
            raise UsageError("-p - reads the prompt from standard input, but there is none")
        raw = stdin.buffer.read(MAX_PROMPT_BYTES + 1) if hasattr(stdin, "buffer") else \
            stdin.read(MAX_PROMPT_BYTES + 1).encode("utf-8")
        if len(raw) > MAX_PROMPT_BYTES:
            raise UsageError(f"the prompt on standard input is longer than {MAX_PROMPT_BYTES:,} bytes",
                             hint=f"a prompt holds at most {MAX_PROMPT_CHARS:,} characters")
        try:
            value = raw.decode("utf-8-sig")
        except UnicodeDecodeError as err:
            raise UsageError(f"the prompt on standard input is not UTF-8 (byte {err.start})",
                             hint="save or pipe it as UTF-8") from None
        value = value[:-2] if value.endswith("\r\n") else value[:-1] if value.endswith("\n") else value
    check_text(value, "the prompt")
    if not value.strip():
        raise UsageError("the prompt is empty", hint='describe the image: -p "a cute orange cat"')
    if len(value) > MAX_PROMPT_CHARS:
        raise UsageError(f"the prompt has {len(value):,} characters; the limit is {MAX_PROMPT_CHARS:,}",
                         hint="shorten it")
    return value


def read_image_info(path: Path) -> Optional[ImageInfo]:
    """Format, width and height from the file's content (None when not a PNG, JPEG, WebP, GIF or SVG)."""
    with open(path, "rb") as handle:
        return image_info_from_stream(handle)


def image_info_from_stream(handle: IO[bytes]) -> Optional[ImageInfo]:
    """None also for a header cut short or a size of zero: what cannot be shown is not an image."""
    head = handle.read(32)
    info = None
    if head.startswith(b"\x89PNG\r\n\x1a\n") and head[12:16] == b"IHDR" and len(head) >= 24:
        info = ImageInfo("png", int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big"))
    elif head[:4] == b"RIFF" and head[8:12] == b"WEBP" and len(head) >= 30:
        info = webp_info(head)
    elif head.startswith(b"\xff\xd8\xff"):
        handle.seek(2)
        info = jpeg_info(handle)
    elif head[:6] in (b"GIF87a", b"GIF89a") and len(head) >= 13:
        handle.seek(13)
        info = gif_info(head, handle)
    elif SVG_START.match(head):
        handle.seek(0)
        return svg_info(handle.read(SVG_HEAD_BYTES))
    return info if info and info.width > 0 and info.height > 0 else None


def gif_info(head: bytes, handle: IO[bytes]) -> Optional[ImageInfo]:
    """The logical screen's size and the frames counted by walking the blocks (image descriptors);
    a file cut short still counts the frames it holds."""
    width, height = int.from_bytes(head[6:8], "little"), int.from_bytes(head[8:10], "little")
    flags = head[10]
    if flags & 0x80:
        handle.seek(3 << ((flags & 7) + 1), os.SEEK_CUR)    # the global colour table
    frames = 0
    while True:
        block = handle.read(1)
        if block == b"\x2c":                                 # an image descriptor: one frame
            descriptor = handle.read(9)
            if len(descriptor) < 9:
                break
            frames += 1
            if descriptor[8] & 0x80:
                handle.seek(3 << ((descriptor[8] & 7) + 1), os.SEEK_CUR)
            handle.seek(1, os.SEEK_CUR)                      # the LZW minimum code size
        elif block == b"\x21":                               # an extension: its label, then data
            handle.seek(1, os.SEEK_CUR)
        else:                                                # the trailer, the end, or garbage
            break
        if not skip_gif_sub_blocks(handle):
            break
    return ImageInfo("gif", width, height, frames) if frames else None


def skip_gif_sub_blocks(handle: IO[bytes]) -> bool:
    while True:
        length = handle.read(1)
        if not length:
            return False
        if length == b"\x00":
            return True
        handle.seek(length[0], os.SEEK_CUR)


def svg_info(head: bytes) -> Optional[ImageInfo]:
    """An XML document whose root element is svg; its size from width and height, else the viewBox,
    else 0. Read as text with patterns only: the tool never parses, interprets or renders SVG."""
    text = head.decode("utf-8", "replace").lstrip("\ufeff")
    root = SVG_ROOT.match(text, svg_prolog_end(text))
    if not root:
        return None
    attributes = dict(re.findall(r'([\w:.-]+)\s*=\s*["\']([^"\']*)["\']', root.group(1) or ""))
    width, height = (svg_length(attributes.get(name, "")) for name in ("width", "height"))
    box = re.split(r"[\s,]+", attributes.get("viewBox", "").strip())
    if not (width and height) and len(box) == 4:
        width, height = (svg_length(value) for value in box[2:])
    return ImageInfo("svg", width, height)


def svg_prolog_end(text: str) -> int:
    """Where the root element may start: after the XML declaration, comments and a doctype (found
    with str.find, in linear time, whatever a hostile server sends)."""
    position = 0
    while True:
        position = SPACES.match(text, position).end()
        opening = next((o for o in SVG_PROLOG if text.startswith(o, position)), None)
        if opening is None:
            return position
        closing = SVG_PROLOG[opening]
        if opening == "<!DOCTYPE" and "[" in text[position:text.find(">", position)]:
            closing = "]>"      # an internal subset holds ">" of its own
        end = text.find(closing, position)
        if end < 0:
            return len(text)
        position = end + len(closing)


def svg_length(text: str) -> int:
    """A length in pixels (1024, 1024px, 1024.0); anything relative (100%, 10em) counts as not stated."""
    match = re.fullmatch(r"\s*([0-9]{1,6}(?:\.[0-9]{0,6})?)\s*(px)?\s*", text)     # a sane length, else not stated
    return round(float(match.group(1))) if match else 0


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
        if length < 2:
            return None         # a segment length counts its own two bytes: less is garbage
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


def path_kind(path: Path) -> str:
    """file, folder, other (a device, a FIFO) or missing; a name the system refuses is missing."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return "missing"
    return "file" if stat.S_ISREG(mode) else "folder" if stat.S_ISDIR(mode) else "other"


def check_input_file(text: str, *, role: str, limit: int) -> InputFile:
    if re.match(r"^[a-z][a-z0-9+.-]*://", text, flags=re.I):
        raise UsageError(f"{role} {text}: URLs are not supported", hint="download the image, then give its path")
    path = expand_path(text)
    kind = path_kind(path)
    if kind != "file":
        problem = {"folder": "is a folder", "other": "not a regular file", "missing": "not found"}[kind]
        raise UsageError(f"{role} {text}: {problem}", hint="check the path")
    size = path.stat().st_size
    if size >= limit:
        raise UsageError(f"{role} {text} is {size / 1048576:.1f} MiB; it must be under {limit // 1048576} MiB",
                         hint="resize or compress it")
    try:
        info = read_image_info(path)
    except OSError as err:
        raise UsageError(f"{role} {text} cannot be read: {err.strerror or err}") from None
    if info is None or info.format not in INPUT_FORMATS or not info.width or not info.height:
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
    path = expand_path(filename)
    if not path.name or filename.endswith(("/", "\\")) or path_kind(path) == "folder":
        raise UsageError(f"-f {filename} names a folder", hint=f"give a file name, e.g. -f {path / 'cat.png'}")
    if os.name == "nt" and not windows_accepts(path.name):     # else it would fail only after paying
        raise UsageError(f"-f {filename}: {path.name!r} {WINDOWS_NAME_RULE}", hint="choose another name")
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


def names_written(plan: OutputPlan, n: int) -> list[str]:
    """The longest name of each kind the run may write for this plan."""
    names = []
    for path in output_paths(plan, n):
        longest = f"{path.stem}{LONGEST_FREE_SUFFIX}{path.suffix}"
        names += [longest, f"{longest}.json" if plan.metadata else longest,
                  f"{path.stem}.partial-{MAX_PARTIAL_IMAGES}{LONGEST_FREE_SUFFIX}{path.suffix}"]
    return names


def name_size(name: str) -> int:
    """What the limit counts: UTF-16 units on Windows (NTFS), bytes of UTF-8 elsewhere."""
    if os.name == "nt":
        return len(name.encode("utf-16-le", "surrogatepass")) // 2
    return len(name.encode("utf-8", "surrogatepass"))


def check_name_lengths(plan: OutputPlan, n: int) -> None:
    """Before sending: a name the file system will refuse would lose a paid image."""
    for part in [*plan.path.parent.parts, *names_written(plan, n)]:
        size = name_size(part)
        if size > MAX_NAME_BYTES:
            room = MAX_NAME_BYTES - (size - name_size(plan.path.name))
            raise UsageError(f"the name {part[:40]}... is {size} bytes; file systems allow {MAX_NAME_BYTES} per "
                             f"name, with room kept for suffixes like {LONGEST_FREE_SUFFIX}",
                             hint=f"use a file name of at most {max(room, 16)} bytes (a Chinese character is 3)")


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


def profile_for(model: str) -> ModelProfile:
    row = MODEL_PROFILES.get(model)
    return ModelProfile(name=model, known=row is not None, **(row or UNKNOWN_MODEL))


def models_that(test: Callable[[ModelProfile], bool]) -> str:
    names = [name for name in MODEL_PROFILES if test(profile_for(name))]
    return f"models that do: {', '.join(names)}" if names else "no model in the table does"


def given_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings the user gave (by flag, batch field or default flag), by profile name."""
    frames = args.frames if args.frames is not None else args.frame_ms
    given = {"size": args.size, "quality": args.quality, "n": args.n, "background": args.background,
             "moderation": args.moderation, "output_compression": args.output_compression, "mask": args.mask,
             "stream": True if streaming(args) else None, "complexity": args.complexity, "frames": frames,
             "svg_model": args.svg_model}
    return {name: value for name, value in given.items() if value is not None}


def check_profile(args: argparse.Namespace, profile: ModelProfile, fmt: str,
                  given: Mapping[str, Any]) -> tuple[frozenset[str], list[str]]:
    """What the model takes: a setting it does not take is refused (naming the models that do); one
    its channel ignores is left out, with a warning. Returns the settings left out and warnings."""
    left_out, warnings = set(), [] if profile.known else [
        f"model {profile.name} is not in the table ({PROG} --list-models): sent as given; only the universal "
        "size rules are checked"]
    for name in given:
        if name == "n" and name not in profile.accepts:
            left_out.add(name)      # a channel that makes one image per request: more is refused below
        elif name in profile.ignores:
            left_out.add(name)
            warnings.append(f"{profile.name} ignores {SETTING_FLAGS[name]}: it was not sent")
        elif name not in profile.accepts:
            raise UsageError(f"{profile.name} does not take {SETTING_FLAGS[name]}",
                             hint=models_that(lambda other: name in other.accepts), field=name)
    if args.quality and "quality" not in left_out and args.quality not in profile.qualities:
        raise UsageError(f"{profile.name} does not take -q {args.quality} (it takes {', '.join(profile.qualities)})",
                         hint=models_that(lambda other: args.quality in other.qualities), field="quality")
    if fmt not in profile.formats:
        raise UsageError(f"{profile.name} does not make {fmt} images (it makes {', '.join(profile.formats)})",
                         hint=models_that(lambda other: fmt in other.formats), field="output_format")
    if fmt == "gif" and args.size and profile.known and not profile.gif_rules:
        warnings.append(f"{profile.name} picks a GIF's size itself: the size asked may not be the one made")
    if profile.real_size_differs and args.size and not args.strict_size:
        warnings.append(f"{profile.name} may return another size than asked (--strict-size makes that exit "
                        f"{EXIT_MISMATCH})")
    if (args.n or 1) > profile.max_n:
        raise UsageError(f"-n {args.n}: {profile.name} makes at most {profile.max_n} per request"
                         + (" (a flat channel bills every n it is sent)" if profile.line == "flat" else ""),
                         hint="ask for fewer, or run a batch", field="n")
    return frozenset(left_out), warnings


def check_format_rules(args: argparse.Namespace, profile: ModelProfile, fmt: str, given: Mapping[str, Any]) -> None:
    """GIF frames and the SVG author model belong to their format; each format rules some settings out."""
    for setting, owner in (("frames", "gif"), ("svg_model", "svg")):
        if setting in given and fmt != owner:
            raise UsageError(f"{SETTING_FLAGS[setting]} applies to -o {owner} only", field=setting,
                             hint=f"add -o {owner}, or drop {SETTING_FLAGS[setting]}")
    for setting in FORMAT_EXCLUDES.get(fmt, ()):
        if setting in given or (setting == "input_images" and args.input_image):
            flag = SETTING_FLAGS.get(setting, "-i")
            raise UsageError(f"{fmt.upper()} output cannot be combined with {flag}", field=setting,
                             hint=f"drop {flag}, or choose another -o")
    if fmt == "svg" and (args.n or 1) > 1:
        raise UsageError("SVG output makes one image per request", hint="drop -n, or run a batch", field="n")
    if fmt == "svg" and profile.needs_svg_model and not args.svg_model:
        raise UsageError(f"-o svg with {profile.name} needs --svg-model NAME, the model that writes the SVG",
                         hint="for example --svg-model gpt-5.6-terra (its tokens are billed too)", field="svg_model")


def output_tokens(width: int, height: int, factor: int) -> int:
    """One image's output tokens by OpenAI's calculator: wide images can cost less than squares."""
    longest, shortest = max(width, height), min(width, height)
    scale = (2 * factor * shortest + longest) // (2 * longest)
    return math.ceil(factor * scale * (2_000_000 + width * height) / 4_000_000)


def output_token_bounds(job: ImageJob, profile: ModelProfile) -> Optional[tuple[int, int]]:
    """The fewest and most output tokens of one image: every quality "auto" may pick, every size "auto"
    may pick; None where the table has no figure."""
    quality = job.fields.get("quality", "auto")
    qualities = [quality] if quality != "auto" else [q for q in BASE_QUALITIES if q != "auto"]
    factors = profile.token_factors or {}
    if not qualities or any(q not in factors for q in qualities):
        return None
    size = job.fields.get("size", "auto")
    sizes = [size] if size != "auto" else list(AUTO_SIZES)
    counts = [output_tokens(*map(int, s.split("x")), factors[q]) for s in sizes for q in qualities]
    previews = int(job.fields.get("partial_images", 0)) * PARTIAL_IMAGE_TOKENS
    return min(counts) + previews, max(counts) + previews


def input_token_bounds(job: ImageJob) -> tuple[int, int, int]:
    """Text tokens (at least a token per 4 bytes, at most one per character) and image input tokens
    (a token per 32 px patch of each input image, at most 1536 each)."""
    text_low = len(job.prompt.encode("utf-8")) // 4 + PROMPT_OVERHEAD_TOKENS
    text_high = len(job.prompt) + PROMPT_OVERHEAD_TOKENS
    images = sum(min(INPUT_IMAGE_MAX_PATCHES, math.ceil(f.info.width / INPUT_IMAGE_PATCH) *
                     math.ceil(f.info.height / INPUT_IMAGE_PATCH)) for f in job.images)
    return text_low, text_high, images


def token_usd(text: float, image: float, output: float, multiplier: float) -> float:
    prices = TOKEN_PRICES
    return (text * prices["text_input"] + image * prices["image_input"] + output * prices["image_output"]) \
        / 1e6 * multiplier


def estimate_cost(job: ImageJob, multiplier: float, history: Sequence[int] = ()) -> dict[str, Any]:
    """USD before sending, low and high (None where nothing is published), from the flat price, or
    from the token tables; output tokens seen in earlier runs of the same request shape replace the
    table's bounds."""
    profile = profile_for(job.fields["model"])
    if profile.price_per_image is not None:
        usd = round(profile.price_per_image * job.n * multiplier, 4)
        return {"low": usd, "high": usd, "basis": "per_image", "source": "the flat price"}
    table = output_token_bounds(job, profile)
    bounds = (min(history), max([*history, *table[1:]] if table else history)) if history else table
    if bounds is None or job.output.format in ("gif", "svg"):
        why = {"gif": "GIF frames have no published token figure", "svg": "an SVG's author model is not priced"}
        return {"low": None, "high": None, "basis": "tokens" if profile.line == "official" else "unknown",
                "source": why.get(job.output.format, "no published figure for this model and quality")}
    text_low, text_high, images = input_token_bounds(job)
    low = token_usd(text_low, images, bounds[0], multiplier) * job.n
    high = token_usd(text_high, images, bounds[1], multiplier) * job.n
    source = f"{len(history)} earlier run{'s' if len(history) > 1 else ''}" if history else "the token tables"
    return {"low": round(low, 4), "high": round(high, 4), "basis": "tokens", "source": source}


def estimate_text(estimate: Mapping[str, Any]) -> str:
    if estimate["high"] is None:
        return f"cost unknown ({estimate['source']})"
    spread = f"${estimate['low']:.4f}" if estimate["low"] == estimate["high"] else \
        f"${estimate['low']:.4f}-${estimate['high']:.4f}"
    return f"estimated cost {spread} (from {estimate['source']})"


def collect_fields(args: argparse.Namespace, *, prompt: str, size: Optional[str], fmt: str,
                   format_given: bool, left_out: frozenset[str] = frozenset()) -> Fields:
    """Only what the user gave goes on the wire (the server's defaults apply); model always does.
    What the model's channel ignores is left out."""
    fields: Fields = {"model": args.model, "prompt": prompt}
    optional = {"n": args.n, "size": size, "quality": args.quality,
                "output_format": fmt if format_given else None,
                "output_compression": args.output_compression,
                "background": args.background, "moderation": args.moderation, "complexity": args.complexity,
                "frame_count": args.frames, "frame_duration_ms": args.frame_ms,
                "svg": {"model": args.svg_model} if args.svg_model else None}
    if streaming(args):
        partials = DEFAULT_PARTIAL_IMAGES if args.partial_images is None else args.partial_images
        optional.update({"stream": True, "partial_images": partials})
    fields.update({k: v for k, v in optional.items() if v is not None and FIELD_SETTINGS.get(k, k) not in left_out})
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
        return ["transparent backgrounds are in preview for gpt-image-2: some gateways refuse them"] \
            if profile_for(args.model).transparency_in_preview else []
    return []


def check_text_settings(args: argparse.Namespace) -> None:
    for field, flag in TEXT_SETTINGS:
        value = getattr(args, BATCH_ITEM_FIELDS[field])
        for text in [value] if isinstance(value, str) else value or ():
            with about(field):
                check_text(text, flag)


def check_inputs(args: argparse.Namespace) -> tuple[tuple[InputFile, ...], Optional[InputFile]]:
    with about("input_images"):
        images = tuple(check_input_file(p, role="input image", limit=MAX_INPUT_BYTES) for p in args.input_image or ())
    with about("mask"):
        return images, check_mask(args.mask, images[0]) if args.mask else None


def build_job(args: argparse.Namespace, *, stdin: Optional[IO[str]], create_folder: bool,
              default_stem: Optional[Path] = None) -> ImageJob:
    """Every check that needs no network, in the order a user would fix them; each error says
    which setting it is about."""
    with about("prompt"):
        prompt = read_prompt(args.prompt, stdin)
    check_text_settings(args)
    with about("filename"):
        path, fmt, format_given, warnings = plan_output_path(args.filename, normalise_format(args.output_format),
                                                             prompt, default_stem=default_stem)
    profile = profile_for(args.model)
    given = given_settings(args)
    left_out, profile_warnings = check_profile(args, profile, fmt, given)
    check_format_rules(args, profile, fmt, given)
    warnings += profile_warnings + check_combinations(args, fmt)
    images, mask = check_inputs(args)
    with about("size"):
        size, size_note = resolve_size(None if "size" in left_out else args.size, args.resolution, profile, fmt=fmt,
                                       frames=args.frames or GIF_DEFAULT_FRAMES,
                                       first_input=images[0] if images else None)
    output = OutputPlan(path, fmt, args.overwrite, args.metadata, args.keep_partials,
                        auto_named=args.filename is None and default_stem is None, strict=args.strict_size,
                        gallery=bool(getattr(args, "gallery", False)))
    with about("filename"):
        check_name_lengths(output, args.n or 1)
        check_output_folder(path.parent, create=create_folder)
    fields = collect_fields(args, prompt=prompt, size=size, fmt=fmt, format_given=format_given, left_out=left_out)
    return ImageJob(prompt=prompt, fields=fields, images=images, mask=mask, output=output,
                    notes=(size_note,) if size_note else (),
                    warnings=tuple(warnings))


def parse_json(raw: Union[str, bytes, bytearray]) -> Any:
    """json.loads for what others wrote: nesting too deep for the parser is bad JSON, not a crash."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError("it is nested too deeply") from None


def reference(name: str) -> str:
    """Where the user can read a reference: the file beside the script, else its page in the repository."""
    local = Path(__file__).resolve().parent.parent / "references" / name
    return str(local) if local.is_file() else f"{REPOSITORY_URL}/blob/main/references/{name}"


def read_batch_file(path: Path) -> tuple[str, Any, list[Any]]:
    """The description, the global settings and the raw items of a JSON, JSONL or bare-list file."""
    check_text(str(path), "--batch")
    if path_kind(path) in ("folder", "other"):
        raise UsageError(f"--batch {path} is not a regular file", hint="give the path of a JSON or JSONL file")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as err:
        raise UsageError(f"--batch {path}: {err.strerror or err}", hint="check the path") from None
    except UnicodeDecodeError as err:
        raise UsageError(f"--batch {path} is not UTF-8 (byte {err.start})", hint="save it as UTF-8") from None
    if path.suffix.lower() == ".jsonl":      # one item per line, even when there is only one line
        document = parse_jsonl(text, path, ValueError("not JSONL"))
    else:
        try:
            document = parse_json(text)
        except ValueError as err:
            document = parse_jsonl(text, path, err)
    if isinstance(document, list):
        items, description, settings = document, "", {}
    elif isinstance(document, dict):
        unknown = sorted(set(document) - set(BATCH_TOP_KEYS))
        if unknown:
            raise UsageError(f"--batch {path}: unknown top-level key {unknown[0]!r}",
                             hint=f"the keys are {', '.join(BATCH_TOP_KEYS)} (see {reference('batch-template.md')})")
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
            items.append(parse_json(stripped))
        except ValueError as err:
            failure = err if items else json_error
            where = f"line {number}" if items else "it"
            raise UsageError(f"--batch {path}: {where} is not valid JSON or JSONL: {failure}",
                             hint=f"see {reference('batch-template.md')}") from None
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
        return str(base / expand_path(value))

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
    out_dir = expand_path(args.out_dir) if args.out_dir else None
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


def read_manifest(manifest: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The records of earlier runs, and a warning for a torn line (a crash mid-write)."""
    try:
        lines = manifest.read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return [], []
    except OSError as err:
        raise UsageError(f"the manifest {manifest} cannot be read: {err.strerror or err}") from None
    records, warnings = [], []
    for number, line in enumerate(lines, 1):
        try:
            record = parse_json(line)
        except ValueError:
            if line.strip():
                warnings.append(f"line {number} of {manifest} is incomplete (a crash while writing it?); ignored")
            continue
        if isinstance(record, dict):
            records.append(record)
    return records, warnings


def proven_outputs(record: Mapping[str, Any], folder: Path) -> tuple[Path, ...]:
    """The files a manifest record names, if every one still holds the bytes it recorded (also
    an image saved to the fallback folder, exit 7: it was paid for)."""
    paths, digests = record.get("paths") or [], record.get("sha256") or []
    if not paths or len(paths) != len(digests) or record.get("status") not in ("ok", "failed"):
        return ()
    found = tuple(Path(p) if Path(p).is_absolute() else folder / p for p in paths)
    try:
        if all(p.is_file() and file_digest(p) == d for p, d in zip(found, digests)):
            return found
    except OSError:
        pass
    return ()


def done_items(records: Sequence[Mapping[str, Any]], folder: Path,
               wanted: set[str]) -> dict[str, tuple[Path, ...]]:
    """Fingerprint -> files proven to be that item's result, for the wanted items only: the newest
    record that proves it wins, so older records of a proven item are never read back from disk."""
    done: dict[str, tuple[Path, ...]] = {}
    for record in reversed(records):
        fingerprint = record.get("fingerprint")
        if fingerprint not in wanted or fingerprint in done:
            continue
        proven = proven_outputs(record, folder)
        if proven and len(proven) == record.get("n", len(proven)):
            done[fingerprint] = proven
    return done


def shown_path(path: Path) -> Path:
    """As the user would write it: relative to the current folder when below it, else absolute."""
    return Path(relative_below(str(path), Path.cwd()))


def relative_below(path: str, folder: Path) -> str:
    absolute, base = os.path.abspath(path), os.path.abspath(folder)
    try:
        inside = os.path.commonpath([absolute, base]) == base
    except ValueError:              # another drive on Windows
        inside = False
    return os.path.relpath(absolute, base) if inside else absolute


def plan_batch(args: argparse.Namespace) -> BatchPlan:
    """Every item checked; an item is done only when the manifest proves it: a record with the same
    fingerprint (prompt and every parameter) whose files still hold the recorded bytes."""
    source = expand_path(args.batch)
    description, global_raw, raw_items = read_batch_file(source)
    jobs, problems = batch_jobs(args, source, global_raw, raw_items)
    if problems:
        raise UsageError(f"--batch {source}: {len(problems)} problem{'s' if len(problems) > 1 else ''}, "
                         "nothing was sent:\n  " + "\n  ".join(problems), problems=problems,
                         hint="fix the items named, then run the same command again")
    manifest = (expand_path(args.out_dir) if args.out_dir else source.parent) / f"{source.stem}.results.jsonl"
    check_output_folder(manifest.parent, create=False)
    check_manifest_link(manifest)
    records, warnings = read_manifest(manifest)
    fingerprints = [request_fingerprint(job, "") for _, job in jobs]
    done = {} if args.overwrite else done_items(records, manifest.parent, set(fingerprints))
    items = []
    for (number, job), fingerprint in zip(jobs, fingerprints):
        proven = tuple(shown_path(p) for p in done.get(fingerprint, ()))
        items.append(BatchItem(number, job, proven if len(proven) == job.n else (), fingerprint))
    plan = BatchPlan(source, description, tuple(items), manifest, args.jobs or DEFAULT_JOBS, tuple(warnings),
                     gallery=not args.no_gallery)
    if plan.gallery and not gallery_is_ours(plan.gallery_path):
        raise UsageError(f"{plan.gallery_path} exists and is not a gallery this tool wrote", field="gallery",
                         hint="move it, or pass --no-gallery")
    return plan


def check_manifest_link(manifest: Path) -> None:
    """A manifest that is a symlink out of its folder would have the batch append to a file elsewhere."""
    if not manifest.is_symlink():
        return
    try:
        folder, target = manifest.parent.resolve(), manifest.resolve()
    except (OSError, RuntimeError):     # a loop of links (RuntimeError before Python 3.13)
        raise UsageError(f"the manifest {manifest} is a symlink that leads nowhere (a loop)",
                         hint="remove the link, then run the same command again") from None
    if folder not in target.parents:
        raise UsageError(f"the manifest {manifest} is a symlink to {target}, outside {folder}",
                         hint="remove the link (or use --out-dir), then run the same command again")


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
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in url):
        raise UsageError(f"--base-url {url!r} holds spaces or control characters", hint=f"e.g. {DEFAULT_BASE_URL}")
    try:
        parts = urlsplit(url)
        parts.port   # noqa: B018 (urllib checks the port only when asked: a bad one is found here)
    except ValueError as err:
        raise UsageError(f"--base-url {url!r} is not a usable URL: {err}", hint=f"e.g. {DEFAULT_BASE_URL}") from None
    if parts.username is not None or parts.password is not None:
        raise UsageError("--base-url holds a user name or password; the key goes in APIYI_API_KEY or -k",
                         hint="give the URL without user:password@")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"--base-url {text!r} is not an http(s) URL", hint=f"e.g. {DEFAULT_BASE_URL}")
    if parts.query or parts.fragment:
        raise UsageError(f"--base-url {text!r} has a query or fragment", hint=f"e.g. {DEFAULT_BASE_URL}")
    try:
        parts.hostname.encode("idna")     # what the resolver will do with it; a label over 63 fails here
    except UnicodeError:
        raise UsageError(f"--base-url {short_name(text)!r}: the host name is not a valid domain name",
                         hint=f"e.g. {DEFAULT_BASE_URL}") from None
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
    if len(key) < MIN_KEY_CHARS or re.fullmatch(r"[a-z_]+", key):
        problem = f"has {len(key)} characters; a key has at least {MIN_KEY_CHARS}" if len(key) < MIN_KEY_CHARS \
            else "is a plain word, not a key"
        raise AuthError(f"the API key {problem}", hint=f"copy the whole key (sk-...) into {ENV_API_KEY}")
    return key, warnings


def check_proxy(base_url: str, *, allowed: bool) -> None:
    """A plain-http base URL through an HTTP proxy hands the proxy the key in clear text. (https goes
    through a proxy as a CONNECT tunnel, which the proxy cannot read; loopback never uses one.)"""
    import urllib.request
    from urllib.parse import urlsplit

    parts = urlsplit(base_url)
    host = parts.hostname or ""
    if parts.scheme != "http" or is_loopback_host(host) or allowed:
        return
    proxy = urllib.request.getproxies().get("http")
    if proxy and not urllib.request.proxy_bypass(host):
        raise UsageError(f"--base-url {base_url} is plain http and an HTTP proxy is set: the proxy would read the "
                         "API key", hint="use https, add the host to NO_PROXY, or pass --allow-http-proxy if you "
                                         "trust the proxy")


def build_config(args: argparse.Namespace, env: Mapping[str, str]) -> tuple[ApiConfig, list[str]]:
    base_url, url_warnings = check_base_url(args.base_url or env.get(ENV_BASE_URL) or DEFAULT_BASE_URL)
    check_proxy(base_url, allowed=args.allow_http_proxy)
    key, key_warnings = resolve_api_key(args.api_key, env, required=not args.dry_run)
    return ApiConfig(base_url, key, args.timeout, args.retries, price_multiplier(env)), url_warnings + key_warnings


def price_multiplier(env: Mapping[str, str]) -> float:
    text = env.get(ENV_PRICE_MULTIPLIER, "").strip()
    try:
        value = float(text) if text else 1.0
    except ValueError:
        value = math.nan
    if not PRICE_MULTIPLIER_RANGE[0] <= value <= PRICE_MULTIPLIER_RANGE[1]:
        raise UsageError(f"{ENV_PRICE_MULTIPLIER}={short_name(clean_text(text))!r} is not a price multiplier",
                         hint="a number such as 1.2 (0.01 to 100), or unset it")
    return value


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
                        f'filename="{quote_form_param(upload_name(upload))}"\r\n'
                        f"Content-Type: {upload.info.content_type}\r\n\r\n".encode("utf-8"))
        segments.extend((upload, b"\r\n"))
    segments.append(f"--{boundary}--\r\n".encode("ascii"))
    return MultipartBody(boundary, tuple(segments))


def upload_name(upload: InputFile) -> str:
    """The file's name with its real format's extension: some gateways (new-api) label a part's type
    by the name, not by its Content-Type (a JPEG named photo.png would go on as a PNG)."""
    name = upload.path.name
    if EXTENSION_FORMATS.get(upload.path.suffix.lower()) == upload.info.format:
        return name
    stem = upload.path.stem if upload.path.suffix.lower() in EXTENSION_FORMATS else name
    return stem + FORMAT_EXTENSIONS[upload.info.format]


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
    headers["Authorization"] = f"Bearer {KEY_MASK}" if config.api_key else f"Bearer <no key: set {ENV_API_KEY}>"
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


class Watchdog:
    """Ends one exchange at its deadline, whatever it is blocked on. A socket timeout bounds each read
    only, so a status line trickled a byte at a time would never trip it; shutting the socket down
    wakes a blocked send or read at once, on every platform."""

    def __init__(self) -> None:
        self.sockets: list[Any] = []
        self.expired = ""           # whose deadline passed: "upload" or "answer"
        self._timer: Optional[threading.Timer] = None

    def arm(self, seconds: float, stage: str) -> None:
        """Also the limit of each read or write from now on (called on the thread that does them)."""
        self.disarm()
        for sock in self.sockets:
            sock.settimeout(seconds)
        self._timer = threading.Timer(seconds, self._expire, (stage,))
        self._timer.daemon = True
        self._timer.start()

    def disarm(self) -> None:
        if self._timer:
            self._timer.cancel()

    def _expire(self, stage: str) -> None:
        import socket

        self.expired = stage
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)   # the plain call: TLS state stays for the reader


def upload_deadline_s(request: HttpRequest) -> float:
    body = request.body
    size = len(body) if isinstance(body, bytes) else body.length
    return UPLOAD_BASE_S + size / UPLOAD_MIN_BYTES_PER_S


def watched_handlers(watchdog: Watchdog, io_timeout_s: float) -> list[Any]:
    """HTTP(S) handlers whose connections hand their socket to the watchdog once connected, then wait
    up to io_timeout_s for each write (connecting has its own limit, CONNECT_TIMEOUT_S)."""
    import http.client
    import urllib.request

    def watched(base: type) -> type:
        class Watched(base):   # type: ignore[valid-type, misc]
            def connect(self) -> None:
                super().connect()
                self.sock.settimeout(io_timeout_s)
                watchdog.sockets.append(self.sock)
                if watchdog.expired:        # the deadline passed while connecting
                    raise TimeoutError("the deadline passed while connecting")
        return Watched

    class Http(urllib.request.HTTPHandler):
        def http_open(self, req: Any) -> Any:
            return self.do_open(watched(http.client.HTTPConnection), req)

    class Https(urllib.request.HTTPSHandler):
        def https_open(self, req: Any) -> Any:
            return self.do_open(watched(http.client.HTTPSConnection), req, context=self._context)

    return [Http(), Https()] if hasattr(http.client, "HTTPSConnection") else [Http()]


def open_url(request: HttpRequest, *, timeout_s: float, follow_redirects: bool, watchdog: Watchdog,
             on_stage: Callable[[str], None] = lambda stage: None) -> Any:
    """urllib with the environment's proxies; without follow_redirects a 3xx comes back as an
    HTTPError, because urllib would resend the Authorization header to the new host."""
    import urllib.request

    class RefuseRedirects(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any, **kwargs: Any) -> None:
            return None

    # While sending, the watchdog ends the upload at its deadline; the socket's own limit is a backstop.
    write_limit_s = 2 * upload_deadline_s(request) if request.body else timeout_s
    handlers: list[Any] = watched_handlers(watchdog, write_limit_s)
    handlers += [] if follow_redirects else [RefuseRedirects()]
    if is_loopback_host(urlsplit_host(request.url)):
        handlers.append(urllib.request.ProxyHandler({}))   # this machine: no proxy ever sees the key
    opener = urllib.request.build_opener(*handlers)
    data = body_pieces(request.body, on_stage) if request.body else None
    urllib_request = urllib.request.Request(request.url, data=data, headers=request.headers, method=request.method)
    return opener.open(urllib_request, timeout=CONNECT_TIMEOUT_S)


def body_pieces(body: Union[bytes, MultipartBody], on_stage: Callable[[str], None]) -> Iterator[bytes]:
    """The body as pieces; http.client asks for the next piece only after sending the last one, so
    "sent" comes once every byte is on its way: from then on the gateway may bill. Before each piece,
    "piece" lets a cancelled job stop while nothing is billed yet."""
    for piece in (body,) if isinstance(body, bytes) else body:
        on_stage("piece")
        yield piece
    on_stage("sent")


def read_body(response: Any, *, deadline: float, limit: int, what: str = "") -> bytes:
    """Read piece by piece (read1: one network read each) so the total --timeout holds even while
    data trickles in, never past limit: more is cut off, or, when `what` names it, refused."""
    read_piece = getattr(response, "read1", response.read)
    expected = announced_length(response, limit=limit, what=what)
    pieces, position = [], 0
    while position < limit:
        check_deadline(deadline)
        piece = read_piece(min(READ_CHUNK, limit - position))
        if not piece:
            check_deadline(deadline)    # an end that is the watchdog's, not the server's
            break
        pieces.append(piece)
        position += len(piece)
    if what and position >= limit and read_piece(1):
        raise too_large(what, limit)
    if expected is not None and position < min(expected, limit):
        raise ConnectionResetError("the connection closed before the whole answer arrived")
    return b"".join(pieces)


def announced_length(response: Any, *, limit: int, what: str) -> Optional[int]:
    """The Content-Length, if it is a plain number; one above the cap is refused before reading."""
    text = (response.headers.get("Content-Length") or "").strip()
    if not text:
        return None
    if not re.fullmatch(r"[0-9]{1,18}", text):
        raise ServiceError(f"the server sent a Content-Length that is not a number: {clean_text(text)[:40]!r}",
                           hint="the gateway is broken; retry later")
    if what and int(text) > limit:
        raise too_large(what, limit, announced=int(text))
    return int(text)


def too_large(what: str, limit: int, *, announced: int = 0) -> ServiceError:
    size = f"announces {announced:,} bytes" if announced else "goes on"
    return ServiceError(f"{what} {size}, past the {limit:,} bytes it can legitimately need; it was not kept",
                        kind="too_large", hint="the gateway is broken or hostile; the request was probably "
                                               "billed, and retrying buys a new image")


def copy_body(response: Any, out: IO[bytes], *, deadline: float, limit: int) -> int:
    """Write the body to out piece by piece as it arrives; the whole answer is never in memory,
    and never more of it than limit."""
    read_piece = getattr(response, "read1", response.read)
    expected = announced_length(response, limit=limit, what="the answer")
    written = 0
    while True:
        check_deadline(deadline)
        piece = read_piece(SPOOL_PIECE)
        if not piece:
            check_deadline(deadline)    # an end that is the watchdog's, not the server's
            break
        written += len(piece)
        if written > limit:
            raise too_large("the answer", limit)
        out.write(piece)
    if expected is not None and written < expected:
        raise ConnectionResetError("the connection closed before the whole answer arrived")
    out.flush()
    return written


def check_deadline(deadline: float) -> None:
    if time.monotonic() >= deadline:
        raise TimeoutError("the answer took longer than --timeout")


# Hears each preview (with how to write it) and each completed image (None), in stream order.
PreviewSink = Callable[[Optional[Callable[[IO[bytes]], tuple[int, str]]], Mapping[str, Any]], None]


def send_request(request: HttpRequest, *, timeout_s: float, follow_redirects: bool = False,
                 transfer: Transfer = Transfer()) -> HttpResponse:
    """One HTTP exchange. Connecting and sending have the upload deadline; from the last byte sent
    (or from the start, with no body) the whole answer has timeout_s, status line and headers
    included. Failures before the request is delivered raise ConnectError (retryable); after it,
    MaybeBilledError (the gateway may already be generating and billing)."""
    import http.client
    import urllib.error

    sent: list[float] = []      # when the last byte went out: --timeout counts from there
    started, watchdog = time.monotonic(), Watchdog()

    def on_stage(stage: str) -> None:
        if stage == "sent":
            sent.append(time.monotonic())
            watchdog.arm(timeout_s, "answer")
        elif watchdog.expired:
            raise TimeoutError("the upload took too long")
        transfer.on_stage(stage)

    def deadline() -> float:
        return (sent[0] if sent else started) + timeout_s

    watchdog.arm(*((upload_deadline_s(request), "upload") if request.body else (timeout_s, "answer")))
    try:
        with open_url(request, timeout_s=timeout_s, follow_redirects=follow_redirects, watchdog=watchdog,
                      on_stage=on_stage) as response:
            transfer.on_stage("receiving")
            return read_answer(response, transfer, deadline=deadline())
    except urllib.error.HTTPError as err:
        return HttpResponse(err.code, lowercase_headers(err.headers), read_error_body(err, deadline=deadline()))
    except (http.client.HTTPException, OSError, ValueError) as err:  # ValueError: a chunk size not a number
        raise exchange_failure(err, request, sent=bool(sent), expired=watchdog.expired, timeout_s=timeout_s) from None
    finally:
        watchdog.disarm()


def exchange_failure(err: Exception, request: HttpRequest, *, sent: bool, expired: str,
                     timeout_s: float) -> ToolError:
    """What a failed exchange means for the bill: nothing was billed before the last byte went out."""
    import socket
    import urllib.error

    host = host_of(request.url)
    if expired == "upload" and not sent:
        return ServiceError(f"connecting to {host} and sending the request took longer than "
                            f"{upload_deadline_s(request):.0f} s; nothing was billed", kind="upload_timeout",
                            hint="check the network, or send smaller input images")
    if expired == "answer" or isinstance(err, (socket.timeout, TimeoutError)):
        return MaybeBilledError(f"no complete answer from {host} within {timeout_s:g} s",
                                hint=billed_hint(timeout_s))
    reason = reason_text(err.reason if isinstance(err, urllib.error.URLError) else err)
    if not sent and (request.body or isinstance(err, urllib.error.URLError)):
        return ConnectError(f"could not reach {host}: {reason}", hint=connect_hint(reason))
    if isinstance(err, ValueError):
        return MaybeBilledError(f"the answer from {host} was malformed: {body_excerpt(str(err))}",
                                hint=billed_hint())
    return MaybeBilledError(f"the connection to {host} dropped after the request was sent: {reason}",
                            hint=billed_hint())


class EventSpanParser:
    """Server-sent events from a spooled stream: fed consecutive pieces with their file offsets,
    it returns each event's name and the file span of each data line's value. Only a line's first
    HEAD bytes are kept (the field name, an event name), so a 33 MB data line costs nothing.
    CR, LF or CRLF line ends, comments, multi-line data; a blank line ends an event."""

    HEAD = 256
    LINE_END = re.compile(rb"[\r\n]")

    def __init__(self) -> None:
        self.position: Optional[int] = None  # file offset of the next piece
        self.line_start = 0
        self.head = bytearray()
        self.after_cr = False  # a LF first in the next piece is the end of a CRLF, not a line
        self.name = ""
        self.spans: list[tuple[int, int]] = []

    def feed(self, piece: bytes, offset: int) -> list[tuple[str, list[tuple[int, int]]]]:
        if self.position is None:
            self.position = self.line_start = offset
        if offset != self.position:
            raise ValueError(f"pieces must be consecutive: expected offset {self.position}, got {offset}")
        self.position += len(piece)
        index, events = 0, []
        if self.after_cr and piece:
            self.after_cr = False
            index = 1 if piece[0] == 0x0A else 0
            self.line_start = offset + index
        while True:
            found = self.LINE_END.search(piece, index)
            stop = found.start() if found else len(piece)
            self.head += piece[index:min(stop, index + self.HEAD - len(self.head))]
            if not found:
                return events
            event = self.take_line(offset + stop)
            events += [event] if event else []
            index = stop + (2 if piece[stop:stop + 2] == b"\r\n" else 1)
            self.after_cr = piece[stop:] == b"\r"  # only a CR that ends the piece
            self.line_start = offset + index

    def finish(self) -> list[tuple[str, list[tuple[int, int]]]]:
        """At the end of the stream, a last event without its blank line still counts."""
        if self.position is None:
            return []
        if self.line_start < self.position:
            self.take_line(self.position)
            self.line_start = self.position
        event = self.take_line(self.position)
        return [event] if event else []

    def take_line(self, end: int) -> Optional[tuple[str, list[tuple[int, int]]]]:
        head, length = bytes(self.head), end - self.line_start
        self.head.clear()
        if not length:
            event = (self.name or "message", self.spans) if self.spans else None
            self.name, self.spans = "", []
            return event
        colon = head.find(b":")
        if colon == 0 or (colon < 0 and length > len(head)):
            return None  # a comment, or a field name too long to be one we use
        field = head[:colon] if colon > 0 else head
        value = colon + 1 + (head[colon + 1:colon + 2] == b" ") if colon > 0 else length
        if field == b"event":
            self.name = head[value:].decode("utf-8", "replace").strip()
        elif field == b"data":
            self.spans.append((self.line_start + value, end))
        return None


def read_span(handle: IO[bytes], span: tuple[int, int]) -> bytes:
    """The bytes of a small span, such as a preview event's JSON. A final image's event goes
    through scan_b64_values instead, so its base64 is never read whole."""
    begin, end = span
    handle.seek(begin)
    data = handle.read(end - begin)
    if len(data) != end - begin:
        raise ValueError(f"the file ends inside the span {begin}-{end}")
    return data


def copy_event_stream(response: Any, spool: IO[bytes], on_preview: PreviewSink, *, deadline: float,
                      limit: int) -> None:
    """The stream goes to the spool as it arrives; each preview is decoded from the spool once its
    event ends, and an error event raises. The final image stays in the spool for the save. Neither
    the stream nor one line of it may pass what an image can need."""
    parser, read_piece = EventSpanParser(), getattr(response, "read1", response.read)
    kinds: list[str] = []
    while "done" not in kinds:
        check_deadline(deadline)
        piece = read_piece(SPOOL_PIECE)
        spool.seek(0, os.SEEK_END)
        offset = spool.tell()
        if offset + len(piece) > limit:
            raise too_large("the stream", limit)
        if offset + len(piece) - parser.line_start > MAX_IMAGE_BASE64 + ANSWER_JSON_ROOM:
            raise too_large("one event of the stream", MAX_IMAGE_BASE64 + ANSWER_JSON_ROOM)
        spool.write(piece)
        kinds += [pass_on_event(spool, name, spans, on_preview)
                  for name, spans in (parser.feed(piece, offset) if piece else parser.finish())]
        if not piece:
            check_deadline(deadline)    # an end that is the watchdog's, not the server's
            break
    spool.flush()
    completed = "completed" in kinds
    if not completed and "done" in kinds:
        raise silent_refusal()
    if not completed:
        raise ConnectionResetError("the stream ended before the final image")


def pass_on_event(spool: IO[bytes], name: str, spans: Sequence[tuple[int, int]], on_preview: PreviewSink) -> str:
    """A preview is written as its event ends; a completed image is announced. Returns the event's kind."""
    kind, event, value = spooled_event(spool, name, spans)
    if kind == "partial" and value is not None:
        on_preview(functools.partial(decode_spooled_image, spool, value), event)
    elif kind == "completed":
        on_preview(None, event)
    return kind


def spooled_event(spool: IO[bytes], name: str, spans: Sequence[tuple[int, int]]
                  ) -> tuple[str, dict[str, Any], Optional[tuple[int, int]]]:
    """An event of a spooled stream: its kind, its JSON without base64, and the span of its image.
    A base64 value cannot hold a line end, so each data line is scanned on its own."""
    skeletons, values = [], []
    for span in spans:
        skeleton, found = scan_b64_values(spool, *span)
        skeletons.append(skeleton)
        values += found
    kind, event = decode_stream_event(name, b"\n".join(skeletons))
    return kind, event, values[0] if values else None


def read_spooled_stream(spool: IO[bytes]) -> tuple[dict[str, Any], tuple[ImageSource, ...]]:
    """The completed event(s) of a spooled stream, as a JSON answer's metadata and image sources."""
    parser, completed, size = EventSpanParser(), [], os.fstat(spool.fileno()).st_size
    events = []
    for offset in range(0, size, SPOOL_PIECE):
        events += parser.feed(read_span(spool, (offset, min(size, offset + SPOOL_PIECE))), offset)
    for name, spans in events + parser.finish():
        kind, event, value = spooled_event(spool, name, spans)
        if kind == "done":
            break
        if kind == "completed":
            completed.append((event, value))
    if not completed:
        raise ServiceError("the stream ended before the final image", hint=PAID_ANSWER_HINT)
    meta = {k: v for k, v in completed[-1][0].items() if k not in ("type", "b64_json")}
    meta["data"] = [event for event, _ in completed]
    if len(completed) > 1:      # n > 1: each image's event carries the usage of its own generation
        meta["usage"] = total_usage([event for event, _ in completed])
    return meta, tuple(value if value is not None else event_url(event) for event, value in completed)


def event_url(event: Mapping[str, Any]) -> str:
    if isinstance(event.get("url"), str) and event["url"]:
        return event["url"]
    raise ServiceError("an image in the answer is empty (no b64_json or url)", hint=PAID_ANSWER_HINT)


def decode_stream_event(name: str, skeleton: bytes) -> tuple[str, dict[str, Any]]:
    """('partial' | 'completed' | 'done' | 'other', the event's JSON with its base64 cut out)."""
    if skeleton.strip() == b"[DONE]":
        return "done", {}
    try:
        event = parse_json(skeleton)
    except ValueError:
        raise ServiceError(f"the stream sent an event that is not JSON: {body_excerpt(skeleton)}",
                           hint="retry without --stream") from None
    if not isinstance(event, dict):
        return "other", {}
    if event.get("error") or name == "error" or event.get("type") == "error":
        raise stream_error(event)
    kind = str(event.get("type") or name)
    if kind.endswith(".partial_image"):
        return "partial", event
    return ("completed" if kind.endswith(".completed") else "other"), event


def read_answer(response: Any, transfer: Transfer, *, deadline: float) -> HttpResponse:
    """A 2xx answer goes to the spool as it arrives: an event stream (read event by event for its
    previews) or a JSON body. Without a spool (an image download) it is read into memory."""
    headers = lowercase_headers(response.headers)
    if transfer.spool is None:
        body = read_body(response, deadline=deadline, limit=transfer.limit, what="the image download")
        return HttpResponse(response.status, headers, body)
    transfer.spool.seek(0)
    transfer.spool.truncate()
    if transfer.on_preview and headers.get("content-type", "").startswith("text/event-stream"):
        copy_event_stream(response, transfer.spool, transfer.on_preview, deadline=deadline, limit=transfer.limit)
        return HttpResponse(response.status, headers, b"", streamed=True)
    copy_body(response, transfer.spool, deadline=deadline, limit=transfer.limit)
    return HttpResponse(response.status, headers, b"")    # the body is in the spool


def stream_error(event: Mapping[str, Any]) -> ToolError:
    """An error event: refused (exit 4) when the request itself was at fault, else the service (5)."""
    error = event.get("error") if isinstance(event.get("error"), dict) else event
    server_text = str(error.get("message") or event.get("error") or "the stream reported an error")
    kind, code = str(error.get("type") or ""), str(error.get("code") or "")
    label = code or (kind if kind != "error" else "")
    message = f"the stream reported an error: {body_excerpt(server_text)}" + (f" ({label})" if label else "")
    if is_safety_refusal(code, server_text):
        return safety_refusal(message, server_text, code=code)
    refused = kind in ("invalid_request_error", "image_generation_user_error")
    cls = RefusedError if refused else ServiceError
    return cls(message, code=code or None, hint="change the prompt or parameters" if refused else "retry later")


def connect_hint(reason: str) -> str:
    if "CERTIFICATE_VERIFY_FAILED" in reason:
        return ("Python cannot verify HTTPS certificates here: on macOS run 'Install Certificates.command' "
                "from the Python folder, or point SSL_CERT_FILE at a CA bundle")
    return "check the network, the proxy settings and --base-url"


def read_error_body(error: Any, *, deadline: float) -> bytes:
    """The status decides what happens next; an error body that is cut off only loses its message."""
    import http.client

    try:
        return read_body(error, deadline=deadline, limit=ERROR_BODY_LIMIT) if error.fp else b""
    except (OSError, http.client.HTTPException, ServiceError):
        return b""


def billed_hint(timeout_s: Optional[float] = None) -> str:
    """After a possible charge, never an invitation to retry blindly; a longer --timeout only helps
    when the time ran out."""
    longer = f", then retry with a longer --timeout (now {timeout_s:g} s)" if timeout_s else ""
    return f"the request may already have been billed; check your APIYI usage before retrying{longer}"


def lowercase_headers(headers: Any) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()} if headers else {}


def urlsplit_host(url: str) -> str:
    from urllib.parse import urlsplit

    return urlsplit(url).hostname or ""


def host_of(url: str) -> str:
    from urllib.parse import urlsplit

    return urlsplit(url).netloc


def reason_text(reason: object) -> str:
    """What went wrong in words: http.client's IncompleteRead(0 bytes read) says less than this."""
    import http.client

    if isinstance(reason, http.client.IncompleteRead):
        return "the connection closed before the whole answer arrived"
    text = getattr(reason, "strerror", None) or str(reason) or type(reason).__name__
    return str(text)


def pause(seconds: float) -> None:
    time.sleep(max(0.0, seconds))     # a wait computed a moment ago may have run out since


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


def asked_wait(response: HttpResponse) -> Optional[float]:
    milliseconds = (response.headers.get("retry-after-ms") or "").strip()
    if re.fullmatch(r"\d{1,9}(\.\d+)?", milliseconds):
        return float(milliseconds) / 1000
    wait = parse_retry_after(response.headers.get("retry-after"))
    if wait is not None:
        return wait
    text = str(parse_error_body(response.body).get("message") or "")
    for pattern in WAIT_IN_WORDS:
        found = pattern.search(text)
        if found:
            return float(found.group(1)) / (1000 if found.group(2).lower().startswith(("ms", "milli", "毫")) else 1)
    return None


def random_between(low: float, high: float) -> float:
    import random

    return random.uniform(low, high)


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
    error = parse_error_body(response.body)
    code = str(error.get("code") or "")
    # The reverse channels report a safety block as a 500: the same request is refused again.
    return not (is_account_problem(response.status, code) or is_safety_refusal(code, str(error.get("message") or "")))


def stream_refused(response: HttpResponse) -> bool:
    """A gateway that cannot relay an image stream: its error names streaming, or it is one known to fail
    streams with a 500 (LiteLLM). Retrying makes the upstream generate, and maybe bill, again."""
    if response.status < 400 or response.status in RETRY_STATUSES or is_account_problem(response.status, ""):
        return False
    text = str(parse_error_body(response.body).get("message") or bytes(response.body[:4096]).decode("utf-8", "replace"))
    return bool(re.search(r"\bstream", text, re.I)) or (response.status >= 500 and
                                                        any(h in response.headers for h in STREAM_BREAKING_GATEWAYS))


def retry_delay(response: HttpResponse, attempt: int) -> float:
    """The wait the gateway asks for (retry-after-ms, Retry-After, or in its message's words), else a
    backoff: from 2 s for a 429, from 0.5 s for anything else."""
    wait = asked_wait(response)
    if wait is None:
        return backoff_delay(attempt) if response.status != 429 else \
            min(RETRY_AFTER_MAX_S, RATE_LIMIT_INITIAL_S * 2 ** attempt) * random_between(1.0, 1.25)
    if wait > RETRY_AFTER_MAX_S:
        when = time.strftime("%H:%M:%S", time.localtime(time.time() + wait)) if wait < 1e9 else "a long while"
        raise ServiceError(f"HTTP {response.status}: the server asks to wait {wait:.0f} s before retrying",
                           status=response.status, hint=f"try again after {when}")
    return wait


class Gate:
    """Admits requests: at most `limit` in flight, none before `resume_at`. The workers of a batch
    share one, and it learns the gateway's concurrency quota from the 429s: a quota refuses only the
    requests above it, so those still in flight when one is refused estimate it (the estimate only
    falls to that, never compounds as halving would). A wave of 429s that leaves nothing in flight and
    saw no success is a pause, not a quota: the limit goes back to where the wave found it. Successes
    raise it again: doubling back to the quota seen (or -j), a step above only every fourth round."""

    def __init__(self, limit: int) -> None:
        self.ceiling = self.limit = limit
        self.active = 0
        self.resume_at = 0.0
        self.quota: Optional[int] = None    # the gateway's limit, as the last wave of 429s showed it
        self.wave_from: Optional[int] = None    # the limit when the current wave of 429s began
        self.successes = 0                  # since the limit last changed
        self.changed = threading.Condition()

    def enter(self) -> None:
        """Waits for the pause (again, if it moved while waiting), then for a slot."""
        waited_for = 0.0
        while True:
            with self.changed:
                target = self.resume_at
                if target <= max(time.monotonic(), waited_for):
                    while self.active >= self.limit:
                        self.changed.wait()
                    if self.resume_at <= target:
                        self.active += 1
                        return
                    continue
            pause(max(0.0, target - time.monotonic()))    # the time may have come since the check
            waited_for = target

    def leave(self) -> None:
        with self.changed:
            self.active -= 1
            self.changed.notify_all()

    def hold_off(self, delay: float, *, throttled: bool) -> Optional[int]:
        """Called by a request still counted in flight, before it leaves (so no worker it wakes can
        slip in before the pause): nobody sends for `delay` s, and a 429 brings the limit down to the
        other requests in flight. Returns the new limit when it changed."""
        with self.changed:
            self.resume_at = max(self.resume_at, time.monotonic() + delay)
            self.changed.notify_all()
            if not throttled:
                return None
            before, others = self.limit, self.active - 1
            self.wave_from = self.limit if self.wave_from is None else self.wave_from
            self.limit = min(self.limit, others) if others > 0 else self.wave_from
            self.successes = 0
            return self.limit if self.limit != before else None

    def succeeded(self) -> Optional[int]:
        """Ends a wave (its limit is the quota), and after a round of successes (as many as the limit)
        raises the limit. Returns the new limit when it changed."""
        with self.changed:
            if self.wave_from is not None:
                self.quota, self.wave_from = self.limit, None
            self.successes += 1
            above = self.quota is not None and self.limit >= self.quota
            if self.limit >= self.ceiling or self.successes < self.limit * (4 if above else 1):
                return None
            self.limit = min(self.ceiling, self.limit + 1 if above else min(self.limit * 2, self.quota or self.ceiling))
            self.successes = 0
            self.changed.notify_all()
            return self.limit


def send_with_retries(request: HttpRequest, config: ApiConfig, *, notify: Callable[..., None],
                      gate: Optional[Gate] = None, transfer: Transfer = Transfer()) -> HttpResponse:
    """Retry what cannot have been billed: connection failures, 408/409/429 and 5xx. A 429 is waited
    out without spending --retries (nothing was billed), up to MAX_THROTTLED_S of its own waiting."""
    gate = gate or Gate(1)
    spent = {"retries": 0, "waits": 0, "waited_s": 0.0}
    while True:
        gate.enter()
        try:
            try:
                response = send_request(request, timeout_s=config.timeout_s, transfer=transfer)
            except ConnectError as err:
                if spent["retries"] >= config.retries:
                    raise
                delay, reason, status = backoff_delay(int(spent["retries"])), err.message, 0
            else:
                if response.status < 300:
                    announce_limit(gate.succeeded(), notify)
                if not retry_again(response, config, spent, streamed=transfer.on_preview is not None):
                    return response
                status, reason = response.status, f"HTTP {response.status}"
                delay = retry_delay(response, int(spent["waits" if status == 429 else "retries"]))
                delay = max(delay, RATE_LIMIT_MIN_S) if status == 429 else delay    # "0" would flood the gateway
            limit = gate.hold_off(delay, throttled=status == 429)     # while still in flight: see hold_off
        finally:
            gate.leave()
        spent["waits" if status == 429 else "retries"] += 1
        spent["waited_s"] += delay if status == 429 else 0.0
        notify(f"429: pausing all workers {delay:.1f} s" + (f"; at most {limit} in flight now" if limit else "")
               if status == 429 else f"{reason}; retry {spent['retries']} of {config.retries} in {delay:.1f} s",
               **({"in_flight": limit} if limit else {}))


def retry_again(response: HttpResponse, config: ApiConfig, spent: Mapping[str, float], *, streamed: bool) -> bool:
    """Whether to send again; a 429 past the time a request may wait them out is an error naming it."""
    if not should_retry(response) or (streamed and stream_refused(response)):
        return False
    if response.status != 429:
        return spent["retries"] < config.retries
    if spent["waited_s"] >= MAX_THROTTLED_S:
        raise ServiceError(f"HTTP 429 for {MAX_THROTTLED_S / 60:.0f} minutes: the gateway still refuses (its "
                           "concurrency quota, or a pause)", status=429, kind="rate_limited",
                           hint="wait a few minutes and run the same command again (only what is missing is sent)")
    return True


def announce_limit(limit: Optional[int], notify: Callable[..., None]) -> None:
    if limit:
        notify(f"back to {limit} in flight", in_flight=limit)


# --- Response decoding and file output ---


def parse_error_body(body: Union[bytes, bytearray]) -> dict[str, Any]:
    try:
        payload = parse_json(bytes(body).decode("utf-8", "replace"))
    except ValueError:
        return {}
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict):
        return error
    return {"message": error} if isinstance(error, str) else {}


def clean_text(text: str) -> str:
    """Server text as it may be shown: no escape sequences, no control characters."""
    return CONTROL_TEXT.sub(" ", text)


def body_excerpt(body: Union[bytes, bytearray, str]) -> str:
    """Server text shortened for one line: tags and control characters out, base64 never shown."""
    raw = body[:4096] if isinstance(body, str) else bytes(body[:4096]).decode("utf-8", "replace")
    text = BASE64_RUN.sub("[base64]", re.sub(r"<[^>]*>", " ", clean_text(raw)))
    text = re.sub(r"\s+", " ", text).strip()
    return text[:ERROR_EXCERPT_CHARS] + ("..." if len(text) > ERROR_EXCERPT_CHARS else "")


def short_body(body: Union[bytes, bytearray]) -> str:
    """The whole error body when it is short and holds no image data; else nothing (the excerpt stays)."""
    if len(body) > ERROR_BODY_IN_JSON:
        return ""
    text = clean_text(bytes(body).decode("utf-8", "replace")).strip()
    return "" if BASE64_RUN.search(text) else text


def request_id_of(headers: Mapping[str, str]) -> str:
    return headers.get(request_id_header(headers), "")


def request_id_header(headers: Mapping[str, str]) -> str:
    """Which header the gateway put its request id in (the first of REQUEST_ID_HEADERS found)."""
    return next((h for h in REQUEST_ID_HEADERS if headers.get(h)), "")


def status_hint(status: int, code: str, config: ApiConfig) -> str:
    if is_account_problem(status, code):
        return f"check {ENV_API_KEY} (or -k) and the balance of the account at https://api.apiyi.com"
    if status == 429:
        return "the model's concurrency quota is full: wait a minute and run it again (or lower -j)"
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
        text = body_excerpt(str(error.get("message") or "")) or body_excerpt(response.body) or "(empty body)"
    message = f"HTTP {status}: {text}" + (f" ({', '.join(details)})" if details else "")
    if not 300 <= status < 400 and error.get("param") != "moderation" and \
            is_safety_refusal(code, str(error.get("message") or "")):
        return safety_refusal(message, str(error.get("message") or ""), status=status, code=code,
                              body=short_body(response.body))
    cls: type[ToolError] = ServiceError
    if is_account_problem(status, code):
        cls = AuthError
    elif status == 524:
        cls = MaybeBilledError
    elif 300 <= status < 500 and not is_retryable(status):
        cls = RefusedError
    return cls(message, status=status, code=code or None, hint=status_hint(status, code, config),
               body=short_body(response.body), kind="rate_limited" if status == 429 and cls is ServiceError else "")


def stream_refusal(response: HttpResponse) -> ToolError:
    return MaybeBilledError(f"HTTP {response.status}: the gateway did not accept a streamed request "
                            f"({body_excerpt(str(parse_error_body(response.body).get('message') or response.body))})",
                            status=response.status, body=short_body(response.body),
                            hint="run it again without --stream; the image may have been generated (and billed) "
                                 "upstream, so check your usage first")


def is_safety_refusal(code: str, message: str) -> bool:
    return code in SAFETY_CODES or bool(SAFETY_WORDS.search(message))


def safety_refusal(message: str, server_text: str, *, status: Optional[int] = None, code: str = "",
                   body: str = "") -> RefusedError:
    """What the block names, when it does: the categories (safety_violations=[...]) and whether the
    prompt or an input image set it off."""
    categories = re.search(r"safety_violations=\[([^\]]*)\]", server_text)
    source = next((who for who, words in (("image", r"\b(input|uploaded|reference) images?\b"),
                                          ("prompt", r"\bprompt\b")) if re.search(words, server_text, re.I)), "")
    details: dict[str, Any] = {"categories": [c.strip(" '\"") for c in categories.group(1).split(",") if c.strip()]
                               } if categories else {}
    details.update({"source": source} if source else {})
    return RefusedError(message, status=status, code=code or None, kind="safety_refusal", hint=SAFETY_HINT,
                        body=body, details=details)


def load_json_object(raw: Union[bytes, bytearray]) -> dict[str, Any]:
    """A stray byte that is not UTF-8 (in a revised prompt, say) must not cost the images beside it."""
    try:
        payload = parse_json(bytes(raw).decode("utf-8", "replace"))
    except ValueError:
        raise ServiceError(f"the answer is not JSON: {body_excerpt(raw)}", hint=PAID_ANSWER_HINT) from None
    if not isinstance(payload, dict):
        raise ServiceError("the answer is not a JSON object", hint=PAID_ANSWER_HINT)
    return payload


def scan_b64_values(handle: IO[bytes], start: int, end: int, *,
                    piece: int = SPOOL_PIECE) -> tuple[bytes, list[tuple[int, int]]]:
    """The JSON in [start, end) with each b64_json value emptied to "" (it parses small: usage,
    revised_prompt, url items), and the file span of each value's characters. Values are skipped,
    never copied: memory is the skeleton and one piece."""
    skeleton, spans = bytearray(), []
    resume = 0  # skeleton index from which a key may still begin
    opened: Optional[int] = None  # file position of the open value's first character
    escaped = False  # the open value's text so far ends with a backslash
    handle.seek(start)
    position = start
    while position < end:
        chunk = handle.read(min(piece, end - position))
        if not chunk:
            raise ValueError(f"the file ends at {position}, before {end}")
        index = 0
        while index < len(chunk):
            if opened is None:
                key_end, resume = append_and_find_key(skeleton, memoryview(chunk)[index:], resume)
                if key_end < 0:
                    break
                index = len(chunk) - (len(skeleton) - key_end)
                del skeleton[key_end:]
                opened, escaped = position + index, False
            else:
                close, escaped = closing_quote(chunk, index, escaped)
                if close < 0:
                    break
                spans.append((opened, position + close))
                opened, index, resume = None, close, len(skeleton) + 1  # the quote ends, not starts
        position += len(chunk)
    if opened is not None:
        raise ValueError(f"the b64_json value at {opened} is not terminated")
    return bytes(skeleton), spans


def append_and_find_key(skeleton: bytearray, text: memoryview, resume: int) -> tuple[int, int]:
    """Append text found outside values, then look for a key from resume, which may lie in
    earlier pieces (a key split between reads). Returns (skeleton index after the key's opening
    quote, or -1; the next resume)."""
    skeleton += text
    found = B64_KEY.search(skeleton, resume)
    if found:
        return found.end(), found.end()
    partial = B64_KEY_AT_END.search(skeleton, resume)
    return -1, partial.start() if partial else len(skeleton)


def closing_quote(chunk: bytes, index: int, escaped: bool) -> tuple[int, bool]:
    """Index of the quote that ends a JSON string (-1 when not in chunk), and whether chunk ends
    on an unpaired backslash, which escapes the next chunk's first character. A quote is escaped
    when an odd run of backslashes precedes it: a value full of '\\/' is still read at memchr speed."""
    index += escaped
    while True:
        quote = chunk.find(b'"', index)
        run = backslash_run(chunk, index, len(chunk) if quote < 0 else quote)
        if quote < 0:
            return -1, run % 2 == 1
        if run % 2 == 0:
            return quote, False
        index = quote + 1


def backslash_run(chunk: bytes, start: int, end: int) -> int:
    """How many backslashes end chunk[start:end]."""
    run = 0
    while end - run > start and chunk[end - run - 1] == 0x5C:
        run += 1
    return run


def decode_b64_span(handle: IO[bytes], span: tuple[int, int], out: IO[bytes], *,
                    piece: int = SPOOL_PIECE) -> tuple[int, str]:
    """Decode the base64 characters of span into out, piece by piece, to the very bytes that
    base64.b64decode gives for the whole unescaped value. Returns (bytes written, their sha256).
    On ValueError, out may hold part of the image: write it to a temporary file."""
    begin, end = skip_data_url(handle, span)
    import hashlib

    digest, written = hashlib.sha256(), 0
    pending, backslash, padded = b"", b"", False
    handle.seek(begin)
    while begin < end:
        raw = handle.read(min(piece, end - begin))
        if not raw:
            raise ValueError("the file ends inside the base64 value")
        begin += len(raw)
        text, backslash = unescape_base64(backslash + raw)
        if padded:
            continue  # b64decode ignores what follows the padding; the escapes are still checked
        decoded, pending, padded = decode_groups(pending + text.translate(None, NOT_BASE64))
        out.write(decoded)
        digest.update(decoded)
        written += len(decoded)
    if backslash:
        raise ValueError("the base64 value ends inside an escape")
    if pending and not padded:
        raise ValueError("not valid base64: incorrect padding (the value may be cut short)")
    if not written:
        raise ValueError("the base64 value is empty")
    return written, digest.hexdigest()


def skip_data_url(handle: IO[bytes], span: tuple[int, int]) -> tuple[int, int]:
    """Some gateways send a data:image/...;base64, URL: the value starts after its comma."""
    begin, end = span
    handle.seek(begin)
    head = handle.read(min(DATA_URL_LIMIT, end - begin))
    if not head.startswith(b"data:"):
        return begin, end
    comma = head.find(b",")
    if comma < 0:
        raise ValueError("the value is a data: URL without base64 after it")
    return begin + comma + 1, end


def unescape_base64(raw: bytes) -> tuple[bytes, bytes]:
    """Gateways may JSON-escape '/' as '\\/' or wrap lines with '\\n', '\\r\\n', '\\t' (dropped);
    anything else would not be base64. Returns the text and a backslash that ends raw, whose
    escaped character comes with the next piece. bytes.replace, not re.sub: a sub builds a
    fragment per escape, megabytes for a value with every '/' escaped."""
    if b"\\" not in raw:
        return raw, b""
    tail = b"\\" if raw.endswith(b"\\") else b""  # "\\\\" at the end is refused below anyway
    text = raw[:len(raw) - len(tail)]
    if BAD_ESCAPE.search(text):  # now every backslash starts one of the four escapes
        raise ValueError("the base64 value holds a JSON escape other than \\/, \\n, \\r, \\t")
    for escape, meaning in ESCAPES:
        text = text.replace(escape, meaning)
    return text, tail


def decode_groups(text: bytes) -> tuple[bytes, bytes, bool]:
    """Decode the whole 4-character groups of filtered base64 as binascii.a2b_base64 decodes
    them in one call: a '=' ends the data in a group's 4th place, or in its 3rd when another
    '=' follows; elsewhere it is skipped. Returns (bytes, the characters to carry, ended)."""
    if b"=" not in text:  # every piece but the last, in practice
        whole = len(text) - len(text) % 4
        return binascii.a2b_base64(memoryview(text)[:whole]), text[whole:], False
    parts = text.split(b"=")
    count = 0
    for index, part in enumerate(parts[:-1]):
        count += len(part)
        place, next_is_pad = count % 4, not parts[index + 1]
        if place == 3 or (place == 2 and next_is_pad and index + 2 < len(parts)):
            return binascii.a2b_base64(b"".join(parts[:index + 1]) + b"=" * (4 - place)), b"", True
        if place == 2 and next_is_pad:  # the '=' ends the piece: the next one tells if it pads
            clean = b"".join(parts[:index + 1])
            return binascii.a2b_base64(clean[:-2]), clean[-2:] + b"=", False
    clean = b"".join(parts)
    whole = len(clean) - len(clean) % 4
    return binascii.a2b_base64(clean[:whole]), clean[whole:], False


def download_image(url: str, *, timeout_s: float) -> bytes:
    """A url-only answer item is fetched without the key (it may point anywhere)."""
    if not url.lower().startswith(("http://", "https://")):
        raise ServiceError(f"the answer's image URL is not http(s): {url[:200]}")
    request = HttpRequest("GET", url, {"User-Agent": user_agent()}, b"")
    response = send_request(request, timeout_s=timeout_s, follow_redirects=True)
    if response.status != 200:
        raise ServiceError(f"downloading the image failed with HTTP {response.status}: {url}",
                           hint="open the URL in a browser within 60 minutes to save it")
    return bytes(response.body)


ImageSource = Union[tuple[int, int], str]           # a span of base64 in the spool, or a URL
ImageFill = Callable[[IO[bytes]], tuple[int, str]]  # writes one image, returns its size and sha256


def read_spooled_answer(spool: Path, *, streamed: bool) -> tuple[dict[str, Any], tuple[ImageSource, ...]]:
    """The answer's JSON without its base64 (small), and where each image is."""
    with open(spool, "rb") as handle:
        try:
            if streamed:
                return read_spooled_stream(handle)
            skeleton, spans = scan_b64_values(handle, 0, os.fstat(handle.fileno()).st_size)
        except ValueError:
            raise ServiceError("the answer ends inside an image (it was cut off)", hint=PAID_ANSWER_HINT) from None
    meta = load_json_object(skeleton)
    items = meta.get("data")
    if not isinstance(items, list) or not items:
        error = meta.get("error")
        if error:
            message = str((error.get("message") if isinstance(error, dict) else error) or "")
            text = f"the answer holds an error instead of images: {body_excerpt(message)}"
            if is_safety_refusal(str(error.get("code") or "") if isinstance(error, dict) else "", message):
                raise safety_refusal(text, message)
            raise ServiceError(text, hint=PAID_ANSWER_HINT)
        raise silent_refusal()
    if not any(isinstance(item, dict) and (item.get("b64_json") == "" or item.get("url")) for item in items):
        raise silent_refusal()
    found = iter(spans)
    return meta, tuple(spooled_source(item, found) for item in items)


def silent_refusal() -> ServiceError:
    """A 200 answer (or a stream that ended cleanly) without any image: declined, and probably billed."""
    return ServiceError("the answer holds no image: the service declined without saying why (a silent refusal)",
                        kind="silent_refusal",
                        hint="it was probably billed; rephrase the prompt rather than retry it as it is")


def spooled_source(item: Any, spans: Iterator[tuple[int, int]]) -> ImageSource:
    if not isinstance(item, dict):
        raise ServiceError("the answer's data holds something other than images")
    if item.get("b64_json") == "":
        span = next(spans, None)
        if span is not None:
            return span
    if isinstance(item.get("url"), str) and item["url"]:
        return item["url"]
    raise ServiceError("an image in the answer is empty (no b64_json or url)", hint=PAID_ANSWER_HINT)


def image_fill(source: ImageSource, spool: IO[bytes], config: ApiConfig) -> ImageFill:
    """How to write one image: decode its span of the spool, or download it once and write the bytes."""
    if isinstance(source, str):
        data = download_image(source, timeout_s=config.timeout_s)
        return lambda out: write_and_digest(out, data)
    return lambda out: decode_spooled_image(spool, source, out)


def write_and_digest(out: IO[bytes], data: bytes) -> tuple[int, str]:
    import hashlib

    out.write(data)
    return len(data), hashlib.sha256(data).hexdigest()


def decode_spooled_image(spool: IO[bytes], span: tuple[int, int], out: IO[bytes]) -> tuple[int, str]:
    if span[0] == span[1]:
        raise ServiceError("an image in the answer is empty (b64_json is blank)", hint=PAID_ANSWER_HINT)
    try:
        return decode_b64_span(spool, span, out)
    except ValueError as err:
        raise ServiceError(f"an image in the answer is not valid base64: {err}", hint=PAID_ANSWER_HINT) from None


def output_paths(plan: OutputPlan, count: int) -> list[Path]:
    if count == 1:
        return [plan.path]
    return [plan.path.with_name(f"{plan.path.stem}-{i}{plan.path.suffix}") for i in range(1, count + 1)]


def path_for_format(path: Path, fmt: str) -> Path:
    return path if EXTENSION_FORMATS.get(path.suffix.lower()) == fmt else path.with_suffix(FORMAT_EXTENSIONS[fmt])


def candidate_names(target: Path) -> Iterator[Path]:
    """NAME.png, NAME-2.png, ... NAME-99999.png: the names a run may give its file, in order (the last
    is what LONGEST_FREE_SUFFIX leaves room for)."""
    yield target
    for number in range(2, 100_000):
        yield target.with_name(f"{target.stem}-{number}{target.suffix}")


def next_free_path(path: Path) -> Path:
    """The name a run would take now (what --dry-run shows); publish claims it for real."""
    return next((c for c in candidate_names(path) if not os.path.lexists(c)), path)


def temporary_beside(target: Path) -> Path:
    """.NAME.JOB-RANDOM.part: the job's id lets the next command clean up after a killed worker
    without touching another job's file of the same name. NAME is cut to 60 characters, so the
    temporary name fits wherever the final name does."""
    return target.with_name(f".{short_name(target.name)}.{TEMPORARY_TAG[0]}{random_hex(4)}.part")


def short_name(name: str) -> str:
    """At most 120 bytes of UTF-8, cut between characters: room for the temporary name's additions."""
    return name.encode("utf-8", "surrogatepass")[:120].decode("utf-8", "ignore")


TEMPORARY_TAG = [""]    # "JOBID-" while a worker runs a job (one job per process or command)


def write_file_atomic(path: Path, data: bytes) -> None:
    """Write beside the target, then rename: readers never see half a file. Only for files this
    tool owns (job records); a user's file is never replaced this way (see publish)."""
    temporary = temporary_beside(path)
    try:
        with create_new(temporary) as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        replace_file(temporary, path)
    finally:
        remove_quietly(temporary)


def create_new(path: Path) -> IO[bytes]:
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    return os.fdopen(os.open(path, flags, 0o666), "w+b")


def replace_file(source: Path, target: Path) -> None:
    """os.replace; on Windows a reader holding the target open makes it fail for a moment."""
    for attempt in range(100):
        try:
            os.replace(source, target)
            return
        except PermissionError:
            if os.name != "nt" or attempt == 99:
                raise
            time.sleep(0.01)


def remove_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def publish(temporary: Path, target: Path, *, replace: bool) -> Path:
    """Give a finished temporary file its name: the target, or the first free NAME-2, NAME-3, ...
    The name is claimed with a hard link, which fails if it exists, so two runs finishing at the
    same instant never overwrite each other; without hard links, an exclusive create claims it."""
    if replace:
        replace_file(temporary, target)
        return target
    for candidate in candidate_names(target):
        try:
            claim_name(temporary, candidate)
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"no free name like {target.name} in {target.parent}")


def claim_name(temporary: Path, candidate: Path) -> None:
    try:
        os.link(temporary, candidate)
    except FileExistsError:
        raise
    except (OSError, NotImplementedError, AttributeError):
        claim_by_creating(temporary, candidate)
        return
    os.unlink(temporary)


def claim_by_creating(temporary: Path, candidate: Path) -> None:
    """Where hard links are not supported: reserve the name by creating it, then fill it."""
    os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        replace_file(temporary, candidate)
    except OSError:
        remove_quietly(candidate)       # the empty reservation is ours: no 0-byte file is left
        raise


def save_file(target: Path, fill: Callable[[IO[bytes]], Any], *, replace: bool,
              rename: Optional[Callable[[Any], Path]] = None) -> tuple[Path, Any]:
    """Write through a temporary file beside the target (removed whatever happens), then publish it
    as the target, or as rename(what fill returned)."""
    temporary = temporary_beside(target)
    LIVE_TEMPORARIES.add(temporary)
    try:
        with create_new(temporary) as handle:
            value = fill(handle)
            handle.flush()
            os.fsync(handle.fileno())
        return publish(temporary, rename(value) if rename else target, replace=replace), value
    finally:
        remove_quietly(temporary)
        LIVE_TEMPORARIES.discard(temporary)


# Temporary files being written now: a worker told to stop removes them before it exits.
LIVE_TEMPORARIES: set[Path] = set()


class PreviewWriter:
    """Streamed previews beside each image's target: one NAME.partial.png replaced by each newer
    preview (an image viewer showing it updates), or NAME.partial-1.png, -2, ... kept. A preview never
    replaces a file it did not write. Used by the thread that reads the stream.
    With n > 1 the API does not say which image a preview belongs to: images are taken to stream one
    after another, so a completed image, or a partial_image_index that does not grow, starts the next."""

    def __init__(self, job: ImageJob, emit: Emit, started: float) -> None:
        self.targets = output_paths(job.output, job.n)
        self.keep = job.output.keep_partials
        self.expected = int(job.fields.get("partial_images", 0))
        self.emit = emit
        self.started = started
        self.count = 0                  # previews received, all images together
        self.image, self.in_image, self.last_index = 1, 0, -1
        self.paths: list[Path] = []     # every preview file written, in order
        self.current: dict[int, Path] = {}  # the file each image's next preview replaces

    def hear(self, fill: Optional[ImageFill], event: Mapping[str, Any]) -> None:
        index = event.get("partial_image_index")
        index = index if isinstance(index, int) and not isinstance(index, bool) else self.last_index + 1
        if (fill is None or index <= self.last_index) and self.image < len(self.targets):
            self.image, self.in_image = self.image + 1, 0
        self.last_index = -1 if fill is None else index
        if fill is not None:
            self.count, self.in_image = self.count + 1, self.in_image + 1
            self.save(fill)

    def save(self, fill: ImageFill) -> None:
        """Decoded straight from the spool into a file named for its real format."""
        target, name = self.targets[self.image - 1], self.preview_name()
        label = f"partial-{self.in_image}" if self.keep else "partial"
        wanted = target.with_name(f"{target.stem}.{label}{target.suffix}")
        own = None if self.keep else self.current.get(self.image)

        def name_for(image: SavedImage) -> Path:
            return path_for_format(own or wanted, image.info.format)

        try:
            wanted.parent.mkdir(parents=True, exist_ok=True)
            path = save_file(wanted, fill_and_inspect(fill), replace=own is not None, rename=name_for)[0]
        except ServiceError as err:
            self.emit("warning", message=f"{name} skipped: {err.message}")
            return
        except OSError as err:
            self.emit("warning", message=f"{name} could not be written: {err.strerror or err}")
            return
        self.current[self.image] = path
        if path not in self.paths:
            self.paths.append(path)
        image = {"image": self.image} if len(self.targets) > 1 else {}
        self.emit("preview", **image, index=self.in_image, of=self.expected, path=str(path),
                  after_s=round(time.monotonic() - self.started, 3))

    def preview_name(self) -> str:
        return (f"image {self.image}, " if len(self.targets) > 1 else "") + f"preview {self.in_image}"


def settle_previews(paths: Sequence[Path], *, keep: bool, arrived: Sequence[Path]) -> tuple[Path, ...]:
    """The preview files left on disk: all when kept, else the last one of each image that did not
    arrive (a preview is named after its image's target: cat-2.png has cat-2.partial.png)."""
    if keep:
        return tuple(paths)
    done = [p for p in paths if any(p.name.startswith(f"{target.stem}.partial") for target in arrived)]
    for path in done:
        remove_quietly(path)
    return tuple(p for p in paths if p not in done)


def fallback_folder(*, create: bool = True) -> Path:
    """Where an image goes when its own folder fails: a folder private to the user in the temp
    folder, else in the home folder (a shared temp folder may hold someone else's folder or link)."""
    import tempfile

    places = [Path(tempfile.gettempdir()) / FALLBACK_FOLDER]
    if not create:
        return places[0]
    with contextlib.suppress(RuntimeError):     # no home folder can be found
        places.append(Path.home() / f".{FALLBACK_FOLDER}")
    found = next((folder for folder in places if is_private_folder(folder)), None)
    if found is None:
        raise OSError(f"no folder private to this user could be made ({', '.join(map(str, places))})")
    return found


def is_private_folder(folder: Path) -> bool:
    """Created 0700 if missing; usable only if it is a real folder (not a link) owned by this user."""
    import stat

    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        info = os.lstat(folder)
    except OSError:
        return False
    if not stat.S_ISDIR(info.st_mode) or stat.S_ISLNK(info.st_mode):
        return False
    if os.name == "nt":
        return True
    if info.st_uid != os.getuid():
        return False
    if info.st_mode & 0o077:            # made by an older version with the default mode
        with contextlib.suppress(OSError):
            os.chmod(folder, 0o700)
    return not os.lstat(folder).st_mode & 0o077


def fill_and_inspect(fill: ImageFill, *, keep_unknown: bool = False) -> Callable[[IO[bytes]], SavedImage]:
    """Write the image, then read its real format and size back from the file. Bytes that are no
    image are refused, or, when they were paid for (keep_unknown), kept as format "bin"."""
    def write(handle: IO[bytes]) -> SavedImage:
        size, digest = fill(handle)
        handle.seek(0)
        info = image_info_from_stream(handle)
        if info is None and not keep_unknown:
            handle.seek(0)
            raise ServiceError(f"the answer's image is not a PNG, JPEG, WebP, GIF or SVG ({size} bytes starting "
                               f"{handle.read(8).hex()})", hint=PAID_ANSWER_HINT)
        return SavedImage(Path(), info or ImageInfo("bin", 0, 0), size, digest)

    return write


def save_image(fill: ImageFill, target: Path, *, overwrite: bool) -> SavedImage:
    """Named by the image's real format; if the target folder fails, the temp folder (exit 7)."""
    def name_for(image: SavedImage) -> Path:
        return path_for_format(destination, image.info.format)

    try:
        destination = target
        target.parent.mkdir(parents=True, exist_ok=True)
        path, image = save_file(target, fill_and_inspect(fill, keep_unknown=True), replace=overwrite,
                                rename=name_for)
        return dataclasses.replace(image, path=path)
    except OSError as err:
        reason = f"{target} could not be written ({err.strerror or err})"
    folder = fallback_folder(create=False)
    try:
        folder = fallback_folder()
        destination = folder / target.name
        folder.mkdir(parents=True, exist_ok=True)
        path, image = save_file(destination, fill_and_inspect(fill, keep_unknown=True), replace=False,
                                rename=name_for)
    except OSError as err:
        raise ServiceError(f"the image was received but could not be saved: {reason}; "
                           f"the fallback {folder} failed too ({err.strerror or err})", kind="save_failed",
                           hint="free disk space or choose another -f, then run the same command again") from None
    return dataclasses.replace(image, path=path, fallback_reason=reason)


def build_metadata(job: ImageJob, saved: SavedImage, result_meta: Mapping[str, Any], *,
                   request_id: str, elapsed_s: float, cost: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """What the .json sidecar records; the key is never part of the job, so it cannot leak here."""
    parameters = {k: v for k, v in job.fields.items() if k != "prompt"}
    return {"tool": f"{TOOL_NAME} {VERSION}", "prompt": job.prompt, "model": job.fields["model"],
            "mode": job.mode, "endpoint": job.endpoint, "parameters": parameters,
            "input_images": [str(f.path) for f in job.images],
            "mask": str(job.mask.path) if job.mask else None,
            **requested_and_real(job, saved), "bytes": saved.size_bytes, "sha256": saved.sha256,
            "usage": result_meta.get("usage"), "revised_prompt": first_revised_prompt(result_meta),
            "request_id": request_id or None, "created": result_meta.get("created"),
            "elapsed_s": round(elapsed_s, 3), "cost": cost}


def write_metadata(saved: SavedImage, metadata: Mapping[str, Any], *, overwrite: bool) -> Path:
    data = json.dumps(metadata, ensure_ascii=False, indent=2).encode("utf-8") + b"\n"
    return save_file(saved.path.with_name(saved.path.name + ".json"), lambda out: out.write(data),
                     replace=overwrite)[0]


def gallery_html(title: str, totals: str, entries: Sequence[Mapping[str, Any]]) -> str:
    """The page: totals, then a card per item; every text from a prompt or a server is escaped."""
    import html

    cards = "\n".join(gallery_card(entry) for entry in entries)
    return (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<meta http-equiv="Content-Security-Policy" content="{GALLERY_POLICY}">{GALLERY_MARKER}'
            f"<title>{html.escape(title)}</title><style>{GALLERY_STYLE}</style></head>\n"
            f'<body><header><h1>{html.escape(title)}</h1><p class="totals">{html.escape(totals)}</p></header>\n'
            f"<main>\n{cards}\n</main></body></html>\n")


def gallery_card(entry: Mapping[str, Any]) -> str:
    """One item: its images (a thumbnail the browser scales, a link to the file), prompt and facts."""
    import html

    images = "".join(gallery_image(path, entry["item"]) for path in entry.get("paths") or ())
    facts = "".join(f"<dt>{name}</dt><dd>{html.escape(str(value))}</dd>" for name, value in gallery_facts(entry))
    error = entry.get("error") or {}
    failure = "".join(f'<p class="error">{html.escape(str(error[k]))}</p>' for k in ("message", "hint") if error.get(k))
    return (f'<article class="{html.escape(entry["status"])}">{images or "<div class=none>no image</div>"}'
            f'<h2>#{entry["item"]} · {html.escape(entry["status"])}</h2>'
            f'<p class="prompt">{html.escape(entry.get("prompt") or "")}</p><dl>{facts}</dl>{failure}</article>')


def gallery_image(path: str, item: int) -> str:
    """A thumbnail linking to the file; an SVG is never linked: opened as a document, a script in it
    would run outside the page's policy."""
    image = f'<img src="{gallery_href(path)}" alt="item {item}">'
    return image if path.lower().endswith(".svg") else f'<a href="{gallery_href(path)}">{image}</a>'


def gallery_href(path: str) -> str:
    from urllib.parse import quote

    return Path(path).as_uri() if os.path.isabs(path) else quote(Path(path).as_posix())


def gallery_facts(entry: Mapping[str, Any]) -> list[tuple[str, Any]]:
    both = (entry.get("requested_and_real") or [{}])[0]
    cost = entry.get("cost") or {}
    facts = [("model", entry.get("model")), ("quality", entry.get("quality")),
             ("size", " → ".join(str(s) for s in (both.get("size_requested") or "auto", both.get("size_real")) if s)
              if both else None),
             ("format", both.get("format_real")),
             ("time", f"{entry['elapsed_s']:.0f} s" if isinstance(entry.get("elapsed_s"), (int, float)) else None),
             ("cost", f"${cost['usd']:.4f}" if cost.get("usd") is not None else None)]
    return [(name, value) for name, value in facts if value]


def single_gallery(job: ImageJob, saved: Sequence[SavedImage], received: Received,
                   cost: Optional[Mapping[str, Any]], problem: Optional[ToolError]) -> Optional[str]:
    """--gallery for one run: NAME.html beside the image, the same page as a batch's."""
    page = (saved[0].path if saved else job.output.path).with_suffix(".html")     # cat-2.png has cat-2.html
    entry = {"item": 1, "prompt": job.prompt, "status": "failed" if problem else "ok",
             "paths": [manifest_path(str(image.path), page.parent) for image in saved],
             "model": job.fields["model"], "quality": job.fields.get("quality", "auto"),
             "requested_and_real": [requested_and_real(job, image) for image in saved],
             "elapsed_s": received.elapsed_s, "cost": cost,
             "error": {"message": problem.message, "hint": problem.hint} if problem else None}
    totals = (f"{entry['status']}: {len(saved)} image{'s' * (len(saved) != 1)} in {received.elapsed_s:.0f} s"
              + (f"; {cost_text(cost)}" if cost else ""))
    return write_gallery(page, job.output.path.name, totals, [entry])


def write_gallery(path: Path, title: str, totals: str, entries: Sequence[Mapping[str, Any]]) -> Optional[str]:
    """Rewritten whole and atomically, so a reader reloading it never sees half a page; a failure is
    a warning (returned), never a lost image."""
    try:
        if not gallery_is_ours(path):
            return f"the gallery was not written: {path} exists and is not one of this tool's pages"
        write_file_atomic(path, gallery_html(title, totals, entries).encode("utf-8"))
    except OSError as err:
        return f"the gallery {path} could not be written: {err.strerror or err}"
    return None


def gallery_is_ours(path: Path) -> bool:
    """No such file yet, or a page this tool wrote (its marker is in the first bytes)."""
    try:
        with open(path, "rb") as handle:
            return GALLERY_MARKER.encode() in handle.read(4096)
    except FileNotFoundError:
        return True


def first_revised_prompt(meta: Mapping[str, Any]) -> Optional[str]:
    items = meta.get("data") or []
    return next((i["revised_prompt"] for i in items if isinstance(i, dict) and i.get("revised_prompt")), None)


# --- Jobs ---

Emit = Callable[..., None]


@dataclasses.dataclass(frozen=True)
class Received:
    """What the worker knows of a 2xx answer besides its body, which is in the spool."""

    request_id: str
    elapsed_s: float
    streamed: bool = False                         # the spool holds an event stream, not JSON
    previews: Optional[int] = None                 # previews received, when streamed
    preview_paths: tuple[Path, ...] = ()
    request_id_header: str = ""                    # which header the gateway put its request id in


def answer_cap(job: ImageJob) -> int:
    """The largest answer this request can legitimately get: n images, each preview one more."""
    images = job.n * (1 + int(job.fields.get("partial_images", 0)))
    return images * (MAX_IMAGE_BASE64 + ANSWER_JSON_ROOM) + ANSWER_JSON_ROOM


def fetch_answer(job: ImageJob, config: ApiConfig, *, spool: Path, emit: Emit,
                 on_stage: Callable[[str], None], gate: Optional[Gate] = None) -> Received:
    """Send with retries until a 2xx answer is in the spool; a streamed answer is spooled as the JSON
    answer it stands for, so one decoder serves both."""
    request = build_request(job, config)
    started = time.monotonic()
    previews = PreviewWriter(job, emit, started) if job.streamed else None
    try:
        with open(spool, "w+b") as handle:
            transfer = Transfer(spool=handle, limit=answer_cap(job), on_stage=on_stage,
                                on_preview=previews.hear if previews else None)
            response = send_with_retries(request, config, gate=gate, transfer=transfer,
                                         notify=lambda text, **more: emit("retry", message=text, **more))
            if not 200 <= response.status < 300:
                raise stream_refusal(response) if job.streamed and stream_refused(response) else \
                    error_for_status(response, config)
    except ToolError as err:
        remove_quietly(spool)
        if previews and previews.current:
            kept = ", ".join(str(path) for path in previews.current.values())
            err.message += f"; the last preview is kept at {kept}"
        raise
    return Received(request_id_of(response.headers), time.monotonic() - started, response.streamed,
                    previews.count if previews else None, tuple(previews.paths) if previews else (),
                    request_id_header(response.headers))


def save_spooled_answer(job: ImageJob, spool: Path, received: Received, config: ApiConfig) -> RunResult:
    """Decode and write what the spooled answer holds: a single run, a batch item, a recovery."""
    meta, sources = read_spooled_answer(spool, streamed=received.streamed)
    saved, arrived, warnings, problem = save_all(job, sources, spool, config)
    cost = cost_of(job, meta, config.price_multiplier)
    for image in saved if job.output.metadata else ():
        metadata = build_metadata(job, image, meta, request_id=received.request_id, elapsed_s=received.elapsed_s,
                                  cost=cost)
        metadata = scrub(metadata, config.api_key)  # a server may echo the key
        try:
            write_metadata(image, metadata, overwrite=job.output.overwrite)
        except OSError as err:
            warnings.append(f"the metadata of {image.path.name} could not be written: {err.strerror or err}")
    fallbacks = [s for s in saved if s.fallback_reason]
    if fallbacks and problem is None:
        problem = FallbackSaveError(f"{fallbacks[0].fallback_reason}; saved to the fallback {fallbacks[0].path}",
                                    hint="use the printed path, or move the file where you want it")
    partials = settle_previews(received.preview_paths, keep=job.output.keep_partials, arrived=arrived)
    problem = problem or strict_size_error(job, saved)
    if job.output.gallery:
        warnings += [w for w in [single_gallery(job, saved, received, cost, problem)] if w]
    return RunResult(job, tuple(saved), meta, received.request_id, received.elapsed_s,
                     tuple(warnings + size_warnings(job, saved)), problem, previews=received.previews,
                     partials=partials, cost=cost, request_id_header=received.request_id_header)


def save_all(job: ImageJob, sources: Sequence[ImageSource], spool: Path,
             config: ApiConfig) -> tuple[list[SavedImage], list[Path], list[str], Optional[ToolError]]:
    """Save every image that decodes; a bad one does not cost the good ones. Returns the images, the
    targets they were saved for, warnings and the first problem. A failure to write anywhere
    (save_failed) is raised: the spool keeps the answer for a later attach."""
    targets = output_paths(job.output, job.n)
    saved, arrived, problem = [], [], None
    warnings = [f"the answer held {len(sources)} images but {job.n} were asked for: only the first "
                f"{job.n} are saved"] if len(sources) > job.n else []
    with open(spool, "rb") as handle:
        for source, target in zip(sources, targets):
            try:
                image = save_image(image_fill(source, handle, config), target, overwrite=job.output.overwrite)
            except ToolError as err:
                if err.kind == "save_failed":
                    raise
                problem = err
                continue
            if image.info.format == "bin":
                problem = problem or kept_bytes_error(image)
                continue
            intended = path_for_format(target, image.info.format)
            if image.info.format != job.output.format:
                warnings.append(f"expected {job.output.format} but the image is {image.info.format}: "
                                f"saved as {intended.name}")
            if image.path != intended and not image.fallback_reason:
                warnings.append(f"{intended.name} exists: saved as {image.path.name} (--overwrite replaces it)")
            saved.append(image)
            arrived.append(target)
    if problem is None and len(saved) < job.n:
        problem = ServiceError(f"asked for {job.n} images but the answer held {len(saved)}", hint=PAID_ANSWER_HINT)
    return saved, arrived, warnings, problem


def requested_and_real(job: ImageJob, image: SavedImage) -> dict[str, Any]:
    """What was asked and what came, side by side: size, format and, for a GIF, frames. An SVG that
    states no size has no real size to compare."""
    info = image.info
    pairs = {"size": (job.fields["size"] if job.size_explicit else None,
                      f"{info.width}x{info.height}" if info.width else None),
             "format": (job.output.format, info.format)}
    if job.output.format == "gif":
        real = info.frames if info.format == "gif" else None
        pairs["frames"] = (job.fields.get("frame_count", GIF_DEFAULT_FRAMES), real)
    return {f"{name}_{side}": value for name, pair in pairs.items() for side, value in zip(("requested", "real"), pair)}


def cost_of(job: ImageJob, meta: Mapping[str, Any], multiplier: float) -> dict[str, Any]:
    """What a run cost in USD: a flat channel's price for every n sent, or the answer's usage at the
    published token prices; None where neither is known."""
    profile = profile_for(job.fields["model"])
    if profile.price_per_image is not None:
        return {"usd": round(profile.price_per_image * job.n * multiplier, 6), "basis": "per_image",
                "prices": {"per_image": profile.price_per_image, "multiplier": multiplier}}
    if profile.line != "official":
        return {"usd": None, "basis": "unknown", "note": "no published price"}
    usage = meta.get("usage")
    if not isinstance(usage, dict):
        return {"usd": None, "basis": "tokens", "note": "the answer reported no usage"}
    details = usage.get("input_tokens_details") if isinstance(usage.get("input_tokens_details"), dict) else {}
    output, image = token_count(usage.get("output_tokens")), token_count(details.get("image_tokens", 0))
    text = token_count(details["text_tokens"]) if "text_tokens" in details else \
        max(0, (token_count(usage.get("input_tokens", 0)) or 0) - (image or 0))
    if output is None or image is None or text is None:
        return {"usd": None, "basis": "tokens", "note": "the answer's usage is unreadable"}
    cost = {"usd": round(token_usd(text, image, output, multiplier), 6), "basis": "tokens",
            "prices": {**TOKEN_PRICES, "multiplier": multiplier}}
    return {**cost, "note": "the SVG author model's tokens are not included"} if meta.get("svg_usage") else cost


def token_count(value: Any) -> Optional[int]:
    """A token count as a server may send it: a whole number in range, else None (never a crash)."""
    ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_USAGE_TOKENS
    return value if ok else None


def cost_text(cost: Optional[Mapping[str, Any]]) -> str:
    if not cost:
        return ""
    if cost.get("usd") is None:
        return f"cost unknown ({cost.get('note', '')})"
    return f"cost ${cost['usd']:.4f}" + (f" ({cost['note']})" if cost.get("note") else "")


def mismatches(job: ImageJob, image: SavedImage, names: Sequence[str] = ("size", "format", "frames")) -> list[str]:
    both = requested_and_real(job, image)
    return [f"asked for {name} {both[f'{name}_requested']} but {image.path.name} has {both[f'{name}_real']}"
            for name in names if f"{name}_real" in both and both[f"{name}_requested"]
            and both[f"{name}_real"] and both[f"{name}_requested"] != both[f"{name}_real"]]


def kept_bytes_error(image: SavedImage) -> ServiceError:
    return ServiceError(f"an image in the answer is not a PNG, JPEG, WebP, GIF or SVG: its {image.size_bytes:,} bytes "
                        f"are kept in {image.path}", hint=PAID_ANSWER_HINT)


def size_warnings(job: ImageJob, saved: Sequence[SavedImage]) -> list[str]:
    """The format is warned about as it is saved; size and frames here."""
    return [text for image in saved for text in mismatches(job, image, ("size", "frames"))]


def strict_size_error(job: ImageJob, saved: Sequence[SavedImage]) -> Optional[ToolError]:
    found = [text for image in saved for text in mismatches(job, image)]
    if not (job.output.strict and found):
        return None
    return MismatchError(f"{found[0]} (--strict-size)" + (f", and {len(found) - 1} more" if len(found) > 1 else ""),
                         hint="the file is kept; ask again with another size, or without --strict-size")


def state_folder(env: Mapping[str, str]) -> Path:
    """APIYI_STATE_DIR, else the platform's per-user state folder."""
    if env.get(ENV_STATE_DIR):
        return Path(env[ENV_STATE_DIR]).expanduser()
    home = Path.home()
    if os.name == "nt":
        base = Path(env.get("LOCALAPPDATA") or home / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = home / "Library" / "Application Support"
    else:
        base = Path(env.get("XDG_STATE_HOME") or home / ".local" / "state")
    return base / TOOL_NAME


def open_state_folder(env: Mapping[str, str]) -> Path:
    """Created private to the user (job records name the files and prompts of their runs)."""
    folder = state_folder(env)
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        if os.name != "nt" and folder.stat().st_mode & 0o077:
            os.chmod(folder, 0o700)
        probe = folder / f".probe-{random_hex(4)}"
        probe.touch(exist_ok=False)
        probe.unlink()
    except OSError as err:
        raise state_folder_error(folder, err) from None
    return folder


def state_folder_error(folder: Path, err: OSError) -> UsageError:
    return UsageError(f"the state folder {folder} cannot be used: {err.strerror or err}"
                      + (f" ({err.filename})" if err.filename else ""),
                      hint=f"set {ENV_STATE_DIR} to a writable folder of your own")


@contextlib.contextmanager
def state_folder_errors(folder: Path) -> Iterator[None]:
    """A job file that cannot be read or written is a problem of the state folder, said in one line."""
    try:
        yield
    except OSError as err:
        raise state_folder_error(folder, err) from None


@dataclasses.dataclass(frozen=True)
class JobFiles:
    """Where one job lives in the state folder: ID.json (the record), ID.events.jsonl, ID.log,
    ID.lock (held by the worker while it lives), ID.reported and the spool of each answer."""

    folder: Path
    job_id: str

    def file(self, suffix: str) -> Path:
        return self.folder / f"{self.job_id}{suffix}"

    record = property(lambda self: self.file(".json"))
    events = property(lambda self: self.file(".events.jsonl"))
    log = property(lambda self: self.file(".log"))
    lock = property(lambda self: self.file(".lock"))
    reported = property(lambda self: self.file(".reported"))
    cancel = property(lambda self: self.file(".cancel"))        # holds "always" or "unless-sent"

    def spool(self, item: int = 0) -> Path:
        return self.file(f".item-{item}.spool" if item else ".spool")

    def all_files(self) -> list[Path]:
        return [p for p in self.folder.glob(f"{self.job_id}.*") if p.name.split(".")[0] == self.job_id]


def new_job_id() -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{random_hex(3)}"


def file_digest(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for piece in iter(lambda: handle.read(READ_CHUNK), b""):
            digest.update(piece)
    return digest.hexdigest()


def text_digest(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def request_fingerprint(job: ImageJob, base_url: str) -> str:
    """What was asked: endpoint, every field, the bytes of every input, where the result goes. A
    made-up name (no -f) differs on each run, so its folder stands for it."""
    output = job.output
    target = f"auto:{os.path.abspath(output.path.parent)}" if output.auto_named else os.path.abspath(output.path)
    asked = {"url": base_url + job.endpoint, "fields": job.fields,
             "inputs": [file_digest(f.path) for f in job.images],
             "mask": file_digest(job.mask.path) if job.mask else None, "target": target,
             "output": [output.format, output.overwrite, output.metadata, output.keep_partials, output.strict,
                        output.gallery]}
    return text_digest(json.dumps(asked, sort_keys=True, ensure_ascii=False))


def key_digest(key: str) -> str:
    """One-way: two accounts never share a job, and the record says nothing of the key."""
    return text_digest(f"{TOOL_NAME} account\0{key}")


def job_fingerprint(parts: Sequence[str], key: str) -> str:
    return text_digest("\n".join([*parts, key_digest(key)]))


def to_plain(value: Any) -> Any:
    """A dataclass as JSON-ready data (paths as text)."""
    return json.loads(json.dumps(dataclasses.asdict(value), default=str, ensure_ascii=False))


def input_from_plain(plain: Mapping[str, Any]) -> InputFile:
    return InputFile(Path(plain["path"]), ImageInfo(**plain["info"]), plain["size_bytes"])


def job_from_plain(plain: Mapping[str, Any]) -> ImageJob:
    output = OutputPlan(**{**plain["output"], "path": Path(plain["output"]["path"])})
    return ImageJob(plain["prompt"], plain["fields"], tuple(input_from_plain(i) for i in plain["images"]),
                    input_from_plain(plain["mask"]) if plain["mask"] else None, output,
                    tuple(plain["notes"]), tuple(plain["warnings"]))


def plan_from_plain(plain: Mapping[str, Any]) -> BatchPlan:
    items = tuple(BatchItem(i["number"], job_from_plain(i["job"]), tuple(Path(p) for p in i["done_paths"]),
                            i.get("fingerprint", ""), i.get("cost_high")) for i in plain["items"])
    return BatchPlan(Path(plain["source"]), plain["description"], items, Path(plain["manifest"]), plain["jobs"],
                     max_cost=plain.get("max_cost"), gallery=plain.get("gallery", True))


def config_to_plain(config: ApiConfig) -> dict[str, Any]:
    return {"base_url": config.base_url, "timeout_s": config.timeout_s, "retries": config.retries,
            "price_multiplier": config.price_multiplier}


def config_from_plain(plain: Mapping[str, Any], key: str) -> ApiConfig:
    return ApiConfig(plain["base_url"], key, plain["timeout_s"], plain["retries"], plain.get("price_multiplier", 1.0))


def result_to_plain(result: RunResult) -> dict[str, Any]:
    return {"files": [to_plain(s) for s in result.files], "meta": result.meta, "request_id": result.request_id,
            "elapsed_s": result.elapsed_s, "warnings": list(result.warnings),
            "error": error_document(result.error) if result.error else None, "previews": result.previews,
            "partials": [str(p) for p in result.partials], "cost": result.cost,
            "request_id_header": result.request_id_header}


def result_from_plain(job: ImageJob, plain: Mapping[str, Any]) -> RunResult:
    files = tuple(SavedImage(Path(f["path"]), ImageInfo(**f["info"]), f["size_bytes"], f["sha256"],
                             f["fallback_reason"]) for f in plain["files"])
    error = error_from_document(plain["error"]) if plain["error"] else None
    return RunResult(job, files, plain["meta"], plain["request_id"], plain["elapsed_s"], tuple(plain["warnings"]),
                     error, plain["previews"], tuple(Path(p) for p in plain["partials"]), plain.get("cost"),
                     plain.get("request_id_header", ""))


def error_from_document(document: Mapping[str, Any]) -> ToolError:
    """A failure recorded by a worker, with the exit code it had there."""
    err = ToolError(str(document.get("message") or "the job failed"), hint=document.get("hint") or "",
                    status=document.get("status"), code=document.get("code"), kind=document.get("kind") or "error",
                    problems=document.get("problems") or (), body=document.get("body") or "",
                    details={k: document[k] for k in ("categories", "source") if k in document})
    err.exit_code = int(document.get("exit_code") or EXIT_BUG)
    return err


def read_record(path: Path) -> Optional[dict[str, Any]]:
    """None when missing, or caught mid-replace on Windows (the next poll reads it)."""
    try:
        record = parse_json(path.read_bytes())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("id") else None


def write_record(files: JobFiles, record: dict[str, Any], *, secret: str = "") -> None:
    record["updated_at"] = time.time()
    write_file_atomic(files.record, json.dumps(scrub(record, secret), ensure_ascii=False).encode("utf-8"))


def redact(text: str, secret: str) -> str:
    """A server may echo the key in an error message; no text the tool shows or logs keeps it, as it
    is or as JSON writes it (a key may hold a quote or a backslash)."""
    for form in {secret, json.dumps(secret)[1:-1]} if secret else ():
        text = text.replace(form, KEY_MASK)
    return text


def scrub(value: Any, secret: str) -> Any:
    """A JSON value with the key masked in its strings and names (a server may echo it in either), its
    structure kept. None of our own names can hold a key: a key that reads as a word is refused."""
    if isinstance(value, str):
        return redact(value, secret)
    if isinstance(value, dict):
        return {redact(str(name), secret): scrub(item, secret) for name, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [scrub(item, secret) for item in value]
    return value


def list_records(folder: Path) -> list[dict[str, Any]]:
    records = (read_record(p) for p in folder.glob("*.json") if not p.name.endswith(".events.json"))
    return sorted((r for r in records if r), key=lambda r: (r.get("created_at", 0), r["id"]))


def try_lock(handle: IO[bytes]) -> bool:
    """An exclusive lock without waiting; the system drops it when its holder dies, even by SIGKILL."""
    if os.name == "nt":
        import msvcrt

        handle.seek(0)      # the lock is on byte 0, wherever the file position was
        try:
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


@contextlib.contextmanager
def held_lock(path: Path, *, wait_s: float = 0.0) -> Iterator[bool]:
    """Yields whether the lock was taken (within wait_s); released on leaving, explicitly (Windows
    releases a lock left to the close only some time later)."""
    with open(path, "a+b") as handle:
        deadline = time.monotonic() + wait_s
        taken = try_lock(handle)
        while not taken and time.monotonic() < deadline:
            time.sleep(0.01)
            taken = try_lock(handle)
        try:
            yield taken
        finally:
            if taken:
                unlock(handle)


def unlock(handle: IO[bytes]) -> None:
    if os.name == "nt":
        import msvcrt

        handle.seek(0)
        with contextlib.suppress(OSError):
            msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)
        return
    import fcntl

    fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def worker_alive(files: JobFiles, record: Mapping[str, Any]) -> bool:
    """The worker holds its lock while it lives; a worker not yet started gets a grace period."""
    if record.get("state") in FINISHED_STATES:
        return False
    with held_lock(files.lock) as free:
        if not free or pid_worker_alive(record):
            return True
    return record.get("state") == "starting" and time.time() - record.get("created_at", 0) < WORKER_START_GRACE_S


@contextlib.contextmanager
def abandoned_record(files: JobFiles, record: dict[str, Any], *, wait_s: float = 0.0
                     ) -> Iterator[Optional[dict[str, Any]]]:
    """The job's record as it is now, under the job's lock, when its worker is gone (None while one lives),
    so the caller can end or recover the job with no worker writing beside it. A worker of this script
    holds the lock while it lives; the Node.js twin's holds none, so its pid tells."""
    with held_lock(files.lock, wait_s=wait_s) as free:
        latest = (read_record(files.record) or record) if free else record
        yield latest if free and not pid_worker_alive(latest) else None


def pid_worker_alive(record: Mapping[str, Any]) -> bool:
    """A worker of the Node.js twin holds no lock (Node has none that the system drops when its holder
    dies): its record says so, and its pid tells whether it lives."""
    pid = record.get("pid")
    return record.get("liveness") == "pid" and type(pid) is int and pid > 0 and pid_alive(pid)


def pid_alive(pid: int) -> bool:
    """Signal 0 tests a process without touching it on POSIX; on Windows os.kill would end it, so the
    process is opened and its exit code read (259: still active)."""
    if os.name == "nt":
        import ctypes

        kernel = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]
        handle = kernel.OpenProcess(WINDOWS_QUERY_LIMITED_INFORMATION, False, pid)
        if not handle:
            return ctypes.get_last_error() == WINDOWS_ACCESS_DENIED  # type: ignore[attr-defined]
        code = ctypes.c_ulong()
        try:
            return bool(kernel.GetExitCodeProcess(handle, ctypes.byref(code))) and code.value == WINDOWS_STILL_ACTIVE
        finally:
            kernel.CloseHandle(handle)
    try:
        os.kill(pid, 0)
    except PermissionError:
        return True
    except OSError:
        return False
    return not is_zombie(pid)


def is_zombie(pid: int) -> bool:
    """A worker that died after its command ended, in a container whose first process reaps nothing, stays
    a zombie: signal 0 still finds it (Linux; elsewhere there is no such file)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            text = stat.read()
    except OSError:
        return False
    return text[text.rfind(b")") + 2:].startswith(b"Z")


@contextlib.contextmanager
def state_lock(folder: Path) -> Iterator[None]:
    """Finding and starting a job is one step, so two identical commands never start two jobs."""
    with held_lock(folder / "jobs.lock", wait_s=STATE_LOCK_WAIT_S) as taken:
        if not taken:
            raise ServiceError(f"the state folder {folder} stayed locked for {STATE_LOCK_WAIT_S:.0f} s",
                               hint=f"another command holds it; try again, or set {ENV_STATE_DIR}")
        yield


def prune_records(folder: Path, records: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Path]]:
    """Finished jobs older than JOB_KEEP_S go, but never one whose spool still holds an answer to
    save. Returns the records kept, and the raw answers removed, so the caller says so."""
    cutoff, kept, said = time.time() - JOB_KEEP_S, [], []
    for record in records:
        files = JobFiles(folder, record["id"])
        old = record.get("state") in FINISHED_STATES and record.get("updated_at", 0) < cutoff
        paths = files.all_files() if old else []
        if not old or any(p.suffix == ".spool" for p in paths):
            kept.append(record)
            continue
        said += [p for p in paths if p.suffix == ".answer"]
        for path in paths:
            remove_quietly(path)
    return kept, said


def spawn_attempts(platform: str) -> list[dict[str, Any]]:
    """Popen options that detach a worker from the command, most detached first."""
    if platform == "nt":
        flags = WINDOWS_DETACHED_PROCESS | WINDOWS_NEW_PROCESS_GROUP
        return [{"creationflags": flags | WINDOWS_BREAKAWAY_FROM_JOB}, {"creationflags": flags}]
    return [{"start_new_session": True}]


def worker_argv(files: JobFiles) -> list[str]:
    return [sys.executable, "-I", "-S", os.path.abspath(__file__), "--run-job", str(files.record)]


RUNNING_WORKERS: list[Any] = []   # Popen objects of this command's workers, reaped as they end


def reap_workers() -> None:
    """A worker that ended is waited for, so it does not linger as a zombie while the command waits."""
    for process in list(RUNNING_WORKERS):
        if process.poll() is not None:
            RUNNING_WORKERS.remove(process)


def start_worker_process(files: JobFiles, key: str, env: Mapping[str, str]) -> None:
    """The key travels in the worker's environment, never in its arguments or files."""
    import subprocess

    child_env = {k: v for k, v in env.items() if k != ENV_WORKER}
    child_env[ENV_API_KEY] = key
    failure: Optional[OSError] = None
    with open(files.log, "ab") as log:
        for options in spawn_attempts(os.name):
            try:
                RUNNING_WORKERS.append(subprocess.Popen(worker_argv(files), stdin=subprocess.DEVNULL, stdout=log,
                                                        stderr=log, close_fds=True, env=child_env, **options))
                return
            except OSError as err:
                failure = err
    raise OSError(failure.errno if failure else 0, reason_text(failure))


def start_worker_thread(files: JobFiles, key: str) -> None:
    threading.Thread(target=run_worker, args=(files, key), daemon=True, name=f"job {files.job_id}").start()


def start_worker(files: JobFiles, record: dict[str, Any], *, mode: str, key: str, env: Mapping[str, str],
                 console: Console) -> None:
    """A detached process; else a thread of this command, said once. The record says which
    (detached) before any worker can read it."""
    if mode == "process":
        try:
            start_worker_process(files, key, env)
            return
        except OSError as err:
            console.warn(f"no worker process could be started ({reason_text(err)}): the request runs inside "
                         "this command and stops if it is stopped")
    elif mode == "unavailable":
        console.warn(f"{ENV_WORKER}=unavailable: the request runs inside this command and stops if it is stopped")
    record["detached"] = False
    write_record(files, record)
    start_worker_thread(files, key)


def worker_mode(env: Mapping[str, str]) -> str:
    mode = env.get(ENV_WORKER, "process").strip().lower() or "process"
    if mode not in WORKER_MODES:
        raise UsageError(f"{ENV_WORKER}={mode!r} is not one of {', '.join(WORKER_MODES)}",
                         hint=f"unset {ENV_WORKER}, or set it to inprocess")
    return mode


def peak_memory_kib() -> Optional[int]:
    """The worker's own peak resident memory. Linux: VmHWM, because ru_maxrss keeps the peak of the
    command the worker was forked from; elsewhere ru_maxrss (bytes on macOS); Windows: none."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status", encoding="ascii") as status:
            return int(next(line for line in status if line.startswith("VmHWM:")).split()[1])
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak


class JobWorker:
    """The owner of one job, from sending to saving: in a worker process, or in a thread of the
    command when no process can be started. Every step goes to the record (what is true now) and
    the events file (what happened); the command reads only those. Batch threads share one
    JobWorker: record and events are written under self.lock."""

    def __init__(self, files: JobFiles, record: dict[str, Any], key: str) -> None:
        self.files = files
        self.record = record                # this worker's copy, written whole on each change
        self.key = key
        self.lock = threading.Lock()
        self.cancelling = False             # set once: a second SIGTERM must not cut the cancel short

    def update(self, **changes: Any) -> None:
        """The last write, which ends the job, carries the worker's peak memory."""
        if changes.get("state") in FINISHED_STATES:
            changes["peak_rss_kib"] = peak_memory_kib()
        with self.lock:
            self.record.update(changes)
            write_record(self.files, self.record, secret=self.key)

    def emit(self, event: str, **fields: Any) -> None:
        line = json.dumps(scrub({"event": event, "at": round(time.time(), 3), **fields}, self.key), ensure_ascii=False)
        with self.lock, open(self.files.events, "a", encoding="utf-8", newline="\n") as handle:
            handle.write(line + "\n")

    def log_bug(self) -> None:
        """The traceback of the exception being handled, into the job's log, without the key."""
        import traceback

        with self.lock, open(self.files.log, "a", encoding="utf-8") as log:
            log.write(redact(traceback.format_exc(), self.key))

    def on_stage(self, stage: str) -> None:
        """From the transport: a piece is about to go (stop here if cancelled: nothing is billed yet),
        the request is completely sent (it may be billed), or answered. A record that cannot be
        written must not fail the request: the copy in memory keeps what is true."""
        if stage == "piece" and self.cancel_requested():
            self.cancelling = True
            raise Signalled("cancelled")
        try:
            if stage == "sent" and not self.record.get("sent"):
                self.update(state="waiting", sent=True, sent_at=time.time())
                self.emit("sent", possibly_billed=True)
            elif stage == "receiving" and self.record.get("kind") == "single":
                self.update(state="receiving")
        except OSError:
            pass

    def cancel_requested(self) -> bool:
        """--cancel asks always; an interrupted command only while nothing is sent."""
        try:
            mode = self.files.cancel.read_text(encoding="ascii").strip()
        except (OSError, ValueError):
            return False
        return mode == "always" or not self.record.get("sent")

    def on_terminate(self, number: int, frame: Any) -> None:
        """SIGTERM (a cancel): stop, unless the answer is already here and being saved (it is paid
        for: finish it) or the cancel was only meant to hold an unsent request."""
        if self.cancelling or (self.record.get("received") and self.record.get("kind") == "single"):
            return
        if self.files.cancel.exists() and not self.cancel_requested():
            return
        self.cancelling = True
        raise Signalled("SIGTERM")

    def config(self) -> ApiConfig:
        return config_from_plain(self.record["config"], self.key)

    def run_single(self) -> None:
        job = job_from_plain(self.record["spec"])
        spool = self.files.spool()
        received = fetch_answer(job, self.config(), spool=spool, emit=self.emit, on_stage=self.on_stage)
        self.update(state="saving", received=True, response=to_plain(received))
        self.emit("received")
        finish_single(self, job, spool, received)

    def run_batch(self) -> None:
        run = BatchRun(plan_from_plain(self.record["spec"]), self.config(), self)
        run.start()
        try:
            run.wait()
        except Signalled:
            self.stop_batch(run)
        self.update(state="cancelled" if run.stop_error and run.stop_error.kind == "cancelled" else "done",
                    result={"stop_error": error_document(run.stop_error) if run.stop_error else None,
                            "crashed": run.crashed}, exit_code=EXIT_OK)

    def stop_batch(self, run: BatchRun) -> None:
        """Told to stop: no new item; those in flight are being paid for, so they finish, unless the
        cancel came before anything was sent (their uploads stop at the next piece)."""
        run.stop(InterruptedRun("cancelled: no new item was started", kind="cancelled",
                                hint="run the same command again to make the items not run"))
        run.wait()

    def fail(self, err: ToolError, *, state: str = "failed") -> None:
        self.update(state=state, error=error_document(err), exit_code=err.exit_code)
        self.emit("error", **error_document(err))


def finish_single(worker: JobWorker, job: ImageJob, spool: Path, received: Received) -> None:
    """Save from the spool, record the result, and only then delete the spool. A save that could not
    write anywhere leaves the spool for the next attach; an answer that holds no usable image is
    kept aside as ID.answer (paid for, so never thrown away; it does not block a new request)."""
    try:
        result = save_spooled_answer(job, spool, received, worker.config())
    except ToolError as err:
        unsaved = err.kind == "save_failed"
        note = "received, not saved" if unsaved else f"the raw answer is kept in {keep_raw_answer(spool)}"
        worker.update(state="failed", error=error_document(err), exit_code=err.exit_code, note=note)
        worker.emit("error", **error_document(err))
        return
    for image in result.files:
        worker.emit("saved", path=str(image.path), width=image.info.width, height=image.info.height,
                    format=image.info.format, bytes=image.size_bytes)
    code = result.error.exit_code if result.error else EXIT_OK
    kept = result.error and result.error.kind != "saved_to_fallback"
    worker.update(state="done" if result.files else "failed", result=result_to_plain(result), exit_code=code,
                  note=f"the raw answer is kept in {keep_raw_answer(spool)}" if kept else None)
    if not kept:
        remove_quietly(spool)


def keep_raw_answer(spool: Path) -> Path:
    """ID.spool -> ID.answer: kept for the user, no longer an answer waiting to be saved."""
    kept = spool.with_suffix(".answer")
    with contextlib.suppress(OSError):
        replace_file(spool, kept)
    return kept


def run_worker(files: JobFiles, key: str, *, detached: bool = False) -> int:
    """The job, start to finish. This is the one boundary where any exception is caught: it is
    recorded as a failure with exit 1 and its traceback goes to the job's log, so a bug is never
    reported as success nor lost."""
    with held_lock(files.lock, wait_s=WORKER_START_GRACE_S / 2) as taken:   # a probe may hold it a moment
        record = read_record(files.record)
        if not taken or record is None or record.get("state") != "starting":
            return EXIT_OK                  # another worker owns it, or it is already over
        worker = JobWorker(files, record, key)
        TEMPORARY_TAG[0] = f"{files.job_id}-"
        if detached:
            import signal

            signal.signal(signal.SIGTERM, worker.on_terminate)
        worker.update(state="sending", pid=os.getpid(), worker_started_at=time.time())
        try:
            (worker.run_single if record["kind"] == "single" else worker.run_batch)()
        except Signalled as signal_seen:
            cancel_in_worker(worker, signal_seen.name)
        except ToolError as err:
            worker.fail(err)
        except Exception as err:  # the documented boundary: recorded, never swallowed
            worker.log_bug()
            worker.fail(ToolError(f"a bug in the worker: {type(err).__name__}: {err} (traceback in {files.log})"))
        finally:
            for temporary in list(LIVE_TEMPORARIES):
                remove_quietly(temporary)
    return EXIT_OK


def cancel_in_worker(worker: JobWorker, signal_name: str) -> None:
    billed = "the request was already sent and may still be billed" if worker.record.get("sent") \
        else "nothing was sent, nothing is billed"
    if not worker.record.get("received"):
        set_spools_aside(worker.files, worker.record)
    worker.fail(InterruptedRun(f"job {worker.files.job_id} was cancelled ({signal_name}); {billed}",
                               kind="cancelled", hint="run the same command again to make a new request"),
                state="cancelled")


def item_record(item: BatchItem, status: str, *, result: Optional[RunResult] = None,
                error: Optional[ToolError] = None, elapsed_s: float = 0.0) -> dict[str, Any]:
    """One manifest line, and one entry of the --json summary."""
    files = result.files if result else ()
    paths = [str(s.path) for s in files] if result else [str(p) for p in item.done_paths]
    return {"item": item.number, "prompt": item.job.prompt, "status": status, "fingerprint": item.fingerprint,
            "n": item.job.n, "target": str(item.job.output.path), "paths": paths,
            "warnings": list(result.warnings) if result else [],
            "sha256": [s.sha256 for s in files], "sizes": [f"{s.info.width}x{s.info.height}" for s in files],
            "requested_and_real": [requested_and_real(item.job, s) for s in files],
            "usage": result.meta.get("usage") if result else None, "cost": result.cost if result else None,
            "model": item.job.fields["model"], "quality": item.job.fields.get("quality", "auto"),
            "shape": list(request_shape(item.job.fields, item.job.mode)),
            "request_id": (result.request_id or None) if result else None,
            "elapsed_s": round(elapsed_s, 3), "error": error_document(error) if error else None,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


class BatchRun:
    """A batch inside its job's worker: threads take items in order and share one Gate; each item's
    record goes to the manifest and, as an event, to the command. All state is under self.lock."""

    def __init__(self, plan: BatchPlan, config: ApiConfig, worker: JobWorker) -> None:
        self.plan, self.config, self.worker = plan, config, worker
        self.gate = Gate(plan.jobs)
        self.lock = threading.Lock()
        self.item_ended = threading.Condition(self.lock)    # a budget check waits for the items in flight
        self.pending = list(reversed(plan.to_run))      # taken from the end, so in file order
        self.stop_error: Optional[ToolError] = None     # set: no new item starts
        self.crashed = False                            # an item ended in a bug (exit 1)
        self.spent = 0.0                                # USD of the items that ended (--max-cost)
        self.lines: dict[int, dict[str, Any]] = {}      # each ended item's manifest line, for the gallery
        self.gallery_at = 0.0                           # when the page was last written
        self.started = time.monotonic()
        self.reserved: dict[int, float] = {}            # the most each item in flight may cost
        self.seen_cost: dict[tuple, float] = {}         # the most an item of each shape really cost
        self.workers_left = 0
        self.all_done = threading.Event()

    def start(self) -> None:
        for item in self.plan.items:
            if item.skipped:
                self.finish(item_record(item, "skipped"))
        with self.lock:
            problem = self.refresh_gallery() if self.plan.gallery else None   # the page is there from the start
        if problem:
            self.worker.emit("warning", message=problem)
        workers = min(self.plan.jobs, len(self.pending))
        self.workers_left = workers
        if not workers:
            self.all_done.set()
        for _ in range(workers):
            threading.Thread(target=self.work, daemon=True).start()

    def take(self) -> Optional[BatchItem]:
        """The next item, unless the batch stopped; with --max-cost, one that fits what is left once the
        items in flight have ended (so -j does not change what is made)."""
        with self.lock:
            while not self.stop_error and self.pending:
                item = self.pending[-1]
                if not self.over_budget(item):
                    self.reserved[item.number] = self.most_it_may_cost(item)
                    return self.pending.pop()
                if not self.reserved:
                    self.stop_error = self.budget_error(item)
                    break
                self.item_ended.wait()
            return None

    def most_it_may_cost(self, item: BatchItem) -> float:
        """Its estimate, or what an item of the same shape really cost, whichever is more."""
        shape = request_shape(item.job.fields, item.job.mode)
        return max(item.cost_high or 0.0, self.seen_cost.get(shape, 0.0))

    def over_budget(self, item: BatchItem) -> bool:
        """What has been spent, plus the most the items in flight and this one may cost."""
        budget = self.plan.max_cost
        return budget is not None and self.spent + sum(self.reserved.values()) + self.most_it_may_cost(item) > budget

    def budget_error(self, item: BatchItem) -> ToolError:
        waiting = ", ".join(str(i.number) for i in reversed(self.pending))
        err = ToolError(f"--max-cost ${self.plan.max_cost:g} reached: ${self.spent:.4f} spent, and item {item.number} "
                        f"may cost up to ${self.most_it_may_cost(item):.4f}; not run: item {waiting}",
                        kind="budget", hint="ask the user before spending more; the same command with a larger "
                                            "--max-cost sends only the items not made (the budget counts from then)")
        err.exit_code = EXIT_BATCH_PARTIAL
        return err

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
                last = not self.workers_left
                problem = self.refresh_gallery() if last and self.plan.gallery else None  # what was not run
                if last:
                    self.all_done.set()
            if problem:
                self.worker.emit("warning", message=problem)

    def run_item(self, item: BatchItem) -> None:
        """A batch thread's boundary: a bug in one item is recorded as that item failing with exit 1
        (traceback in the job's log), never as a success, and the other items go on."""
        started = time.monotonic()
        self.worker.emit("item_started", item=item.number)
        try:
            record = self.make_item(item)
        except Signalled:           # cancelled before its last byte went out
            remove_quietly(self.worker.files.spool(item.number))
            record = item_record(item, "failed", elapsed_s=time.monotonic() - started, error=InterruptedRun(
                "cancelled before it was completely sent; nothing was billed", kind="cancelled"))
        except Exception as err:  # the documented boundary of a batch thread
            self.worker.log_bug()
            bug = ToolError(f"a bug: {type(err).__name__}: {err} (traceback in {self.worker.files.log})")
            record = item_record(item, "failed", error=bug, elapsed_s=time.monotonic() - started)
            with self.lock:
                self.crashed = True
        self.finish(record)

    def make_item(self, item: BatchItem) -> dict[str, Any]:
        spool = self.worker.files.spool(item.number)
        started = time.monotonic()
        try:
            received = fetch_answer(item.job, self.config, spool=spool, gate=self.gate, on_stage=self.worker.on_stage,
                                    emit=functools.partial(self.worker.emit, item=item.number))
        except ToolError as err:
            if isinstance(err, AuthError):
                self.stop(err)
            return item_record(item, "failed", error=err, elapsed_s=time.monotonic() - started)
        try:
            result = save_spooled_answer(item.job, spool, received, self.config)
        except ToolError as err:
            err.message += f"; the raw answer is kept in {keep_raw_answer(spool)}"
            return item_record(item, "failed", error=err, elapsed_s=received.elapsed_s)
        if not result.error or result.error.kind == "saved_to_fallback":
            remove_quietly(spool)
        else:
            result.error.message += f"; the raw answer is kept in {keep_raw_answer(spool)}"
        return item_record(item, "failed" if result.error else "ok", result=result, error=result.error,
                           elapsed_s=received.elapsed_s)

    def finish(self, record: dict[str, Any]) -> None:
        record = scrub(record, self.worker.key)
        with self.lock:
            cost = (record.get("cost") or {}).get("usd")
            reserved = self.reserved.pop(record["item"], 0.0)
            self.spent += max(0.0, cost) if cost is not None else reserved
            if cost is not None and record.get("shape"):
                shape = tuple(record["shape"])
                self.seen_cost[shape] = max(self.seen_cost.get(shape, 0.0), cost)
            self.item_ended.notify_all()
            try:
                append_manifest(self.plan.manifest, record)
            except OSError as err:
                self.worker.emit("warning", message=f"the manifest {self.plan.manifest} could not be written: "
                                                    f"{err.strerror or err}")
            self.worker.emit("item_done", record=record)
            self.lines[record["item"]] = manifest_line(record, self.plan.manifest.parent)
            due = self.plan.gallery and time.monotonic() - self.gallery_at >= GALLERY_REFRESH_S
            page = self.gallery_page() if due else None
        problem = write_gallery(self.plan.gallery_path, *page) if page else None    # the disk, outside the lock
        if problem:
            self.worker.emit("warning", message=problem)

    def refresh_gallery(self) -> Optional[str]:
        return write_gallery(self.plan.gallery_path, *self.gallery_page())

    def gallery_page(self) -> tuple[str, str, list[dict[str, Any]]]:
        """The page as the batch stands (title, totals, entries): each ended item as the manifest has
        it, the others waiting, running or not run. Under self.lock."""
        def waiting(item: BatchItem) -> str:
            return "running" if item.number in self.reserved else "not_run" if self.stop_error else "waiting"

        entries = [self.lines.get(item.number) or {"item": item.number, "prompt": item.job.prompt,
                                                   "status": waiting(item)} for item in self.plan.items]
        counts = {status: sum(e["status"] == status for e in entries)
                  for status in ("ok", "failed", "skipped", "running", "waiting", "not_run")}
        spent = total_cost(list(self.lines.values()))
        totals = (f"{counts['ok']} done, {counts['failed']} failed, {counts['skipped']} skipped, {counts['not_run']} "
                  f"not run, {counts['running']} running, {counts['waiting']} waiting; "
                  f"{clock(time.monotonic() - self.started)}" + (f"; {cost_text(spent)}" if spent else ""))
        self.gallery_at = time.monotonic()
        return self.plan.description or self.plan.source.name, totals, entries

    def wait(self) -> None:
        while not self.all_done.wait(0.1):
            pass


# --- Commands ---


def silence(stream: IO[str]) -> None:
    with contextlib.suppress(OSError, ValueError, AttributeError):
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, stream.fileno())
        os.close(null)


class Console:
    """All printing goes through here: stdout for results, stderr for the rest; the key is masked."""

    def __init__(self, *, json_mode: bool, quiet: bool = False, events_mode: bool = False) -> None:
        self.json_mode = json_mode
        self.quiet = quiet
        self.events_mode = events_mode      # stderr carries JSON Lines events only
        self.secrets: list[str] = []
        self.started = time.monotonic()
        self._live = 0     # the width of the live line on screen (0: none)

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            text = redact(text, secret)
        return text

    def as_json(self, payload: Mapping[str, Any], **options: Any) -> str:
        """JSON with the key masked in its strings only, so no name is ever touched."""
        for secret in self.secrets:
            payload = scrub(payload, secret)
        return json.dumps(payload, **options)

    def _write(self, stream: IO[str], text: str, *, masked: bool = False) -> None:
        """A reader that went away (| head -c1) or a full disk (> /dev/full) does not stop the run: the
        stream is pointed at the null device, so not even the exit's flush complains."""
        try:
            stream.write(text if masked else self.redact(text))
            stream.flush()
        except (OSError, ValueError):
            silence(stream)

    def progress(self, text: str) -> None:
        if not self.quiet and not self.events_mode:
            self.end_live()
            self._write(sys.stderr, text + "\n")

    def live(self, text: str) -> None:
        if not self.events_mode:
            self._write(sys.stderr, "\r" + text.ljust(max(60, self._live)))
            self._live = max(self._live, len(text))

    def event(self, name: str, **fields: Any) -> None:
        """One JSON line on stderr with --events; t counts seconds from this command's start."""
        if self.events_mode:
            line = {"event": name, "t": round(time.monotonic() - self.started, 3), **fields}
            self._write(sys.stderr, self.as_json(line, ensure_ascii=False) + "\n", masked=True)

    def end_live(self) -> None:
        if self._live:
            self._write(sys.stderr, "\r" + " " * max(60, self._live) + "\r")
            self._live = 0

    def warn(self, text: str) -> None:
        if self.events_mode:
            self.event("warning", message=text)
            return
        self.end_live()
        self._write(sys.stderr, f"warning: {text}\n")

    def result(self, text: str) -> None:
        if not self.json_mode:
            self.end_live()     # on a terminal stdout and stderr share the line the status is on
            self._write(sys.stdout, text + "\n")

    def document(self, payload: Mapping[str, Any]) -> None:
        self._write(sys.stdout, self.as_json(payload, indent=2) + "\n", masked=True)

    def error(self, err: ToolError) -> None:
        if self.events_mode:
            self.event("error", **error_document(err))
            return
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
    low, high = profile_for(job.fields["model"]).seconds
    slowest = ", up to 5 min at high quality or 4K" if job.fields["model"] == DEFAULT_MODEL else ""
    return (f"{action} {count} with {job.fields['model']}" + (f" ({settings})" if settings else "") + stream
            + f": usually {low}-{high} s{slowest}")


# How a worker's event reads on a console; the others are shown only with --events.
EVENT_LINES: dict[str, Callable[[Mapping[str, Any]], str]] = {
    "retry": lambda e: str(e["message"]),
    "preview": lambda e: (f"image {e['image']}, " if "image" in e else "") +
    f"preview {e['index']}/{e['of']} after {e['after_s']:.0f} s: {e['path']}",
}


class JobWatch:
    """The command's side of a job: follows its events file and record until the job ends, shows
    what happens, and knows when to stop waiting. Main thread only."""

    def __init__(self, files: JobFiles, console: Console, *,
                 on_event: Callable[[Mapping[str, Any]], bool] = lambda event: False) -> None:
        self.files = files
        self.console = console
        self.on_event = on_event        # a batch takes its item events here
        self.offset = 0                 # how far the events file has been read
        self.last_heartbeat = time.monotonic()
        self.record: tuple[Any, Optional[dict[str, Any]]] = (None, None)   # (stat key, record read then)

    def current_record(self) -> Optional[dict[str, Any]]:
        """The record, parsed again only when the file changed: a batch's record holds its whole plan,
        and the wait polls ten times a second."""
        try:
            info = os.stat(self.files.record)
        except OSError:
            return None
        key = (info.st_mtime_ns, info.st_size, info.st_ino)
        if key != self.record[0] or self.record[1] is None:     # a failed read is tried again
            self.record = (key, read_record(self.files.record))
        return self.record[1]

    def read_events(self) -> list[dict[str, Any]]:
        events, self.offset = read_events(self.files.events, self.offset)
        return events

    def show(self, event: Mapping[str, Any]) -> None:
        fields = {k: v for k, v in event.items() if k not in ("event", "at")}
        self.console.event(str(event["event"]), job=self.files.job_id, **fields)
        if self.on_event(event) or self.console.events_mode:
            return
        if event["event"] == "warning":
            self.console.warn(str(event["message"]))
        elif event["event"] in EVENT_LINES:
            self.console.progress(EVENT_LINES[event["event"]](event))

    def pump(self, *, beat: bool = True) -> None:
        if beat and time.monotonic() - self.last_heartbeat >= HEARTBEAT_S:
            self.last_heartbeat = time.monotonic()
            self.console.event("heartbeat", job=self.files.job_id)
        for event in self.read_events():
            self.show(event)

    def wait(self, *, max_wait: Optional[float], on_poll: Callable[[], None] = lambda: None) -> dict[str, Any]:
        """The job's record once it has ended; StillRunning when max_wait runs out first."""
        started, polls = time.monotonic(), iter(POLL_INTERVALS_S)
        while True:
            self.pump()
            on_poll()
            reap_workers()
            record = self.current_record()
            if record and (record["state"] in FINISHED_STATES or not worker_alive(self.files, record)):
                record = conclude(self.files, record, self.console)
                if record["state"] in FINISHED_STATES:
                    self.pump(beat=False)
                    return record
            if max_wait is not None and time.monotonic() - started >= max_wait:
                raise still_running(self.files.job_id, f"still running after --max-wait {max_wait:g} s")
            time.sleep(next(polls, POLL_INTERVALS_S[-1]))


def read_events(path: Path, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """The events after offset, and where the next read starts. Whole lines only: the worker may be
    halfway through writing the next one."""
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            chunk = handle.read()
    except FileNotFoundError:
        return [], offset
    complete = chunk[:chunk.rfind(b"\n") + 1]
    events = []
    for line in complete.splitlines():
        with contextlib.suppress(ValueError):       # a line torn by a killed worker says nothing
            event = parse_json(line)
            events.append(event) if isinstance(event, dict) and "event" in event else None
    return events, offset + len(complete)


def still_running(job_id: str, why: str, *, exit_code: int = EXIT_STILL_RUNNING) -> StillRunning:
    return StillRunning(f"{why}; the request goes on as job {job_id}", job_id=job_id, exit_code=exit_code,
                        hint=f"run the same command again, or: {PROG} --attach {job_id}")


def settle_dead_worker(files: JobFiles, record: dict[str, Any]) -> dict[str, Any]:
    """A worker that died without finishing: what its record proves is all there is to say."""
    if record["state"] in FINISHED_STATES:
        return record
    if record.get("sent"):
        err: ToolError = MaybeBilledError(f"the worker of job {files.job_id} stopped after the request was sent; "
                                          "the answer is lost", kind="worker_lost",
                                          hint=f"it may have been billed: check your usage; the log is {files.log}")
    else:
        err = ServiceError(f"the worker of job {files.job_id} stopped before the request was sent; nothing was "
                           "billed", kind="worker_lost", hint="run the same command again")
    return end_abandoned_job(files, record, state="failed", err=err)


def end_abandoned_job(files: JobFiles, record: dict[str, Any], *, state: str, err: ToolError) -> dict[str, Any]:
    """Under the job's lock, its worker gone: its half-written files go, its spools are set aside and
    the record ends. A single job's answer waiting in its spool is not ended: conclude saves it."""
    if record["state"] in FINISHED_STATES:
        return record
    remove_stale_temporaries(files, record)
    if needs_recovery(files, record):
        return record
    kept = set_spools_aside(files, record)
    record.update(state=state, error=error_document(err), exit_code=err.exit_code,
                  note=f"raw answers kept: {', '.join(kept)}" if kept else record.get("note"))
    write_record(files, record)
    return record


def set_spools_aside(files: JobFiles, record: Mapping[str, Any]) -> list[str]:
    """The spools of a job that will not save them: a batch item's may hold a whole paid answer, so it
    is kept as ID.item-N.answer; any other is an answer cut short, and goes. Returns what was kept."""
    kept = []
    for spool in files.folder.glob(f"{files.job_id}.*spool"):
        if record.get("kind") == "batch" and os.path.getsize(spool):
            kept.append(str(keep_raw_answer(spool)))
        else:
            remove_quietly(spool)
    return kept


def remove_stale_temporaries(files: JobFiles, record: Mapping[str, Any]) -> None:
    """A worker killed outright (SIGKILL) leaves its half-written files; the next command removes them:
    .NAME.xxxx.part beside each target and in the fallback folder, previews, and its own record's."""
    import glob

    tag = f"{files.job_id}-*.part"
    patterns = [(files.folder, f".{files.job_id}.json.*.part")]
    for target in record.get("targets") or ():
        path = Path(record.get("cwd") or ".") / target
        name, stem = glob.escape(short_name(path.name)), glob.escape(short_name(path.stem))
        patterns += [(path.parent, f".{name}*.{tag}"), (path.parent, f".{stem}.partial*.{tag}"),
                     (fallback_folder(create=False), f".{name}*.{tag}")]
    for folder, pattern in patterns:
        for leftover in folder.glob(pattern):
            remove_quietly(leftover)


def recover_from_spool(files: JobFiles, record: dict[str, Any], console: Console) -> dict[str, Any]:
    """An answer that was received but not saved (the worker died, or the disk failed) is saved now,
    from the spool, with no new request."""
    console.progress(f"job {files.job_id}: saving the answer received earlier; nothing new is sent")
    worker = JobWorker(files, record, next(iter(console.secrets), ""))   # a key the server echoed is masked
    received = Received(**{**record["response"], "preview_paths": tuple(Path(p) for p in
                                                                        record["response"]["preview_paths"])})
    finish_single(worker, job_from_plain(record["spec"]), files.spool(), received)
    return worker.record


def needs_recovery(files: JobFiles, record: Mapping[str, Any]) -> bool:
    """Received and not saved: the worker died while saving, or the disk failed it."""
    unsaved = record["state"] not in FINISHED_STATES or record.get("note") == "received, not saved"
    return bool(unsaved and record.get("received") and record.get("kind") == "single"
                and not record.get("result") and files.spool().exists())


def is_attachable(files: JobFiles, record: Mapping[str, Any]) -> bool:
    """Running, or ended with a result that no command has reported yet; a job whose worker died
    before sending holds nothing worth attaching to."""
    if needs_recovery(files, record):
        return True                     # an answer paid for and not saved yet: finish it first
    if files.reported.exists() or (record["state"] == "cancelled" and not record.get("sent")):
        return False
    if record["state"] in FINISHED_STATES or worker_alive(files, record):
        return True
    return bool(record.get("sent"))


def mark_reported(files: JobFiles) -> None:
    with contextlib.suppress(OSError):
        files.reported.touch()


@dataclasses.dataclass(frozen=True)
class JobStart:
    """A job found or started for this command."""

    files: JobFiles
    attached: bool
    record: dict[str, Any]

    @property
    def detached(self) -> bool:
        """False when the worker is a thread of a command (this one, or another's)."""
        return bool(self.record.get("detached"))


def find_or_start_job(folder: Path, record: dict[str, Any], *, key: str, env: Mapping[str, str],
                      console: Console) -> JobStart:
    """Attach to the job with this fingerprint that is running or unreported; else start one. A
    batch whose manifest another running job writes is refused."""
    mode = worker_mode(env)             # a bad switch is refused before any record is written
    with state_folder_errors(folder), state_lock(folder):
        records, removed = prune_records(folder, list_records(folder))
        for answer in removed:
            console.warn(f"removed {answer}, the raw answer of a job that ended {JOB_KEEP_S // 86400} days ago")
        for existing in reversed(records):
            files = JobFiles(folder, existing["id"])
            if existing.get("fingerprint") == record["fingerprint"] and is_attachable(files, existing):
                return JobStart(files, True, existing)
            if record.get("manifest") and existing.get("manifest") == record["manifest"] \
                    and worker_alive(files, existing):
                raise UsageError(f"job {existing['id']} is running this batch with other settings "
                                 f"(manifest {record['manifest']})",
                                 hint=f"wait for it ({PROG} --attach {existing['id']}) or stop it (--cancel)")
        files = JobFiles(folder, record["id"])
        write_record(files, record)
        start_worker(files, record, mode=mode, key=key, env=env, console=console)
        return JobStart(files, False, record)


def new_record(kind: str, *, fingerprint: str, spec: Mapping[str, Any], config: ApiConfig, prompt: str,
               targets: Sequence[str], manifest: str = "") -> dict[str, Any]:
    """A job as the command hands it over: everything the worker needs, except the key."""
    now = time.time()
    return {"id": new_job_id(), "kind": kind, "tool": f"{TOOL_NAME} {VERSION}", "fingerprint": fingerprint,
            "state": "starting", "created_at": now, "updated_at": now, "pid": None, "detached": True,
            "sent": False, "received": False, "cwd": os.getcwd(), "prompt": prompt[:PROMPT_EXCERPT_CHARS],
            "targets": list(targets), "manifest": manifest, "spec": spec, "config": config_to_plain(config),
            "response": None, "result": None, "error": None, "exit_code": None, "note": None,
            "peak_rss_kib": None}


def attached_line(record: Mapping[str, Any]) -> str:
    age = time.time() - record.get("created_at", time.time())
    return f"attached to job {record['id']} (started {age:.0f} s ago); nothing new was sent"


def begin_job(start: JobStart, console: Console, *, detach: bool) -> Optional[int]:
    """Say which job this is; with --detach that is all (exit 0)."""
    job_id = start.files.job_id
    if start.attached:
        console.progress(attached_line(start.record))
        console.event("attached", job=job_id, state=start.record["state"])
    else:
        console.event("job_started", job=job_id, detached=start.detached)
    if not detach:
        return None
    if not start.detached:
        console.warn("--detach needs a worker process; the job runs in the foreground instead")
        return None
    console.result(f"job {job_id}")
    console.event("detached", job=job_id)
    if console.json_mode:
        console.document({"ok": True, "job": job_id, "state": start.record["state"]})
    return EXIT_OK


def interrupt_job(start: JobStart, signal_name: str) -> ToolError:
    """Ctrl-C, SIGTERM or SIGHUP while waiting: before the request is completely sent the job is
    cancelled (nothing billed); after, the command stops waiting and the job goes on."""
    code = SIGNAL_EXITS[signal_name]
    record = read_record(start.files.record) or start.record
    if not start.detached:
        err = interrupted_in_process(start.files, record)
        err.exit_code = code
        return err
    if not record.get("sent") and record["state"] not in FINISHED_STATES:
        with state_folder_errors(start.files.folder):
            record = cancel_worker(start.files, record, mode="unless-sent")
    if not record.get("sent") and record["state"] not in ("done", "failed"):
        settled = "was cancelled" if record["state"] == "cancelled" else "is being cancelled"
        err = InterruptedRun(f"interrupted before the request was completely sent: job {start.files.job_id} "
                             f"{settled} and nothing was billed", hint="run the same command again to send it")
        err.exit_code = code
        return err
    return still_running(start.files.job_id, f"interrupted ({signal_name})", exit_code=code)


# What an interrupt leaves when the job was a thread of the command: it ends with the command.
IN_PROCESS_ENDINGS = {
    "unsent": ("interrupted before the request was completely sent: nothing was billed",
               "run the same command again to send it"),
    "sent": ("interrupted after the request was sent: it may be billed, and with no worker process "
             "its answer is lost with this command", "check your APIYI usage before sending it again"),
    "received": ("interrupted while saving: the answer is kept in the job's spool",
                 "run the same command again to save it; nothing new is sent"),
}


def interrupted_in_process(files: JobFiles, record: Mapping[str, Any]) -> InterruptedRun:
    """The truth about what is left: an unsent request stops before its next piece, this command's
    temporaries go, the previews written stay."""
    with contextlib.suppress(OSError):
        files.cancel.write_text("unless-sent", encoding="ascii")
    record = settled_record(files, record)
    for temporary in [] if record.get("received") else list(LIVE_TEMPORARIES):
        remove_quietly(temporary)     # a save under way is left to finish, or to the next command
    stage = "received" if record.get("received") else "sent" if record.get("sent") else "unsent"
    message, hint = IN_PROCESS_ENDINGS[stage]
    previews = written_previews(files)
    kept = f"; the last preview is kept at {', '.join(previews)}" if previews else ""
    return InterruptedRun(message + kept, hint=hint)


def settled_record(files: JobFiles, record: Mapping[str, Any], wait_s: float = 2.0) -> Mapping[str, Any]:
    """The record once the worker has taken its side: the last byte went out (it records that at
    once), or it stopped at the next piece, or it ended. Until then the interrupt may have come
    between the last byte and its record."""
    deadline = time.monotonic() + wait_s
    while not record.get("sent") and record.get("state") not in FINISHED_STATES and time.monotonic() < deadline:
        time.sleep(0.02)
        record = read_record(files.record) or record
    return record


def written_previews(files: JobFiles) -> list[str]:
    """The newest preview of each image that is still on disk, from the job's events."""
    latest: dict[int, str] = {}
    for event in read_events(files.events)[0]:
        if event["event"] == "preview" and isinstance(event.get("path"), str):
            latest[int(event.get("image") or 1)] = event["path"]
    return [path for path in latest.values() if os.path.isfile(path)]


def cancel_worker(files: JobFiles, record: dict[str, Any], *, mode: str = "always") -> dict[str, Any]:
    """Ask the job's worker to stop and return its record after it: the worker decides (see
    JobWorker.on_terminate), so an interrupted command never cancels a request already sent. A
    worker that is gone, or never started, is settled here under its lock."""
    files.cancel.write_text(mode, encoding="ascii")
    with abandoned_record(files, record) as gone:
        if gone:
            return mark_cancelled(files, gone)
    latest = wait_for_pid(files) or record
    if latest.get("detached") and latest.get("pid") and (mode == "always" or os.name != "nt"):
        signal_worker(int(latest["pid"]))   # on Windows this is TerminateProcess: only for --cancel
    deadline = time.monotonic() + CANCEL_WAIT_S
    while time.monotonic() < deadline:
        latest = read_record(files.record) or latest
        if latest["state"] in FINISHED_STATES or (mode == "unless-sent" and latest.get("sent")):
            return latest
        with abandoned_record(files, latest) as gone:
            if gone:
                return mark_cancelled(files, gone)
        time.sleep(0.02)
    return latest


def signal_worker(pid: int) -> None:
    import signal

    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGTERM)


def mark_cancelled(files: JobFiles, record: dict[str, Any]) -> dict[str, Any]:
    """Under the job's lock, its worker gone (or never started): the job ends cancelled."""
    billed = "the request was already sent and may still be billed" if record.get("sent") else "nothing was billed"
    err = InterruptedRun(f"job {files.job_id} was cancelled; {billed}", kind="cancelled",
                         hint="run the same command again to make a new request")
    return end_abandoned_job(files, record, state="cancelled", err=err)


def wait_for_pid(files: JobFiles) -> Optional[dict[str, Any]]:
    """A worker records its pid just after taking its lock; give it a moment."""
    deadline = time.monotonic() + 2
    record = read_record(files.record)
    while (record is None or not record.get("pid")) and time.monotonic() < deadline:
        time.sleep(0.01)
        record = read_record(files.record)
    return record


def rebase(path: Path, cwd: str) -> Path:
    """A path the worker recorded relative to its folder, as seen from this command's folder."""
    return path if path.is_absolute() or os.path.abspath(cwd) == os.getcwd() else Path(cwd) / path


def follow_single(start: JobStart, console: Console, *, max_wait: Optional[float]) -> int:
    watch = JobWatch(start.files, console)
    began = time.monotonic() - max(0.0, time.time() - start.record.get("created_at", time.time()))
    try:
        with ProgressTicker(console, began), state_folder_errors(start.files.folder):
            record = watch.wait(max_wait=max_wait)
    except (KeyboardInterrupt, Signalled) as stop:
        raise interrupt_job(start, signal_name(stop)) from None
    return report_single(start.files, record, console)


def signal_name(stop: BaseException) -> str:
    return stop.name if isinstance(stop, Signalled) else "SIGINT"


def report_single(files: JobFiles, record: dict[str, Any], console: Console) -> int:
    """The job's outcome as this command's own: the same stdout, --json document and exit code.
    It counts as reported once printed, not before: a command stopped in between leaves it to the next."""
    job = job_from_plain(record["spec"])
    if record.get("result"):
        result = result_from_plain(job, record["result"])
        files_seen = tuple(dataclasses.replace(s, path=rebase(s.path, record["cwd"])) for s in result.files)
        code = report_result(dataclasses.replace(result, files=files_seen), console)
    else:
        err = error_from_document(record.get("error") or {"message": f"job {files.job_id} ended without a result"})
        if record.get("note") == "received, not saved":
            err.message += f"; the answer is kept in {files.spool()}"
            err.hint = f"make the folder writable, then run the same command again (or --attach {files.job_id})"
        code = report_failure(err, console)
    mark_reported(files)
    return code


def report_failure(err: ToolError, console: Console) -> int:
    """The last word of a run that failed: the --json document, then the error line."""
    if isinstance(err, StillRunning):
        console.result(f"job {err.job_id}")
    if console.json_mode:
        console.document(failure_document(err))
    console.error(err)
    return err.exit_code


def conclude(files: JobFiles, record: dict[str, Any], console: Console) -> dict[str, Any]:
    """The record once nothing will change it: a dead worker's job settled, an answer received but not
    saved saved now. Done under the worker's lock, so never while a worker runs, nor twice at once."""
    if record["state"] in FINISHED_STATES and not needs_recovery(files, record):
        return record
    with abandoned_record(files, record, wait_s=1) as gone:
        if not gone:
            return read_record(files.record) or record      # a worker still runs it: wait on
        latest = settle_dead_worker(files, gone)
        return recover_from_spool(files, latest, console) if needs_recovery(files, latest) else latest


class BatchMonitor:
    """The command's view of a batch job, built from its item events: a line per item, the live
    status line on a terminal, and the summary. Main thread only."""

    def __init__(self, plan: BatchPlan, console: Console) -> None:
        self.plan, self.console = plan, console
        self.records: dict[int, dict[str, Any]] = {}    # item number -> its record, as items end
        self.running: set[int] = set()
        self.started = time.monotonic()
        self.last_live = 0.0
        self.in_flight = plan.jobs          # as the worker's gate last announced it (429s change it)

    def on_event(self, event: Mapping[str, Any]) -> bool:
        """Takes the item events; a retry (a 429 that lowers the concurrency too) is shown with its
        item, an item's previews stay off the console."""
        if event["event"] == "retry" and "item" in event:
            self.console.progress(f"item {event['item']}: {event['message']}")
            self.in_flight = int(event.get("in_flight") or self.in_flight)
        elif event["event"] == "item_started":
            self.running.add(int(event["item"]))
        elif event["event"] == "item_done":
            record = event["record"]
            self.running.discard(record["item"])
            self.records[record["item"]] = record
            if not self.console.events_mode:
                self.report_item(record)
        return "item" in event or event["event"] == "item_done"

    def report_item(self, record: Mapping[str, Any]) -> None:
        position = f"[{len(self.records)}/{len(self.plan.items)}] item {record['item']}"
        if record["status"] == "skipped":
            self.console.progress(f"{position} skipped, already done: {', '.join(record['paths'])}")
            return
        for path in record["paths"]:
            self.console.result(path)
        for warning in record.get("warnings") or ():
            self.console.warn(f"item {record['item']}: {warning}")
        if record["error"]:
            error = record["error"]
            self.console.progress(f"{position} failed (exit {error['exit_code']}, {error['kind']}): "
                                  f"{error['message']}")
        else:
            self.console.progress(f"{position} ok in {record['elapsed_s']:.0f} s: {', '.join(record['paths'])}"
                                  + (f"; ~{clock(self.time_left())} left" if len(self.records) < len(self.plan.items)
                                     else ""))

    def show_status(self) -> None:
        live = sys.stderr.isatty() and not self.console.quiet
        if live and time.monotonic() - self.last_live >= PROGRESS_TTY_INTERVAL_S:
            self.last_live = time.monotonic()
            self.console.live(self.status_line())

    def time_left(self) -> float:
        """Rounds of what is in flight now (the gate's limit, as 429s changed it) times the average item."""
        ended = [r for r in self.records.values() if r["status"] != "skipped"]
        left = len(self.plan.items) - len(self.records)
        average = sum(r["elapsed_s"] for r in ended) / len(ended) if ended else sum(typical_seconds(self.plan)) / 2
        return math.ceil(left / max(1, self.in_flight)) * average

    def status_line(self) -> str:
        ended = [r for r in self.records.values() if r["status"] != "skipped"]
        failed = sum(r["status"] == "failed" for r in ended)
        elapsed = time.monotonic() - self.started
        return (f"batch: {len(ended) - failed} done, {failed} failed, {len(self.running)} running, "
                f"{len(self.plan.items)} total; {clock(elapsed)} elapsed, ~{clock(self.time_left())} left")


def follow_batch(start: JobStart, console: Console, *, max_wait: Optional[float]) -> int:
    monitor = BatchMonitor(plan_from_plain(start.record["spec"]), console)
    watch = JobWatch(start.files, console, on_event=monitor.on_event)
    try:
        with state_folder_errors(start.files.folder):
            record = watch.wait(max_wait=max_wait, on_poll=monitor.show_status)
    except (KeyboardInterrupt, Signalled) as stop:
        console.end_live()
        raise interrupt_job(start, signal_name(stop)) from None
    finally:
        console.end_live()
    code = report_batch(monitor, record, console)
    mark_reported(start.files)
    return code


def batch_outcome(monitor: BatchMonitor, record: Mapping[str, Any],
                  failed: Sequence[Mapping[str, Any]]) -> Optional[ToolError]:
    result = record.get("result") or {}
    if result.get("crashed"):
        return ToolError("a batch item failed with a bug (exit 1, traceback in the job's log); "
                         "run the same command to finish the rest")
    if result.get("stop_error"):
        return error_from_document(result["stop_error"])
    if record["state"] != "done" and record.get("error"):
        return error_from_document(record["error"])
    if failed:
        refused = all(item["error"]["exit_code"] == EXIT_REFUSED for item in failed)
        hint = ("the API refused them: change their prompts or parameters (the same file would be refused "
                "again)" if refused else "run the same command again: only what is missing is generated")
        return BatchPartialError(f"{len(failed)} of {len(monitor.plan.items)} items failed", hint=hint)
    return None


def report_batch(monitor: BatchMonitor, record: Mapping[str, Any], console: Console) -> int:
    plan = monitor.plan
    records = [monitor.records[item.number] for item in plan.items if item.number in monitor.records]
    counts = {status: sum(r["status"] == status for r in records) for status in ("ok", "failed", "skipped")}
    counts = {"total": len(plan.items), **counts, "not_run": len(plan.items) - len(records)}
    failed = [r for r in records if r["status"] == "failed"]
    for item in failed:
        console.progress(f"item {item['item']} failed (exit {item['error']['exit_code']}): {item['error']['message']}")
    elapsed = time.monotonic() - monitor.started
    usage, cost = total_usage(records), total_cost(records)
    console.progress(f"batch: {counts['ok']} ok, {counts['failed']} failed, {counts['skipped']} skipped, "
                     f"{counts['not_run']} not run, of {counts['total']} in {clock(elapsed)}"
                     + "".join(f"; {text}" for text in (usage_text(usage), cost_text(cost)) if text)
                     + f"; manifest {plan.manifest}")
    outcome = batch_outcome(monitor, record, failed)
    if console.json_mode:
        not_run = [{"item": i.number, "prompt": i.job.prompt, "status": "not_run"}
                   for i in plan.items if i.number not in monitor.records]
        console.document({"ok": outcome is None, "batch": str(plan.source), "description": plan.description,
                          "manifest": str(plan.manifest), "job": record["id"], "counts": counts,
                          "items": sorted(records + not_run, key=lambda r: r["item"]), "usage": usage, "cost": cost,
                          "elapsed_s": round(elapsed, 3),
                          **({"error": error_document(outcome)} if outcome else {})})
    if outcome:
        console.error(outcome)
        return outcome.exit_code
    return EXIT_OK


def follow_job(start: JobStart, console: Console, *, max_wait: Optional[float]) -> int:
    follow = follow_single if start.record["kind"] == "single" else follow_batch
    return follow(start, console, max_wait=max_wait)


def find_job(folder: Path, wanted: str) -> tuple[JobFiles, dict[str, Any]]:
    """A job by its id, or the newest with 'last'."""
    records = list_records(folder)
    found = records[-1:] if wanted == "last" else [r for r in records if r["id"] == wanted]
    if not found:
        listed = f"; the newest is {records[-1]['id']}" if records else ""
        raise UsageError(f"no job {wanted!r} in {folder}{listed}", hint=f"see {PROG} --list-jobs")
    return JobFiles(folder, found[0]["id"]), found[0]


def job_state(files: JobFiles, record: Mapping[str, Any]) -> str:
    state = str(record.get("state"))
    if state not in FINISHED_STATES and not worker_alive(files, record):
        return f"{state} (worker gone)"
    return state + (f", {record['note']}" if record.get("note") else "")


def job_summary(files: JobFiles, record: Mapping[str, Any]) -> dict[str, Any]:
    result = record.get("result") or {}
    outputs = [f["path"] for f in result.get("files") or ()] or list(record.get("targets") or ())
    return {"id": record["id"], "kind": record.get("kind"), "state": job_state(files, record),
            "age_s": round(time.time() - record.get("created_at", time.time()), 1), "prompt": record.get("prompt"),
            "outputs": outputs, "sent": bool(record.get("sent")), "reported": files.reported.exists(),
            "exit_code": record.get("exit_code"), "peak_rss_kib": record.get("peak_rss_kib")}


def run_doctor(args: argparse.Namespace, console: Console, env: Mapping[str, str]) -> int:
    """One line per check, OK / WARN / FAIL with a fix; no billed call is made (GET /models only).
    Exit 0, or the code of the first failure."""
    checks: list[dict[str, Any]] = []

    def check(name: str, status: str, detail: str, fix: str = "", code: int = EXIT_OK) -> None:
        checks.append({"check": name, "status": status, "detail": console.redact(detail), "fix": fix,
                       "exit_code": code if status == "FAIL" else EXIT_OK})

    check("python", "OK", f"Python {sys.version_info[0]}.{sys.version_info[1]}")
    base_url = doctor_base_url(args, env, check)
    key = doctor_key(args, env, check, console)
    if base_url:
        doctor_network(base_url, args, check)
        if key and not any(c["status"] == "FAIL" for c in checks):
            doctor_models(base_url, key, args, check)
    doctor_folders(args, env, check)
    failed = next((c for c in checks if c["status"] == "FAIL"), None)
    if console.json_mode:
        console.document({"ok": failed is None, "checks": checks})
    else:
        for c in checks:
            console.result(f"{c['status']:<4} {c['check']}: {c['detail']}" + (f" ({c['fix']})" if c["fix"] else ""))
    return failed["exit_code"] if failed else EXIT_OK


Check = Callable[..., None]


def doctor_base_url(args: argparse.Namespace, env: Mapping[str, str], check: Check) -> str:
    try:
        base_url, _ = check_base_url(args.base_url or env.get(ENV_BASE_URL) or DEFAULT_BASE_URL)
        check_proxy(base_url, allowed=args.allow_http_proxy)
    except UsageError as err:
        check("base URL", "FAIL", err.message, err.hint, EXIT_USAGE)
        return ""
    host = urlsplit_host(base_url)
    problems = [text for text, bad in (("no /v1 at the end", not base_url.rstrip("/").endswith("/v1")),
                                       ("plain http: the key travels unencrypted",
                                        base_url.startswith("http://") and not is_loopback_host(host)),
                                       (f"{host} cuts requests at about 100 s (HTTP 524), shorter than an image "
                                        "takes", host in SHORT_CUT_HOSTS)) if bad]
    check("base URL", "WARN" if problems else "OK", base_url + (": " + "; ".join(problems) if problems else ""),
          f"use {DEFAULT_BASE_URL}" if problems else "")
    return base_url


def doctor_key(args: argparse.Namespace, env: Mapping[str, str], check: Check, console: Console) -> str:
    try:
        key, _ = resolve_api_key(args.api_key, env, required=True)
    except AuthError as err:
        check("API key", "FAIL", err.message, err.hint, EXIT_AUTH)
        return ""
    console.secrets.append(key)
    check("API key", "OK", f"set ({len(key)} characters; never shown)")
    return key


def doctor_network(base_url: str, args: argparse.Namespace, check: Check) -> None:
    """DNS, TCP and TLS, one after another, each failure named with what usually causes it."""
    import socket
    import ssl
    import urllib.request

    host, port = host_and_port(base_url)
    proxy = urllib.request.getproxies().get(base_url.split(":", 1)[0]) if not is_loopback_host(host) else None
    if proxy and not urllib.request.proxy_bypass(host):
        check("proxy", "OK", f"{base_url.split(':', 1)[0]} traffic goes through {proxy}")
        return      # DNS and TCP are the proxy's to make; GET /models below tells the rest
    try:
        socket.getaddrinfo(host, port)
        with socket.create_connection((host, port), timeout=min(args.timeout, CONNECT_TIMEOUT_S)) as raw:
            check("network", "OK", f"{host}:{port} resolves and accepts connections")
            if base_url.startswith("https://"):
                with ssl.create_default_context().wrap_socket(raw, server_hostname=host):
                    check("TLS", "OK", "the certificate is valid for the host")
    except ssl.SSLCertVerificationError as err:
        check("TLS", "FAIL", f"certificate refused: {err.verify_message}",
              "a proxy or antivirus that inspects HTTPS? set SSL_CERT_FILE to its certificate", EXIT_UNAVAILABLE)
    except (OSError, ssl.SSLError, ValueError) as err:       # ValueError: a name the resolver refuses
        reason = reason_text(err)
        check("network", "FAIL", f"{host}:{port}: {reason}", connect_hint(reason), EXIT_UNAVAILABLE)


def host_and_port(base_url: str) -> tuple[str, int]:
    from urllib.parse import urlsplit

    parts = urlsplit(base_url)
    return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)


def doctor_models(base_url: str, key: str, args: argparse.Namespace, check: Check) -> None:
    """GET /models with the key: accepted or not, whether the model is listed, and the clock."""
    request = HttpRequest("GET", base_url + "/models", {"Authorization": f"Bearer {key}", "User-Agent": user_agent(),
                                                        "Accept": "application/json"}, b"")
    try:
        response = send_request(request, timeout_s=min(args.timeout, CONNECT_TIMEOUT_S))
    except ToolError as err:
        check("GET /models", "FAIL", err.message, err.hint, EXIT_UNAVAILABLE)
        return
    if response.status != 200:
        err = error_for_status(response, ApiConfig(base_url, key, args.timeout, 0))
        check("API key" if err.exit_code == EXIT_AUTH else "GET /models", "FAIL", err.message, err.hint,
              err.exit_code if err.exit_code == EXIT_AUTH else EXIT_UNAVAILABLE)
        return
    check("API key", "OK", "accepted by the gateway (GET /models answered 200)")
    doctor_model_listed(response, args.model, check)
    doctor_clock(response, check)


def doctor_model_listed(response: HttpResponse, model: str, check: Check) -> None:
    try:
        listed = {str(m.get("id")) for m in parse_json(response.body).get("data", []) if isinstance(m, dict)}
    except (ValueError, AttributeError, TypeError):
        listed = set()
    if not listed:
        check("model", "WARN", f"{model}: the gateway's model list could not be read")
    elif model in listed:
        check("model", "OK", f"{model} is listed")
    else:
        check("model", "WARN", f"{model} is not in the gateway's list of {len(listed)} models",
              f"check --model (see {PROG} --list-models), or the key's token group")


def doctor_clock(response: HttpResponse, check: Check) -> None:
    from email.utils import parsedate_to_datetime

    try:
        skew = time.time() - parsedate_to_datetime(response.headers.get("date", "")).timestamp()
    except (TypeError, ValueError, IndexError):
        return
    if abs(skew) > CLOCK_SKEW_WARN_S:
        check("clock", "WARN", f"this machine's clock is {skew:+.0f} s off the server's", "set the clock (NTP)")
    else:
        check("clock", "OK", f"within {abs(skew):.0f} s of the server's")


def doctor_folders(args: argparse.Namespace, env: Mapping[str, str], check: Check) -> None:
    for name, folder, create in (("state folder", state_folder(env), True),
                                 ("output folder", expand_path(args.filename).parent if args.filename else Path("."),
                                  False)):
        try:
            check_output_folder(folder, create=create)
            check(name, "OK", f"{folder} is writable")
        except UsageError as err:
            check(name, "FAIL", err.message, err.hint, EXIT_USAGE)


def run_list_models(console: Console) -> int:
    """The profile table, as text or JSON: what each model takes, makes, bills and usually takes."""
    profiles = [profile_for(name) for name in MODEL_PROFILES]
    if console.json_mode:
        console.document({"ok": True, "default": DEFAULT_MODEL, "models": [
            {**dataclasses.asdict(p), "size_tiers": SIZE_TIERS.get(p.tiers)} for p in profiles]})
        return EXIT_OK
    for p in profiles:
        qualities = ",".join(p.qualities) or "-"
        console.result(f"{p.name:<24} {p.line:<8} {p.billing:<17} {p.seconds[0]}-{p.seconds[1]} s  "
                       f"n<={p.max_n}  formats {','.join(p.formats)}  quality {qualities}")
        console.result(f"{'':<24} {p.note}; takes {', '.join(SETTING_FLAGS[a] for a in p.accepts)}"
                       + (f"; ignores {', '.join(SETTING_FLAGS[i] for i in p.ignores)}" if p.ignores else ""))
    return EXIT_OK


def run_list_jobs(console: Console, env: Mapping[str, str]) -> int:
    folder = open_state_folder(env)
    summaries = [job_summary(JobFiles(folder, r["id"]), r) for r in list_records(folder)]
    if console.json_mode:
        console.document({"ok": True, "state_dir": str(folder), "jobs": summaries})
        return EXIT_OK
    for job in summaries:
        console.result(f"{job['id']}  {job['state']}  {clock(job['age_s'])} ago  {job['prompt']!r}  "
                       f"{', '.join(job['outputs'])}")
    if not summaries:
        console.progress(f"no jobs in {folder}")
    return EXIT_OK


def run_cancel(job_id: str, console: Console, env: Mapping[str, str]) -> int:
    files, record = find_job(open_state_folder(env), job_id)
    if record["state"] in FINISHED_STATES:
        console.progress(f"job {files.job_id} has already ended ({record['state']})")
        state = str(record["state"])
    else:
        with state_folder_errors(files.folder):
            after = cancel_worker(files, record)
        state = str(after["state"]) if after["state"] in FINISHED_STATES else \
            "stopping" if after.get("detached") or not after.get("sent") else "running"
        billed = "; the request was already sent and may still be billed" if record.get("sent") else ""
        more = "; no new item starts, the ones in flight finish" if record.get("kind") == "batch" else ""
        console.progress(f"job {files.job_id}: {state}{billed}{more}")
    console.result(f"job {files.job_id} {state}")
    if console.json_mode:
        console.document({"ok": True, "job": files.job_id, "state": state})
    return EXIT_OK


def run_attach(job_id: str, console: Console, env: Mapping[str, str], *, max_wait: Optional[float]) -> int:
    files, record = find_job(open_state_folder(env), job_id)
    console.progress(attached_line(record))
    console.event("attached", job=files.job_id, state=record["state"])
    return follow_job(JobStart(files, True, record), console, max_wait=max_wait)


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
    done = f"done in {result.elapsed_s:.0f} s" + (f" (request id {result.request_id})" if result.request_id else "")
    spent = "; ".join(t for t in (usage_text(result.meta.get("usage")), cost_text(result.cost)) if t)
    for line in (spent, f"revised prompt: {revised}" if revised else "",
                 "" if result.error and not result.files else done):
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
              "bytes": s.size_bytes, **requested_and_real(result.job, s)} for s in result.files]
    document: dict[str, Any] = {"ok": result.error is None, "files": files,
                                "model": result.job.fields["model"], "mode": result.job.mode,
                                "size": result.job.fields.get("size", "auto"),
                                "quality": result.job.fields.get("quality", "auto"),
                                "usage": result.meta.get("usage"), "cost": result.cost,
                                "revised_prompt": first_revised_prompt(result.meta),
                                "request_id": result.request_id or None,
                                "request_id_header": result.request_id_header or None,
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
    extras = {"problems": list(err.problems), "body": err.body, **err.details}
    return {**document, **{name: value for name, value in extras.items() if value}}


def body_lines(described: Mapping[str, Any]) -> list[str]:
    if "json" in described:
        return [json.dumps(described["json"], ensure_ascii=False, indent=2)]
    return ([f"field {k} = {v}" for k, v in described["fields"].items()]
            + [f"file {f['name']}: {f['filename']} ({f['content_type']}, {f['bytes']:,} bytes, "
               f"{f['width']}x{f['height']})" for f in described["files"]])


def dry_run_outputs(job: ImageJob) -> tuple[list[str], list[str]]:
    """The paths a real run would write now, and a warning for each name already taken."""
    outputs, warnings = [], []
    for path in output_paths(job.output, job.n):
        free = path if job.output.overwrite else next_free_path(path)
        outputs.append(str(free))
        if free != path:
            warnings.append(f"{path.name} exists: would save as {free.name} (--overwrite replaces it)")
    return outputs, warnings


def run_dry(job: ImageJob, config: ApiConfig, console: Console, estimate: Mapping[str, Any]) -> int:
    described = describe_request(build_request(job, config), job, config)
    outputs, taken = dry_run_outputs(job)
    for warning in taken:
        console.warn(warning)
    if console.json_mode:
        console.document({"ok": True, "dry_run": True, "mode": job.mode, "request": described,
                          "outputs": outputs, "warnings": list(job.warnings) + taken, "estimate": estimate})
        return EXIT_OK
    lines = [f"{described['method']} {described['url']}"]
    lines += [f"{name}: {value}" for name, value in described["headers"].items()]
    lines += [""] + body_lines(described) + [""] + [f"output: {path}" for path in outputs]
    lines += [estimate_text(estimate)]
    console.result("\n".join(lines))
    return EXIT_OK


def clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}" if minutes >= 60 else f"{minutes}:{secs:02d}"


def typical_seconds(plan: BatchPlan) -> tuple[int, int]:
    """The slowest model's usual seconds among the items: a round lasts as long as its slowest item."""
    return max((profile_for(item.job.fields["model"]).seconds for item in plan.to_run),
               default=profile_for(DEFAULT_MODEL).seconds, key=lambda pair: pair[1])


def batch_estimate(count: int, jobs: int, seconds: tuple[int, int]) -> str:
    rounds = math.ceil(count / jobs)
    low, high = (rounds * s for s in seconds)
    return (f"about {clock(low)}-{clock(high)} ({rounds} round{'s' if rounds > 1 else ''} of "
            f"{seconds[0]}-{seconds[1]} s at -j {jobs}; longer at high quality or 4K)")


def append_manifest(path: Path, record: Mapping[str, Any]) -> None:
    """Appended and synced as each item ends, never rewritten: a crash loses nothing recorded. Paths
    are relative to the manifest's folder; a torn last line gets its line end first."""
    line = manifest_line(record, path.parent)
    with open(path, "a+b") as handle:
        handle.seek(0, os.SEEK_END)
        torn = False
        if handle.tell():
            handle.seek(-1, os.SEEK_END)
            torn = handle.read(1) != b"\n"
        handle.write((b"\n" if torn else b"") + json.dumps(line, ensure_ascii=False).encode("utf-8") + b"\n")
        handle.flush()
        os.fsync(handle.fileno())


def manifest_line(record: Mapping[str, Any], folder: Path) -> dict[str, Any]:
    return dict(record, target=manifest_path(record["target"], folder),
                paths=[manifest_path(p, folder) for p in record["paths"]])


def manifest_path(path: str, folder: Path) -> str:
    relative = relative_below(path, folder)
    return Path(relative).as_posix() if not os.path.isabs(relative) else relative


def total_usage(records: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    totals: dict[str, int] = {}
    for record in records:
        usage = record.get("usage") if isinstance(record.get("usage"), dict) else {}
        for key in ("input_tokens", "output_tokens", "total_tokens"):
            if isinstance(usage.get(key), int):
                totals[key] = totals.get(key, 0) + usage[key]
    return totals


def request_shape(fields: Mapping[str, Any], mode: str) -> tuple[str, ...]:
    """What decides the output tokens of a request: the same shape, the same tokens to expect."""
    return (str(fields.get("model")), mode, str(fields.get("size", "auto")), str(fields.get("quality", "auto")),
            str(fields.get("output_format", "png")), str(fields.get("partial_images", 0)))


def earlier_output_tokens(env: Mapping[str, str], manifest: Optional[Path] = None) -> dict[tuple, list[int]]:
    """Output tokens per image that earlier runs really used, by request shape: from the finished jobs
    in the state folder and a batch's manifest. A record of another shape or version is skipped."""
    seen: dict[tuple, list[int]] = {}
    folder = state_folder(env)
    for record in list_records(folder) if folder.is_dir() else []:
        spec, result = record.get("spec"), record.get("result")
        if record.get("kind") == "single" and isinstance(spec, dict) and isinstance(result, dict):
            with contextlib.suppress(KeyError, TypeError, ValueError, AttributeError):
                job = job_from_plain(spec)
                add_tokens(seen, request_shape(job.fields, job.mode), result["meta"]["usage"], job.n)
    for line in read_manifest(manifest)[0] if manifest else ():
        with contextlib.suppress(KeyError, TypeError, ValueError, AttributeError, IndexError):
            if line["status"] == "ok":
                add_tokens(seen, tuple(line["shape"]), line["usage"], line.get("n", 1))
    return seen


def add_tokens(seen: dict[tuple, list[int]], shape: tuple, usage: Any, n: Any) -> None:
    tokens = token_count(usage.get("output_tokens")) if isinstance(usage, dict) else None
    if tokens and isinstance(n, int) and 0 < n <= MAX_N:
        seen.setdefault(shape, []).append(tokens // n)


def check_budget(estimate: Mapping[str, Any], max_cost: Optional[float], what: str) -> None:
    """--max-cost: refused before sending when the most it may cost is above it, or cannot be known."""
    if max_cost is None:
        return
    if estimate["high"] is None:
        raise UsageError(f"--max-cost ${max_cost:g}: the cost of {what} cannot be estimated ({estimate['source']})",
                         hint="drop --max-cost, or choose a model and quality with published prices", field="max_cost")
    if estimate["high"] > max_cost:
        raise UsageError(f"--max-cost ${max_cost:g}: {what} may cost up to ${estimate['high']:.4f} "
                         f"({estimate_text(estimate)})", hint="raise --max-cost, or ask for less (size, quality, -n)",
                         field="max_cost")


def total_cost(records: Sequence[Mapping[str, Any]]) -> Optional[dict[str, Any]]:
    """The batch's spend: the items that cost something known, and how many ran at an unknown cost."""
    costs = [r["cost"] for r in records if isinstance(r.get("cost"), dict)]
    if not costs:
        return None
    known = [c["usd"] for c in costs if c.get("usd") is not None]
    unknown = len(costs) - len(known)
    note = {"note": f"and {unknown} item{'s' if unknown > 1 else ''} at an unknown cost"} if unknown else {}
    return {"usd": round(sum(known), 6) if known else None, "basis": "sum", **note}


def batch_cost_estimate(estimates: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The items' estimates added up; unknown when any one is."""
    estimates = list(estimates)
    if any(e["high"] is None for e in estimates):
        unknown = sum(e["high"] is None for e in estimates)
        return {"low": None, "high": None, "basis": "sum", "source": f"{unknown} item{'s' * (unknown > 1)} unknown"}
    return {"low": round(sum(e["low"] for e in estimates), 4), "high": round(sum(e["high"] for e in estimates), 4),
            "basis": "sum", "source": "the items' estimates"}


def run_batch_dry(plan: BatchPlan, config: ApiConfig, console: Console,
                  estimates: Mapping[int, Mapping[str, Any]]) -> int:
    entries = []
    for item in plan.items:
        outputs = [str(p) for p in item.done_paths or output_paths(item.job.output, item.job.n)]
        request = None if item.skipped else describe_request(build_request(item.job, config), item.job, config)
        entries.append({"item": item.number, "skip": item.skipped, "request": request, "outputs": outputs,
                        "estimate": estimates.get(item.number)})
    runnable = len(plan.to_run)
    total = batch_cost_estimate(estimates.values())
    summary = (f"{len(plan.items)} items: {runnable} to send, {len(plan.items) - runnable} already done; "
               + batch_estimate(runnable, plan.jobs, typical_seconds(plan)) + f"; {estimate_text(total)}")
    if console.json_mode:
        console.document({"ok": True, "dry_run": True, "batch": str(plan.source), "manifest": str(plan.manifest),
                          "jobs": plan.jobs, "items": entries, "to_send": runnable, "estimate": summary,
                          "cost": total})
        return EXIT_OK
    lines = []
    for entry in entries:
        request = entry["request"]
        if request is None:
            lines.append(f"item {entry['item']}: already done, skipped: {', '.join(entry['outputs'])}")
            continue
        lines += [f"item {entry['item']}: {request['method']} {request['url']}", *body_lines(request),
                  estimate_text(entry["estimate"])]
        lines += [f"output: {path}" for path in entry["outputs"]] + [""]
    console.result("\n".join(lines + [f"manifest: {plan.manifest}", summary]))
    return EXIT_OK


# Flags that act on jobs already started; they take no prompt, batch or request settings.
JOB_ACTIONS = (("--attach", "attach"), ("--cancel", "cancel"), ("--list-jobs", "list_jobs"),
               ("--list-models", "list_models"), ("--doctor", "doctor"))


def check_mode_flags(args: argparse.Namespace) -> None:
    action = next((flag for flag, dest in JOB_ACTIONS if getattr(args, dest)), None)
    if action:
        clash = next((flag for flag, value in (("-p", args.prompt), ("--batch", args.batch), ("--detach", args.detach),
                                               ("--dry-run", args.dry_run)) if value), None)
        clash = clash or next((flag for flag, dest in JOB_ACTIONS if getattr(args, dest) and flag != action), None)
        if clash:
            raise UsageError(f"{action} cannot be combined with {clash}", hint=f"run {action} on its own")
        return
    if args.detach and (args.dry_run or args.max_wait is not None):
        flag = "--dry-run" if args.dry_run else "--max-wait"
        raise UsageError(f"--detach cannot be combined with {flag}", hint="--detach returns at once; drop one")
    if args.batch is None:
        if args.prompt is None:
            raise UsageError("no prompt: give -p TEXT, or --batch FILE for many images", hint=f"see {PROG} --help")
        extra = next((flag for flag, value in (("--out-dir", args.out_dir), ("--jobs", args.jobs),
                                               ("--no-gallery", args.no_gallery)) if value), None)
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
    config = connect(args, console, env, [*plan.warnings, *(f"item {', '.join(numbers)}: {text}"
                                                            for text, numbers in by_text.items())])
    plan, estimates = price_batch(plan, config, env, args.max_cost, dry_run=args.dry_run)
    console.event("validated", items=len(plan.items), to_send=len(plan.to_run))
    if args.dry_run:
        return run_batch_dry(plan, config, console, estimates)
    return run_batch(plan, config, console, env, args)


def price_batch(plan: BatchPlan, config: ApiConfig, env: Mapping[str, str], max_cost: Optional[float], *,
                dry_run: bool) -> tuple[BatchPlan, dict[int, dict[str, Any]]]:
    """Each item to send gets its estimate; with --max-cost every one must be known, and the plan
    carries the budget and each item's most to the worker, which keeps to it."""
    history = earlier_output_tokens(env, plan.manifest) if dry_run or max_cost is not None else {}
    estimates = {item.number: estimate_cost(item.job, config.price_multiplier,
                                            history.get(request_shape(item.job.fields, item.job.mode), []))
                 for item in plan.to_run}
    unknown = [str(number) for number, estimate in estimates.items() if estimate["high"] is None]
    if max_cost is not None and unknown:
        raise UsageError(f"--max-cost ${max_cost:g}: the cost of item {', '.join(unknown)} cannot be estimated",
                         hint="drop --max-cost, or choose models and qualities with published prices",
                         field="max_cost")
    first = next(iter(estimates.values()), None)
    if first is not None:
        check_budget(first, max_cost, f"item {plan.to_run[0].number}")
    items = tuple(dataclasses.replace(item, cost_high=estimates[item.number]["high"]) if item.number in estimates
                  else item for item in plan.items)
    return dataclasses.replace(plan, items=items, max_cost=max_cost), estimates


def run_batch(plan: BatchPlan, config: ApiConfig, console: Console, env: Mapping[str, str],
              args: argparse.Namespace) -> int:
    runnable = len(plan.to_run)
    console.progress(f"batch {plan.source}: {len(plan.items)} items, {len(plan.items) - runnable} already done, "
                     f"{runnable} to generate at -j {plan.jobs}: "
                     f"{batch_estimate(runnable, plan.jobs, typical_seconds(plan))}"
                     if runnable else f"batch {plan.source}: all {len(plan.items)} items are already done")
    plan.manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest = os.path.abspath(plan.manifest)
    fingerprint = job_fingerprint(["batch", config.base_url, manifest, *(i.fingerprint for i in plan.items)],
                                  config.api_key)
    record = new_record("batch", fingerprint=fingerprint, spec=to_plain(plan), config=config,
                        prompt=plan.description or str(plan.source), targets=[str(plan.manifest)], manifest=manifest)
    start = find_or_start_job(open_state_folder(env), record, key=config.api_key, env=env, console=console)
    done = begin_job(start, console, detach=args.detach)
    code = done if done is not None else follow_job(start, console, max_wait=args.max_wait)
    if code == EXIT_OK and args.open and not args.detach and plan.gallery:
        open_in_viewer(plan.gallery_path, console)
    return code


def run_single(job: ImageJob, config: ApiConfig, console: Console, env: Mapping[str, str],
               args: argparse.Namespace) -> int:
    fingerprint = job_fingerprint([request_fingerprint(job, config.base_url)], config.api_key)
    record = new_record("single", fingerprint=fingerprint, spec=to_plain(job), config=config, prompt=job.prompt,
                        targets=[str(p) for p in output_paths(job.output, job.n)])
    start = find_or_start_job(open_state_folder(env), record, key=config.api_key, env=env, console=console)
    if not start.attached:
        console.progress(start_line(job))
    done = begin_job(start, console, detach=args.detach)
    code = done if done is not None else follow_job(start, console, max_wait=args.max_wait)
    if code == EXIT_OK and args.open and not args.detach:
        saved = ((read_record(start.files.record) or {}).get("result") or {}).get("files") or []
        open_in_viewer(rebase(Path(saved[0]["path"]), start.record["cwd"]) if saved else job.output.path, console)
    return code


def viewer_command(path: Path, platform: str) -> Optional[list[str]]:
    """How the system shows a file: open on macOS, xdg-open elsewhere; None on Windows, where
    os.startfile does what start does in a console."""
    if platform == "win32":
        return None
    return ["open" if platform == "darwin" else "xdg-open", str(path)]


def open_in_viewer(path: Path, console: Console, platform: str = sys.platform) -> None:
    """--open: the viewer is started on its own and not waited for; no viewer is a warning."""
    import subprocess

    command = viewer_command(path, platform)
    try:
        if command is None:
            os.startfile(str(path))  # type: ignore[attr-defined]   # Windows only
        else:
            viewer = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, start_new_session=True)
            threading.Thread(target=viewer.wait, daemon=True).start()     # reaped when it ends, never waited for
    except (OSError, AttributeError) as err:
        viewer = command[0] if command else "the Windows shell"
        console.warn(f"could not open {path} with {viewer} ({getattr(err, 'strerror', None) or err}): "
                     "open it yourself")


def run_command(args: argparse.Namespace, console: Console, env: Mapping[str, str]) -> int:
    check_mode_flags(args)
    args.model = args.model or default_model(env)
    if args.list_models:
        return run_list_models(console)
    if args.doctor:
        return run_doctor(args, console, env)
    if args.list_jobs:
        return run_list_jobs(console, env)
    if args.cancel:
        return run_cancel(args.cancel, console, env)
    if args.attach:
        return run_attach(args.attach, console, env, max_wait=args.max_wait)
    if args.batch is not None:
        return run_batch_command(args, console, env)
    job = build_job(args, stdin=sys.stdin, create_folder=not args.dry_run)
    for note in job.notes:
        console.progress(note)
    config = connect(args, console, env, job.warnings)
    history = earlier_output_tokens(env).get(request_shape(job.fields, job.mode), []) \
        if args.dry_run or args.max_cost is not None else []     # read only when the estimate is shown or kept to
    estimate = estimate_cost(job, config.price_multiplier, history)
    check_budget(estimate, args.max_cost, "this request")
    console.event("validated", mode=job.mode, outputs=[str(p) for p in output_paths(job.output, job.n)])
    if args.dry_run:
        return run_dry(job, config, console, estimate)
    return run_single(job, config, console, env, args)


# --- CLI ---


class StoreOnce(argparse.Action):
    """A prompt or file name given twice is a mistake to point out, not to settle by taking the last."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: Optional[str] = None) -> None:
        if getattr(namespace, self.dest, None) is not None:
            raise argparse.ArgumentError(self, "given twice; give it once")
        setattr(namespace, self.dest, values)


class CliParser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so main() owns every exit code and --json sees usage errors."""

    def error(self, message: str) -> NoReturn:
        """An unknown flag is named, but not what followed it: that may be a key (--api-ke sk-...)."""
        prefix = "unrecognized arguments: "
        if message.startswith(prefix):
            flags = [word.split("=", 1)[0] for word in message[len(prefix):].split() if word.startswith("-")]
            message = f"unrecognized option{'s' if len(flags) > 1 else ''}: {' '.join(flags) or '(a value)'}"
        raise UsageError(message, hint=f"see {PROG} --help")

    def exit(self, status: int = 0, message: Optional[str] = None) -> NoReturn:
        if message:
            sys.stderr.write(message)
        raise ParserExit(status)


def build_parser() -> CliParser:
    parser = CliParser(prog=PROG, description=(__doc__ or "").replace(SCRIPT_NAME, PROG),
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       allow_abbrev=False)
    convert = setting_converters()
    what = parser.add_argument_group("what to make")
    what.add_argument("-p", "--prompt", metavar="TEXT", action=StoreOnce,
                      help="the prompt, sent exactly as given; - reads it from stdin (UTF-8); at most 32000 characters")
    what.add_argument("-s", "--size", metavar="SIZE",
                      help=f"auto (the server's default), match (the first input image's shape), a preset "
                           f"({', '.join(SIZE_PRESETS)}), any WxH (edges "
                           "multiples of 16, at most 3840, ratio at most 3:1, 655,360-8,294,400 pixels) or a ratio "
                           "W:H such as 16:9 with -r")
    what.add_argument("-r", "--resolution", type=convert["resolution"],
                      metavar="{1K,2K,4K}", help="long edge for a W:H size: 1K=1024, 2K=2048, 4K=3840 (default 1K)")
    what.add_argument("-q", "--quality", type=convert["quality"], metavar="{" + ",".join(QUALITIES) + "}",
                      help="low (drafts), medium, high (final, fine text) or auto (the server's default); xhigh "
                           "and max on gpt-image-2.5 and 2.6")
    what.add_argument("--complexity", type=convert["complexity"], metavar="{" + ",".join(COMPLEXITIES) + "}",
                      help="how much detail gpt-image-2.6 puts in (its default: high); independent of -q")
    what.add_argument("-n", "--n", type=convert["n"], metavar="N",
                      help="images in one request, 1-10; files are then NAME-1, NAME-2, ...")
    what.add_argument("--background", type=convert["background"], metavar="{" + ",".join(BACKGROUNDS) + "}",
                      help="transparent needs png or webp (in preview for gpt-image-2)")
    what.add_argument("--moderation", type=convert["moderation"], metavar="{" + ",".join(MODERATIONS) + "}",
                      help="content filter strictness; text-to-image only")
    what.add_argument("--model", type=convert["model"], metavar="NAME",
                      help=f"model or channel (default: ${ENV_MODEL}, else {DEFAULT_MODEL}); see --list-models")
    what.add_argument("--list-models", action="store_true",
                      help="the models and channels the tool knows: what each takes, bills and usually takes")
    inputs = parser.add_argument_group("input images (edit and fusion)")
    inputs.add_argument("-i", "--input-image", action="extend", nargs="+", metavar="PATH",
                        help="1-16 PNG/JPEG/WebP images under 50 MiB, in order (image 1, image 2, ...); "
                             "-i a b and -i a -i b both work")
    inputs.add_argument("-m", "--mask", metavar="PATH",
                        help="PNG with alpha, same size as the first input image, under 4 MiB; "
                             "transparent areas are edited")
    output = parser.add_argument_group("output")
    output.add_argument("-f", "--filename", metavar="PATH", action=StoreOnce,
                        help="where to save (folders are created); default: TIMESTAMP-SLUG-RANDOM.png here")
    output.add_argument("-o", "--output-format", type=convert["output_format"],
                        metavar="{png,jpeg,jpg,webp,gif,svg}",
                        help="default: from the -f extension, else png; gif and svg on gpt-image-2.6")
    output.add_argument("--frames", type=convert["frame_count"], metavar="N",
                        help="GIF: frames, %d-%d (the API's default: 9)" % GIF_FRAMES)
    output.add_argument("--frame-ms", type=convert["frame_duration_ms"], metavar="MS",
                        help="GIF: milliseconds per frame, %d-%d in steps of %d (the API's default: 200)"
                             % GIF_FRAME_MS)
    output.add_argument("--svg-model", metavar="NAME",
                        help="SVG on gpt-image-2.6: the model that writes it (e.g. gpt-5.6-terra; billed too)")
    output.add_argument("--gallery", action="store_true",
                        help="also write NAME.html beside the image: a page to look at it (batches always get one)")
    output.add_argument("--open", action="store_true",
                        help="after success, open the image (a batch: its gallery) in the system's viewer")
    output.add_argument("--strict-size", action="store_true",
                        help=f"an image saved at another size, format or frame count than asked ends with exit "
                             f"{EXIT_MISMATCH} (the file is kept)")
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
                       help="JSON ({description, global, prompts}), a list, or JSONL; see "
                            f"{reference('batch-template.md')}. "
                            "Flags give defaults; the file's global block and items override them")
    batch.add_argument("--out-dir", metavar="DIR",
                       help="write the images and FILE.results.jsonl here (default: beside the batch file)")
    batch.add_argument("--no-gallery", action="store_true",
                       help="do not write FILE.html, the page that shows every item as it finishes")
    batch.add_argument("--max-cost", type=positive_dollars, metavar="USD",
                       help="refuse a run that may cost more (its high estimate), and start no batch item that "
                            "could take the spend past it")
    batch.add_argument("-j", "--jobs", type=int_in_range(1, MAX_JOBS), metavar="N",
                       help=f"requests in flight at most, 1-{MAX_JOBS} (default {DEFAULT_JOBS}); the gateway's "
                            "quota is found from its 429s, which pause every worker")
    conn = parser.add_argument_group("connection")
    conn.add_argument("-k", "--api-key", metavar="KEY", help=f"API key (default: ${ENV_API_KEY})")
    conn.add_argument("--base-url", metavar="URL", help=f"API base (default: ${ENV_BASE_URL}, else {DEFAULT_BASE_URL})")
    conn.add_argument("--timeout", type=positive_seconds, default=DEFAULT_TIMEOUT_S, metavar="S",
                      help="seconds to wait for the whole answer (status line and headers included), counted "
                           "from when the request is completely sent; connecting and sending have their own "
                           "deadline: 60 s plus 1 s per 50 kB sent; at most 86400 (default %(default)g)")
    conn.add_argument("--retries", type=int_in_range(0, MAX_RETRIES), default=DEFAULT_RETRIES, metavar="N",
                      help="retries on connection failure, 408, 409, 429 and 5xx, never after a timeout "
                           "(default %(default)s)")
    conn.add_argument("--allow-http-proxy", action="store_true",
                      help="send a plain-http base URL through the HTTP proxy set in the environment (the proxy "
                           "sees the key); refused without it")
    conn.add_argument("--dry-run", action="store_true",
                      help="check everything and print the request (key redacted); needs no key, sends nothing")
    jobs = parser.add_argument_group(
        "jobs (each request runs in a worker that outlives this command; the same command again attaches to it)")
    jobs.add_argument("--detach", action="store_true",
                      help="check, start the job, print 'job ID' and exit 0 at once; collect it with --attach ID")
    jobs.add_argument("--attach", metavar="JOB",
                      help="wait for a job (an id, or last) and report it as if it had run in the foreground")
    jobs.add_argument("--max-wait", type=positive_seconds, metavar="S",
                      help="stop waiting after S seconds with exit 9 while the job goes on (keep it below your "
                           "shell's time limit)")
    jobs.add_argument("--list-jobs", action="store_true", help="list recent jobs: id, state, age, prompt, outputs")
    jobs.add_argument("--cancel", metavar="JOB",
                      help="stop a job's worker (a request already sent may still be billed)")
    jobs.add_argument("--events", action="store_true",
                      help="progress as JSON Lines on stderr (validated, job_started, sent, heartbeat, saved, ...)")
    jobs.add_argument("--doctor", action="store_true",
                      help="check the set-up without a billed call (key, base URL, network, TLS, proxy, the key "
                           "and model at GET /models, folders, clock) and print one line per check")
    jobs.add_argument("--run-job", metavar="RECORD", help=argparse.SUPPRESS)
    parser.add_argument("--version", action="version", version=f"%(prog)s {VERSION}")
    return parser


def make_streams_safe() -> None:
    """A console that cannot show a character (GBK, ASCII) prints '?' instead of crashing; a stream
    that was closed before the start (python x.py >&-) writes nowhere instead of failing."""
    for name in ("stdout", "stderr"):
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, "w", encoding="utf-8"))
        reconfigure = getattr(getattr(sys, name), "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="replace")


@contextlib.contextmanager
def signals_raised(wanted: Sequence[str] = ("SIGTERM", "SIGHUP")) -> Iterator[None]:
    """These signals raise Signalled in the main thread, as SIGINT raises KeyboardInterrupt, so the
    command can say what happens to its job; the previous handlers come back afterwards."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    names = [name for name in wanted if hasattr(signal, name)]
    previous = {name: signal.getsignal(getattr(signal, name)) for name in names}

    def raise_signalled(number: int, frame: Any) -> None:
        raise Signalled(signal.Signals(number).name)

    for name in names:
        signal.signal(getattr(signal, name), raise_signalled)
    try:
        yield
    finally:
        for name, handler in previous.items():
            signal.signal(getattr(signal, name), handler)


def run_worker_process(record: Path, env: Mapping[str, str]) -> int:
    """The entry of a detached worker (--run-job): SIGTERM (a cancel) is weighed by the worker; it has
    no terminal, so SIGINT and SIGHUP are ignored in case one is still delivered."""
    import signal

    for name in ("SIGINT", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    return run_worker(JobFiles(record.parent, record.name[:-len(".json")]), env.get(ENV_API_KEY, ""), detached=True)


def failure_document(err: ToolError) -> dict[str, Any]:
    document: dict[str, Any] = {"ok": False, "error": error_document(err)}
    if isinstance(err, StillRunning):
        document["job"] = err.job_id
    return document


def main(argv: Optional[Sequence[str]] = None) -> int:
    make_streams_safe()
    argv = list(sys.argv[1:] if argv is None else argv)
    console = Console(json_mode="--json" in argv, events_mode="--events" in argv)
    try:
        args = build_parser().parse_args(argv)
        if args.run_job:
            return run_worker_process(Path(args.run_job), os.environ)
        console.quiet = args.quiet
        with signals_raised():
            return run_command(args, console, os.environ)
    except ParserExit as done:
        return done.status
    except ToolError as err:
        failure: ToolError = err
    except (KeyboardInterrupt, Signalled) as stop:
        failure = InterruptedRun("interrupted; no partial file was left (a request already sent may be billed)")
        failure.exit_code = SIGNAL_EXITS[signal_name(stop)]
    return report_failure(failure, console)


if __name__ == "__main__":
    raise SystemExit(main())
