#!/usr/bin/env node
/*
 * generate_image.js: the Node.js twin of generate_image.py, for machines with Node.js 18+ and no Python.
 *
 * Generate and edit images with gpt-image-2 through the APIYI gateway. Same flags, checks, messages,
 * request bodies, --json documents, job records and exit codes as generate_image.py for one request:
 * text-to-image, edit, fusion, mask, sizes and ratios, formats, -n, --dry-run, --max-cost, jobs
 * (--detach, --attach, --max-wait, --list-jobs, --cancel). A job started by either twin can be attached
 * and recovered by the other: they share the state folder and its record format.
 *
 * Python only (refused here with exit 2): --batch and its flags, --stream and previews, --gallery,
 * --open, --events, --doctor. Run `node generate_image.js --help` for the manual; README.md lists
 * the differences.
 *
 * Built-in modules only; nothing to install. Sections in the order of generate_image.py: constants
 * and tables, exceptions, validation, request building, transport, response decoding and file
 * output, jobs, commands, CLI, main.
 */
'use strict';

const childProcess = require('node:child_process');
const crypto = require('node:crypto');
const fs = require('node:fs');
const http = require('node:http');
const https = require('node:https');
const net = require('node:net');
const os = require('node:os');
const path = require('node:path');
const tls = require('node:tls');
const util = require('node:util');

// --- Constants ---

const VERSION = '1.0.0';
const TOOL_NAME = 'apiyi-gpt-image-2-gen';
const PROG = 'generate_image.js';
const PYTHON_TWIN = 'generate_image.py';
const MIN_NODE_MAJOR = 18;

const DEFAULT_BASE_URL = 'https://api.apiyi.com/v1';
const DEFAULT_MODEL = 'gpt-image-2';
const DEFAULT_TIMEOUT_S = 600.0;
const DEFAULT_RETRIES = 2;
const ENV_API_KEY = 'APIYI_API_KEY';
const ENV_BASE_URL = 'APIYI_BASE_URL';
const ENV_MODEL = 'APIYI_IMAGE_MODEL';
const ENV_STATE_DIR = 'APIYI_STATE_DIR';
const ENV_WORKER = 'APIYI_WORKER';
const ENV_PRICE_MULTIPLIER = 'APIYI_PRICE_MULTIPLIER';
const MODEL_NAME = /^[A-Za-z0-9_.:/@+-]{1,100}$/;
const KEY_MASK = '***';
// APIYI keys are sk- and 48 characters; a key this short could not be masked without masking words.
const MIN_KEY_CHARS = 8;
const GENERATIONS_PATH = '/images/generations';
const EDITS_PATH = '/images/edits';

const QUALITIES = ['auto', 'low', 'medium', 'high', 'xhigh', 'max'];
const COMPLEXITIES = ['low', 'medium', 'high'];
const OUTPUT_FORMATS = ['png', 'jpeg', 'webp', 'gif', 'svg'];
const CLASSIC_FORMATS = ['png', 'jpeg', 'webp'];
const INPUT_FORMATS = CLASSIC_FORMATS;
const FORMAT_ALIASES = { jpg: 'jpeg' };
const BACKGROUNDS = ['auto', 'opaque', 'transparent'];
const MODERATIONS = ['auto', 'low'];
const RESOLUTION_LONG_EDGES = { '1K': 1024, '2K': 2048, '4K': 3840 };
const SIZE_PRESETS = ['1024x1024', '1536x1024', '1024x1536', '2048x2048', '2048x1152', '3840x2160', '2160x3840'];
const FORMAT_EXTENSIONS = { png: '.png', jpeg: '.jpg', webp: '.webp', gif: '.gif', svg: '.svg', bin: '.bin' };
const EXTENSION_FORMATS = { '.png': 'png', '.jpg': 'jpeg', '.jpeg': 'jpeg', '.webp': 'webp', '.gif': 'gif',
  '.svg': 'svg' };
const CONTENT_TYPES = { png: 'image/png', jpeg: 'image/jpeg', webp: 'image/webp', gif: 'image/gif',
  svg: 'image/svg+xml' };

// gpt-image-2 size rules, as APIYI and OpenAI publish them for free sizes (references/models.md).
const SIZE_MULTIPLE = 16;
const MAX_EDGE = 3840;
const MAX_ASPECT = 3.0;
const MIN_PIXELS = 655360;
const MAX_PIXELS = 8294400;
const SIZE_RULES = {
  free: { multiple: SIZE_MULTIPLE, edges: [SIZE_MULTIPLE, MAX_EDGE], pixels: [MIN_PIXELS, MAX_PIXELS] },
  universal: { multiple: SIZE_MULTIPLE, edges: [SIZE_MULTIPLE, 4992], pixels: [MIN_PIXELS, MAX_PIXELS] },
  'long-edge-1536': { multiple: 1, edges: [1, 1536], long_edge_from: 512, pixels: [1, MAX_PIXELS] },
};
const FREE = SIZE_RULES.free;
const VIP_SIZES = {
  '1K': ['1280x1280', '848x1280', '1280x848', '960x1280', '1280x960', '1024x1280', '1280x1024', '720x1280',
    '1280x720', '1280x544'],
  '2K': ['2048x2048', '1360x2048', '2048x1360', '1536x2048', '2048x1536', '1632x2048', '2048x1632', '1152x2048',
    '2048x1152', '2048x864'],
  '4K': ['2880x2880', '2336x3520', '3520x2336', '2480x3312', '3312x2480', '2560x3216', '3216x2560', '2160x3840',
    '3840x2160', '3840x1632'],
};
const SIZE_TIERS = {
  vip: VIP_SIZES,
  '2.6-all': { '2K': ['2048x2048', '2048x1152', '1152x2048', '2048x1536', '1536x2048'],
    '4K': ['3840x2160', '2160x3840', '2880x2880'] },
};
const DEFAULT_TIER = '2K';
// GIF (gpt-image-2.6): the frames share one sheet, four frames wide at most; measured square caps.
const GIF_FRAMES = [2, 16];
const GIF_DEFAULT_FRAMES = 9;
const GIF_FRAME_MS = [20, 2000, 10];
const GIF_SHEET_COLUMNS = 4;
const GIF_FRAME_CAPS = [[9, 960], [12, 816], [16, 720]];

const SVG_START = /^(\xef\xbb\xbf)?\s*<(\?xml|!--|!DOCTYPE\s+svg|(?:[A-Za-z_][\w.-]*:)?svg[\s>/])/i;
const SVG_HEAD_BYTES = 64 * 1024;
const SVG_PROLOG = { '<?': '?>', '<!--': '-->', '<!DOCTYPE': '>' };
const SVG_ROOT = /<(?:[A-Za-z_][\w.-]*:)?svg(\s[^>]*)?\/?>/y;
const JPEG_SOF_MARKERS = new Set([...Array(16).keys()].map((i) => 0xC0 + i).filter((m) => ![0xC4, 0xC8, 0xCC]
  .includes(m)));

const FORMAT_EXCLUDES = { gif: ['stream', 'mask', 'output_compression'],
  svg: ['stream', 'output_compression', 'input_images'] };
const FIELD_SETTINGS = { frame_count: 'frames', frame_duration_ms: 'frames', svg: 'svg_model',
  partial_images: 'stream' };

// USD per million tokens on the official line, checked 2026-11 (references/models.md).
const TOKEN_PRICES = { text_input: 5.0, image_input: 8.0, image_output: 30.0 };
const PRICE_MULTIPLIER_RANGE = [0.01, 100.0];
const MAX_COST_USD = 1000000.0;
const MAX_USAGE_TOKENS = 10 ** 8;
const GPT_IMAGE_2_FACTORS = { low: 16, medium: 48, high: 96 };
const GPT_IMAGE_2_5_FACTORS = { low: 16, medium: 24, high: 48, xhigh: 64, max: 96 };
const GPT_IMAGE_2_6_FACTORS = { high: 48, xhigh: 64, max: 96 };
const PARTIAL_IMAGE_TOKENS = 100;
const AUTO_SIZES = ['1024x1024', '1536x1024', '1024x1536'];
const INPUT_IMAGE_PATCH = 32;
const INPUT_IMAGE_MAX_PATCHES = 1536;
const PROMPT_OVERHEAD_TOKENS = 6;

// The model table: the same rows as generate_image.py's MODEL_PROFILES (a test compares them).
const OFFICIAL_SETTINGS = ['size', 'quality', 'n', 'background', 'moderation', 'output_compression', 'mask', 'stream'];
const BASE_QUALITIES = QUALITIES.slice(0, 4);
const OFFICIAL_ROW = { line: 'official', billing: 'tokens', sizes: 'free', accepts: OFFICIAL_SETTINGS };
const GPT_IMAGE_2_5_ROW = { ...OFFICIAL_ROW, token_factors: GPT_IMAGE_2_5_FACTORS, qualities: QUALITIES,
  formats: CLASSIC_FORMATS };
const GPT_IMAGE_2_6_ROW = { ...OFFICIAL_ROW, token_factors: GPT_IMAGE_2_6_FACTORS, qualities: QUALITIES,
  formats: OUTPUT_FORMATS, gif_rules: true, needs_svg_model: true,
  accepts: [...OFFICIAL_SETTINGS, 'complexity', 'frames', 'svg_model'] };
const ONE_IMAGE_ROW = { line: 'flat', qualities: [], formats: ['png'], accepts: ['size'], ignores: ['quality'],
  max_n: 1 };
const LONG_EDGE_ROW = { ...ONE_IMAGE_ROW, price_per_image: 0.03, billing: '$0.03 per image', seconds: [30, 90],
  sizes: 'long-edge-1536', real_size_differs: true,
  note: 'flat price; size is a target (long edge 512-1536); no mask, no quality' };
const MODEL_PROFILES = {
  'gpt-image-2': { ...OFFICIAL_ROW, token_factors: GPT_IMAGE_2_FACTORS, seconds: [120, 150],
    transparency_in_preview: true, qualities: BASE_QUALITIES, formats: CLASSIC_FORMATS,
    note: 'the default: best text rendering; up to 5 min at high quality and 4K' },
  'gpt-image-2.5-flare': { ...GPT_IMAGE_2_5_ROW, seconds: [40, 75],
    note: 'faster 2.5; quality up to xhigh and max; native transparency' },
  'gpt-image-2.5-sunburst': { ...GPT_IMAGE_2_5_ROW, seconds: [60, 120],
    note: 'detailed 2.5; quality up to xhigh and max; native transparency' },
  'gpt-image-2.6-flare': { ...GPT_IMAGE_2_6_ROW, seconds: [8, 15],
    note: 'fastest; complexity, GIF and SVG (SVG needs --svg-model)' },
  'gpt-image-2.6-sunburst': { ...GPT_IMAGE_2_6_ROW, seconds: [20, 60],
    note: 'detailed 2.6 and edits; complexity, GIF and SVG (SVG needs --svg-model)' },
  'gpt-image-2-all': LONG_EDGE_ROW,
  'gpt-image-2.5-all': LONG_EDGE_ROW,
  'gpt-image-2-vip': { ...ONE_IMAGE_ROW, price_per_image: 0.03, billing: '$0.03 per image', seconds: [90, 150],
    sizes: '', tiers: 'vip', real_size_differs: true,
    note: 'flat price at any of its 30 sizes up to 4K; no mask, no quality' },
  'gpt-image-2.6-all': { line: 'flat', price_per_image: 0.025, billing: '$0.025 per image', seconds: [10, 46],
    qualities: BASE_QUALITIES, formats: ['png', 'jpeg', 'gif', 'svg'], max_n: 4, sizes: 'long-edge-1536',
    tiers: '2.6-all', accepts: ['size', 'quality', 'n', 'background', 'mask', 'frames'],
    ignores: ['complexity', 'moderation', 'svg_model'], real_size_differs: true,
    note: 'flat price up to 4K; GIF and SVG (rough); the real size may differ' },
};
const UNKNOWN_MODEL = { line: 'unknown', billing: 'unknown', seconds: [120, 150], qualities: QUALITIES,
  formats: OUTPUT_FORMATS, accepts: [...OFFICIAL_SETTINGS, 'complexity', 'frames', 'svg_model'], sizes: 'universal',
  note: 'not in the table: sent as given' };
// What a row leaves out, as ModelProfile's defaults in generate_image.py.
const PROFILE_DEFAULTS = { ignores: [], max_n: 10, real_size_differs: false, tiers: '', gif_rules: false,
  needs_svg_model: false, transparency_in_preview: false, price_per_image: null, token_factors: null };
const PROFILE_FIELDS = ['name', 'known', 'line', 'billing', 'seconds', 'qualities', 'formats', 'accepts', 'sizes',
  'note', 'ignores', 'max_n', 'real_size_differs', 'tiers', 'gif_rules', 'needs_svg_model',
  'transparency_in_preview', 'price_per_image', 'token_factors'];
const SETTING_FLAGS = { size: '-s', quality: '-q', n: '-n', background: '--background', moderation: '--moderation',
  output_compression: '-c', mask: '--mask', stream: '--stream', complexity: '--complexity',
  frames: '--frames/--frame-ms', svg_model: '--svg-model' };
// Images API limits for GPT image models (openai-images-api.md, sections 1-2).
const MAX_PROMPT_CHARS = 32000;
const MAX_INPUT_IMAGES = 16;
const MAX_INPUT_BYTES = 50 * 1024 * 1024;
const MAX_MASK_BYTES = 4 * 1024 * 1024;
const MIN_N = 1;
const MAX_N = 10;
const MAX_RETRIES = 10;
const MAX_WAIT_S = 86400.0;
const MAX_PROMPT_BYTES = MAX_PROMPT_CHARS * 4 + 3;
const MAX_NAME_BYTES = 255;
const LONGEST_FREE_SUFFIX = '-99999';
const MAX_PARTIAL_IMAGES = 3;

// Retry policy mirrors the official SDK; 524 is left out: the origin keeps generating (and billing).
const RETRY_STATUSES = new Set([408, 409, 429]);
const NOT_RETRIED_5XX = new Set([524]);
const BACKOFF_INITIAL_S = 0.5;
const BACKOFF_MAX_S = 8.0;
const RETRY_AFTER_MAX_S = 120.0;
const RATE_LIMIT_INITIAL_S = 2.0;
const MAX_THROTTLED_S = 600.0;
const RATE_LIMIT_MIN_S = 1.0;
const WAIT_IN_WORDS = [/(?:try again|retry)(?: after| in)?\s*(\d+(?:\.\d+)?)\s*(ms|milliseconds?|s|secs?|seconds?)\b/i,
  /(\d+(?:\.\d+)?)\s*(秒|毫秒)\s*后\s*(?:再)?重试/];
const REFUSED_STATUSES = new Set([400, 404, 413, 415, 422]);
const SAFETY_CODES = new Set(['moderation_blocked', 'content_policy_violation']);
const SAFETY_WORDS = /safety system|moderation|content[ _]policy|safety_violations|违反|安全|审核/i;
const SAFETY_HINT = 'the safety system refused it: rephrase the prompt or change the image (an agent asks the user '
  + 'how, and keeps their words); the same request is refused again';
const AUTH_STATUSES = new Set([401, 402, 403]);
const QUOTA_ERROR_CODE = 'insufficient_quota';
const REQUEST_ID_HEADERS = ['x-request-id', 'request-id', 'openai-request-id', 'x-oneapi-request-id',
  'x-new-api-request-id', 'x-litellm-call-id', 'cf-ray'];

const READ_CHUNK = 1024 * 1024;
// Connecting and sending have a deadline of their own: a minute, plus the body at 400 kbit/s.
const UPLOAD_BASE_S = 60.0;
const UPLOAD_MIN_BYTES_PER_S = 50000;
const ERROR_BODY_LIMIT = 64 * 1024;
const PAID_ANSWER_HINT = 'the request was probably billed; retrying buys a new image';
const MAX_IMAGE_BYTES = MAX_PIXELS * 4 + 1024 * 1024;
const MAX_IMAGE_BASE64 = Math.floor(MAX_IMAGE_BYTES * 4 / 3) + 4;
const ANSWER_JSON_ROOM = 1024 * 1024;
const ERROR_EXCERPT_CHARS = 300;
const ERROR_BODY_IN_JSON = 2048;
const PROGRESS_LOG_INTERVAL_S = 15.0;
const PROGRESS_TTY_INTERVAL_S = 1.0;
const FALLBACK_FOLDER = 'apiyi-gpt-image-2';

// Jobs: the same state folder, file names and record as generate_image.py (references/jobs.md).
const WORKER_MODES = ['process', 'inprocess', 'unavailable'];
const FINISHED_STATES = new Set(['done', 'failed', 'cancelled']);
const JOB_KEEP_S = 7 * 24 * 3600;
const WORKER_START_GRACE_S = 20.0;
const POLL_INTERVALS_S = [0.01, 0.02, 0.05, 0.1];
const CANCEL_WAIT_S = 10.0;
const STATE_LOCK_WAIT_S = 30;
const PROMPT_EXCERPT_CHARS = 60;
const SPOOL_PIECE = 1024 * 1024;
// Base64 is decoded this much at a time: its text stays below V8's large-object size (128 KiB), so each
// piece's strings die young instead of piling up in the old generation until a full collection.
const DECODE_PIECE = 96 * 1024;
// A worker (started with --expose-gc) collects after this much of an answer has passed through it: the
// socket's and the decoder's spent buffers are memory outside V8's heap, which it counts only loosely,
// so they would pile up to several times the answer before a collection on its own.
const COLLECT_EVERY = 2 * 1024 * 1024;
// An image URL in an answer is fetched following redirects, as urllib does.
const REDIRECTS = new Set([301, 302, 303, 307, 308]);
const MAX_REDIRECTS = 10;
// Node has no file lock that the system drops when its holder dies (Python's flock): a worker of this
// twin is known alive by its pid, and says so in its record, so the Python twin checks the same way.
const PID_LIVENESS = 'pid';

const EXIT_OK = 0;
const EXIT_BUG = 1;
const EXIT_USAGE = 2;
const EXIT_AUTH = 3;
const EXIT_REFUSED = 4;
const EXIT_UNAVAILABLE = 5;
const EXIT_MAYBE_BILLED = 6;
const EXIT_FALLBACK = 7;
const EXIT_STILL_RUNNING = 9;
const EXIT_MISMATCH = 10;
const EXIT_INTERRUPTED = 130;
const SIGNAL_EXITS = { SIGINT: 130, SIGTERM: 143, SIGHUP: 129 };

const CONTROL_TEXT = /\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|[\x00-\x1f\x7f-\x9f]/g;
const BASE64_RUN = /[A-Za-z0-9+/=]{200,}/g;
const WINDOWS_RESERVED = /^(con|prn|aux|nul|com[0-9]|lpt[0-9])(\..*)?$/i;
const WINDOWS_FORBIDDEN = /[<>:"|?*\x00-\x1f]/;
const WINDOWS_NAME_RULE = 'is not a file name Windows accepts (reserved names like CON or NUL, <>:"|?*, a trailing '
  + 'dot or space)';
const IS_WINDOWS = process.platform === 'win32';

// What generate_image.py has and this twin does not: refused with exit 2, naming the Python script.
const PYTHON_ONLY = {
  batch: '--batch', out_dir: '--out-dir', no_gallery: '--no-gallery', jobs: '-j/--jobs', stream: '--stream',
  partial_images: '--partial-images', keep_partials: '--keep-partials', gallery: '--gallery', open: '--open',
  events: '--events', doctor: '--doctor',
};

// --- Exceptions ---

/** An expected failure: main() prints it on one line and returns its exit code. */
class ToolError extends Error {
  constructor(message, { hint = '', status = null, code = null, kind = '', problems = [], field = '', body = '',
    details = {}, exitCode = null } = {}) {
    super(message);
    this.hint = hint;
    this.status = status;
    this.code = code;
    this.problems = problems;
    this.field = field;
    this.body = body;
    this.details = details;
    this.kind = kind || this.constructor.kind;
    this.exitCode = exitCode ?? this.constructor.exitCode;
  }
}
ToolError.kind = 'error';
ToolError.exitCode = EXIT_BUG;

/** An error class with its exit code and kind: one row each, as the Python twin's hierarchy. */
function errorClass(name, exitCode, kind, parent = ToolError) {
  const made = { [name]: class extends parent {} }[name];
  made.exitCode = exitCode;
  made.kind = kind;
  return made;
}
const UsageError = errorClass('UsageError', EXIT_USAGE, 'usage');
const AuthError = errorClass('AuthError', EXIT_AUTH, 'account');
const RefusedError = errorClass('RefusedError', EXIT_REFUSED, 'bad_request');
const ServiceError = errorClass('ServiceError', EXIT_UNAVAILABLE, 'service');
const ConnectError = errorClass('ConnectError', EXIT_UNAVAILABLE, 'service', ServiceError);
const MaybeBilledError = errorClass('MaybeBilledError', EXIT_MAYBE_BILLED, 'possibly_billed');
const FallbackSaveError = errorClass('FallbackSaveError', EXIT_FALLBACK, 'saved_to_fallback');
const MismatchError = errorClass('MismatchError', EXIT_MISMATCH, 'size_mismatch');
const InterruptedRun = errorClass('InterruptedRun', EXIT_INTERRUPTED, 'interrupted');

/** --max-wait ran out, or the command was interrupted after sending: the job goes on. */
class StillRunning extends ToolError {
  constructor(message, { jobId, hint = '', exitCode = EXIT_STILL_RUNNING }) {
    super(message, { hint, exitCode });
    this.jobId = jobId;
  }
}
StillRunning.kind = 'still_running';
StillRunning.exitCode = EXIT_STILL_RUNNING;

/** argparse's ArgumentTypeError: a flag's value that its converter refused. */
class ArgumentTypeError extends Error {}

/** A UsageError raised inside is about this setting, unless it already names one. */
function about(field, run) {
  try {
    return run();
  } catch (err) {
    if (err instanceof UsageError) err.field = err.field || field;
    throw err;
  }
}

// --- Python's text formats (messages and documents are the Python twin's, to the byte) ---

/** f"{n:,}": a whole number with thousands separators. */
function grouped(n) {
  return Math.round(n).toLocaleString('en-US');
}

/** f"{x:g}": six significant digits, trailing zeros dropped, exponent from 1e+06. */
function gFormat(x) {
  if (x === 0) return '0';
  const exponent = Math.floor(Math.log10(Math.abs(x)));
  if (exponent < -4 || exponent >= 6) {
    const [mantissa, power] = x.toExponential(5).split('e');
    const digits = mantissa.includes('.') ? mantissa.replace(/\.?0+$/, '') : mantissa;
    const sign = power[0] === '-' ? '-' : '+';
    return `${digits}e${sign}${power.replace(/^[+-]/, '').padStart(2, '0')}`;
  }
  const text = x.toFixed(Math.max(0, 5 - exponent));
  return text.includes('.') ? text.replace(/\.?0+$/, '') : text;
}

/** f"{x:.Nf}": the decimal nearest the binary value, as toFixed gives it, except that an exact half goes
 * to the even digit, as Python rounds (toFixed rounds it up: 0.03125 -> 0.0313, Python 0.0312). */
function fixed(x, digits) {
  const scaled = x * 10 ** digits;
  if (!Number.isFinite(scaled) || Math.abs(scaled % 1) !== 0.5) return x.toFixed(digits);
  return (pyRound(scaled) / 10 ** digits).toFixed(digits);
}

/** repr() of a str: single quotes unless the text holds one and no double quote. */
function pyRepr(text) {
  const quote = text.includes("'") && !text.includes('"') ? '"' : "'";
  const named = { '\\': '\\\\', '\n': '\\n', '\r': '\\r', '\t': '\\t' };
  let out = '';
  for (const ch of text) {
    const code = ch.codePointAt(0);
    if (named[ch]) out += named[ch];
    else if (ch === quote) out += `\\${ch}`;
    else if (code < 0x20 || (code >= 0x7f && code <= 0xa0) || code === 0xad)
      out += `\\x${code.toString(16).padStart(2, '0')}`;
    else if (code >= 0xd800 && code <= 0xdfff) out += `\\u${code.toString(16)}`;
    else out += ch;
  }
  return quote + out + quote;
}

/** json.dumps as Python writes it: ", " and ": " (or indent), ensure_ascii, sort_keys. */
function pyJson(value, { indent = null, ascii = true, sortKeys = false } = {}, depth = 0) {
  if (value === null || value === undefined) return 'null';
  if (typeof value === 'boolean') return value ? 'true' : 'false';
  if (typeof value === 'number')
    return Number.isFinite(value) ? String(value) : { Infinity: 'Infinity', '-Infinity': '-Infinity' }[value] || 'NaN';
  if (typeof value === 'string') {
    const text = JSON.stringify(value);
    return ascii ? text.replace(/[\u007f-\uffff]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`)
      : text;
  }
  const options = { indent, ascii, sortKeys };
  const inner = indent === null ? '' : `\n${' '.repeat(indent * (depth + 1))}`;
  const outer = indent === null ? '' : `\n${' '.repeat(indent * depth)}`;
  const comma = indent === null ? ', ' : ',';
  if (Array.isArray(value)) {
    if (!value.length) return '[]';
    return `[${inner}${value.map((v) => pyJson(v, options, depth + 1)).join(comma + inner)}${outer}]`;
  }
  const keys = Object.keys(value).filter((k) => value[k] !== undefined);
  if (sortKeys) keys.sort();
  if (!keys.length) return '{}';
  const items = keys.map((k) => `${pyJson(k, options)}: ${pyJson(value[k], options, depth + 1)}`);
  return `{${inner}${items.join(comma + inner)}${outer}}`;
}

/** At most 120 bytes of UTF-8, cut between characters. */
function shortName(name) {
  const bytes = Buffer.from(name, 'utf8');
  if (bytes.length <= 120) return name;
  return bytes.subarray(0, 120).toString('utf8').replace(/\ufffd+$/, '');
}

/** Server text as it may be shown: no escape sequences, no control characters. */
function cleanText(text) {
  return text.replace(CONTROL_TEXT, ' ');
}

function randomHex(nbytes) {
  return crypto.randomBytes(nbytes).toString('hex');
}

function sha256(data) {
  return crypto.createHash('sha256').update(data).digest('hex');
}

function timestamp(date = new Date()) {
  const two = (n) => String(n).padStart(2, '0');
  return `${date.getFullYear()}${two(date.getMonth() + 1)}${two(date.getDate())}-${two(date.getHours())}`
    + `${two(date.getMinutes())}${two(date.getSeconds())}`;
}

// --- Validation ---

function intInRange(low, high, step = 1) {
  return (text) => {
    if (!/^\s*[+-]?\d+(_\d+)*\s*$/.test(text)) throw new ArgumentTypeError(`${pyRepr(text)} is not a whole number`);
    const value = parseInt(text.replace(/_/g, ''), 10);
    if (!(low <= value && value <= high)) throw new ArgumentTypeError(`${value} is outside ${low}-${high}`);
    if ((value - low) % step) throw new ArgumentTypeError(`${value} is not a multiple of ${step}`);
    return value;
  };
}

function positiveAmount(text, most, what, limit) {
  const value = pyFloat(text);
  if (Number.isNaN(value) && !/^\s*[+-]?nan\s*$/i.test(text)) {
    throw new ArgumentTypeError(`${pyRepr(shortName(text))} is not ${what}`);
  }
  if (!(value > 0 && value <= most))
    throw new ArgumentTypeError(`${shortName(text)} must be above 0 and at most ${limit}`);
  return value;
}

/** float(text): what Python accepts as a number (inf, nan, 1_000, 1e3), NaN otherwise. */
function pyFloat(text) {
  const t = text.trim().replace(/(\d)_(?=\d)/g, '$1');
  if (/^[+-]?(inf|infinity)$/i.test(t)) return t.startsWith('-') ? -Infinity : Infinity;
  if (/^[+-]?nan$/i.test(t)) return NaN;
  return /^[+-]?(\d+\.?\d*|\.\d+)(e[+-]?\d+)?$/i.test(t) ? Number(t) : NaN;
}

const positiveDollars = (text) => positiveAmount(text, MAX_COST_USD, 'an amount in US dollars', gFormat(MAX_COST_USD));
const positiveSeconds = (text) =>
  positiveAmount(text, MAX_WAIT_S, 'a number of seconds', `${gFormat(MAX_WAIT_S)} (a day)`);

function choiceOf(choices, transform = (s) => s.toLowerCase()) {
  return (text) => {
    const value = transform(text.trim());
    if (!choices.includes(value)) throw new ArgumentTypeError(`${pyRepr(text)} is not one of ${choices.join(', ')}`);
    return value;
  };
}

/** A model or channel name as APIYI spells them; anything else is a typo, not a name to send. */
function modelName(text) {
  const name = text.trim();
  if (!name) throw new ArgumentTypeError(`the model name is empty (e.g. ${DEFAULT_MODEL})`);
  if (!MODEL_NAME.test(name)) {
    throw new ArgumentTypeError(`${pyRepr(shortName(cleanText(name)))} is not a model name `
      + '(letters, digits and . _ - : / @ + only)');
  }
  return name;
}

function defaultModel(env) {
  const text = env[ENV_MODEL] || '';
  try {
    return text.trim() ? modelName(text) : DEFAULT_MODEL;
  } catch (err) {
    if (!(err instanceof ArgumentTypeError)) throw err;
    throw new UsageError(`${ENV_MODEL}: ${err.message}`, {
      hint: `set it to a name from ${PROG} --list-models, or unset it`,
      field: 'model'
    });
  }
}

const CONVERTERS = {
  resolution: choiceOf(Object.keys(RESOLUTION_LONG_EDGES), (s) => s.toUpperCase()),
  quality: choiceOf(QUALITIES), n: intInRange(MIN_N, MAX_N), background: choiceOf(BACKGROUNDS),
  moderation: choiceOf(MODERATIONS), output_format: choiceOf([...OUTPUT_FORMATS, ...Object.keys(FORMAT_ALIASES)]),
  output_compression: intInRange(0, 100), complexity: choiceOf(COMPLEXITIES), frame_count: intInRange(...GIF_FRAMES),
  frame_duration_ms: intInRange(...GIF_FRAME_MS), model: modelName,
};

function windowsAccepts(part) {
  return !(WINDOWS_RESERVED.test(part) || WINDOWS_FORBIDDEN.test(part) || /[. ]$/.test(part));
}

/** Split a -s value into ['auto'|'wxh'|'ratio', a, b]; X, × and spaces tolerated. */
function parseSizeText(text) {
  const cleaned = text.replace(/\s+/g, '').toLowerCase().replace(/×/g, 'x').replace(/：/g, ':');
  if (cleaned === 'auto') return ['auto', 0, 0];
  const match = /^(\d{1,6})([x:])(\d{1,6})$/.exec(cleaned);
  if (!match) {
    const upper = cleaned.toUpperCase();
    const hint = upper in RESOLUTION_LONG_EDGES ? `for ${text.toUpperCase()} give a ratio: -s 16:9 -r ${upper}`
      : `presets: ${SIZE_PRESETS.join(' ')}`;
    throw new UsageError(`--size ${pyRepr(shortName(text))} is not a size: use auto, WxH (e.g. 1536x1024) or a ratio `
      + 'W:H (e.g. 16:9)', { hint });
  }
  return [match[2] === 'x' ? 'wxh' : 'ratio', parseInt(match[1], 10), parseInt(match[3], 10)];
}

function sizeRuleViolations(width, height, rule = FREE) {
  if (Math.min(width, height) === 0) return ['width and height must be above 0'];
  const rules = [];
  const { multiple, edges: [, longest], pixels: [fewest, most] } = rule;
  if (width % multiple || height % multiple) rules.push(`width and height must be multiples of ${multiple}`);
  if (Math.max(width, height) > longest) rules.push(`the longest edge must be at most ${longest}`);
  if (Math.max(width, height) < (rule.long_edge_from || 0)) {
    rules.push(`the longest edge must be at least ${rule.long_edge_from}`);
  }
  if (Math.max(width, height) / Math.min(width, height) > MAX_ASPECT)
    rules.push('the aspect ratio must be at most 3:1');
  if (!(fewest <= width * height && width * height <= most)) {
    rules.push(
      `the total pixels must be between ${grouped(fewest)} and ${grouped(most)} (got ${grouped(width * height)})`
    );
  }
  return rules;
}

/** The valid heights for a width, as [low, high] in steps of the rule's multiple (low > high: none). */
function validHeightsFor(width, rule = FREE) {
  const { multiple, edges: [, longest], pixels: [fewest, most] } = rule;
  const from = rule.long_edge_from || 0;
  const shortestLong = width < from ? from : 0;
  const low = Math.max(multiple, Math.ceil(width / MAX_ASPECT / multiple) * multiple,
    Math.ceil(fewest / width / multiple) * multiple, Math.ceil(shortestLong / multiple) * multiple);
  const high = Math.min(longest, Math.floor(Math.floor(width * MAX_ASPECT) / multiple) * multiple,
    Math.floor(Math.floor(most / width) / multiple) * multiple);
  return [low, high];
}

/** The valid size closest to width x height (relative change of each edge), after fitting the limits. */
function nearestValidSize(width, height, rule = FREE) {
  [width, height] = fitWithinLimits(Math.max(width, 1.0), Math.max(height, 1.0), rule);
  const { multiple, edges: [, longest] } = rule;
  let best = [Infinity, 0, 0];
  for (let w = multiple; w <= longest; w += multiple) {
    const [low, high] = validHeightsFor(w, rule);
    if (low > high) continue;
    const below = Math.min(Math.max(low, Math.floor(Math.floor(height) / multiple) * multiple), high);
    for (const h of [below, Math.min(below + multiple, high)]) {
      const cost = Math.abs(Math.log(w / width)) + Math.abs(Math.log(h / height));
      if (cost < best[0] || (cost === best[0] && (w < best[1] || (w === best[1] && h < best[2])))) best = [cost, w, h];
    }
  }
  return [best[1], best[2]];
}

function fitWithinLimits(width, height, rule = FREE) {
  const { edges: [, longest], pixels: [fewest, most] } = rule;
  if (Math.max(width, height) / Math.min(width, height) > MAX_ASPECT) {
    [width, height] = width > height ? [height * MAX_ASPECT, height] : [width, width * MAX_ASPECT];
  }
  const target = Math.min(Math.max(Math.max(width, height), rule.long_edge_from || 0), longest);
  const larger = Math.max(width, height);
  [width, height] = [width * target / larger, height * target / larger];
  const pixels = width * height;
  if (!(fewest <= pixels && pixels <= most)) {
    const factor = Math.sqrt((pixels > most ? most : fewest) / pixels);
    [width, height] = [width * factor, height * factor];
  }
  return [width, height];
}

function sizeForRatio(ratioW, ratioH, resolution, rule = FREE) {
  const scale = RESOLUTION_LONG_EDGES[resolution] / Math.max(ratioW, ratioH);
  return nearestValidSize(ratioW * scale, ratioH * scale, rule);
}

/** The size to send (null: not sent) and a note saying how a ratio or 'match' was mapped. */
function resolveSize(text, resolution, profile, { fmt = 'png', frames = GIF_DEFAULT_FRAMES, firstInput = null } = {}) {
  if (text === null || text === undefined) {
    if (resolution) {
      throw new UsageError('--resolution needs an aspect ratio size', {
        hint: 'e.g. -s 16:9 -r 2K',
        field: 'resolution'
      });
    }
    return [null, ''];
  }
  const [kind, a, b] = sizeRequest(text, firstInput);
  if (kind === 'auto') {
    if (resolution) {
      throw new UsageError('--resolution needs an aspect ratio size, not auto', { hint: 'e.g. -s 16:9 -r 2K',
        field: 'resolution' });
    }
    return ['auto', ''];
  }
  if (kind === 'wxh' && resolution) {
    throw new UsageError(`--resolution applies to a ratio like 16:9, not to ${a}x${b}`,
      { hint: `drop -r, or use -s ${a}:${b} -r ${resolution}`, field: 'resolution' });
  }
  if (a === 0 || b === 0) {
    if (kind === 'wxh') throw new UsageError(`--size ${a}x${b}: width and height must be above 0; e.g. 1024x1024`);
    throw new UsageError(`--size ${a}:${b}: both sides of a ratio must be above 0`, { hint: 'e.g. -s 16:9' });
  }
  if (kind === 'ratio' && Math.max(a, b) / Math.min(a, b) > MAX_ASPECT) {
    const widest = a > b ? '3:1' : '1:3';
    throw new UsageError(`--size ${a}:${b}: the aspect ratio must be at most 3:1; nearest valid ratio is ${widest}`);
  }
  if (fmt === 'gif' && profile.gif_rules) return gifSize(kind, a, b, frames, resolution);
  return profileSize(kind, a, b, resolution, profile);
}

/** A model's own sizes: a fixed tier size as it is, a free size by its rule, a ratio in the -r tier. */
function profileSize(kind, a, b, resolution, profile) {
  const tiers = SIZE_TIERS[profile.tiers] || {};
  const rule = SIZE_RULES[profile.sizes];
  const every = Object.values(tiers).flat();
  if (kind === 'wxh' && every.includes(`${a}x${b}`)) return [`${a}x${b}`, ''];
  if (rule && !(kind !== 'wxh' && resolution in tiers)) return ruleSize(kind, a, b, resolution, rule, profile.name);
  if (kind === 'wxh') {
    throw new UsageError(
      `--size ${a}x${b}: ${profile.name} takes only its fixed sizes; nearest is ` +
        `${nearestByRatio(a, b, every, a * b)}`,
      { hint: `see ${PROG} --list-models, or give a ratio such as -s 16:9 -r 2K` }
    );
  }
  const tier = resolution || DEFAULT_TIER;
  if (!(tier in tiers)) {
    throw new UsageError(`-r ${tier}: ${profile.name} has no ${tier} sizes (it has ${Object.keys(tiers).join(', ')})`,
      { field: 'resolution' });
  }
  const size = nearestByRatio(a, b, tiers[tier]);
  return [size, `size ${kind === 'match' ? 'match' : `${a}:${b}`} at ${tier} -> ${size} (${profile.name})`];
}

function sizeRequest(text, firstInput) {
  if (text.replace(/\s+/g, '').toLowerCase() !== 'match') return parseSizeText(text);
  if (!firstInput) {
    throw new UsageError('-s match takes the shape of the first input image, but there is none',
      { hint: 'add -i IMAGE, or give a size such as 16:9' });
  }
  return ['match', firstInput.info.width, firstInput.info.height];
}

function ruleSize(kind, a, b, resolution, rule, model = DEFAULT_MODEL) {
  const longest = rule.edges[1];
  if (resolution && RESOLUTION_LONG_EDGES[resolution] > longest) {
    throw new UsageError(`-r ${resolution}: ${model} takes a long edge of at most ${longest}`, { field: 'resolution',
      hint: 'use -r 1K, or a model that makes larger images (see --list-models)' });
  }
  if (kind === 'wxh') {
    const problems = sizeRuleViolations(a, b, rule);
    if (problems.length) {
      const [w, h] = nearestValidSize(a, b, rule);
      throw new UsageError(`--size ${a}x${b}: ${problems.join('; ')}; nearest valid size is ${w}x${h}`);
    }
    return [`${a}x${b}`, ''];
  }
  if (kind === 'match') {
    const scale = resolution ? RESOLUTION_LONG_EDGES[resolution] / Math.max(a, b) : 1.0;
    const [width, height] = nearestValidSize(a * scale, b * scale, rule);
    return [`${width}x${height}`, `size match (first input image ${a}x${b}) -> ${width}x${height}`];
  }
  const tier = resolution || '1K';
  const [width, height] = sizeForRatio(a, b, tier, rule);
  return [`${width}x${height}`, `size ${a}:${b} at ${tier} -> ${width}x${height}`];
}

function nearestByRatio(width, height, sizes, area = 0) {
  const distance = (size) => {
    const [w, h] = size.split('x').map(Number);
    return [Math.abs(Math.log((w / h) / (width / height))), area ? Math.abs(Math.log(w * h / area)) : 0];
  };
  return sizes.reduce((best, size) => {
    const [d1, d2] = distance(size);
    const [b1, b2] = distance(best);
    return d1 < b1 || (d1 === b1 && d2 < b2) ? size : best;
  });
}

function gifLimits(frames) {
  const cap = GIF_FRAME_CAPS.find(([most]) => frames <= most)[1];
  return [MAX_EDGE / GIF_SHEET_COLUMNS, cap * cap];
}

/** A GIF's size is one frame's: edges multiples of 16, all frames within one sheet's budget. */
function gifSize(kind, a, b, frames, resolution) {
  if (resolution) {
    throw new UsageError('--resolution does not apply to a GIF: its frames are at most 960 px',
      { hint: 'drop -r; give -s W:H or a frame size such as 720x720', field: 'resolution' });
  }
  const [longest, pixels] = gifLimits(frames);
  if (kind === 'wxh') {
    const problems = [
      [`frame edges must be multiples of ${SIZE_MULTIPLE}`, a % SIZE_MULTIPLE || b % SIZE_MULTIPLE],
      [`a frame's longest edge must be at most ${longest}`, Math.max(a, b) > longest],
      [`with ${frames} frames a frame holds at most ${grouped(pixels)} pixels (got ${grouped(a * b)})`, a * b > pixels],
      ['the aspect ratio must be at most 3:1', Math.max(a, b) / Math.min(a, b) > MAX_ASPECT],
    ].filter(([, broken]) => broken).map(([rule]) => rule);
    if (problems.length) {
      const [w, h] = largestGifFrame(a, b, frames);
      throw new UsageError(`--size ${a}x${b} for a GIF of ${frames} frames: ${problems.join('; ')}; nearest valid `
        + `frame is ${w}x${h}`);
    }
    return [`${a}x${b}`, ''];
  }
  const [width, height] = largestGifFrame(a, b, frames);
  return [`${width}x${height}`, `GIF frame for ${a}:${b} with ${frames} frames -> ${width}x${height}`];
}

function largestGifFrame(width, height, frames) {
  const [longest, pixels] = gifLimits(frames);
  const ratio = Math.min(Math.max(width / height, 1 / MAX_ASPECT), MAX_ASPECT);
  const scale = Math.min(longest / Math.max(ratio, 1.0), Math.sqrt(pixels / ratio));
  const edge = (x) => Math.max(SIZE_MULTIPLE, Math.floor(Math.floor(x) / SIZE_MULTIPLE) * SIZE_MULTIPLE);
  return [edge(scale * ratio), edge(scale)];
}

/** A path as given, ~ expanded as Python's expanduser does (~ alone and ~/...). */
function expandPath(text) {
  if (text === '~' || text.startsWith('~/') || (IS_WINDOWS && text.startsWith('~\\'))) {
    return path.join(os.homedir(), text.slice(2));
  }
  if (/^~[^/\\]/.test(text)) {
    throw new UsageError(`${text}: its ~ names no home folder here`, { hint: 'give the full path' });
  }
  return text;
}

/** Text that can go on the wire and into a file name: no NUL. */
function checkText(value, what) {
  if (value.includes('\x00')) throw new UsageError(`${what} holds a NUL character`, { hint: 'remove it' });
  if (/[\ud800-\udfff]/.test(value.replace(/[\ud800-\udbff][\udc00-\udfff]/g, ''))) {
    throw new UsageError(`${what} holds bytes that are not UTF-8`, { hint: 'give it as UTF-8 text' });
  }
}

/** len() of a Python str: code points, not UTF-16 units. */
function codePoints(text) {
  let count = 0;
  for (const _ of text) count += 1;   // eslint-disable-line no-unused-vars
  return count;
}

/** The prompt exactly as given; '-' reads UTF-8 from stdin and drops one trailing newline. */
function readPrompt(value) {
  if (value === '-') {
    let raw;
    try {
      raw = readStdin(MAX_PROMPT_BYTES + 1);
    } catch (err) {
      throw new UsageError('-p - reads the prompt from standard input, but there is none');
    }
    if (raw.length > MAX_PROMPT_BYTES) {
      throw new UsageError(`the prompt on standard input is longer than ${grouped(MAX_PROMPT_BYTES)} bytes`,
        { hint: `a prompt holds at most ${grouped(MAX_PROMPT_CHARS)} characters` });
    }
    const bad = firstInvalidUtf8(raw);
    if (bad >= 0) {
      throw new UsageError(`the prompt on standard input is not UTF-8 (byte ${bad})`, {
        hint: 'save or pipe it as UTF-8'
      });
    }
    value = raw.toString('utf8').replace(/^\ufeff/, '');
    value = value.endsWith('\r\n') ? value.slice(0, -2) : value.endsWith('\n') ? value.slice(0, -1) : value;
  }
  checkText(value, 'the prompt');
  if (!value.trim())
    throw new UsageError('the prompt is empty', { hint: 'describe the image: -p "a cute orange cat"' });
  const length = codePoints(value);
  if (length > MAX_PROMPT_CHARS) {
    throw new UsageError(`the prompt has ${grouped(length)} characters; the limit is ${grouped(MAX_PROMPT_CHARS)}`,
      { hint: 'shorten it' });
  }
  return value;
}

function readStdin(limit) {
  const pieces = [];
  let total = 0;
  const buffer = Buffer.alloc(65536);
  for (;;) {
    let count;
    try {
      count = fs.readSync(0, buffer, 0, buffer.length, null);
    } catch (err) {
      if (err.code === 'EAGAIN') {     // a non-blocking stdin with nothing yet
        sleepSync(0.01);
        continue;
      }
      if (err.code === 'EOF') break;
      throw err;
    }
    if (!count) break;
    pieces.push(Buffer.from(buffer.subarray(0, count)));
    total += count;
    if (total >= limit) break;
  }
  return Buffer.concat(pieces);
}

// UTF-8 by its lead byte (RFC 3629): first and last lead, sequence length, the range of the second byte
// (the rest are 80-BF); E0, ED, F0 and F4 narrow it to rule out overlong forms, surrogates and > 10FFFF.
const UTF8_LEADS = [[0x00, 0x7f, 1], [0xc2, 0xdf, 2, 0x80, 0xbf], [0xe0, 0xe0, 3, 0xa0, 0xbf],
  [0xe1, 0xec, 3, 0x80, 0xbf], [0xed, 0xed, 3, 0x80, 0x9f], [0xee, 0xef, 3, 0x80, 0xbf], [0xf0, 0xf0, 4, 0x90, 0xbf],
  [0xf1, 0xf3, 4, 0x80, 0xbf], [0xf4, 0xf4, 4, 0x80, 0x8f]];

/** Where bytes stop being UTF-8, as Python's decoder reports it: the start of the first bad sequence
 * (-1: all valid). */
function firstInvalidUtf8(bytes) {
  for (let at = 0; at < bytes.length;) {
    const lead = UTF8_LEADS.find(([first, last]) => first <= bytes[at] && bytes[at] <= last);
    if (!lead) return at;
    const [, , size, low, high] = lead;
    for (let k = 1; k < size; k += 1) {
      const byte = bytes[at + k];
      if (byte === undefined || byte < (k === 1 ? low : 0x80) || byte > (k === 1 ? high : 0xbf)) return at;
    }
    at += size;
  }
  return -1;
}

/** Format, width and height (and a GIF's frames) from a file's first bytes: null when not an image. */
function imageInfoFromFile(file) {
  const handle = fs.openSync(file, 'r');
  try {
    return imageInfoFromHandle(handle);
  } finally {
    fs.closeSync(handle);
  }
}

/** Reads from a file descriptor at absolute positions, as the Python twin's handle.read/seek. */
function readAt(handle, position, length) {
  const buffer = Buffer.alloc(length);
  const count = fs.readSync(handle, buffer, 0, length, position);
  return buffer.subarray(0, count);
}

function imageInfoFromHandle(handle) {
  const head = readAt(handle, 0, 32);
  let info = null;
  if (
    head.subarray(0, 8).equals(Buffer.from('\x89PNG\r\n\x1a\n', 'latin1')) &&
    head.toString('latin1', 12, 16) === 'IHDR' &&
    head.length >= 24
  ) {
    info = imageInfo('png', head.readUInt32BE(16), head.readUInt32BE(20));
  } else if (
    head.toString('latin1', 0, 4) === 'RIFF' &&
    head.toString('latin1', 8, 12) === 'WEBP' &&
    head.length >= 30
  ) {
    info = webpInfo(head);
  } else if (head[0] === 0xff && head[1] === 0xd8 && head[2] === 0xff) {
    info = jpegInfo(handle);
  } else if (['GIF87a', 'GIF89a'].includes(head.toString('latin1', 0, 6)) && head.length >= 13) {
    info = gifInfo(head, handle);
  } else if (SVG_START.test(head.toString('latin1'))) {
    return svgInfo(readAt(handle, 0, SVG_HEAD_BYTES));
  }
  return info && info.width > 0 && info.height > 0 ? info : null;
}

function imageInfo(format, width, height, frames = 1) {
  return { format, width, height, frames };
}

/** The logical screen's size, and the frames counted by walking the blocks. */
function gifInfo(head, handle) {
  const width = head.readUInt16LE(6);
  const height = head.readUInt16LE(8);
  const flags = head[10];
  let position = 13 + (flags & 0x80 ? 3 << ((flags & 7) + 1) : 0);
  let frames = 0;
  for (;;) {
    const block = readAt(handle, position, 1);
    position += 1;
    if (block[0] === 0x2c && block.length) {
      const descriptor = readAt(handle, position, 9);
      if (descriptor.length < 9) break;
      frames += 1;
      position += 9 + (descriptor[8] & 0x80 ? 3 << ((descriptor[8] & 7) + 1) : 0) + 1;
    } else if (block[0] === 0x21 && block.length) {
      position += 1;
    } else {
      break;
    }
    const after = skipGifSubBlocks(handle, position);
    if (after < 0) break;
    position = after;
  }
  return frames ? imageInfo('gif', width, height, frames) : null;
}

function skipGifSubBlocks(handle, position) {
  for (;;) {
    const length = readAt(handle, position, 1);
    if (!length.length) return -1;
    position += 1;
    if (length[0] === 0) return position;
    position += length[0];
  }
}

/** An XML document whose root element is svg; its size from width and height, else the viewBox. */
function svgInfo(head) {
  const text = head.toString('utf8').replace(/^\ufeff/, '');
  SVG_ROOT.lastIndex = svgPrologEnd(text);
  const root = SVG_ROOT.exec(text);
  if (!root) return null;
  const attributes = {};
  for (const [, name, value] of (root[1] || '').matchAll(/([\w:.-]+)\s*=\s*["']([^"']*)["']/g)) {
    if (!(name in attributes)) attributes[name] = value;
  }
  let [width, height] = ['width', 'height'].map((name) => svgLength(attributes[name] || ''));
  const box = (attributes.viewBox || '').trim().split(/[\s,]+/);
  if (!(width && height) && box.length === 4) [width, height] = box.slice(2).map(svgLength);
  return imageInfo('svg', width, height);
}

function svgPrologEnd(text) {
  let position = 0;
  for (;;) {
    position += /^\s*/.exec(text.slice(position))[0].length;
    const opening = Object.keys(SVG_PROLOG).find((o) => text.startsWith(o, position));
    if (opening === undefined) return position;
    let closing = SVG_PROLOG[opening];
    if (opening === '<!DOCTYPE' && text.slice(position, text.indexOf('>', position)).includes('[')) closing = ']>';
    const end = text.indexOf(closing, position);
    if (end < 0) return text.length;
    position = end + closing.length;
  }
}

function svgLength(text) {
  const match = /^\s*([0-9]{1,6}(?:\.[0-9]{0,6})?)\s*(px)?\s*$/.exec(text);
  return match ? pyRound(parseFloat(match[1])) : 0;
}

/** round(): halves to even, as Python rounds. */
function pyRound(x) {
  const floor = Math.floor(x);
  const diff = x - floor;
  if (diff > 0.5) return floor + 1;
  if (diff < 0.5) return floor;
  return floor % 2 === 0 ? floor : floor + 1;
}

function webpInfo(head) {
  const chunk = head.toString('latin1', 12, 16);
  if (chunk === 'VP8 ' && head[23] === 0x9d && head[24] === 0x01 && head[25] === 0x2a) {
    return imageInfo('webp', head.readUInt16LE(26) & 0x3fff, head.readUInt16LE(28) & 0x3fff);
  }
  if (chunk === 'VP8L' && head[20] === 0x2f) {
    const bits = head.readUInt32LE(21);
    return imageInfo('webp', (bits & 0x3fff) + 1, ((bits >>> 14) & 0x3fff) + 1);
  }
  if (chunk === 'VP8X') return imageInfo('webp', head.readUIntLE(24, 3) + 1, head.readUIntLE(27, 3) + 1);
  return null;
}

/** Walk the JPEG segments (skipping EXIF and friends) to the first start-of-frame. */
function jpegInfo(handle) {
  let position = 2;
  for (;;) {
    let byte = readAt(handle, position++, 1);
    while (byte.length && byte[0] === 0xff) byte = readAt(handle, position++, 1);
    if (!byte.length) return null;
    const marker = byte[0];
    if (marker === 0x01 || (marker >= 0xd0 && marker <= 0xd8)) continue;
    const header = readAt(handle, position, 2);
    position += 2;
    if (header.length < 2) return null;
    const length = header.readUInt16BE(0);
    if (length < 2) return null;
    if (JPEG_SOF_MARKERS.has(marker)) {
      const frame = readAt(handle, position, 5);
      if (frame.length < 5) return null;
      return imageInfo('jpeg', frame.readUInt16BE(3), frame.readUInt16BE(1));
    }
    position += length - 2;
    const next = readAt(handle, position++, 1);
    if (!next.length || next[0] !== 0xff) return null;
  }
}

/** Colour type 4/6 carries alpha; any other type has it only through a tRNS chunk. */
function pngHasAlpha(file) {
  const handle = fs.openSync(file, 'r');
  try {
    let position = 8;
    for (;;) {
      const header = readAt(handle, position, 8);
      if (header.length < 8) return false;
      const length = header.readUInt32BE(0);
      const name = header.toString('latin1', 4, 8);
      position += 8;
      if (name === 'IHDR') {
        const ihdr = readAt(handle, position, Math.min(length, 13));   // a length is what the file claims
        if ([4, 6].includes(ihdr[9])) return true;
        position += length + 4;
      } else if (['tRNS', 'IDAT', 'IEND'].includes(name)) {
        return name === 'tRNS';
      } else {
        position += length + 4;
      }
    }
  } finally {
    fs.closeSync(handle);
  }
}

/** file, folder, other (a device, a FIFO) or missing. */
function pathKind(file) {
  let info;
  try {
    info = fs.statSync(file);
  } catch {
    return 'missing';
  }
  return info.isFile() ? 'file' : info.isDirectory() ? 'folder' : 'other';
}

function checkInputFile(text, role, limit) {
  if (/^[a-z][a-z0-9+.-]*:\/\//i.test(text)) {
    throw new UsageError(`${role} ${text}: URLs are not supported`, { hint: 'download the image, then give its path' });
  }
  const file = expandPath(text);
  const kind = pathKind(file);
  if (kind !== 'file') {
    const problem = { folder: 'is a folder', other: 'not a regular file', missing: 'not found' }[kind];
    throw new UsageError(`${role} ${text}: ${problem}`, { hint: 'check the path' });
  }
  const size = fs.statSync(file).size;
  if (size >= limit) {
    throw new UsageError(`${role} ${text} is ${fixed(size / 1048576, 1)} MiB; it must be under ${limit / 1048576} MiB`,
      { hint: 'resize or compress it' });
  }
  let info;
  try {
    info = imageInfoFromFile(file);
  } catch (err) {
    throw new UsageError(`${role} ${text} cannot be read: ${reasonText(err)}`);
  }
  if (!info || !INPUT_FORMATS.includes(info.format) || !info.width || !info.height) {
    throw new UsageError(`${role} ${text} is not a PNG, JPEG or WebP image (by its content)`,
      { hint: 'convert it to PNG, JPEG or WebP' });
  }
  return { path: pyPath(file), info, size_bytes: size };
}

function checkMask(text, firstImage) {
  const mask = checkInputFile(text, '--mask', MAX_MASK_BYTES);
  if (mask.info.format !== 'png') {
    throw new UsageError(
      `--mask ${text} is ${mask.info.format.toUpperCase()}; a mask must be a PNG with an alpha channel`
    );
  }
  if (!pngHasAlpha(mask.path)) {
    throw new UsageError(`--mask ${text} has no alpha channel`,
      { hint: 'make the areas to edit fully transparent in an RGBA PNG' });
  }
  const first = firstImage.info;
  if (mask.info.width !== first.width || mask.info.height !== first.height) {
    throw new UsageError(`--mask ${text} is ${mask.info.width}x${mask.info.height} but the first input image is `
      + `${first.width}x${first.height}`, { hint: 'the mask must have the same size as image 1' });
  }
  return mask;
}

/** A path as pathlib writes it: separators collapsed, '.' parts dropped, '..' kept. */
function pyPath(text) {
  const root = path.parse(text).root;
  const parts = text.slice(root.length).split(IS_WINDOWS ? /[/\\]+/ : /\/+/).filter((p) => p && p !== '.');
  return (root + parts.join(path.sep)) || '.';
}

/** pathlib's parents: "out/sub" has "out" and "."; "/a/b" has "/a" and "/". */
function pyParents(file) {
  const parents = [];
  for (let current = pyPath(file); path.dirname(current) !== current;) {
    current = path.dirname(current);
    parents.push(current);
  }
  return parents;
}

function isWritable(folder) {
  try {
    fs.accessSync(folder, fs.constants.W_OK);
    return true;
  } catch {
    return false;
  }
}

function normaliseFormat(value) {
  return value === null || value === undefined ? null : FORMAT_ALIASES[value.toLowerCase()] || value.toLowerCase();
}

/** pathlib's suffix: the last dot's part of the name, unless the name starts with it. */
function suffixOf(name) {
  const dot = name.lastIndexOf('.');
  return dot > 0 && dot < name.length - 1 ? name.slice(dot) : '';
}

function withName(file, name) {
  const folder = path.dirname(file);
  return folder === '.' && !file.startsWith('.') ? name : path.join(folder, name);
}

function stemOf(file) {
  const name = path.basename(file);
  return name.slice(0, name.length - suffixOf(name).length);
}

/** The planned output path, its format, whether the format was given, and warnings. */
function planOutputPath(filename, formatFlag, prompt) {
  if (filename === null || filename === undefined) {
    const fmt = formatFlag || 'png';
    return [defaultStemFor(prompt) + FORMAT_EXTENSIONS[fmt], fmt, formatFlag !== null, []];
  }
  const file = pyPath(expandPath(filename));
  const name = path.basename(file);
  if (!name || name === '.' || name === '..' || /[/\\]$/.test(filename) || pathKind(file) === 'folder') {
    throw new UsageError(`-f ${filename} names a folder`, {
      hint: `give a file name, e.g. -f ${path.join(file, 'cat.png')}`
    });
  }
  if (IS_WINDOWS && !windowsAccepts(name)) {
    throw new UsageError(`-f ${filename}: ${pyRepr(name)} ${WINDOWS_NAME_RULE}`, { hint: 'choose another name' });
  }
  const suffix = suffixOf(name);
  const fromExtension = EXTENSION_FORMATS[suffix.toLowerCase()] || null;
  const fmt = formatFlag || fromExtension || 'png';
  if (fromExtension === fmt) return [file, fmt, true, []];
  if (fromExtension) {
    const fixedPath = withName(file, stemOf(file) + FORMAT_EXTENSIONS[fmt]);
    return [fixedPath, fmt, true, [`-o ${fmt} does not match ${name}: the file will be ${path.basename(fixedPath)}`]];
  }
  const fixedPath = withName(file, name + FORMAT_EXTENSIONS[fmt]);
  const warnings = suffix ? [`${name} has no image extension: the file will be ${path.basename(fixedPath)}`] : [];
  return [fixedPath, fmt, formatFlag !== null, warnings];
}

function defaultStemFor(prompt) {
  return `${timestamp()}-${promptSlug(prompt)}-${randomHex(3)}`;
}

function promptSlug(prompt, maxWords = 6, maxChars = 40) {
  const words = (prompt.toLowerCase().match(/[a-z0-9]+/g) || []).slice(0, maxWords);
  let slug = '';
  for (const word of words) {
    const candidate = slug ? `${slug}-${word}` : word;
    if (candidate.length > maxChars) break;
    slug = candidate;
  }
  return slug || 'image';
}

/** The longest name of each kind the run may write for this plan. */
function namesWritten(plan, n) {
  const names = [];
  for (const file of outputPaths(plan, n)) {
    const suffix = suffixOf(path.basename(file));
    const longest = `${stemOf(file)}${LONGEST_FREE_SUFFIX}${suffix}`;
    names.push(longest, plan.metadata ? `${longest}.json` : longest,
      `${stemOf(file)}.partial-${MAX_PARTIAL_IMAGES}${LONGEST_FREE_SUFFIX}${suffix}`);
  }
  return names;
}

/** What the limit counts: UTF-16 units on Windows (NTFS), bytes of UTF-8 elsewhere. */
function nameSize(name) {
  return IS_WINDOWS ? name.length : Buffer.byteLength(name, 'utf8');
}

function checkNameLengths(plan, n) {
  const folders = path.dirname(plan.path).split(/[/\\]+/).filter((p) => p && p !== '.');
  for (const part of [...folders, ...namesWritten(plan, n)]) {
    const size = nameSize(part);
    if (size > MAX_NAME_BYTES) {
      const room = MAX_NAME_BYTES - (size - nameSize(path.basename(plan.path)));
      throw new UsageError(`the name ${[...part].slice(0, 40).join('')}... is ${size} bytes; file systems allow `
        + `${MAX_NAME_BYTES} per name, with room kept for suffixes like ${LONGEST_FREE_SUFFIX}`,
      { hint: `use a file name of at most ${Math.max(room, 16)} bytes (a Chinese character is 3)` });
    }
  }
}

/** The folder exists (or can be created) and accepts a new file; dry runs create nothing. */
function checkOutputFolder(folder, create) {
  try {
    if (create) {
      fs.mkdirSync(folder, { recursive: true });
      const probe = path.join(folder, `.${TOOL_NAME}-probe-${randomHex(4)}`);
      fs.closeSync(fs.openSync(probe, 'wx'));
      fs.unlinkSync(probe);
      return;
    }
    const existing = [folder, ...pyParents(folder)].find((p) => fs.existsSync(p));
    if (pathKind(existing) !== 'folder' || !isWritable(existing))
      throw new Error(`${existing} is not a writable folder`);
  } catch (err) {
    throw new UsageError(`the output folder ${folder} cannot be written: ${reasonText(err)}`,
      { hint: 'choose another -f path' });
  }
}

/** One row of MODEL_PROFILES (or UNKNOWN_MODEL), with every field the Python twin's ModelProfile has. */
function profileFor(model) {
  const row = MODEL_PROFILES[model];
  return { ...PROFILE_DEFAULTS, ...(row || UNKNOWN_MODEL), name: model, known: Boolean(row) };
}

function modelsThat(test) {
  const names = Object.keys(MODEL_PROFILES).filter((name) => test(profileFor(name)));
  return names.length ? `models that do: ${names.join(', ')}` : 'no model in the table does';
}

/** The settings the user gave, by profile name. */
function givenSettings(args) {
  const given = { size: args.size, quality: args.quality, n: args.n, background: args.background,
    moderation: args.moderation, output_compression: args.output_compression, mask: args.mask,
    complexity: args.complexity, frames: args.frames ?? args.frame_ms, svg_model: args.svg_model };
  return Object.fromEntries(Object.entries(given).filter(([, value]) => value !== null && value !== undefined));
}

/** What the model takes: refused (naming the models that do), or ignored by its channel (not sent). */
function checkProfile(args, profile, fmt, given) {
  const leftOut = new Set();
  const warnings = profile.known ? [] : [`model ${profile.name} is not in the table (${PROG} --list-models): sent as `
    + 'given; only the universal size rules are checked'];
  for (const name of Object.keys(given)) {
    if (name === 'n' && !profile.accepts.includes(name)) {
      leftOut.add(name);
    } else if (profile.ignores.includes(name)) {
      leftOut.add(name);
      warnings.push(`${profile.name} ignores ${SETTING_FLAGS[name]}: it was not sent`);
    } else if (!profile.accepts.includes(name)) {
      throw new UsageError(`${profile.name} does not take ${SETTING_FLAGS[name]}`,
        { hint: modelsThat((other) => other.accepts.includes(name)), field: name });
    }
  }
  if (args.quality && !leftOut.has('quality') && !profile.qualities.includes(args.quality)) {
    throw new UsageError(`${profile.name} does not take -q ${args.quality} (it takes ${profile.qualities.join(', ')})`,
      { hint: modelsThat((other) => other.qualities.includes(args.quality)), field: 'quality' });
  }
  if (!profile.formats.includes(fmt)) {
    throw new UsageError(`${profile.name} does not make ${fmt} images (it makes ${profile.formats.join(', ')})`,
      { hint: modelsThat((other) => other.formats.includes(fmt)), field: 'output_format' });
  }
  if (fmt === 'gif' && args.size && profile.known && !profile.gif_rules) {
    warnings.push(`${profile.name} picks a GIF's size itself: the size asked may not be the one made`);
  }
  if (profile.real_size_differs && args.size && !args.strict_size) {
    warnings.push(
      `${profile.name} may return another size than asked (--strict-size makes that exit ${EXIT_MISMATCH})`
    );
  }
  if ((args.n || 1) > profile.max_n) {
    throw new UsageError(`-n ${args.n}: ${profile.name} makes at most ${profile.max_n} per request`
      + (profile.line === 'flat' ? ' (a flat channel bills every n it is sent)' : ''),
    { hint: 'ask for fewer, or run a batch', field: 'n' });
  }
  return [leftOut, warnings];
}

/** GIF frames and the SVG author model belong to their format; each format rules some settings out. */
function checkFormatRules(args, profile, fmt, given) {
  for (const [setting, owner] of [['frames', 'gif'], ['svg_model', 'svg']]) {
    if (setting in given && fmt !== owner) {
      throw new UsageError(`${SETTING_FLAGS[setting]} applies to -o ${owner} only`, { field: setting,
        hint: `add -o ${owner}, or drop ${SETTING_FLAGS[setting]}` });
    }
  }
  for (const setting of FORMAT_EXCLUDES[fmt] || []) {
    if (setting in given || (setting === 'input_images' && args.input_image)) {
      const flag = SETTING_FLAGS[setting] || '-i';
      throw new UsageError(`${fmt.toUpperCase()} output cannot be combined with ${flag}`, { field: setting,
        hint: `drop ${flag}, or choose another -o` });
    }
  }
  if (fmt === 'svg' && (args.n || 1) > 1) {
    throw new UsageError('SVG output makes one image per request', { hint: 'drop -n, or run a batch', field: 'n' });
  }
  if (fmt === 'svg' && profile.needs_svg_model && !args.svg_model) {
    throw new UsageError(`-o svg with ${profile.name} needs --svg-model NAME, the model that writes the SVG`,
      { hint: 'for example --svg-model gpt-5.6-terra (its tokens are billed too)', field: 'svg_model' });
  }
}

/** One image's output tokens by OpenAI's calculator: wide images can cost less than squares. */
function outputTokens(width, height, factor) {
  const longest = Math.max(width, height);
  const shortest = Math.min(width, height);
  const scale = Math.floor((2 * factor * shortest + longest) / (2 * longest));
  return Math.ceil(factor * scale * (2000000 + width * height) / 4000000);
}

function outputTokenBounds(job, profile) {
  const quality = job.fields.quality || 'auto';
  const qualities = quality !== 'auto' ? [quality] : BASE_QUALITIES.filter((q) => q !== 'auto');
  const factors = profile.token_factors || {};
  if (!qualities.length || qualities.some((q) => !(q in factors))) return null;
  const size = job.fields.size || 'auto';
  const sizes = size !== 'auto' ? [size] : AUTO_SIZES;
  const counts = sizes.flatMap((s) => qualities.map((q) => outputTokens(...s.split('x').map(Number), factors[q])));
  const previews = Number(job.fields.partial_images || 0) * PARTIAL_IMAGE_TOKENS;
  return [Math.min(...counts) + previews, Math.max(...counts) + previews];
}

function inputTokenBounds(job) {
  const textLow = Math.floor(Buffer.byteLength(job.prompt, 'utf8') / 4) + PROMPT_OVERHEAD_TOKENS;
  const textHigh = codePoints(job.prompt) + PROMPT_OVERHEAD_TOKENS;
  const images = job.images.reduce((sum, f) => sum + Math.min(INPUT_IMAGE_MAX_PATCHES,
    Math.ceil(f.info.width / INPUT_IMAGE_PATCH) * Math.ceil(f.info.height / INPUT_IMAGE_PATCH)), 0);
  return [textLow, textHigh, images];
}

function tokenUsd(text, image, output, multiplier) {
  const prices = TOKEN_PRICES;
  return (text * prices.text_input + image * prices.image_input + output * prices.image_output) / 1e6 * multiplier;
}

/** round(x, digits) as Python rounds a float: the decimal nearest the binary value, halves to even. */
function roundTo(x, digits) {
  const scaled = Number((x * 10 ** digits).toPrecision(15));
  return pyRound(scaled) / 10 ** digits;
}

/** USD before sending, low and high (null where nothing is published); earlier runs replace the table. */
function estimateCost(job, multiplier, history = []) {
  const profile = profileFor(job.fields.model);
  if (profile.price_per_image !== null) {
    const usd = roundTo(profile.price_per_image * jobN(job) * multiplier, 4);
    return { low: usd, high: usd, basis: 'per_image', source: 'the flat price' };
  }
  const table = outputTokenBounds(job, profile);
  const bounds = history.length
    ? [Math.min(...history), Math.max(...history, ...(table ? table.slice(1) : []))]
    : table;
  if (bounds === null || ['gif', 'svg'].includes(job.output.format)) {
    const why = { gif: 'GIF frames have no published token figure', svg: "an SVG's author model is not priced" };
    return { low: null, high: null, basis: profile.line === 'official' ? 'tokens' : 'unknown',
      source: why[job.output.format] || 'no published figure for this model and quality' };
  }
  const [textLow, textHigh, images] = inputTokenBounds(job);
  const low = tokenUsd(textLow, images, bounds[0], multiplier) * jobN(job);
  const high = tokenUsd(textHigh, images, bounds[1], multiplier) * jobN(job);
  const source = history.length ? `${history.length} earlier run${history.length > 1 ? 's' : ''}` : 'the token tables';
  return { low: roundTo(low, 4), high: roundTo(high, 4), basis: 'tokens', source };
}

function estimateText(estimate) {
  if (estimate.high === null) return `cost unknown (${estimate.source})`;
  const spread = estimate.low === estimate.high ? `$${fixed(estimate.low, 4)}`
    : `$${fixed(estimate.low, 4)}-$${fixed(estimate.high, 4)}`;
  return `estimated cost ${spread} (from ${estimate.source})`;
}

/** Only what the user gave goes on the wire (the server's defaults apply); model always does. */
function collectFields(args, { prompt, size, fmt, formatGiven, leftOut }) {
  const fields = { model: args.model, prompt };
  const optional = { n: args.n, size, quality: args.quality, output_format: formatGiven ? fmt : null,
    output_compression: args.output_compression, background: args.background, moderation: args.moderation,
    complexity: args.complexity, frame_count: args.frames, frame_duration_ms: args.frame_ms,
    svg: args.svg_model ? { model: args.svg_model } : null };
  for (const [key, value] of Object.entries(optional)) {
    if (value !== null && value !== undefined && !leftOut.has(FIELD_SETTINGS[key] || key)) fields[key] = value;
  }
  return fields;
}

/** Cross-flag rules; returns warnings for what is allowed but risky. */
function checkCombinations(args, fmt) {
  if (args.output_compression !== null && args.output_compression !== undefined && fmt === 'png') {
    throw new UsageError('--output-compression applies to jpeg or webp, but the output format is png',
      { hint: 'add -o jpeg or -o webp, or drop -c', field: 'output_compression' });
  }
  if (args.mask && !args.input_image)
    throw new UsageError('--mask needs an input image to apply to', { hint: 'add -i IMAGE', field: 'mask' });
  if (args.moderation && args.input_image) {
    throw new UsageError('--moderation applies to text-to-image only (the edits endpoint has no such field)',
      { hint: 'drop --moderation', field: 'moderation' });
  }
  if ((args.input_image || []).length > MAX_INPUT_IMAGES) {
    throw new UsageError(`${args.input_image.length} input images given; at most ${MAX_INPUT_IMAGES} are allowed`,
      { field: 'input_images' });
  }
  if (args.background === 'transparent') {
    if (fmt === 'jpeg') {
      throw new UsageError('--background transparent needs png or webp; jpeg has no transparency',
        { hint: 'use -o png or -o webp', field: 'background' });
    }
    return profileFor(args.model).transparency_in_preview
      ? ['transparent backgrounds are in preview for gpt-image-2: some gateways refuse them'] : [];
  }
  return [];
}

const TEXT_SETTINGS = [['filename', '-f'], ['model', '--model'], ['mask', '-m'], ['input_image', '-i'],
  ['svg_model', '--svg-model']];

function checkTextSettings(args) {
  for (const [dest, flag] of TEXT_SETTINGS) {
    const value = args[dest];
    for (const text of typeof value === 'string' ? [value] : value || []) {
      about(dest === 'input_image' ? 'input_images' : dest, () => checkText(text, flag));
    }
  }
}

function checkInputs(args) {
  const images = about('input_images', () => (args.input_image || []).map((p) => checkInputFile(p, 'input image',
    MAX_INPUT_BYTES)));
  return [images, about('mask', () => (args.mask ? checkMask(args.mask, images[0]) : null))];
}

function jobN(job) {
  return Number(job.fields.n || 1);
}

function jobMode(job) {
  return job.images.length ? 'edit' : 'generate';
}

function jobEndpoint(job) {
  return job.images.length ? EDITS_PATH : GENERATIONS_PATH;
}

/** Every check that needs no network, in the order a user would fix them. A job is the Python
 * twin's ImageJob as plain data (the record's "spec"), so either twin can run or recover it. */
function buildJob(args, { create }) {
  const prompt = about('prompt', () => readPrompt(args.prompt));
  checkTextSettings(args);
  const [file, fmt, formatGiven, warnings] = about('filename', () => planOutputPath(args.filename,
    normaliseFormat(args.output_format), prompt));
  const profile = profileFor(args.model);
  const given = givenSettings(args);
  const [leftOut, profileWarnings] = checkProfile(args, profile, fmt, given);
  checkFormatRules(args, profile, fmt, given);
  warnings.push(...profileWarnings, ...checkCombinations(args, fmt));
  const [images, mask] = checkInputs(args);
  const [size, sizeNote] = about('size', () => resolveSize(leftOut.has('size') ? null : args.size, args.resolution,
    profile, { fmt, frames: args.frames || GIF_DEFAULT_FRAMES, firstInput: images[0] || null }));
  const output = { path: file, format: fmt, overwrite: args.overwrite, metadata: args.metadata, keep_partials: false,
    auto_named: args.filename === null, strict: args.strict_size, gallery: false };
  about('filename', () => {
    checkNameLengths(output, args.n || 1);
    checkOutputFolder(path.dirname(file), create);
  });
  const fields = collectFields(args, { prompt, size, fmt, formatGiven, leftOut });
  return { prompt, fields, images, mask, output, notes: sizeNote ? [sizeNote] : [], warnings };
}

function isLoopbackHost(host) {
  if (host.toLowerCase() === 'localhost') return true;
  const bare = host.replace(/^\[|\]$/g, '');
  if (net.isIPv4(bare)) return bare.startsWith('127.');
  if (net.isIPv6(bare)) return /^(0*:)*:?0*1$/.test(bare) || /^::ffff:127\./i.test(bare);
  return false;
}

/** The base URL, trimmed, and warnings; refused when it could not work or would leak the key. */
function checkBaseUrl(text) {
  const url = text.trim().replace(/\/+$/, '');
  const example = { hint: `e.g. ${DEFAULT_BASE_URL}` };
  if ([...url].some((ch) => /\s/.test(ch) || ch.charCodeAt(0) < 0x20 || ch.charCodeAt(0) === 0x7f)) {
    throw new UsageError(`--base-url ${pyRepr(url)} holds spaces or control characters`, example);
  }
  const parts = urlsplit(url);
  if (parts.port && !/^\d+$/.test(parts.port)) {
    throw new UsageError(`--base-url ${pyRepr(url)} is not a usable URL: Port could not be cast to integer value as `
      + `${pyRepr(parts.port)}`, example);
  }
  if (parts.port && Number(parts.port) > 65535) {
    throw new UsageError(`--base-url ${pyRepr(url)} is not a usable URL: Port out of range 0-65535`, example);
  }
  if (parts.userinfo !== null) {
    throw new UsageError('--base-url holds a user name or password; the key goes in APIYI_API_KEY or -k',
      { hint: 'give the URL without user:password@' });
  }
  if (!['http', 'https'].includes(parts.scheme) || !parts.hostname) {
    throw new UsageError(`--base-url ${pyRepr(text)} is not an http(s) URL`, example);
  }
  if (parts.rest) throw new UsageError(`--base-url ${pyRepr(text)} has a query or fragment`, example);
  if (parts.hostname.split('.').some((label) => Buffer.byteLength(label) > 63)) {
    throw new UsageError(`--base-url ${pyRepr(shortName(text))}: the host name is not a valid domain name`, example);
  }
  for (const endpoint of [GENERATIONS_PATH, EDITS_PATH]) {
    if (url.endsWith(endpoint)) {
      throw new UsageError(`--base-url ends with ${endpoint}: give the base only`,
        { hint: `use ${url.slice(0, -endpoint.length)}` });
    }
  }
  if (parts.scheme === 'http' && !isLoopbackHost(parts.hostname)) {
    return [url, [`${parts.hostname} is plain http: the API key travels unencrypted`]];
  }
  return [url, []];
}

/** A URL's parts as Python's urlsplit reads them (WHATWG's URL reads more: backslashes as slashes,
 * 0x7f.1 as 127.0.0.1), so both twins accept and refuse the same base URLs. */
function urlsplit(url) {
  const [, scheme = '', netloc = null, rest = ''] = /^(?:([A-Za-z][A-Za-z0-9+.-]*):)?(?:\/\/([^/?#]*))?[^?#]*(.*)$/
    .exec(url);
  const at = (netloc || '').lastIndexOf('@');
  const hostPort = (netloc || '').slice(at + 1);
  const bracketed = /^\[([^\]]*)\](?::(.*))?$/.exec(hostPort);
  const [host, port] = bracketed ? [bracketed[1], bracketed[2] || ''] : [hostPort.split(':')[0], hostPort.split(':')[1]
    || ''];
  return { scheme: scheme.toLowerCase(), userinfo: at >= 0 ? netloc.slice(0, at) : null, hostname: host.toLowerCase(),
    port, rest };
}

/** The key and warnings. Windows CMD keeps the quotes of set KEY="..." in the value; no key has them. */
function resolveApiKey(flag, env, required) {
  let key = (flag !== null && flag !== undefined ? flag : env[ENV_API_KEY] || '').trim();
  const warnings = [];
  if (key.length >= 2 && key[0] === key[key.length - 1] && `'"`.includes(key[0])) {
    key = key.slice(1, -1).trim();
    warnings.push('the API key was wrapped in quotes; they were removed '
      + `(in Windows CMD write: set ${ENV_API_KEY}=sk-... without quotes)`);
  }
  if (!key) {
    if (required) {
      throw new AuthError(`no API key: set ${ENV_API_KEY} or pass -k`,
        { hint: 'get a key at https://api.apiyi.com (console -> API keys)' });
    }
    return ['', warnings];
  }
  if ([...key].some((ch) => ch.charCodeAt(0) < 0x21 || ch.charCodeAt(0) > 0x7e)) {
    throw new AuthError('the API key contains spaces or characters that cannot go in a header',
      { hint: `copy the key again into ${ENV_API_KEY}` });
  }
  if (key.length < MIN_KEY_CHARS || /^[a-z_]+$/.test(key)) {
    const problem = key.length < MIN_KEY_CHARS ? `has ${key.length} characters; a key has at least ${MIN_KEY_CHARS}`
      : 'is a plain word, not a key';
    throw new AuthError(`the API key ${problem}`, { hint: `copy the whole key (sk-...) into ${ENV_API_KEY}` });
  }
  return [key, warnings];
}

/** The proxy the environment names for this URL, as urllib finds it (null: none, or bypassed). */
function proxyFor(url, env) {
  const parts = new URL(url);
  const host = parts.hostname.replace(/^\[|\]$/g, '');
  if (isLoopbackHost(host)) return null;
  const scheme = parts.protocol.slice(0, -1);
  const lower = Object.fromEntries(Object.entries(env).map(([k, v]) => [k.toLowerCase(), v]));
  const proxy = env[`${scheme}_proxy`] || lower[`${scheme}_proxy`];     // urllib's handler never uses all_proxy
  if (!proxy) return null;
  const bypass = (env.no_proxy || lower.no_proxy || '').split(',').map((s) => s.trim().toLowerCase()).filter(Boolean);
  const bypassed = bypass.some((entry) => entry === '*' || host === entry.replace(/^\./, '')
    || host.endsWith(`.${entry.replace(/^\./, '')}`));
  return bypassed ? null : proxy;
}

/** A plain-http base URL through an HTTP proxy hands the proxy the key in clear text. */
function checkProxy(baseUrl, allowed, env) {
  if (!baseUrl.startsWith('http:') || allowed) return;
  if (proxyFor(baseUrl, env)) {
    throw new UsageError(`--base-url ${baseUrl} is plain http and an HTTP proxy is set: the proxy would read the `
      + 'API key', { hint: 'use https, add the host to NO_PROXY, or pass --allow-http-proxy if you trust the proxy' });
  }
}

function priceMultiplier(env) {
  const text = (env[ENV_PRICE_MULTIPLIER] || '').trim();
  const value = text ? pyFloat(text) : 1.0;
  if (!(PRICE_MULTIPLIER_RANGE[0] <= value && value <= PRICE_MULTIPLIER_RANGE[1])) {
    throw new UsageError(`${ENV_PRICE_MULTIPLIER}=${pyRepr(shortName(cleanText(text)))} is not a price multiplier`,
      { hint: 'a number such as 1.2 (0.01 to 100), or unset it' });
  }
  return value;
}

function buildConfig(args, env) {
  const [baseUrl, urlWarnings] = checkBaseUrl(args.base_url || env[ENV_BASE_URL] || DEFAULT_BASE_URL);
  checkProxy(baseUrl, args.allow_http_proxy, env);
  const [key, keyWarnings] = resolveApiKey(args.api_key, env, !args.dry_run);
  return [{ base_url: baseUrl, api_key: key, timeout_s: args.timeout, retries: args.retries,
    price_multiplier: priceMultiplier(env) }, [...urlWarnings, ...keyWarnings]];
}

// --- Request building ---

function userAgent() {
  const [major, minor] = process.versions.node.split('.');
  return `${TOOL_NAME}/${VERSION} (node ${major}.${minor})`;
}

/** Form fields are text; booleans as the SDK writes them (stream=true). The one nested field, svg, never
 * goes as a form: an SVG is generated, never edited. */
function formValue(value) {
  return typeof value === 'boolean' ? (value ? 'true' : 'false') : String(value);
}

/** HTML5 form escaping, as browsers and httpx (the SDK's transport) do it. */
function quoteFormParam(value) {
  const escaped = value.replace(/\\/g, '\\\\').replace(/"/g, '%22');
  return escaped.replace(
    /[\x00-\x1a\x1c-\x1f]/g,
    (ch) => `%${ch.charCodeAt(0).toString(16).toUpperCase().padStart(2, '0')}`
  );
}

/** The file's name with its real format's extension: some gateways label a part's type by its name. */
function uploadName(upload) {
  const name = path.basename(upload.path);
  const suffix = suffixOf(name).toLowerCase();
  if (EXTENSION_FORMATS[suffix] === upload.info.format) return name;
  const stem = suffix in EXTENSION_FORMATS ? stemOf(upload.path) : name;
  return stem + FORMAT_EXTENSIONS[upload.info.format];
}

/** One image is a part named image; several are parts named image[], as the SDK sends them. */
function uploadParts(job) {
  const name = job.images.length === 1 ? 'image' : 'image[]';
  return [...job.images.map((image) => [name, image]), ...(job.mask ? [['mask', job.mask]] : [])];
}

/** Text fields first, then file parts; file bytes stay on disk until sent. */
function encodeMultipart(fields, files, boundary = randomHex(16)) {
  const segments = [];
  for (const [name, value] of Object.entries(fields)) {
    segments.push(Buffer.from(`--${boundary}\r\nContent-Disposition: form-data; name="${quoteFormParam(name)}"\r\n\r\n`
      + `${formValue(value)}\r\n`, 'utf8'));
  }
  for (const [name, upload] of files) {
    segments.push(
      Buffer.from(
        `--${boundary}\r\nContent-Disposition: form-data; name="${quoteFormParam(name)}"; ` +
          `filename="${quoteFormParam(uploadName(upload))}"\r\n` +
          `Content-Type: ${CONTENT_TYPES[upload.info.format]}\r\n\r\n`,
        'utf8'
      ),
      upload,
      Buffer.from('\r\n')
    );
  }
  segments.push(Buffer.from(`--${boundary}--\r\n`, 'ascii'));
  const length = segments.reduce((sum, s) => sum + (Buffer.isBuffer(s) ? s.length : s.size_bytes), 0);
  return { boundary, segments, length, contentType: `multipart/form-data; boundary=${boundary}` };
}

function buildRequest(job, config) {
  const headers = { Authorization: `Bearer ${config.api_key}`, 'User-Agent': userAgent(), Accept: 'application/json' };
  const url = config.base_url + jobEndpoint(job);
  let body;
  if (job.images.length) {
    body = encodeMultipart(job.fields, uploadParts(job));
    Object.assign(headers, { 'Content-Type': body.contentType, 'Content-Length': String(body.length) });
  } else {
    body = Buffer.from(pyJson(job.fields, { ascii: false }), 'utf8');
    Object.assign(headers, { 'Content-Type': 'application/json', 'Content-Length': String(body.length) });
  }
  return { method: 'POST', url, headers, body };
}

/** What --dry-run shows: the request with the key redacted and file parts summarised. */
function describeRequest(request, job, config) {
  const headers = { ...request.headers };
  headers.Authorization = config.api_key ? `Bearer ${KEY_MASK}` : `Bearer <no key: set ${ENV_API_KEY}>`;
  const described = { method: request.method, url: request.url, headers };
  if (!Buffer.isBuffer(request.body)) {
    described.fields = Object.fromEntries(Object.entries(job.fields).map(([k, v]) => [k, formValue(v)]));
    described.files = uploadParts(job).map(([name, f]) => ({ name, filename: path.basename(f.path),
      content_type: CONTENT_TYPES[f.info.format], bytes: f.size_bytes, width: f.info.width, height: f.info.height }));
  } else {
    described.json = job.fields;
  }
  return described;
}

// --- Transport ---

function uploadDeadlineS(request) {
  return UPLOAD_BASE_S + request.body.length / UPLOAD_MIN_BYTES_PER_S;
}

/** The URL's netloc, as the Python twin names the server in its messages (never a throw). */
function hostOf(url) {
  return (/^[a-z][a-z0-9+.-]*:\/\/([^/?#]*)/i.exec(url) || [])[1] || url;
}

/** What went wrong in words, as the system says it ("Connection refused"), never a stack. */
function reasonText(err) {
  const known = { EEXIST: 'File exists', ECONNRESET: 'Connection reset by peer', ENOTFOUND: 'Name or service not known',
    EAI_AGAIN: 'Temporary failure in name resolution' };
  if (err && known[err.code]) return known[err.code];
  if (err && typeof err.errno === 'number' && err.syscall) {
    const entry = util.getSystemErrorMap().get(err.errno);
    if (entry) return entry[1][0].toUpperCase() + entry[1].slice(1);
  }
  return String((err && err.message) || err || 'unknown error');
}

/** How a request reaches its URL, as urllib routes it for the Python twin: directly, or through the
 * proxy the environment names (loopback never): https as a CONNECT tunnel the proxy cannot read, plain
 * http in absolute form (checkProxy has refused that unless --allow-http-proxy). */
function requestOptions(url, request, env = process.env) {
  const options = { method: request.method, headers: request.headers };
  const proxy = proxyFor(url.href, env);
  if (!proxy) return [url, { ...options, agent: false }];
  let via;
  let credentials;
  try {
    via = new URL(/^[a-z][a-z0-9+.-]*:\/\//i.test(proxy) ? proxy : `http://${proxy}`);
    credentials = via.username ? { 'Proxy-Authorization': `Basic ${Buffer.from(
      `${decodeURIComponent(via.username)}:${decodeURIComponent(via.password)}`).toString('base64')}` } : {};
  } catch {
    throw new ConnectError(`the proxy the environment names for ${url.hostname} is not a usable URL`,
      { hint: 'fix or unset HTTPS_PROXY / HTTP_PROXY' });
  }
  if (url.protocol === 'http:') {
    return [url, { ...options, host: via.hostname.replace(/^\[|\]$/g, ''), port: via.port || 80, path: url.href,
      headers: { Host: url.host, ...options.headers, ...credentials }, agent: false, setHost: false }];
  }
  return [url, { ...options, headers: { Host: url.host, ...options.headers }, setHost: false,
    createConnection: (_, done) => openTunnel(via, url, credentials, done) }];
}

/** A CONNECT tunnel through the proxy to the URL's host, with TLS to that host inside it. */
function openTunnel(via, url, credentials, done) {
  const target = `${url.hostname.replace(/^\[|\]$/g, '')}:${url.port || 443}`;
  const connect = http.request({ host: via.hostname.replace(/^\[|\]$/g, ''), port: via.port || 80, method: 'CONNECT',
    path: target, headers: { Host: target, ...credentials }, agent: false });
  connect.once('connect', (answer, socket) => {
    if (answer.statusCode !== 200) {
      socket.destroy();
      done(Object.assign(new Error(`the proxy ${via.host} refused the tunnel (HTTP ${answer.statusCode})`),
        { code: 'EPROXY' }));
      return;
    }
    // host: the certificate is checked against the base URL's host, never the proxy's (an IP too)
    done(null, tls.connect({ socket, host: url.hostname.replace(/^\[|\]$/g, ''), rejectUnauthorized: true,
      servername: net.isIP(url.hostname) ? undefined : url.hostname }));
  });
  connect.once('error', (err) => done(err));
  connect.end();
}

/** The body goes out piece by piece (files streamed from disk, waiting for the socket to drain), so a
 * cancel can stop it between pieces while nothing is billed. */
async function writeBody(req, body, onStage) {
  const segments = Buffer.isBuffer(body) ? [body] : body.segments;
  for (const segment of segments) {
    if (Buffer.isBuffer(segment)) {
      onStage('piece');
      if (!req.write(segment)) await drained(req);
      continue;
    }
    let remaining = segment.size_bytes;
    const handle = fs.openSync(segment.path, 'r');
    try {
      for (let position = 0; remaining > 0;) {
        const piece = readAt(handle, position, Math.min(READ_CHUNK, remaining));
        if (!piece.length)
          throw new UsageError(`${segment.path} shrank while it was being sent`, { hint: 'run again' });
        onStage('piece');
        position += piece.length;
        remaining -= piece.length;
        if (!req.write(piece)) await drained(req);
      }
    } finally {
      fs.closeSync(handle);
    }
  }
  req.end();
}

function drained(req) {
  return new Promise((resolve) => {
    const done = () => {
      req.off('drain', done);
      req.off('close', done);
      resolve();
    };
    req.on('drain', done);
    req.on('close', done);
  });
}

/** One HTTP exchange. Connecting and sending have the upload deadline; from the last byte sent the
 * whole answer has timeoutS. Before delivery a failure is a ConnectError (retryable); after it,
 * MaybeBilledError. A 2xx body goes to the spool file as it arrives (never whole in memory). */
function sendRequest(request, { timeoutS, spool = null, limit = MAX_IMAGE_BYTES, onStage = () => {} }) {
  return new Promise((resolve, reject) => {
    const state = { sent: false, expired: '', settled: false, responded: false, timer: null };
    let req;
    const finish = (err, response) => {
      if (state.settled) return;
      state.settled = true;
      clearTimeout(state.timer);
      CURRENT.request = null;
      if (req) req.destroy();
      if (err) reject(err instanceof ToolError ? err : exchangeFailure(err, request, { ...state, timeoutS }));
      else resolve(response);
    };
    const arm = (seconds, what) => {
      clearTimeout(state.timer);
      state.timer = setTimeout(() => {
        state.expired = what;
        req.destroy(new Error('timed out'));
      }, Math.min(seconds * 1000, 2 ** 31 - 1));
    };
    try {
      req = openRequest(request);
    } catch (err) {
      finish(err);
      return;
    }
    CURRENT.request = req;
    arm(request.body.length ? uploadDeadlineS(request) : timeoutS, request.body.length ? 'upload' : 'answer');
    req.on('error', (err) => finish(state.responded ? cutShort() : err));   // mid-body: said as urllib says it
    req.on('close', () => state.responded || finish(cutShort()));
    req.on('finish', () => {
      state.sent = true;
      arm(timeoutS, 'answer');
      onStage('sent');
    });
    req.on('upgrade', (res, socket) => {      // 101: not an answer this API gives; said as its status
      socket.destroy();
      finish(null, { status: res.statusCode, headers: lowercaseHeaders(res.headers), body: Buffer.alloc(0) });
    });
    req.on('response', (res) => {
      state.responded = true;
      readResponse(res, { spool, limit, onStage, finish });
    });
    writeBody(req, request.body, onStage).catch((err) => finish(err));
  });
}

/** The request on its way, as urllib would send it: Node's parser made as lenient as http.client's
 * (a gateway's 20 KB header or odd byte must not cost a paid answer: this is a client, nothing to smuggle
 * to), and certificates always checked, whatever NODE_TLS_REJECT_UNAUTHORIZED says. */
function openRequest(request) {
  const url = new URL(request.url);
  const [target, options] = requestOptions(url, request);
  const lenient = { maxHeaderSize: 256 * 1024, insecureHTTPParser: true, rejectUnauthorized: true };
  if (options.host) return http.request({ ...options, ...lenient });
  return (url.protocol === 'https:' ? https : http).request(target, { ...options, ...lenient });
}

function lowercaseHeaders(headers) {
  return Object.fromEntries(Object.entries(headers).map(([k, v]) => [k.toLowerCase(), Array.isArray(v) ? v.join(', ')
    : String(v)]));
}

function cutShort() {
  return Object.assign(new Error('the connection closed before the whole answer arrived'), { code: 'ECUTSHORT' });
}

/** The answer, handed to finish once: a 2xx body into the spool (refused past limit); a download (no
 * spool) into memory, refused past limit; any other body into memory, cut at 64 KiB, since its status
 * decides what happens next. */
function readResponse(res, { spool, limit, onStage, finish }) {
  const headers = lowercaseHeaders(res.headers);
  const ok = res.statusCode >= 200 && res.statusCode < 300;
  const what = ok ? (spool ? 'the answer' : 'the image download') : '';
  let sink = null;
  const end = (err, response) => {
    try {
      if (sink) sink.close();
    } catch (closing) {
      err = err || closing;
    }
    finish(err, response);        // first: destroying the socket below emits events of its own
    if (err) res.destroy();
  };
  const answer = () => ({ status: res.statusCode, headers, body: sink.body() });
  let announced;
  try {
    announced = announcedLength(headers, what ? limit : Infinity, what);
    if (ok && spool) onStage('receiving');
    sink = ok && spool ? spoolSink(spool, limit) : memorySink(what ? limit : ERROR_BODY_LIMIT, what);
  } catch (err) {
    end(err);
    return;
  }
  res.on('data', (piece) => {
    try {
      if (sink.add(piece)) end(null, answer());     // an error body long enough to say what it has to
    } catch (err) {
      end(err);
    }
  });
  // An error body cut short only loses its message: its status decides what happens next.
  const broken = (err) => (ok ? end(err) : end(null, answer()));
  res.on('error', () => broken(cutShort()));     // a reset mid-body is said as urllib says it
  res.on('aborted', () => broken(cutShort()));
  res.on('close', () => broken(cutShort()));        // after 'end' this finds the exchange settled
  res.on('end', () => {
    try {
      sink.finish();
      if (announced !== null && sink.size() < announced) broken(cutShort());
      else end(null, answer());
    } catch (err) {
      end(err);
    }
  });
}

/** The Content-Length, if it is a plain number; one above the cap is refused before reading. */
function announcedLength(headers, limit, what) {
  const text = (headers['content-length'] || '').trim();
  if (!text) return null;
  if (!/^[0-9]{1,18}$/.test(text)) {
    throw new ServiceError(
      `the server sent a Content-Length that is not a number: ${pyRepr(cleanText(text).slice(0, 40))}`,
      { hint: 'the gateway is broken; retry later' }
    );
  }
  if (what && Number(text) > limit) throw tooLarge(what, limit, Number(text));
  return Number(text);
}

/** A 2xx answer, written to the spool as it arrives; closed once, whatever ends it. */
function spoolSink(file, limit) {
  let handle = fs.openSync(file, 'w');
  let size = 0;
  return {
    add(piece) {
      size += piece.length;
      if (size > limit) throw tooLarge('the answer', limit);
      fs.writeSync(handle, piece);
      collectNow(size, piece.length);
      return false;
    },
    finish: () => fs.fsyncSync(handle),
    close() {
      if (handle === null) return;
      const closing = handle;
      handle = null;
      fs.closeSync(closing);
    },
    size: () => size,
    body: () => Buffer.alloc(0),
  };
}

/** A body kept in memory: past limit, refused when `what` names it, else cut (and reading stops). */
function memorySink(limit, what) {
  const pieces = [];
  let size = 0;
  return {
    add(piece) {
      size += piece.length;
      if (size > limit && what) throw tooLarge(what, limit);
      pieces.push(piece);
      return !what && size >= limit;
    },
    finish: () => {},
    close: () => {},
    size: () => size,
    body: () => Buffer.concat(pieces).subarray(0, limit),
  };
}

/** A collection each time COLLECT_EVERY bytes more have gone through (a worker only: see COLLECT_EVERY). */
function collectNow(total, piece) {
  if (
    typeof global.gc === 'function' &&
    Math.floor(total / COLLECT_EVERY) !== Math.floor((total - piece) / COLLECT_EVERY)
  ) {
    global.gc();
  }
}

function tooLarge(what, limit, announced = 0) {
  const size = announced ? `announces ${grouped(announced)} bytes` : 'goes on';
  return new ServiceError(`${what} ${size}, past the ${grouped(limit)} bytes it can legitimately need; it was not kept`,
    { kind: 'too_large', hint: 'the gateway is broken or hostile; the request was probably billed, and retrying buys a '
      + 'new image' });
}

/** What a failed exchange means for the bill: nothing was billed before the last byte went out. */
function exchangeFailure(err, request, { sent, expired, timeoutS }) {
  const host = hostOf(request.url);
  if (expired === 'upload' && !sent) {
    return new ServiceError(`connecting to ${host} and sending the request took longer than `
      + `${fixed(uploadDeadlineS(request), 0)} s; nothing was billed`, { kind: 'upload_timeout',
      hint: 'check the network, or send smaller input images' });
  }
  if (expired === 'answer') {
    return new MaybeBilledError(`no complete answer from ${host} within ${gFormat(timeoutS)} s`,
      { hint: billedHint(timeoutS) });
  }
  const reason = err && err.code === 'ECUTSHORT' ? err.message : reasonText(err);
  if (!sent) return new ConnectError(`could not reach ${host}: ${reason}`, { hint: connectHint(reason) });
  return new MaybeBilledError(`the connection to ${host} dropped after the request was sent: ${reason}`,
    { hint: billedHint() });
}

function connectHint(reason) {
  if (/certificate|CERT_|self.signed/i.test(reason)) {
    return 'Node.js cannot verify HTTPS certificates here: point NODE_EXTRA_CA_CERTS at a CA bundle';
  }
  return 'check the network, the proxy settings and --base-url';
}

/** After a possible charge, never an invitation to retry blindly. */
function billedHint(timeoutS = null) {
  const longer = timeoutS ? `, then retry with a longer --timeout (now ${gFormat(timeoutS)} s)` : '';
  return `the request may already have been billed; check your APIYI usage before retrying${longer}`;
}

/** A real pause of the thread, where the code must stay synchronous (a Windows rename retried). */
function sleepSync(seconds) {
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, seconds * 1000);
}

function sleep(seconds) {
  return new Promise((resolve) => setTimeout(resolve, Math.max(0, Math.min(seconds * 1000, 2 ** 31 - 1))));
}

/** Retry-After as seconds or an HTTP date, in seconds from now (null when absent or unreadable). */
function parseRetryAfter(value) {
  if (!value) return null;
  const text = value.trim();
  if (/^\d+(\.\d+)?$/.test(text)) return parseFloat(text);
  if (!/^[A-Za-z]{3},? +\d/.test(text)) return null;    // an HTTP date starts with its day's name
  const when = Date.parse(text);
  return Number.isNaN(when) ? null : Math.max(0, (when - Date.now()) / 1000);
}

function askedWait(response) {
  const milliseconds = (response.headers['retry-after-ms'] || '').trim();
  if (/^\d{1,9}(\.\d+)?$/.test(milliseconds)) return parseFloat(milliseconds) / 1000;
  const wait = parseRetryAfter(response.headers['retry-after']);
  if (wait !== null) return wait;
  const text = String(parseErrorBody(response.body).message || '');
  for (const pattern of WAIT_IN_WORDS) {
    const found = pattern.exec(text);
    if (found) return parseFloat(found[1]) / (/^(ms|milli|毫)/i.test(found[2]) ? 1000 : 1);
  }
  return null;
}

function randomBetween(low, high) {
  return low + Math.random() * (high - low);
}

function backoffDelay(attempt) {
  return Math.min(BACKOFF_MAX_S, BACKOFF_INITIAL_S * 2 ** attempt) * randomBetween(0.75, 1.0);
}

function isRetryable(status) {
  return RETRY_STATUSES.has(status) || (status >= 500 && !NOT_RETRIED_5XX.has(status));
}

function isAccountProblem(status, code) {
  return AUTH_STATUSES.has(status) || code === QUOTA_ERROR_CODE;
}

function shouldRetry(response) {
  if (!isRetryable(response.status)) return false;
  const error = parseErrorBody(response.body);
  const code = String(error.code || '');
  return !(isAccountProblem(response.status, code) || isSafetyRefusal(code, String(error.message || '')));
}

/** The wait the gateway asks for, else a backoff: from 2 s for a 429, from 0.5 s for anything else. */
function retryDelay(response, attempt) {
  const wait = askedWait(response);
  if (wait === null) {
    return response.status !== 429 ? backoffDelay(attempt)
      : Math.min(RETRY_AFTER_MAX_S, RATE_LIMIT_INITIAL_S * 2 ** attempt) * randomBetween(1.0, 1.25);
  }
  if (wait > RETRY_AFTER_MAX_S) {
    const when = wait < 1e9 ? new Date(Date.now() + wait * 1000).toTimeString().slice(0, 8) : 'a long while';
    throw new ServiceError(`HTTP ${response.status}: the server asks to wait ${fixed(wait, 0)} s before retrying`,
      { status: response.status, hint: `try again after ${when}` });
  }
  return wait;
}

/** Retry what cannot have been billed: connection failures, 408/409/429 and 5xx. A 429 is waited out
 * without spending --retries, up to MAX_THROTTLED_S of waiting. */
async function sendWithRetries(request, config, { notify, spool, limit, onStage }) {
  const spent = { retries: 0, waits: 0, waited_s: 0.0 };
  for (;;) {
    let delay;
    let status = 0;
    try {
      const response = await sendRequest(request, { timeoutS: config.timeout_s, spool, limit, onStage });
      if (!retryAgain(response, config, spent)) return response;
      status = response.status;
      delay = retryDelay(response, status === 429 ? spent.waits : spent.retries);
      delay = status === 429 ? Math.max(delay, RATE_LIMIT_MIN_S) : delay;
      if (status === 429) {
        spent.waits += 1;
        spent.waited_s += delay;
        notify(`429: pausing all workers ${fixed(delay, 1)} s`);
      } else {
        spent.retries += 1;
        notify(`HTTP ${status}; retry ${spent.retries} of ${config.retries} in ${fixed(delay, 1)} s`);
      }
    } catch (err) {
      if (!(err instanceof ConnectError) || spent.retries >= config.retries) throw err;
      delay = backoffDelay(spent.retries);
      spent.retries += 1;
      notify(`${err.message}; retry ${spent.retries} of ${config.retries} in ${fixed(delay, 1)} s`);
    }
    await sleep(delay);
  }
}

function retryAgain(response, config, spent) {
  if (!shouldRetry(response)) return false;
  if (response.status !== 429) return spent.retries < config.retries;
  if (spent.waited_s >= MAX_THROTTLED_S) {
    throw new ServiceError(`HTTP 429 for ${fixed((MAX_THROTTLED_S / 60), 0)} minutes: the gateway still refuses (its `
      + 'concurrency quota, or a pause)', { status: 429, kind: 'rate_limited',
      hint: 'wait a few minutes and run the same command again (only what is missing is sent)' });
  }
  return true;
}

// --- Response decoding and file output ---

function parseErrorBody(body) {
  let payload;
  try {
    payload = JSON.parse(Buffer.from(body || []).toString('utf8'));
  } catch {
    return {};
  }
  const error = payload && typeof payload === 'object' && !Array.isArray(payload) ? payload.error : null;
  if (error && typeof error === 'object' && !Array.isArray(error)) return error;
  return typeof error === 'string' ? { message: error } : {};
}

/** Server text shortened for one line: tags and control characters out, base64 never shown. */
function bodyExcerpt(body) {
  const raw = typeof body === 'string' ? body.slice(0, 4096) : Buffer.from(body).subarray(0, 4096).toString('utf8');
  const text = cleanText(raw).replace(/<[^>]*>/g, ' ').replace(BASE64_RUN, '[base64]').replace(/\s+/g, ' ').trim();
  return text.length > ERROR_EXCERPT_CHARS ? `${text.slice(0, ERROR_EXCERPT_CHARS)}...` : text;
}

function shortBody(body) {
  if (body.length > ERROR_BODY_IN_JSON) return '';
  const text = cleanText(Buffer.from(body).toString('utf8')).trim();
  return /[A-Za-z0-9+/=]{200,}/.test(text) ? '' : text;
}

function requestIdHeader(headers) {
  return REQUEST_ID_HEADERS.find((h) => headers[h]) || '';
}

function requestIdOf(headers) {
  return headers[requestIdHeader(headers)] || '';
}

function statusHint(status, code, config) {
  if (isAccountProblem(status, code)) {
    return `check ${ENV_API_KEY} (or -k) and the balance of the account at https://api.apiyi.com`;
  }
  const hints = {
    429: 'the model\'s concurrency quota is full: wait a minute and run it again (or lower -j)',
    404: `check --base-url (${config.base_url}) and --model`,
    413: 'the upload is too large: use smaller input images',
    524: 'a CDN in front of the gateway gave up waiting; the image may still be generated and billed: use the '
      + "gateway's direct endpoint as --base-url, and check usage before retrying",
  };
  if (hints[status]) return hints[status];
  if (status >= 300 && status < 400)
    return 'the key is never sent to a redirect target; if you trust it, use it as --base-url';
  if (REFUSED_STATUSES.has(status)) return 'change the prompt or the parameters the message names';
  return 'retry later';
}

/** Map a non-2xx answer to the exit code the agent acts on. */
function errorForStatus(response, config) {
  const { status } = response;
  const error = parseErrorBody(response.body);
  const code = String(error.code || '');
  const details = ['type', 'param', 'code'].filter((k) => error[k]).map((k) => `${k} ${error[k]}`);
  const requestId = requestIdOf(response.headers);
  if (requestId) details.push(`request id ${requestId}`);
  const redirect = status >= 300 && status < 400;
  const text = redirect ? `redirected to ${response.headers.location || '(no location)'}`
    : bodyExcerpt(String(error.message || '')) || bodyExcerpt(response.body) || '(empty body)';
  const message = `HTTP ${status}: ${text}` + (details.length ? ` (${details.join(', ')})` : '');
  if (!redirect && error.param !== 'moderation' && isSafetyRefusal(code, String(error.message || ''))) {
    return safetyRefusal(message, String(error.message || ''), { status, code, body: shortBody(response.body) });
  }
  let Kind = ServiceError;
  if (isAccountProblem(status, code)) Kind = AuthError;
  else if (status === 524) Kind = MaybeBilledError;
  else if (status >= 300 && status < 500 && !isRetryable(status)) Kind = RefusedError;
  return new Kind(message, { status, code: code || null, hint: statusHint(status, code, config),
    body: shortBody(response.body), kind: status === 429 && Kind === ServiceError ? 'rate_limited' : '' });
}

function isSafetyRefusal(code, message) {
  return SAFETY_CODES.has(code) || SAFETY_WORDS.test(message);
}

/** What the block names, when it does: the categories and whether the prompt or an image set it off. */
function safetyRefusal(message, serverText, { status = null, code = '', body = '' } = {}) {
  const categories = /safety_violations=\[([^\]]*)\]/.exec(serverText);
  const source = [['image', /\b(input|uploaded|reference) images?\b/i], ['prompt', /\bprompt\b/i]]
    .find(([, words]) => words.test(serverText));
  const details = categories ? { categories: categories[1].split(',').filter((c) => c.trim())
    .map((c) => c.trim().replace(/^['" ]+|['" ]+$/g, '')) } : {};
  if (source) details.source = source[0];
  return new RefusedError(message, {
    status,
    code: code || null,
    kind: 'safety_refusal',
    hint: SAFETY_HINT,
    body,
    details
  });
}

/** The answer's JSON with each b64_json value emptied (it parses small), and the spool span of each
 * value's characters. The spool is read a piece at a time and the values are skipped, never copied:
 * memory is the skeleton and one piece, however large the images. Only strings matter to find them:
 * outside strings JSON holds no quote. */
function scanB64Values(handle, size) {
  const scan = { skeleton: [], spans: [], inString: false, inValue: false, escaped: false, text: [], afterKey: 0,
    opened: 0 };
  const buffer = Buffer.alloc(SPOOL_PIECE);
  for (let offset = 0; offset < size;) {
    const piece = buffer.subarray(0, fs.readSync(handle, buffer, 0, Math.min(SPOOL_PIECE, size - offset), offset));
    if (!piece.length) throw new Error(`the file ends at ${offset}, before ${size}`);
    scanPiece(scan, piece, offset);
    offset += piece.length;
  }
  if (scan.inValue || scan.inString) throw new Error('the answer ends inside a string');
  return [Buffer.concat(scan.skeleton), scan.spans];
}

const B64_KEY = Buffer.from('b64_json');
const JSON_SPACE = new Set([0x20, 0x09, 0x0a, 0x0d]);     // what may stand between a key and its colon

function scanPiece(scan, piece, offset) {
  let from = scan.inValue ? -1 : 0;           // where the piece's run of skeleton began (-1: in a value)
  for (let index = 0; index < piece.length;) {
    if (scan.inValue) {
      index = skipValue(scan, piece, index, offset);
      if (!scan.inValue) from = index - 1;      // the closing quote starts the next run
      continue;
    }
    const byte = piece[index];
    index += 1;
    if (scan.inString) {
      if (scan.escaped) scan.escaped = false;
      else if (byte === 0x5c) scan.escaped = true;
      else if (byte === 0x22) scan.inString = false;
      else if (scan.text.length <= B64_KEY.length) scan.text.push(byte);
      if (!scan.inString) scan.afterKey = Buffer.from(scan.text).equals(B64_KEY) ? 1 : 0;
    } else if (byte === 0x22 && scan.afterKey === 2) {
      scan.skeleton.push(Buffer.from(piece.subarray(from, index)));
      from = -1;
      Object.assign(scan, { inValue: true, escaped: false, opened: offset + index, afterKey: 0 });
    } else if (byte === 0x22) {
      Object.assign(scan, { inString: true, escaped: false, text: [], afterKey: 0 });
    } else if (byte === 0x3a && scan.afterKey === 1) {
      scan.afterKey = 2;
    } else if (!JSON_SPACE.has(byte)) {
      scan.afterKey = 0;
    }
  }
  if (from >= 0) scan.skeleton.push(Buffer.from(piece.subarray(from)));
}

/** Inside a b64_json value: jump to its closing quote (one not escaped), or to the end of the piece. */
function skipValue(scan, piece, index, offset) {
  for (let at = index; ;) {
    const quote = piece.indexOf(0x22, at);
    const end = quote < 0 ? piece.length : quote;
    let run = 0;
    while (end - run - 1 >= at && piece[end - run - 1] === 0x5c) run += 1;
    const escaped = end - run === at ? (scan.escaped !== (run % 2 === 1)) : run % 2 === 1;
    if (quote < 0) {
      scan.escaped = escaped;
      return piece.length;
    }
    if (!escaped) {
      scan.spans.push([scan.opened, offset + quote]);
      scan.inValue = false;
      return quote + 1;
    }
    scan.escaped = false;
    at = quote + 1;
  }
}

/** JSON as Python's json reads it: NaN and Infinity are values there (a gateway writing usage with
 * Python may send them), so an answer holding one still gives its image. */
function parsePythonJson(text) {
  try {
    return JSON.parse(text);
  } catch (err) {
    const nulled = text.replace(/([:[,]\s*)-?(?:NaN|Infinity)(?=\s*[,\]}])/g, '$1null');
    if (nulled === text) throw err;
    return JSON.parse(nulled);
  }
}

function loadJsonObject(raw) {
  let payload;
  try {
    payload = parsePythonJson(raw.toString('utf8'));
  } catch {
    throw new ServiceError(`the answer is not JSON: ${bodyExcerpt(raw)}`, { hint: PAID_ANSWER_HINT });
  }
  if (!payload || typeof payload !== 'object' || Array.isArray(payload)) {
    throw new ServiceError('the answer is not a JSON object', { hint: PAID_ANSWER_HINT });
  }
  return payload;
}

function silentRefusal() {
  return new ServiceError('the answer holds no image: the service declined without saying why (a silent refusal)',
    { kind: 'silent_refusal', hint: 'it was probably billed; rephrase the prompt rather than retry it as it is' });
}

/** The answer's JSON without its base64, and where each image is (a span of the spool, or a URL). */
function readSpooledAnswer(spool, handle) {
  let skeleton;
  let spans;
  try {
    [skeleton, spans] = scanB64Values(handle, fs.fstatSync(handle).size);
  } catch {
    throw new ServiceError('the answer ends inside an image (it was cut off)', { hint: PAID_ANSWER_HINT });
  }
  const meta = loadJsonObject(skeleton);
  const items = meta.data;
  if (!Array.isArray(items) || !items.length) {
    const { error } = meta;
    if (error) {
      const message = String((error && typeof error === 'object' ? error.message : error) || '');
      const text = `the answer holds an error instead of images: ${bodyExcerpt(message)}`;
      if (isSafetyRefusal(error && typeof error === 'object' ? String(error.code || '') : '', message)) {
        throw safetyRefusal(text, message);
      }
      throw new ServiceError(text, { hint: PAID_ANSWER_HINT });
    }
    throw silentRefusal();
  }
  if (!items.some((item) => item && typeof item === 'object' && (item.b64_json === '' || item.url)))
    throw silentRefusal();
  let next = 0;
  const sources = items.map((item) => {
    if (!item || typeof item !== 'object' || Array.isArray(item)) {
      throw new ServiceError("the answer's data holds something other than images");
    }
    if (item.b64_json === '' && next < spans.length) return spans[next++];
    if (typeof item.url === 'string' && item.url) return item.url;
    throw new ServiceError('an image in the answer is empty (no b64_json or url)', { hint: PAID_ANSWER_HINT });
  });
  return [meta, sources];
}

/** Decode one base64 span of the spool into the file, a piece at a time: \/ and wrapped lines
 * allowed, a data: URL's prefix skipped, characters outside base64 ignored as binascii does, the data
 * ending at its padding. Returns the bytes written and their sha256. */
function decodeSpan(spool, [begin, end], out) {
  if (begin === end)
    throw new ServiceError('an image in the answer is empty (b64_json is blank)', { hint: PAID_ANSWER_HINT });
  const head = readAt(spool, begin, Math.min(end - begin, 256)).toString('latin1');
  if (head.startsWith('data:')) {
    if (!head.includes(',')) throw badBase64('the value is a data: URL without base64 after it');
    begin += head.indexOf(',') + 1;
  }
  const digest = crypto.createHash('sha256');
  let [written, pending, backslash, ended] = [0, '', '', false];
  const buffer = Buffer.alloc(DECODE_PIECE);
  for (let at = begin; at < end && !ended;) {
    const raw = buffer.subarray(0, fs.readSync(spool, buffer, 0, Math.min(DECODE_PIECE, end - at), at));
    if (!raw.length) throw badBase64('the file ends inside the base64 value');
    at += raw.length;
    let text = backslash + raw.toString('latin1');
    backslash = /(^|[^\\])(\\\\)*\\$/.test(text) ? '\\' : '';
    text = text.slice(0, text.length - backslash.length);
    if (/\\(?![/nrt])/.test(text))
      throw badBase64('the base64 value holds a JSON escape other than \\/, \\n, \\r, \\t');
    text = pending + text.replace(/\\\//g, '/').replace(/\\[nrt]/g, '').replace(/[^A-Za-z0-9+/=]/g, '');
    const padding = text.indexOf('=');
    ended = padding >= 0;
    const usable = ended ? text.slice(0, padding) : text.slice(0, text.length - (text.length % 4));
    pending = ended ? usable.slice(usable.length - (usable.length % 4)) : text.slice(usable.length);
    const piece = Buffer.from(usable, 'base64');
    fs.writeSync(out, piece);
    digest.update(piece);
    written += piece.length;
    collectNow(at - begin, raw.length);
  }
  if (backslash) throw badBase64('the base64 value ends inside an escape');
  if (pending.length % 4 === 1 || (!ended && pending))
    throw badBase64('not valid base64: incorrect padding (the value may be cut short)');
  if (!written) throw badBase64('the base64 value is empty');
  return [written, digest.digest('hex')];
}

function badBase64(reason) {
  return new ServiceError(`an image in the answer is not valid base64: ${reason}`, { hint: PAID_ANSWER_HINT });
}

/** A url-only answer item is fetched without the key (it may point anywhere), following redirects as
 * urllib does (at most 10). */
async function downloadImage(url, timeoutS) {
  for (let hops = 0; ; hops += 1) {
    if (!/^https?:\/\//i.test(url))
      throw new ServiceError(`the answer's image URL is not http(s): ${url.slice(0, 200)}`);
    const response = await sendRequest(
      { method: 'GET', url, headers: { 'User-Agent': userAgent() }, body: Buffer.alloc(0) },
      { timeoutS }
    );
    if (REDIRECTS.has(response.status) && response.headers.location && hops < MAX_REDIRECTS) {
      url = new URL(response.headers.location, url).href;
      continue;
    }
    if (response.status !== 200) {
      throw new ServiceError(`downloading the image failed with HTTP ${response.status}: ${url}`,
        { hint: 'open the URL in a browser within 60 minutes to save it' });
    }
    return response.body;
  }
}

function outputPaths(plan, count) {
  if (count === 1) return [plan.path];
  const suffix = suffixOf(path.basename(plan.path));
  return Array.from({ length: count }, (_, i) => withName(plan.path, `${stemOf(plan.path)}-${i + 1}${suffix}`));
}

function pathForFormat(file, fmt) {
  return EXTENSION_FORMATS[suffixOf(path.basename(file)).toLowerCase()] === fmt ? file
    : withName(file, stemOf(file) + FORMAT_EXTENSIONS[fmt]);
}

/** NAME.png, NAME-2.png, ... NAME-99999.png: the names a run may give its file, in order. */
function* candidateNames(target) {
  yield target;
  const suffix = suffixOf(path.basename(target));
  for (let number = 2; number < 100000; number += 1) yield withName(target, `${stemOf(target)}-${number}${suffix}`);
}

function lexists(file) {
  try {
    fs.lstatSync(file);
    return true;
  } catch {
    return false;
  }
}

function nextFreePath(file) {
  for (const candidate of candidateNames(file)) if (!lexists(candidate)) return candidate;
  return file;
}

/** .NAME.JOB-RANDOM.part: the job's id lets the next command clean up after a killed worker. */
function temporaryBeside(target) {
  return withName(target, `.${shortName(path.basename(target))}.${CURRENT.tag}${randomHex(4)}.part`);
}

function removeQuietly(file) {
  try {
    fs.unlinkSync(file);
  } catch { /* already gone */ }
}

/** Write beside the target, then rename: readers never see half a file. Only for the tool's own files. */
function writeFileAtomic(file, data) {
  const temporary = temporaryBeside(file);
  try {
    const handle = fs.openSync(temporary, 'wx');
    try {
      fs.writeSync(handle, data);
      fs.fsyncSync(handle);
    } finally {
      fs.closeSync(handle);
    }
    replaceFile(temporary, file);
  } finally {
    removeQuietly(temporary);
  }
}

/** rename; on Windows a reader holding the target open makes it fail for a moment. */
function replaceFile(source, target) {
  for (let attempt = 0; ; attempt += 1) {
    try {
      fs.renameSync(source, target);
      return;
    } catch (err) {
      if (!IS_WINDOWS || !['EPERM', 'EACCES', 'EBUSY'].includes(err.code) || attempt === 99) throw err;
      sleepSync(0.01);
    }
  }
}

/** Give a finished temporary file its name: the target, or the first free NAME-2, NAME-3, ... claimed
 * with a hard link (which fails if the name exists), else by an exclusive create. */
function publish(temporary, target, replace) {
  if (replace) {
    replaceFile(temporary, target);
    return target;
  }
  for (const candidate of candidateNames(target)) {
    try {
      claimName(temporary, candidate);
      return candidate;
    } catch (err) {
      if (err.code !== 'EEXIST') throw err;
    }
  }
  throw Object.assign(new Error(`no free name like ${path.basename(target)} in ${path.dirname(target)}`),
    { code: 'EEXIST' });
}

function claimName(temporary, candidate) {
  try {
    fs.linkSync(temporary, candidate);
  } catch (err) {
    if (err.code === 'EEXIST') throw err;
    fs.closeSync(fs.openSync(candidate, 'wx'));
    try {
      replaceFile(temporary, candidate);
    } catch (again) {
      removeQuietly(candidate);
      throw again;
    }
    return;
  }
  fs.unlinkSync(temporary);
}

/** Write through a temporary file beside the target (removed whatever happens), then publish it as the
 * target, or as rename(what fill returned). */
function saveFile(target, fill, replace, rename = null) {
  const temporary = temporaryBeside(target);
  CURRENT.temporaries.add(temporary);
  try {
    const handle = fs.openSync(temporary, 'wx+');
    let value;
    try {
      value = fill(handle);
      fs.fsyncSync(handle);
    } finally {
      fs.closeSync(handle);
    }
    return [publish(temporary, rename ? rename(value) : target, replace), value];
  } finally {
    removeQuietly(temporary);
    CURRENT.temporaries.delete(temporary);
  }
}

/** Where an image goes when its own folder fails: a folder private to the user in the temp folder,
 * else in the home folder (a shared temp folder may hold someone else's folder or link). */
function fallbackFolder(create = true) {
  const places = [path.join(os.tmpdir(), FALLBACK_FOLDER)];
  if (!create) return places[0];
  places.push(path.join(os.homedir(), `.${FALLBACK_FOLDER}`));
  const found = places.find(isPrivateFolder);
  if (!found) throw new Error(`no folder private to this user could be made (${places.join(', ')})`);
  return found;
}

function isPrivateFolder(folder) {
  let info;
  try {
    fs.mkdirSync(folder, { mode: 0o700, recursive: true });
    info = fs.lstatSync(folder);
  } catch {
    return false;
  }
  if (!info.isDirectory() || info.isSymbolicLink()) return false;
  if (IS_WINDOWS) return true;
  if (info.uid !== process.getuid()) return false;
  if (info.mode & 0o077) {
    try {
      fs.chmodSync(folder, 0o700);
    } catch { /* checked again below */ }
  }
  return !(fs.lstatSync(folder).mode & 0o077);
}

/** Write the image, then read its real format and size back from the file; bytes that are no image
 * are kept as format "bin" (they were paid for). */
function fillAndInspect(fill) {
  return (handle) => {
    const [size, digest] = fill(handle);
    const info = imageInfoFromHandle(handle);
    return { path: '', info: info || imageInfo('bin', 0, 0), size_bytes: size, sha256: digest, fallback_reason: '' };
  };
}

/** Named by the image's real format; if the target folder fails, the fallback folder (exit 7). */
function saveImage(fill, target, overwrite) {
  let destination = target;
  const nameFor = (image) => pathForFormat(destination, image.info.format);
  let reason;
  try {
    fs.mkdirSync(path.dirname(target), { recursive: true });
    const [saved, image] = saveFile(target, fillAndInspect(fill), overwrite, nameFor);
    return { ...image, path: saved };
  } catch (err) {
    if (err instanceof ToolError) throw err;
    reason = `${target} could not be written (${reasonText(err)})`;
  }
  let folder = fallbackFolder(false);
  try {
    folder = fallbackFolder();
    destination = path.join(folder, path.basename(target));
    const [saved, image] = saveFile(destination, fillAndInspect(fill), false, nameFor);
    return { ...image, path: saved, fallback_reason: reason };
  } catch (err) {
    if (err instanceof ToolError) throw err;
    throw new ServiceError(
      `the image was received but could not be saved: ${reason}; the fallback ${folder} failed too ` +
        `(${reasonText(err)})`,
      { kind: 'save_failed', hint: 'free disk space or choose another -f, then run the same command again' }
    );
  }
}

function firstRevisedPrompt(meta) {
  const item = (Array.isArray(meta.data) ? meta.data : []).find((i) => i && typeof i === 'object' && i.revised_prompt);
  return item ? item.revised_prompt : null;
}

/** What was asked and what came, side by side: size, format and, for a GIF, frames. */
function requestedAndReal(job, image) {
  const { info } = image;
  const pairs = {
    size: [
      (job.fields.size || 'auto') !== 'auto' ? job.fields.size : null,
      info.width ? `${info.width}x${info.height}` : null
    ],
    format: [job.output.format, info.format]
  };
  if (job.output.format === 'gif') {
    pairs.frames = [job.fields.frame_count ?? GIF_DEFAULT_FRAMES, info.format === 'gif' ? info.frames : null];
  }
  const both = {};
  for (const [name, [requested, real]] of Object.entries(pairs)) {
    both[`${name}_requested`] = requested;
    both[`${name}_real`] = real;
  }
  return both;
}

function buildMetadata(job, saved, meta, { requestId, elapsedS, cost }) {
  const parameters = Object.fromEntries(Object.entries(job.fields).filter(([k]) => k !== 'prompt'));
  return { tool: `${TOOL_NAME} ${VERSION}`, prompt: job.prompt, model: job.fields.model, mode: jobMode(job),
    endpoint: jobEndpoint(job), parameters, input_images: job.images.map((f) => f.path),
    mask: job.mask ? job.mask.path : null, ...requestedAndReal(job, saved), bytes: saved.size_bytes,
    sha256: saved.sha256, usage: meta.usage ?? null, revised_prompt: firstRevisedPrompt(meta),
    request_id: requestId || null, created: meta.created ?? null, elapsed_s: roundTo(elapsedS, 3), cost };
}

function writeMetadata(saved, metadata, overwrite) {
  const data = Buffer.from(`${pyJson(metadata, { indent: 2, ascii: false })}\n`, 'utf8');
  return saveFile(`${saved.path}.json`, (handle) => fs.writeSync(handle, data), overwrite)[0];
}

/** What a run cost in USD: a flat channel's price for every n sent, or the answer's usage at the
 * published token prices; null where neither is known. */
function costOf(job, meta, multiplier) {
  const profile = profileFor(job.fields.model);
  if (profile.price_per_image !== null) {
    return { usd: roundTo(profile.price_per_image * jobN(job) * multiplier, 6), basis: 'per_image',
      prices: { per_image: profile.price_per_image, multiplier } };
  }
  if (profile.line !== 'official') return { usd: null, basis: 'unknown', note: 'no published price' };
  const { usage } = meta;
  if (!usage || typeof usage !== 'object' || Array.isArray(usage)) {
    return { usd: null, basis: 'tokens', note: 'the answer reported no usage' };
  }
  const details = usage.input_tokens_details && typeof usage.input_tokens_details === 'object'
    ? usage.input_tokens_details : {};
  const output = tokenCount(usage.output_tokens);
  const image = tokenCount(details.image_tokens ?? 0);
  const text = 'text_tokens' in details ? tokenCount(details.text_tokens)
    : Math.max(0, (tokenCount(usage.input_tokens ?? 0) || 0) - (image || 0));
  if (output === null || image === null || text === null) {
    return { usd: null, basis: 'tokens', note: "the answer's usage is unreadable" };
  }
  const cost = { usd: roundTo(tokenUsd(text, image, output, multiplier), 6), basis: 'tokens',
    prices: { ...TOKEN_PRICES, multiplier } };
  return meta.svg_usage ? { ...cost, note: "the SVG author model's tokens are not included" } : cost;
}

function tokenCount(value) {
  return Number.isInteger(value) && value >= 0 && value <= MAX_USAGE_TOKENS ? value : null;
}

function costText(cost) {
  if (!cost) return '';
  if (cost.usd === null || cost.usd === undefined) return `cost unknown (${cost.note || ''})`;
  return `cost $${fixed(cost.usd, 4)}` + (cost.note ? ` (${cost.note})` : '');
}

function mismatches(job, image, names = ['size', 'format', 'frames']) {
  const both = requestedAndReal(job, image);
  return names.filter((name) => `${name}_real` in both && both[`${name}_requested`] && both[`${name}_real`]
    && both[`${name}_requested`] !== both[`${name}_real`])
    .map((name) => `asked for ${name} ${both[`${name}_requested`]} but ${path.basename(image.path)} has `
      + `${both[`${name}_real`]}`);
}

function keptBytesError(image) {
  return new ServiceError(
    `an image in the answer is not a PNG, JPEG, WebP, GIF or SVG: its ${grouped(image.size_bytes)} ` +
      `bytes are kept in ${image.path}`,
    { hint: PAID_ANSWER_HINT }
  );
}

function strictSizeError(job, saved) {
  const found = saved.flatMap((image) => mismatches(job, image));
  if (!(job.output.strict && found.length)) return null;
  return new MismatchError(`${found[0]} (--strict-size)` + (found.length > 1 ? `, and ${found.length - 1} more` : ''),
    { hint: 'the file is kept; ask again with another size, or without --strict-size' });
}

// --- Jobs ---

// What this process is doing now: the request in flight (a cancel destroys it), the tag of its
// temporary files and the temporaries being written (a worker told to stop removes them).
// running: a job that runs inside this command (no worker process), which ends with it.
const CURRENT = { request: null, tag: '', temporaries: new Set(), running: null };

function now() {
  return Date.now() / 1000;
}

/** APIYI_STATE_DIR, else the platform's per-user state folder (the same as the Python twin's). */
function stateFolder(env) {
  if (env[ENV_STATE_DIR]) return expandPath(env[ENV_STATE_DIR]);
  const home = os.homedir();
  let base;
  if (IS_WINDOWS) base = env.LOCALAPPDATA || path.join(home, 'AppData', 'Local');
  else if (process.platform === 'darwin') base = path.join(home, 'Library', 'Application Support');
  else base = env.XDG_STATE_HOME || path.join(home, '.local', 'state');
  return path.join(base, TOOL_NAME);
}

/** Created private to the user (job records name the files and prompts of their runs). */
function openStateFolder(env) {
  const folder = stateFolder(env);
  try {
    fs.mkdirSync(folder, { recursive: true, mode: 0o700 });
    if (!IS_WINDOWS && fs.statSync(folder).mode & 0o077) fs.chmodSync(folder, 0o700);
    const probe = path.join(folder, `.probe-${randomHex(4)}`);
    fs.closeSync(fs.openSync(probe, 'wx'));
    fs.unlinkSync(probe);
  } catch (err) {
    throw stateFolderError(folder, err);
  }
  return folder;
}

function stateFolderError(folder, err) {
  return new UsageError(
    `the state folder ${folder} cannot be used: ${reasonText(err)}` + (err.path ? ` (${err.path})` : ''),
    { hint: `set ${ENV_STATE_DIR} to a writable folder of your own` }
  );
}

/** Where one job lives in the state folder: ID.json, ID.events.jsonl, ID.log, ID.reported, ID.cancel, ID.spool. */
function jobFiles(folder, jobId) {
  const file = (suffix) => path.join(folder, `${jobId}${suffix}`);
  return { folder, jobId, record: file('.json'), events: file('.events.jsonl'), log: file('.log'),
    reported: file('.reported'), cancel: file('.cancel'), spool: file('.spool'), answer: file('.answer') };
}

function newJobId() {
  return `${timestamp()}-${randomHex(3)}`;
}

function fileDigest(file) {
  const digest = crypto.createHash('sha256');
  const handle = fs.openSync(file, 'r');
  try {
    for (let position = 0; ;) {
      const piece = readAt(handle, position, READ_CHUNK);
      if (!piece.length) break;
      digest.update(piece);
      position += piece.length;
    }
  } finally {
    fs.closeSync(handle);
  }
  return digest.digest('hex');
}

/** What was asked, as the Python twin writes it, so the same command on either twin finds the same job. */
function requestFingerprint(job, baseUrl) {
  const { output } = job;
  const target = output.auto_named ? `auto:${path.resolve(path.dirname(output.path))}` : path.resolve(output.path);
  const asked = {
    url: baseUrl + jobEndpoint(job),
    fields: job.fields,
    inputs: job.images.map((f) => fileDigest(f.path)),
    mask: job.mask ? fileDigest(job.mask.path) : null,
    target,
    output: [output.format, output.overwrite, output.metadata, output.keep_partials, output.strict, output.gallery]
  };
  return sha256(Buffer.from(pyJson(asked, { ascii: false, sortKeys: true }), 'utf8'));
}

/** One-way: two accounts never share a job, and the record says nothing of the key. */
function keyDigest(key) {
  return sha256(Buffer.from(`${TOOL_NAME} account\0${key}`, 'utf8'));
}

function jobFingerprint(parts, key) {
  return sha256(Buffer.from([...parts, keyDigest(key)].join('\n'), 'utf8'));
}

/** A server may echo the key: no text the tool shows or writes keeps it, as it is or as JSON writes it. */
function redact(text, secret) {
  if (!secret) return text;
  for (const form of new Set([secret, JSON.stringify(secret).slice(1, -1)])) text = text.split(form).join(KEY_MASK);
  return text;
}

function scrub(value, secret) {
  if (!secret) return value;
  if (typeof value === 'string') return redact(value, secret);
  if (Array.isArray(value)) return value.map((item) => scrub(item, secret));
  if (value && typeof value === 'object') {
    return Object.fromEntries(Object.entries(value).map(([k, v]) => [redact(k, secret), scrub(v, secret)]));
  }
  return value;
}

/** null when missing, or caught mid-replace (the next poll reads it). */
function readRecord(file) {
  try {
    const record = JSON.parse(fs.readFileSync(file, 'utf8'));
    return record && typeof record === 'object' && record.id ? record : null;
  } catch {
    return null;
  }
}

function writeRecord(files, record, secret = '') {
  record.updated_at = now();
  writeFileAtomic(files.record, Buffer.from(pyJson(scrub(record, secret), { ascii: false }), 'utf8'));
}

function listRecords(folder) {
  let names;
  try {
    names = fs.readdirSync(folder);
  } catch {
    return [];
  }
  const records = names.filter((n) => n.endsWith('.json') && !n.endsWith('.events.json') && !n.startsWith('.'))
    .map((n) => readRecord(path.join(folder, n))).filter(Boolean);
  return records.sort((a, b) => (a.created_at || 0) - (b.created_at || 0) || (a.id < b.id ? -1 : a.id > b.id ? 1 : 0));
}

function jobFilesOnDisk(files) {
  try {
    return fs.readdirSync(files.folder).filter((n) => n.split('.')[0] === files.jobId)
      .map((n) => path.join(files.folder, n));
  } catch {
    return [];
  }
}

/** Finished jobs older than a week go, but never one whose spool still holds an answer to save. */
function pruneRecords(folder, records) {
  const cutoff = now() - JOB_KEEP_S;
  const kept = [];
  const said = [];
  for (const record of records) {
    const files = jobFiles(folder, record.id);
    const old = FINISHED_STATES.has(record.state) && (record.updated_at || 0) < cutoff;
    const paths = old ? jobFilesOnDisk(files) : [];
    if (!old || paths.some((p) => p.endsWith('.spool'))) {
      kept.push(record);
      continue;
    }
    said.push(...paths.filter((p) => p.endsWith('.answer')));
    paths.forEach(removeQuietly);
  }
  return [kept, said];
}

/** Whether a process lives (signal 0 tests without sending; Node does the same on Windows). */
function pidAlive(pid) {
  try {
    process.kill(pid, 0);
  } catch (err) {
    return err.code === 'EPERM';
  }
  return !isZombie(pid);
}

/** A worker that died after its command ended, in a container whose first process reaps nothing, stays
 * a zombie: signal 0 still finds it (Linux; elsewhere no such file, and no such answer). */
function isZombie(pid) {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'ascii');
    return stat.slice(stat.lastIndexOf(')') + 2).startsWith('Z');
  } catch {
    return false;
  }
}

/** A worker is alive while its process is (this twin cannot test the Python twin's lock, and its own
 * workers hold none); one not yet started gets a grace period. */
function workerAlive(record) {
  if (FINISHED_STATES.has(record.state)) return false;
  if (record.pid && pidAlive(Number(record.pid))) return true;
  return record.state === 'starting' && now() - (record.created_at || 0) < WORKER_START_GRACE_S;
}

function workerMode(env) {
  const mode = (env[ENV_WORKER] || 'process').trim().toLowerCase() || 'process';
  if (!WORKER_MODES.includes(mode)) {
    throw new UsageError(`${ENV_WORKER}=${pyRepr(mode)} is not one of ${WORKER_MODES.join(', ')}`,
      { hint: `unset ${ENV_WORKER}, or set it to inprocess` });
  }
  return mode;
}

/** The key travels in the worker's environment, never in its arguments or files. */
function startWorkerProcess(files, key, env) {
  const childEnv = { ...env, [ENV_API_KEY]: key };
  delete childEnv[ENV_WORKER];
  const log = fs.openSync(files.log, 'a');
  try {
    const child = childProcess.spawn(process.execPath, ['--expose-gc', __filename, '--run-job', files.record],
      workerSpawnOptions(log, childEnv));
    child.on('error', () => {});
    child.unref();
    if (!child.pid) throw new Error('the worker did not start');
  } finally {
    fs.closeSync(log);
  }
}

/** A session of its own on POSIX (setsid: the caller's Ctrl-C and hang-up do not reach it); on Windows
 * a new process group with no console window. Unlike the Python twin, Node cannot ask Windows to take
 * the worker out of the caller's job object. */
function workerSpawnOptions(log, env) {
  return { detached: true, stdio: ['ignore', log, log], env, windowsHide: true };
}

/** A detached process; else the job runs inside this command, said once. */
function startWorker(files, record, { mode, key, env, console }) {
  if (mode === 'process') {
    try {
      startWorkerProcess(files, key, env);
      return null;
    } catch (err) {
      console.warn(`no worker process could be started (${reasonText(err)}): the request runs inside this command `
        + 'and stops if it is stopped');
    }
  } else if (mode === 'unavailable') {
    console.warn(`${ENV_WORKER}=unavailable: the request runs inside this command and stops if it is stopped`);
  }
  record.detached = false;
  writeRecord(files, record);
  const running = runWorker(files, key, { detached: false });
  CURRENT.running = running;
  running.finally(() => {
    CURRENT.running = null;
  });
  return running;
}

/** The worker's own peak resident memory in KiB. Linux: VmHWM, because maxRSS keeps the peak of the
 * command the worker was spawned from; elsewhere maxRSS. */
function peakMemoryKib() {
  try {
    const line = fs.readFileSync('/proc/self/status', 'ascii').split('\n').find((l) => l.startsWith('VmHWM:'));
    if (line) return parseInt(line.split(/\s+/)[1], 10);
  } catch { /* not Linux */ }
  return process.resourceUsage().maxRSS;
}

/** The owner of one job, from sending to saving: every step goes to the record (what is true now) and
 * the events file (what happened); the command reads only those. */
class JobWorker {
  constructor(files, record, key) {
    this.files = files;
    this.record = record;
    this.key = key;
    this.cancelling = false;
  }

  update(changes) {
    if (FINISHED_STATES.has(changes.state)) changes.peak_rss_kib = peakMemoryKib();
    Object.assign(this.record, changes);
    writeRecord(this.files, this.record, this.key);
  }

  emit(event, fields = {}) {
    const line = pyJson(scrub({ event, at: roundTo(now(), 3), ...fields }, this.key), { ascii: false });
    fs.appendFileSync(this.files.events, `${line}\n`, 'utf8');
  }

  /** "piece": stop here if cancelled (nothing billed yet); "sent": it may be billed from now on. */
  onStage(stage) {
    if (stage === 'piece' && this.cancelRequested()) {
      this.cancelling = true;
      throw new InterruptedRun('cancelled');
    }
    try {
      if (stage === 'sent' && !this.record.sent) {
        this.update({ state: 'waiting', sent: true, sent_at: now() });
        this.emit('sent', { possibly_billed: true });
      } else if (stage === 'receiving') {
        this.update({ state: 'receiving' });
      }
    } catch { /* a record that cannot be written must not fail the request */ }
  }

  cancelRequested() {
    let mode;
    try {
      mode = fs.readFileSync(this.files.cancel, 'ascii').trim();
    } catch {
      return false;
    }
    return mode === 'always' || !this.record.sent;
  }

  /** SIGTERM (a cancel): stop, unless the answer is here and being saved (paid for: finish it) or the
   * cancel was only meant to hold an unsent request. */
  onTerminate() {
    if (this.cancelling || this.record.received) return;
    if (fs.existsSync(this.files.cancel) && !this.cancelRequested()) return;
    this.cancelling = true;
    if (CURRENT.request) CURRENT.request.destroy();
    cancelInWorker(this, 'SIGTERM');
    for (const temporary of CURRENT.temporaries) removeQuietly(temporary);
    process.exit(EXIT_OK);
  }

  config() {
    return { ...this.record.config, api_key: this.key, price_multiplier: this.record.config.price_multiplier ?? 1.0 };
  }

  fail(err, state = 'failed') {
    this.update({ state, error: errorDocument(err), exit_code: err.exitCode });
    this.emit('error', errorDocument(err));
  }
}

/** Send with retries until a 2xx answer is in the spool. */
async function fetchAnswer(job, config, { spool, emit, onStage }) {
  const request = buildRequest(job, config);
  const started = process.hrtime.bigint();
  let response;
  try {
    response = await sendWithRetries(request, config, { notify: (text) => emit('retry', { message: text }), spool,
      limit: jobN(job) * (MAX_IMAGE_BASE64 + ANSWER_JSON_ROOM) + ANSWER_JSON_ROOM, onStage });
    if (!(response.status >= 200 && response.status < 300)) throw errorForStatus(response, config);
  } catch (err) {
    removeQuietly(spool);
    throw err;
  }
  return { request_id: requestIdOf(response.headers), elapsed_s: Number(process.hrtime.bigint() - started) / 1e9,
    streamed: false, previews: null, preview_paths: [], request_id_header: requestIdHeader(response.headers) };
}

/** Decode and write what the spooled answer holds: a run, or a recovery. */
async function saveSpooledAnswer(job, spool, received, config) {
  const handle = fs.openSync(spool, 'r');
  let meta;
  let saved;
  let warnings;
  let firstProblem;
  try {
    let sources;
    [meta, sources] = readSpooledAnswer(spool, handle);
    [saved, warnings, firstProblem] = await saveAll(job, sources, handle, config);
  } finally {
    fs.closeSync(handle);
  }
  let problem = firstProblem;
  const cost = costOf(job, meta, config.price_multiplier);
  for (const image of job.output.metadata ? saved : []) {
    const metadata = scrub(buildMetadata(job, image, meta, { requestId: received.request_id,
      elapsedS: received.elapsed_s, cost }), config.api_key);
    try {
      writeMetadata(image, metadata, job.output.overwrite);
    } catch (err) {
      warnings.push(`the metadata of ${path.basename(image.path)} could not be written: ${reasonText(err)}`);
    }
  }
  const fallback = saved.find((s) => s.fallback_reason);
  if (fallback && !problem) {
    problem = new FallbackSaveError(`${fallback.fallback_reason}; saved to the fallback ${fallback.path}`,
      { hint: 'use the printed path, or move the file where you want it' });
  }
  problem = problem || strictSizeError(job, saved);
  const sizeWarnings = saved.flatMap((image) => mismatches(job, image, ['size', 'frames']));
  return { files: saved, meta, request_id: received.request_id, elapsed_s: received.elapsed_s,
    warnings: [...warnings, ...sizeWarnings], error: problem, previews: null, partials: [], cost,
    request_id_header: received.request_id_header };
}

/** Save every image that decodes; a bad one does not cost the good ones. A failure to write anywhere
 * (save_failed) is raised: the spool keeps the answer for a later attach. */
async function saveAll(job, sources, spool, config) {
  const targets = outputPaths(job.output, jobN(job));
  const saved = [];
  let problem = null;
  const warnings = sources.length > jobN(job) ? [`the answer held ${sources.length} images but ${jobN(job)} were asked `
    + `for: only the first ${jobN(job)} are saved`] : [];
  for (let index = 0; index < Math.min(sources.length, targets.length); index += 1) {
    const source = sources[index];
    const target = targets[index];
    let image;
    try {
      const bytes = typeof source === 'string' ? await downloadImage(source, config.timeout_s) : null;
      const fill = bytes ? (handle) => [fs.writeSync(handle, bytes), sha256(bytes)]
        : (handle) => decodeSpan(spool, source, handle);
      image = saveImage(fill, target, job.output.overwrite);
    } catch (err) {
      if (!(err instanceof ToolError) || err.kind === 'save_failed') throw err;
      problem = err;
      continue;
    }
    if (image.info.format === 'bin') {
      problem = problem || keptBytesError(image);
      continue;
    }
    const intended = pathForFormat(target, image.info.format);
    if (image.info.format !== job.output.format) {
      warnings.push(
        `expected ${job.output.format} but the image is ${image.info.format}: saved as ${path.basename(intended)}`
      );
    }
    if (image.path !== intended && !image.fallback_reason) {
      warnings.push(
        `${path.basename(intended)} exists: saved as ${path.basename(image.path)} (--overwrite replaces it)`
      );
    }
    saved.push(image);
  }
  if (!problem && saved.length < jobN(job)) {
    problem = new ServiceError(`asked for ${jobN(job)} images but the answer held ${saved.length}`, {
      hint: PAID_ANSWER_HINT
    });
  }
  return [saved, warnings, problem];
}

function resultToPlain(result) {
  return { files: result.files, meta: result.meta, request_id: result.request_id, elapsed_s: result.elapsed_s,
    warnings: result.warnings, error: result.error ? errorDocument(result.error) : null, previews: result.previews,
    partials: result.partials, cost: result.cost, request_id_header: result.request_id_header };
}

/** Save from the spool, record the result, and only then delete the spool. A save that could not write
 * anywhere leaves the spool for the next attach; an answer without a usable image is kept as ID.answer. */
async function finishSingle(worker, job, received) {
  const { spool } = worker.files;
  let result;
  try {
    result = await saveSpooledAnswer(job, spool, received, worker.config());
  } catch (err) {
    if (!(err instanceof ToolError)) throw err;
    const unsaved = err.kind === 'save_failed';
    const note = unsaved ? 'received, not saved' : `the raw answer is kept in ${keepRawAnswer(worker.files)}`;
    worker.update({ state: 'failed', error: errorDocument(err), exit_code: err.exitCode, note });
    worker.emit('error', errorDocument(err));
    return;
  }
  for (const image of result.files) {
    worker.emit('saved', { path: image.path, width: image.info.width, height: image.info.height,
      format: image.info.format, bytes: image.size_bytes });
  }
  const kept = result.error && result.error.kind !== 'saved_to_fallback';
  worker.update({ state: result.files.length ? 'done' : 'failed', result: resultToPlain(result),
    exit_code: result.error ? result.error.exitCode : EXIT_OK,
    note: kept ? `the raw answer is kept in ${keepRawAnswer(worker.files)}` : null });
  if (!kept) removeQuietly(spool);
}

/** ID.spool -> ID.answer: kept for the user, no longer an answer waiting to be saved. */
function keepRawAnswer(files) {
  try {
    replaceFile(files.spool, files.answer);
  } catch { /* nothing to keep */ }
  return files.answer;
}

/** The job, start to finish. This is the one boundary where any exception is caught: it is recorded
 * as a failure with exit 1 and its stack goes to the job's log, so a bug is never lost. */
async function runWorker(files, key, { detached }) {
  const record = readRecord(files.record);
  if (!record || record.state !== 'starting') return EXIT_OK;   // another worker owns it, or it is over
  const worker = new JobWorker(files, record, key);
  CURRENT.tag = `${files.jobId}-`;
  if (detached) process.on('SIGTERM', () => worker.onTerminate());
  try {
    worker.update({ state: 'sending', pid: process.pid, worker_started_at: now(), liveness: PID_LIVENESS });
    const job = record.spec;
    const received = await fetchAnswer(job, worker.config(), { spool: files.spool, emit: (e, f) => worker.emit(e, f),
      onStage: (stage) => worker.onStage(stage) });
    worker.update({ state: 'saving', received: true, response: received });
    worker.emit('received');
    await finishSingle(worker, job, received);
  } catch (err) {
    if (worker.cancelling) {
      cancelInWorker(worker, 'SIGTERM');
    } else if (err instanceof ToolError) {
      worker.fail(err);
    } else {
      fs.appendFileSync(files.log, redact(String(err && err.stack ? err.stack : err), key) + '\n');
      worker.fail(
        new ToolError(`a bug in the worker: ${err && err.name}: ${err && err.message} (stack in ${files.log})`)
      );
    }
  } finally {
    for (const temporary of CURRENT.temporaries) removeQuietly(temporary);
  }
  return EXIT_OK;
}

function cancelInWorker(worker, signalName) {
  if (FINISHED_STATES.has(worker.record.state)) return;
  const billed = worker.record.sent ? 'the request was already sent and may still be billed'
    : 'nothing was sent, nothing is billed';
  if (!worker.record.received) removeQuietly(worker.files.spool);
  worker.fail(new InterruptedRun(`job ${worker.files.jobId} was cancelled (${signalName}); ${billed}`,
    { kind: 'cancelled', hint: 'run the same command again to make a new request' }), 'cancelled');
}

/** The events after offset, and where the next read starts; whole lines only. */
function readEvents(file, offset = 0) {
  let chunk;
  try {
    const handle = fs.openSync(file, 'r');
    try {
      const size = fs.fstatSync(handle).size;
      chunk = readAt(handle, offset, Math.max(0, size - offset));
    } finally {
      fs.closeSync(handle);
    }
  } catch {
    return [[], offset];
  }
  const complete = chunk.subarray(0, chunk.lastIndexOf(0x0a) + 1);
  const events = [];
  for (const line of complete.toString('utf8').split('\n')) {
    try {
      const event = JSON.parse(line);
      if (event && typeof event === 'object' && 'event' in event) events.push(event);
    } catch { /* a line torn by a killed worker says nothing */ }
  }
  return [events, offset + complete.length];
}

function stillRunning(jobId, why, exitCode = EXIT_STILL_RUNNING) {
  return new StillRunning(`${why}; the request goes on as job ${jobId}`, { jobId, exitCode,
    hint: `run the same command again, or: ${PROG} --attach ${jobId}` });
}

/** A worker that died without finishing: what its record proves is all there is to say. */
function settleDeadWorker(files, record) {
  if (FINISHED_STATES.has(record.state)) return record;
  const err = record.sent
    ? new MaybeBilledError(`the worker of job ${files.jobId} stopped after the request was sent; the answer is lost`,
      { kind: 'worker_lost', hint: `it may have been billed: check your usage; the log is ${files.log}` })
    : new ServiceError(`the worker of job ${files.jobId} stopped before the request was sent; nothing was billed`,
      { kind: 'worker_lost', hint: 'run the same command again' });
  return endAbandonedJob(files, record, 'failed', err);
}

/** Its worker gone: half-written files go, the spool of an unfinished answer goes, the record ends;
 * an answer waiting whole in its spool is not ended: conclude saves it. */
function endAbandonedJob(files, record, state, err) {
  if (FINISHED_STATES.has(record.state)) return record;
  removeStaleTemporaries(files, record);
  if (needsRecovery(files, record)) return record;
  removeQuietly(files.spool);
  Object.assign(record, { state, error: errorDocument(err), exit_code: err.exitCode });
  writeRecord(files, record);
  return record;
}

/** A worker killed outright leaves .NAME.JOBID-xxxx.part files beside its targets; they go now. */
function removeStaleTemporaries(files, record) {
  const tag = `.${files.jobId}-`;
  const folders = new Set([files.folder, fallbackFolder(false)]);
  for (const target of record.targets || []) folders.add(path.dirname(path.resolve(record.cwd || '.', target)));
  for (const folder of folders) {
    let names = [];
    try {
      names = fs.readdirSync(folder);
    } catch { /* no such folder */ }
    for (const name of names) {
      if (name.startsWith('.') && name.endsWith('.part') && name.includes(tag)) removeQuietly(path.join(folder, name));
    }
  }
}

function needsRecovery(files, record) {
  const unsaved = !FINISHED_STATES.has(record.state) || record.note === 'received, not saved';
  return Boolean(
    unsaved && record.received && record.kind === 'single' && !record.result && fs.existsSync(files.spool)
  );
}

/** Received but not saved (the worker died, or the disk failed): saved now, with no new request. */
async function recoverFromSpool(files, record, console) {
  console.progress(`job ${files.jobId}: saving the answer received earlier; nothing new is sent`);
  const worker = new JobWorker(files, record, console.secrets[0] || '');   // a key the server echoed is masked
  CURRENT.tag = `${files.jobId}-`;
  await finishSingle(worker, record.spec, record.response);
  return worker.record;
}

/** Running, or ended with a result no command has reported yet. */
function isAttachable(files, record) {
  if (needsRecovery(files, record)) return true;
  if (fs.existsSync(files.reported) || (record.state === 'cancelled' && !record.sent)) return false;
  if (FINISHED_STATES.has(record.state) || workerAlive(record)) return true;
  return Boolean(record.sent);
}

function markReported(files) {
  try {
    fs.closeSync(fs.openSync(files.reported, 'a'));
  } catch { /* reported again next time */ }
}

/** The record once nothing will change it: a dead worker's job settled, an unsaved answer saved now. */
async function conclude(files, record, console) {
  if (FINISHED_STATES.has(record.state) && !needsRecovery(files, record)) return record;
  const latest = readRecord(files.record) || record;
  if (workerAlive(latest)) return latest;
  const settled = settleDeadWorker(files, latest);
  try {
    return needsRecovery(files, settled) ? await recoverFromSpool(files, settled, console) : settled;
  } catch (err) {
    if (err.code !== 'ENOENT') throw err;
    return readRecord(files.record) || settled;     // another command saved that spool a moment ago
  }
}

/** Attach to the job with this fingerprint that is running or unreported; else start one. */
async function findOrStartJob(folder, record, { key, env, console }) {
  const mode = workerMode(env);
  try {
    return await withStateLock(folder, () => findOrStart(folder, record, { mode, key, env, console }));
  } catch (err) {
    if (err instanceof ToolError || !err.code) throw err;
    throw stateFolderError(folder, err);
  }
}

function findOrStart(folder, record, { mode, key, env, console }) {
  const [records, removed] = pruneRecords(folder, listRecords(folder));
  for (const answer of removed) console.warn(`removed ${answer}, the raw answer of a job that ended 7 days ago`);
  const found = records.reverse().find((r) => r.fingerprint === record.fingerprint
    && isAttachable(jobFiles(folder, r.id), r));
  if (found) return { files: jobFiles(folder, found.id), attached: true, record: found, running: null };
  const files = jobFiles(folder, record.id);
  writeRecord(files, record);
  const running = startWorker(files, record, { mode, key, env, console });
  return { files, attached: false, record, running };
}

/** Finding and starting a job is one step, so two identical commands of this twin never start two jobs:
 * jobs.node.lock, created exclusively, names its holder's pid; a dead holder's lock is taken over. (The
 * Python twin's jobs.lock is an OS lock this twin cannot take: see references/jobs.md.) */
async function withStateLock(folder, run) {
  const lock = path.join(folder, 'jobs.node.lock');
  for (const deadline = now() + STATE_LOCK_WAIT_S; ;) {
    try {
      fs.writeFileSync(lock, String(process.pid), { flag: 'wx' });
      break;
    } catch (err) {
      if (err.code !== 'EEXIST') throw err;
    }
    if (lockIsStale(lock)) removeQuietly(lock);
    else if (now() > deadline) {
      throw new ServiceError(`the state folder ${folder} stayed locked for ${STATE_LOCK_WAIT_S} s`,
        { hint: `another command holds it; try again, or set ${ENV_STATE_DIR}` });
    } else await sleep(0.01);
  }
  try {
    return await run();
  } finally {
    removeQuietly(lock);
  }
}

/** Its holder is gone; an empty lock is one being written, unless it is a second old. */
function lockIsStale(lock) {
  try {
    const holder = Number(fs.readFileSync(lock, 'ascii'));
    return holder ? !pidAlive(holder) : now() - fs.statSync(lock).mtimeMs / 1000 > 1;
  } catch {
    return false;
  }
}

function newRecord(kind, { fingerprint, spec, config, prompt, targets }) {
  const at = now();
  return {
    id: newJobId(),
    kind,
    tool: `${TOOL_NAME} ${VERSION}`,
    fingerprint,
    state: 'starting',
    created_at: at,
    updated_at: at,
    pid: null,
    detached: true,
    sent: false,
    received: false,
    cwd: process.cwd(),
    prompt: [...prompt].slice(0, PROMPT_EXCERPT_CHARS).join(''),
    targets,
    manifest: '',
    spec,
    config: {
      base_url: config.base_url,
      timeout_s: config.timeout_s,
      retries: config.retries,
      price_multiplier: config.price_multiplier
    },
    response: null,
    result: null,
    error: null,
    exit_code: null,
    note: null,
    peak_rss_kib: null,
    liveness: PID_LIVENESS
  };
}

function attachedLine(record) {
  const age = now() - (record.created_at || now());
  return `attached to job ${record.id} (started ${fixed(age, 0)} s ago); nothing new was sent`;
}

/** Say which job this is; with --detach that is all (exit 0). */
function beginJob(start, console, detach) {
  const jobId = start.files.jobId;
  if (start.attached) console.progress(attachedLine(start.record));
  if (!detach) return null;
  if (!start.record.detached) {
    console.warn('--detach needs a worker process; the job runs in the foreground instead');
    return null;
  }
  console.result(`job ${jobId}`);
  if (console.jsonMode) console.document({ ok: true, job: jobId, state: start.record.state });
  return EXIT_OK;
}

/** Ask the job's worker to stop and return its record after it; the worker decides (an interrupted
 * command never cancels a request already sent). A worker that is gone is settled here. */
async function cancelWorker(files, record, mode = 'always') {
  fs.writeFileSync(files.cancel, mode, 'ascii');
  let latest = readRecord(files.record) || record;
  if (!workerAlive(latest)) return markCancelled(files, latest);
  const deadline = now() + 2;
  while (!latest.pid && now() < deadline) {
    await sleep(0.01);
    latest = readRecord(files.record) || latest;
  }
  if (latest.detached && latest.pid && (mode === 'always' || !IS_WINDOWS)) {
    try {
      process.kill(Number(latest.pid), 'SIGTERM');
    } catch { /* already gone */ }
  }
  for (const until = now() + CANCEL_WAIT_S; now() < until;) {
    latest = readRecord(files.record) || latest;
    if (FINISHED_STATES.has(latest.state) || (mode === 'unless-sent' && latest.sent)) return latest;
    if (!workerAlive(latest)) return markCancelled(files, readRecord(files.record) || latest);
    await sleep(0.02);
  }
  return latest;
}

function markCancelled(files, record) {
  const billed = record.sent ? 'the request was already sent and may still be billed' : 'nothing was billed';
  return endAbandonedJob(files, record, 'cancelled', new InterruptedRun(`job ${files.jobId} was cancelled; ${billed}`,
    { kind: 'cancelled', hint: 'run the same command again to make a new request' }));
}

function errorDocument(err) {
  const document = { kind: err.kind, message: err.message, status: err.status ?? null, code: err.code ?? null,
    hint: err.hint || null, exit_code: err.exitCode };
  const extras = { problems: err.problems || [], body: err.body || '', ...(err.details || {}) };
  for (const [name, value] of Object.entries(extras)) {
    if (Array.isArray(value) ? value.length : value) document[name] = value;
  }
  return document;
}

/** A failure recorded by a worker, with the exit code it had there. */
function errorFromDocument(document) {
  const details = Object.fromEntries(
    ['categories', 'source'].filter((k) => k in document).map((k) => [k, document[k]])
  );
  const err = new ToolError(String(document.message || 'the job failed'), { hint: document.hint || '',
    status: document.status ?? null, code: document.code ?? null, kind: document.kind || 'error',
    problems: document.problems || [], body: document.body || '', details });
  err.exitCode = Number(document.exit_code || EXIT_BUG);
  return err;
}

// --- Commands ---

/** All printing goes through here: stdout for results, stderr for the rest; the key is masked. */
class Console {
  constructor({ jsonMode }) {
    this.jsonMode = jsonMode;
    this.quiet = false;
    this.secrets = [];
    this.live = 0;
  }

  redact(text) {
    return this.secrets.reduce((masked, secret) => redact(masked, secret), text);
  }

  write(stream, text) {
    try {
      stream.write(this.redact(text));
    } catch { /* a reader that went away does not stop the run */ }
  }

  progress(text) {
    if (this.quiet) return;
    this.endLive();
    this.write(process.stderr, `${text}\n`);
  }

  liveLine(text) {
    this.write(process.stderr, `\r${text.padEnd(Math.max(60, this.live))}`);
    this.live = Math.max(this.live, text.length);
  }

  endLive() {
    if (!this.live) return;
    this.write(process.stderr, `\r${' '.repeat(Math.max(60, this.live))}\r`);
    this.live = 0;
  }

  warn(text) {
    this.endLive();
    this.write(process.stderr, `warning: ${text}\n`);
  }

  result(text) {
    if (this.jsonMode) return;
    this.endLive();
    this.write(process.stdout, `${text}\n`);
  }

  document(payload) {
    const masked = this.secrets.reduce((value, secret) => scrub(value, secret), payload);
    this.write(process.stdout, `${pyJson(masked, { indent: 2 })}\n`);
  }

  error(err) {
    this.endLive();
    this.write(process.stderr, `${PROG}: error: ${err.message}\n` + (err.hint ? `hint: ${err.hint}\n` : ''));
  }
}

/** Shows elapsed time while waiting: a live line on a terminal, a line every 15 s in a log. */
function startTicker(console, startedAt) {
  if (console.quiet) return () => {};
  const tty = Boolean(process.stderr.isTTY);
  const timer = setInterval(() => {
    const elapsed = now() - startedAt;
    if (tty) console.liveLine(`waiting for the image... ${fixed(elapsed, 0)} s`);
    else console.progress(`still waiting: ${fixed(elapsed, 0)} s elapsed`);
  }, (tty ? PROGRESS_TTY_INTERVAL_S : PROGRESS_LOG_INTERVAL_S) * 1000);
  return () => {
    clearInterval(timer);
    console.endLive();
  };
}

function startLine(job) {
  const n = jobN(job);
  const count = `${n} image${n > 1 ? 's' : ''}`;
  const action =
    { 0: 'Generating', 1: 'Editing 1 image into' }[job.images.length] || `Fusing ${job.images.length} images into`;
  const settings = [['size', ''], ['quality', 'quality '], ['output_format', '']].filter(([k]) => k in job.fields)
    .map(([k, label]) => `${label}${job.fields[k]}`).join(', ');
  const [low, high] = profileFor(job.fields.model).seconds;
  const slowest = job.fields.model === DEFAULT_MODEL ? ', up to 5 min at high quality or 4K' : '';
  return (
    `${action} ${count} with ${job.fields.model}` +
    (settings ? ` (${settings})` : '') +
    `: usually ${low}-${high} s${slowest}`
  );
}

// Signals that reach the command while it waits: the wait loop takes them in turn.
const SIGNALS = { received: null, waiting: false };

/** The job's record once it has ended; StillRunning when maxWait runs out first; the signal's name
 * when the command is interrupted. */
async function waitForJob(files, console, { maxWait, running }) {
  const started = now();
  let offset = 0;
  let events;
  for (let poll = 0; ; poll += 1) {
    [events, offset] = readEvents(files.events, offset);
    for (const event of events) showEvent(event, console);
    if (SIGNALS.received) return { signal: SIGNALS.received };
    const record = readRecord(files.record);
    if (record && (FINISHED_STATES.has(record.state) || (!running && !workerAlive(record)))) {
      const settled = await conclude(files, record, console);
      if (FINISHED_STATES.has(settled.state)) {
        [events, offset] = readEvents(files.events, offset);
        events.forEach((event) => showEvent(event, console));
        return { record: settled };
      }
    }
    if (maxWait !== null && now() - started >= maxWait) {
      throw stillRunning(files.jobId, `still running after --max-wait ${gFormat(maxWait)} s`);
    }
    await sleep(POLL_INTERVALS_S[Math.min(poll, POLL_INTERVALS_S.length - 1)]);
  }
}

function showEvent(event, console) {
  if (event.event === 'warning') console.warn(String(event.message));
  else if (event.event === 'retry') console.progress(String(event.message));
}

async function followSingle(start, console, maxWait) {
  const stopTicker = startTicker(console, start.record.created_at || now());
  let outcome;
  SIGNALS.waiting = true;
  try {
    outcome = await waitForJob(start.files, console, { maxWait, running: start.running });
  } finally {
    SIGNALS.waiting = false;
    stopTicker();
  }
  if (outcome.signal) throw await interruptJob(start, outcome.signal);
  return reportSingle(start.files, outcome.record, console);
}

/** Ctrl-C, SIGTERM or SIGHUP while waiting: before the request is completely sent the job is cancelled
 * (nothing billed); after, the command stops waiting and the job goes on. */
async function interruptJob(start, signalName) {
  const code = SIGNAL_EXITS[signalName];
  let record = readRecord(start.files.record) || start.record;
  if (!start.record.detached) return interruptedInProcess(start.files, record, code);
  if (!record.sent && !FINISHED_STATES.has(record.state))
    record = await cancelWorker(start.files, record, 'unless-sent');
  if (!record.sent && !['done', 'failed'].includes(record.state)) {
    const settled = record.state === 'cancelled' ? 'was cancelled' : 'is being cancelled';
    return new InterruptedRun(`interrupted before the request was completely sent: job ${start.files.jobId} ${settled} `
      + 'and nothing was billed', { hint: 'run the same command again to send it', exitCode: code });
  }
  return stillRunning(start.files.jobId, `interrupted (${signalName})`, code);
}

// What an interrupt leaves when the job ran inside the command: it ends with the command.
const IN_PROCESS_ENDINGS = {
  unsent: [
    'interrupted before the request was completely sent: nothing was billed',
    'run the same command again to send it'
  ],
  sent: [
    'interrupted after the request was sent: it may be billed, and with no worker process its answer is lost with ' +
      'this command',
    'check your APIYI usage before sending it again'
  ],
  received: [
    "interrupted while saving: the answer is kept in the job's spool",
    'run the same command again to save it; nothing new is sent'
  ]
};

function interruptedInProcess(files, record, code) {
  try {
    fs.writeFileSync(files.cancel, 'unless-sent', 'ascii');
  } catch { /* the worker stops with this process anyway */ }
  if (!record.received) for (const temporary of CURRENT.temporaries) removeQuietly(temporary);
  const stage = record.received ? 'received' : record.sent ? 'sent' : 'unsent';
  const [message, hint] = IN_PROCESS_ENDINGS[stage];
  return new InterruptedRun(message, { hint, exitCode: code });
}

/** A path the worker recorded relative to its folder, as seen from this command's folder. */
function rebase(file, cwd) {
  return path.isAbsolute(file) || path.resolve(cwd) === process.cwd() ? file : path.join(cwd, file);
}

/** The job's outcome as this command's own: the same stdout, --json document and exit code. It counts
 * as reported once printed, not before. */
function reportSingle(files, record, console) {
  const job = record.spec;
  let code;
  if (record.result) {
    const result = { ...record.result, job, error: record.result.error ? errorFromDocument(record.result.error) : null,
      files: record.result.files.map((s) => ({ ...s, path: rebase(s.path, record.cwd) })) };
    code = reportResult(result, console);
  } else {
    const err = errorFromDocument(record.error || { message: `job ${files.jobId} ended without a result` });
    if (record.note === 'received, not saved') {
      err.message += `; the answer is kept in ${files.spool}`;
      err.hint = `make the folder writable, then run the same command again (or --attach ${files.jobId})`;
    }
    code = reportFailure(err, console);
  }
  markReported(files);
  return code;
}

function reportFailure(err, console) {
  if (err instanceof StillRunning) console.result(`job ${err.jobId}`);
  if (console.jsonMode) console.document(failureDocument(err));
  console.error(err);
  return err.exitCode;
}

function failureDocument(err) {
  const document = { ok: false, error: errorDocument(err) };
  if (err instanceof StillRunning) document.job = err.jobId;
  return document;
}

function usageText(usage) {
  if (!usage || typeof usage !== 'object' || Array.isArray(usage)) return '';
  const parts = [['input_tokens', 'input'], ['output_tokens', 'output'], ['total_tokens', 'total']]
    .filter(([k]) => k in usage).map(([k, label]) => `${usage[k]} ${label}`);
  return parts.length ? `tokens: ${parts.join(', ')}` : '';
}

function reportResult(result, console) {
  result.warnings.forEach((warning) => console.warn(warning));
  for (const saved of result.files) {
    const { info } = saved;
    console.progress(`saved ${saved.path} (${info.width}x${info.height}, ${info.format}, `
      + `${grouped(Number(fixed(saved.size_bytes / 1024, 0)))} KB)`);
    console.result(saved.path);
  }
  const revised = firstRevisedPrompt(result.meta);
  const done =
    `done in ${fixed(result.elapsed_s, 0)} s` + (result.request_id ? ` (request id ${result.request_id})` : '');
  const spent = [usageText(result.meta.usage), costText(result.cost)].filter(Boolean).join('; ');
  for (const line of [
    spent,
    revised ? `revised prompt: ${revised}` : '',
    result.error && !result.files.length ? '' : done
  ]) {
    if (line) console.progress(line);
  }
  if (console.jsonMode) console.document(resultDocument(result));
  if (result.error) {
    console.error(result.error);
    return result.error.exitCode;
  }
  return EXIT_OK;
}

function resultDocument(result) {
  const { job } = result;
  const files = result.files.map((s) => ({ path: s.path, format: s.info.format, width: s.info.width,
    height: s.info.height, bytes: s.size_bytes, ...requestedAndReal(job, s) }));
  const document = { ok: !result.error, files, model: job.fields.model, mode: jobMode(job),
    size: job.fields.size || 'auto', quality: job.fields.quality || 'auto', usage: result.meta.usage ?? null,
    cost: result.cost ?? null, revised_prompt: firstRevisedPrompt(result.meta), request_id: result.request_id || null,
    request_id_header: result.request_id_header || null, elapsed_s: roundTo(result.elapsed_s, 3),
    warnings: result.warnings };
  if (result.error) document.error = errorDocument(result.error);
  return document;
}

function bodyLines(described) {
  if ('json' in described) return [pyJson(described.json, { indent: 2, ascii: false })];
  return [...Object.entries(described.fields).map(([k, v]) => `field ${k} = ${v}`),
    ...described.files.map((f) => `file ${f.name}: ${f.filename} (${f.content_type}, ${grouped(f.bytes)} bytes, `
      + `${f.width}x${f.height})`)];
}

/** The paths a real run would write now, and a warning for each name already taken. */
function dryRunOutputs(job) {
  const outputs = [];
  const warnings = [];
  for (const file of outputPaths(job.output, jobN(job))) {
    const free = job.output.overwrite ? file : nextFreePath(file);
    outputs.push(free);
    if (free !== file) {
      warnings.push(`${path.basename(file)} exists: would save as ${path.basename(free)} (--overwrite replaces it)`);
    }
  }
  return [outputs, warnings];
}

function runDry(job, config, console, estimate) {
  const described = describeRequest(buildRequest(job, config), job, config);
  const [outputs, taken] = dryRunOutputs(job);
  taken.forEach((warning) => console.warn(warning));
  if (console.jsonMode) {
    console.document({ ok: true, dry_run: true, mode: jobMode(job), request: described, outputs,
      warnings: [...job.warnings, ...taken], estimate });
    return EXIT_OK;
  }
  const lines = [
    `${described.method} ${described.url}`,
    ...Object.entries(described.headers).map(([k, v]) => `${k}: ${v}`),
    '',
    ...bodyLines(described),
    '',
    ...outputs.map((p) => `output: ${p}`),
    estimateText(estimate)
  ];
  console.result(lines.join('\n'));
  return EXIT_OK;
}

function clock(seconds) {
  const total = pyRound(seconds);
  const minutes = Math.floor(total / 60);
  const secs = String(total % 60).padStart(2, '0');
  return minutes >= 60
    ? `${Math.floor(minutes / 60)}:${String(minutes % 60).padStart(2, '0')}:${secs}`
    : `${minutes}:${secs}`;
}

/** The profile table, as text or JSON: what each model takes, makes, bills and usually takes. */
function runListModels(console) {
  const profiles = Object.keys(MODEL_PROFILES).map(profileFor);
  if (console.jsonMode) {
    console.document({ ok: true, default: DEFAULT_MODEL, models: profiles.map((p) => ({
      ...Object.fromEntries(PROFILE_FIELDS.map((f) => [f, p[f]])), size_tiers: SIZE_TIERS[p.tiers] || null })) });
    return EXIT_OK;
  }
  for (const p of profiles) {
    console.result(
      `${p.name.padEnd(24)} ${p.line.padEnd(8)} ${p.billing.padEnd(17)} ${p.seconds[0]}-${p.seconds[1]} s  ` +
        `n<=${p.max_n}  formats ${p.formats.join(',')}  quality ${p.qualities.join(',') || '-'}`
    );
    console.result(`${''.padEnd(24)} ${p.note}; takes ${p.accepts.map((a) => SETTING_FLAGS[a]).join(', ')}`
      + (p.ignores.length ? `; ignores ${p.ignores.map((i) => SETTING_FLAGS[i]).join(', ')}` : ''));
  }
  return EXIT_OK;
}

function jobState(record) {
  const state = String(record.state);
  if (!FINISHED_STATES.has(state) && !workerAlive(record)) return `${state} (worker gone)`;
  return state + (record.note ? `, ${record.note}` : '');
}

function jobSummary(files, record) {
  const result = record.result || {};
  const outputs = (result.files || []).map((f) => f.path);
  return {
    id: record.id,
    kind: record.kind ?? null,
    state: jobState(record),
    age_s: roundTo(now() - (record.created_at || now()), 1),
    prompt: record.prompt ?? null,
    outputs: outputs.length ? outputs : record.targets || [],
    sent: Boolean(record.sent),
    reported: fs.existsSync(files.reported),
    exit_code: record.exit_code ?? null,
    peak_rss_kib: record.peak_rss_kib ?? null
  };
}

function runListJobs(console, env) {
  const folder = openStateFolder(env);
  const summaries = listRecords(folder).map((r) => jobSummary(jobFiles(folder, r.id), r));
  if (console.jsonMode) {
    console.document({ ok: true, state_dir: folder, jobs: summaries });
    return EXIT_OK;
  }
  for (const job of summaries) {
    console.result(
      `${job.id}  ${job.state}  ${clock(job.age_s)} ago  ${pyRepr(String(job.prompt))}  ${job.outputs.join(', ')}`
    );
  }
  if (!summaries.length) console.progress(`no jobs in ${folder}`);
  return EXIT_OK;
}

/** A job by its id, or the newest with 'last'. */
function findJob(folder, wanted) {
  const records = listRecords(folder);
  const found = wanted === 'last' ? records.slice(-1) : records.filter((r) => r.id === wanted);
  if (!found.length) {
    const listed = records.length ? `; the newest is ${records[records.length - 1].id}` : '';
    throw new UsageError(`no job ${pyRepr(wanted)} in ${folder}${listed}`, { hint: `see ${PROG} --list-jobs` });
  }
  return [jobFiles(folder, found[0].id), found[0]];
}

function checkBatchJob(record) {
  if (record.kind !== 'single') {
    throw new UsageError(`job ${record.id} is a batch: the Node.js twin does not run batches`,
      { hint: `use ${PYTHON_TWIN} --attach ${record.id}` });
  }
}

async function runCancel(jobId, console, env) {
  const [files, record] = findJob(openStateFolder(env), jobId);
  checkBatchJob(record);
  let state;
  if (FINISHED_STATES.has(record.state)) {
    console.progress(`job ${files.jobId} has already ended (${record.state})`);
    state = String(record.state);
  } else {
    const after = await cancelWorker(files, record);
    state = FINISHED_STATES.has(after.state)
      ? String(after.state)
      : after.detached || !after.sent
        ? 'stopping'
        : 'running';
    const billed = record.sent ? '; the request was already sent and may still be billed' : '';
    console.progress(`job ${files.jobId}: ${state}${billed}`);
  }
  console.result(`job ${files.jobId} ${state}`);
  if (console.jsonMode) console.document({ ok: true, job: files.jobId, state });
  return EXIT_OK;
}

async function runAttach(jobId, console, env, maxWait) {
  const [files, record] = findJob(openStateFolder(env), jobId);
  checkBatchJob(record);
  console.progress(attachedLine(record));
  return followSingle({ files, attached: true, record, running: null }, console, maxWait);
}

// Flags that act on jobs already started; they take no prompt or request settings.
const JOB_ACTIONS = [['--attach', 'attach'], ['--cancel', 'cancel'], ['--list-jobs', 'list_jobs'],
  ['--list-models', 'list_models']];

function checkModeFlags(args) {
  const refused = Object.keys(PYTHON_ONLY).find((dest) => args[dest] !== null && args[dest] !== false);
  if (refused) {
    throw new UsageError(`${PYTHON_ONLY[refused]} is not in the Node.js twin (${PROG}); it is in ${PYTHON_TWIN}`,
      { hint: `run the same command with python3 ${path.join(path.dirname(__filename), PYTHON_TWIN)} (Python 3.9+)` });
  }
  const action = JOB_ACTIONS.find(([, dest]) => args[dest]);
  if (action) {
    const clash = [['-p', args.prompt], ['--detach', args.detach], ['--dry-run', args.dry_run]].find(([, v]) => v)
      || JOB_ACTIONS.find(([flag, dest]) => args[dest] && flag !== action[0]);
    if (clash)
      throw new UsageError(`${action[0]} cannot be combined with ${clash[0]}`, { hint: `run ${action[0]} on its own` });
    return;
  }
  if (args.detach && (args.dry_run || args.max_wait !== null)) {
    const flag = args.dry_run ? '--dry-run' : '--max-wait';
    throw new UsageError(`--detach cannot be combined with ${flag}`, { hint: '--detach returns at once; drop one' });
  }
  if (args.prompt === null)
    throw new UsageError('no prompt: give -p TEXT, or --batch FILE for many images', { hint: `see ${PROG} --help` });
}

/** The connection settings; from here on the key is masked in everything printed. */
function connect(args, console, env, jobWarnings) {
  const [config, configWarnings] = buildConfig(args, env);
  if (config.api_key) console.secrets.push(config.api_key);
  [...jobWarnings, ...configWarnings].forEach((warning) => console.warn(warning));
  return config;
}

function requestShape(fields, mode) {
  return [String(fields.model), mode, String(fields.size || 'auto'), String(fields.quality || 'auto'),
    String(fields.output_format || 'png'), String(fields.partial_images || 0)].join('\0');
}

/** Output tokens per image that earlier runs of the same request shape really used (finished jobs). */
function earlierOutputTokens(env, shape) {
  const seen = [];
  const folder = stateFolder(env);
  for (const record of pathKind(folder) === 'folder' ? listRecords(folder) : []) {
    const { spec, result } = record;
    if (record.kind !== 'single' || !spec || !result || typeof spec !== 'object' || !spec.fields) continue;
    const usage = result.meta && result.meta.usage;
    const tokens = usage && typeof usage === 'object' ? tokenCount(usage.output_tokens) : null;
    const n = spec.fields.n ?? 1;
    if (requestShape(spec.fields, spec.images && spec.images.length ? 'edit' : 'generate') === shape && tokens
        && Number.isInteger(n) && n > 0 && n <= MAX_N) seen.push(Math.floor(tokens / n));
  }
  return seen;
}

function checkBudget(estimate, maxCost, what) {
  if (maxCost === null) return;
  if (estimate.high === null) {
    throw new UsageError(
      `--max-cost $${gFormat(maxCost)}: the cost of ${what} cannot be estimated (${estimate.source})`,
      { hint: 'drop --max-cost, or choose a model and quality with published prices', field: 'max_cost' }
    );
  }
  if (estimate.high > maxCost) {
    throw new UsageError(
      `--max-cost $${gFormat(maxCost)}: ${what} may cost up to $${fixed(estimate.high, 4)} ` +
        `(${estimateText(estimate)})`,
      { hint: 'raise --max-cost, or ask for less (size, quality, -n)', field: 'max_cost' }
    );
  }
}

async function runSingle(job, config, console, env, args) {
  const fingerprint = jobFingerprint([requestFingerprint(job, config.base_url)], config.api_key);
  const record = newRecord('single', { fingerprint, spec: job, config, prompt: job.prompt,
    targets: outputPaths(job.output, jobN(job)) });
  const start = await findOrStartJob(openStateFolder(env), record, { key: config.api_key, env, console });
  if (!start.attached) console.progress(startLine(job));
  const done = beginJob(start, console, args.detach);
  if (done !== null) return done;
  return followSingle(start, console, args.max_wait);
}

async function runCommand(args, console, env) {
  checkModeFlags(args);
  args.model = args.model || defaultModel(env);
  if (args.list_models) return runListModels(console);
  if (args.list_jobs) return runListJobs(console, env);
  if (args.cancel) return runCancel(args.cancel, console, env);
  if (args.attach) return runAttach(args.attach, console, env, args.max_wait);
  const job = buildJob(args, { create: !args.dry_run });
  job.notes.forEach((note) => console.progress(note));
  const config = connect(args, console, env, job.warnings);
  const history = args.dry_run || args.max_cost !== null
    ? earlierOutputTokens(env, requestShape(job.fields, jobMode(job))) : [];
  const estimate = estimateCost(job, config.price_multiplier, history);
  checkBudget(estimate, args.max_cost, 'this request');
  if (args.dry_run) return runDry(job, config, console, estimate);
  return runSingle(job, config, console, env, args);
}

// --- CLI ---

const HELP_GROUPS = [
  [
    'what to make',
    [
      [
        '-p',
        '--prompt',
        'prompt',
        'once',
        null,
        'TEXT',
        'the prompt, sent exactly as given; - reads it from stdin (UTF-8)'
      ],
      [
        '-s',
        '--size',
        'size',
        'value',
        null,
        'SIZE',
        `auto, match, a preset (${SIZE_PRESETS.join(', ')}), any WxH or a ratio W:H with -r`
      ],
      [
        '-r',
        '--resolution',
        'resolution',
        'value',
        CONVERTERS.resolution,
        '{1K,2K,4K}',
        'long edge for a W:H size (default 1K)'
      ],
      [
        '-q',
        '--quality',
        'quality',
        'value',
        CONVERTERS.quality,
        `{${QUALITIES.join(',')}}`,
        'low, medium, high or auto'
      ],
      [
        null,
        '--complexity',
        'complexity',
        'value',
        CONVERTERS.complexity,
        `{${COMPLEXITIES.join(',')}}`,
        'gpt-image-2.6 detail'
      ],
      ['-n', '--n', 'n', 'value', CONVERTERS.n, 'N', 'images in one request, 1-10; files are then NAME-1, NAME-2, ...'],
      [
        null,
        '--background',
        'background',
        'value',
        CONVERTERS.background,
        `{${BACKGROUNDS.join(',')}}`,
        'transparent needs png or webp'
      ],
      [
        null,
        '--moderation',
        'moderation',
        'value',
        CONVERTERS.moderation,
        `{${MODERATIONS.join(',')}}`,
        'text-to-image only'
      ],
      [
        null,
        '--model',
        'model',
        'value',
        CONVERTERS.model,
        'NAME',
        `model or channel (default: $${ENV_MODEL}, else ${DEFAULT_MODEL})`
      ],
      [null, '--list-models', 'list_models', 'flag', null, null, 'the models and channels the tool knows']
    ]
  ],
  [
    'input images (edit and fusion)',
    [
      [
        '-i',
        '--input-image',
        'input_image',
        'extend',
        null,
        'PATH [PATH ...]',
        '1-16 PNG/JPEG/WebP images under 50 MiB, in order'
      ],
      ['-m', '--mask', 'mask', 'value', null, 'PATH', 'PNG with alpha, same size as the first input image, under 4 MiB']
    ]
  ],
  [
    'output',
    [
      ['-f', '--filename', 'filename', 'once', null, 'PATH', 'where to save (default: TIMESTAMP-SLUG-RANDOM.png here)'],
      [
        '-o',
        '--output-format',
        'output_format',
        'value',
        CONVERTERS.output_format,
        '{png,jpeg,jpg,webp,gif,svg}',
        'default: from the -f extension, else png'
      ],
      [null, '--frames', 'frames', 'value', CONVERTERS.frame_count, 'N', 'GIF: frames, 2-16'],
      [
        null,
        '--frame-ms',
        'frame_ms',
        'value',
        CONVERTERS.frame_duration_ms,
        'MS',
        'GIF: milliseconds per frame, 20-2000'
      ],
      [null, '--svg-model', 'svg_model', 'value', null, 'NAME', 'SVG on gpt-image-2.6: the model that writes it'],
      [
        null,
        '--strict-size',
        'strict_size',
        'flag',
        null,
        null,
        `another size, format or frame count is exit ${EXIT_MISMATCH}`
      ],
      [
        '-c',
        '--output-compression',
        'output_compression',
        'value',
        CONVERTERS.output_compression,
        'N',
        '0-100, jpeg and webp only'
      ],
      [null, '--overwrite', 'overwrite', 'flag', null, null, 'replace an existing file (default: NAME-2, NAME-3, ...)'],
      [null, '--metadata', 'metadata', 'flag', null, null, 'also write IMAGE.json beside each image (never the key)'],
      [null, '--json', 'json', 'flag', null, null, 'print one JSON object on stdout instead of paths'],
      [null, '--quiet', 'quiet', 'flag', null, null, 'no progress on stderr (warnings and errors stay)'],
      [null, '--max-cost', 'max_cost', 'value', positiveDollars, 'USD', 'refuse a run that may cost more']
    ]
  ],
  [
    'connection',
    [
      ['-k', '--api-key', 'api_key', 'value', null, 'KEY', `API key (default: $${ENV_API_KEY})`],
      [
        null,
        '--base-url',
        'base_url',
        'value',
        null,
        'URL',
        `API base (default: $${ENV_BASE_URL}, else ${DEFAULT_BASE_URL})`
      ],
      [
        null,
        '--timeout',
        'timeout',
        'value',
        positiveSeconds,
        'S',
        'seconds for the whole answer once sent (default 600)'
      ],
      [
        null,
        '--retries',
        'retries',
        'value',
        intInRange(0, MAX_RETRIES),
        'N',
        'retries on connection failure, 408, 409, 429 and 5xx (default 2)'
      ],
      [
        null,
        '--allow-http-proxy',
        'allow_http_proxy',
        'flag',
        null,
        null,
        'let a plain-http base URL go through the HTTP proxy set in the environment (it sees the key)'
      ],
      [
        null,
        '--dry-run',
        'dry_run',
        'flag',
        null,
        null,
        'check everything and print the request (key redacted); sends nothing'
      ]
    ]
  ],
  [
    'jobs (each request runs in a worker that outlives this command; the same command again attaches to it)',
    [
      [null, '--detach', 'detach', 'flag', null, null, "start the job, print 'job ID' and exit 0 at once"],
      [null, '--attach', 'attach', 'value', null, 'JOB', 'wait for a job (an id, or last) and report it'],
      [
        null,
        '--max-wait',
        'max_wait',
        'value',
        positiveSeconds,
        'S',
        'stop waiting after S seconds with exit 9; the job goes on'
      ],
      [null, '--list-jobs', 'list_jobs', 'flag', null, null, 'list recent jobs'],
      [
        null,
        '--cancel',
        'cancel',
        'value',
        null,
        'JOB',
        "stop a job's worker (a request already sent may still be billed)"
      ],
      [null, '--run-job', 'run_job', 'value', null, 'RECORD', null]
    ]
  ],
  [
    `Python only (refused here: run ${PYTHON_TWIN})`,
    [
      [null, '--batch', 'batch', 'value', null, 'FILE', null],
      [null, '--out-dir', 'out_dir', 'value', null, 'DIR', null],
      [null, '--no-gallery', 'no_gallery', 'flag', null, null, null],
      ['-j', '--jobs', 'jobs', 'value', null, 'N', null],
      [null, '--stream', 'stream', 'flag', null, null, null],
      [null, '--partial-images', 'partial_images', 'value', null, 'N', null],
      [null, '--keep-partials', 'keep_partials', 'flag', null, null, null],
      [null, '--gallery', 'gallery', 'flag', null, null, null],
      [null, '--open', 'open', 'flag', null, null, null],
      [null, '--events', 'events', 'flag', null, null, null],
      [null, '--doctor', 'doctor', 'flag', null, null, null]
    ]
  ]
];
const OPTIONS = HELP_GROUPS.flatMap(([, options]) => options.map(([short, long, dest, kind, convert, metavar, help]) =>
  ({ short, long, dest, kind, convert, metavar, help, display: short ? `${short}/${long}` : long })));
const DEFAULTS = { timeout: DEFAULT_TIMEOUT_S, retries: DEFAULT_RETRIES };

/** argparse finished on its own (--help, --version) with this status. */
class ParserExit extends Error {
  constructor(status) {
    super(String(status));
    this.status = status;
  }
}

function helpText() {
  const lines = [`usage: ${PROG} [-h] [-p TEXT] [options]  (the Node.js twin of ${PYTHON_TWIN}: same flags)`, '',
    'Generate and edit images with gpt-image-2 through the APIYI gateway. Node.js 18+, nothing to install.',
    'stdout carries only the saved paths (or one JSON document with --json); progress, warnings and',
    'errors go to stderr. Exit codes: 0 ok, 2 bad input (nothing sent), 3 key, 4 refused, 5 service,',
    '6 may be billed, 7 fallback path, 9 still running (--max-wait), 10 --strict-size.',
    `Python only (refused with exit 2): ${Object.values(PYTHON_ONLY).join(', ')}.`, '',
    'examples:', `  ${PROG} -p "一只可爱的橘猫在草地上玩耍" -f cat.png`,
    `  ${PROG} -p "Put the cat of image 1 in the garden of image 2" -i cat.png garden.jpg -f fused.png -s 16:9 -r 2K`];
  for (const [title, options] of HELP_GROUPS.slice(0, -1)) {
    lines.push('', `${title}:`);
    for (const o of options.filter((option) => option[6])) {
      const flags = [o[0], o[1]].filter(Boolean).join(', ') + (o[5] ? ` ${o[5]}` : '');
      lines.push(`  ${flags.padEnd(30)} ${o[6]}`);
    }
  }
  lines.push(
    '',
    `  -h, --help${' '.repeat(22)}show this help and exit`,
    `  --version${' '.repeat(23)}show the version and exit`
  );
  return `${lines.join('\n')}\n`;
}

function parserError(message) {
  return new UsageError(message, { hint: `see ${PROG} --help` });
}

/** A token argparse would take for an option: a dash and more, unless it is a negative number. */
function looksLikeOption(token) {
  if (!token.startsWith('-') || token === '-' || /^-\d+$|^-\d*\.\d+$/.test(token)) return false;
  return !token.includes(' ') || Boolean(splitOption(token.split('=')[0])[0]);   // "-a cat on a mat" is a value
}

/** The option a token names, and a value written into it (--size=16:9, -s16:9, -n=3). */
function splitOption(token) {
  const byLong = OPTIONS.find((o) => token === o.long || token.startsWith(`${o.long}=`));
  if (byLong) return [byLong, token === byLong.long ? null : token.slice(byLong.long.length + 1)];
  const byShort = OPTIONS.find((o) => o.short && token.startsWith(o.short) && !token.startsWith('--'));
  if (byShort && token !== byShort.short) {
    const rest = token.slice(2);
    return [byShort, rest.startsWith('=') ? rest.slice(1) : rest];
  }
  return [byShort || null, null];
}

function convertValue(option, text) {
  if (!option.convert) return text;
  try {
    return option.convert(text);
  } catch (err) {
    if (err instanceof ArgumentTypeError) throw parserError(`argument ${option.display}: ${err.message}`);
    throw err;
  }
}

/** The argument list as argparse reads it for the Python twin: the same values, and the same errors. */
function parseArgs(argv) {
  const args = Object.fromEntries(OPTIONS.map((o) => [o.dest, o.kind === 'flag' ? false : DEFAULTS[o.dest] ?? null]));
  const unknown = [];
  for (let index = 0; index < argv.length; index += 1) {
    const token = argv[index];
    stopForHelpOrVersion(token);
    const [option, attached] = looksLikeOption(token) ? splitOption(token) : [null, null];
    if (!option) {
      unknown.push(token);
    } else if (option.kind === 'flag') {
      if (attached !== null) {
        throw parserError(`argument ${option.display}: ignored explicit argument ${pyRepr(attached)}`);
      }
      args[option.dest] = true;
    } else {
      const values = attached !== null ? [attached] : optionValues(argv, index, option);
      index += attached !== null ? 0 : values.length;
      storeValues(args, option, values);
    }
  }
  if (unknown.length) {
    const flags = unknown.filter((w) => w.startsWith('-')).map((w) => w.split('=')[0]);
    throw parserError(`unrecognized option${flags.length > 1 ? 's' : ''}: ${flags.join(' ') || '(a value)'}`);
  }
  return args;
}

/** --help and --version answer at once, wherever they stand, as argparse does. */
function stopForHelpOrVersion(token) {
  if (token === '-h' || token === '--help') process.stdout.write(helpText());
  else if (token === '--version') process.stdout.write(`${PROG} ${VERSION}\n`);
  else return;
  throw new ParserExit(0);
}

/** The words after an option that are its values: one, or (for -i) all up to the next option. */
function optionValues(argv, index, option) {
  const values = [];
  for (let next = index + 1; next < argv.length && !looksLikeOption(argv[next]); next += 1) {
    values.push(argv[next]);
    if (option.kind !== 'extend') break;
  }
  return values;
}

function storeValues(args, option, values) {
  if (!values.length) {
    const expected = option.kind === 'extend' ? 'at least one argument' : 'one argument';
    throw parserError(`argument ${option.display}: expected ${expected}`);
  }
  if (option.kind === 'once' && args[option.dest] !== null) {
    throw parserError(`argument ${option.display}: given twice; give it once`);
  }
  if (option.kind === 'extend') args[option.dest] = [...(args[option.dest] || []), ...values];
  else args[option.dest] = convertValue(option, values[0]);
}

/** The entry of a detached worker (--run-job): it has no terminal, so SIGINT and SIGHUP are ignored. */
async function runWorkerProcess(record, env) {
  for (const name of ['SIGINT', 'SIGHUP']) process.on(name, () => {});
  const folder = path.dirname(record);
  return runWorker(jobFiles(folder, path.basename(record).replace(/\.json$/, '')), env[ENV_API_KEY] || '', {
    detached: true
  });
}

/** Ctrl-C, SIGTERM and SIGHUP: while a job is waited for, the wait loop says what happens to it;
 * before, nothing was sent and the command stops at once. */
function handleSignals(console) {
  for (const name of Object.keys(SIGNAL_EXITS)) {
    process.on(name, () => {
      if (SIGNALS.waiting) {
        SIGNALS.received = SIGNALS.received || name;
        return;
      }
      endNow(reportFailure(new InterruptedRun('interrupted; no partial file was left (a request already sent may be '
        + 'billed)', { exitCode: SIGNAL_EXITS[name] }), console));
    });
  }
}

/** NODE_DEBUG=http (or net, tls) makes Node print every request's headers to stderr, the key among
 * them, and it cannot be switched off once Node has started: refused before anything is read. */
function checkNodeDebug(env) {
  const modules = (env.NODE_DEBUG || '').split(/[\s,]+/).filter((m) => /^(http|https|http2|net|tls|\*)$/i.test(m));
  if (modules.length) {
    throw new UsageError(`NODE_DEBUG=${modules.join(',')} would print the API key with every request`,
      { hint: 'unset NODE_DEBUG (or leave out http, https, http2, net and tls)' });
  }
}

async function main(argv = process.argv.slice(2)) {
  const console = new Console({ jsonMode: argv.includes('--json') });
  for (const stream of [process.stdout, process.stderr]) stream.on('error', () => {});
  const major = Number(process.versions.node.split('.')[0]);
  if (major < MIN_NODE_MAJOR) {
    process.stderr.write(`${PROG}: error: needs Node.js ${MIN_NODE_MAJOR} or newer (this is ${process.version})\n`
      + `hint: install a newer Node.js, or run ${PYTHON_TWIN} with Python 3.9+\n`);
    return EXIT_USAGE;
  }
  try {
    checkNodeDebug(process.env);
    const args = parseArgs(argv);
    if (args.run_job) return await runWorkerProcess(args.run_job, process.env);
    console.quiet = args.quiet;
    handleSignals(console);
    return await runCommand(args, console, process.env);
  } catch (err) {
    if (err instanceof ParserExit) return err.status;
    if (!(err instanceof ToolError)) throw err;
    return reportFailure(err, console);
  }
}

/** The command ends here, with a job that ran inside it (as a Python daemon thread ends with its
 * process): its request is dropped and its temporaries go, once stdout and stderr are flushed. */
function endNow(code) {
  if (CURRENT.request) CURRENT.request.destroy();
  for (const temporary of CURRENT.temporaries) removeQuietly(temporary);
  process.stdout.write('', () => process.stderr.write('', () => process.exit(code)));
}

if (require.main === module) {
  main().then((code) => {
    process.exitCode = code;
    if (CURRENT.running) endNow(code);
  }, (err) => {
    process.stderr.write(`${PROG}: a bug: report it with this trace\n${err && err.stack ? err.stack : err}\n`);
    process.exitCode = EXIT_BUG;
  });
}

// For the tests of what differs by platform (tests/test_twin_platforms.py) and the table's comparison.
module.exports = {
  MODEL_PROFILES,
  OPTIONS,
  PYTHON_ONLY,
  decodeSpan,
  readSpooledAnswer,
  main,
  nameSize,
  parseArgs,
  pidAlive,
  planOutputPath,
  pyJson,
  stateFolder,
  workerSpawnOptions
};
