"""The HTTP JSON API of the PixelLM Serve application: request parsing, limits and responses.

``POST /v1/segment`` takes ``{"image": base64, "question": str, "max_new_tokens"?: int}`` and returns
``{"text", "targets": [{"index", "rle", "bbox", "score"}]}`` where ``rle`` is a COCO RLE of the mask
at the original image size (``counts`` a str), ``bbox`` its ``[x, y, w, h]`` box in pixels and
``score`` the decoder's confidence. The k-th target belongs to the k-th ``[SEG]`` of ``text``.

Every problem with a request is a ``RequestError`` carrying a 4xx status and a message that names the
field, the value seen and what is expected; the app turns it into ``{"error": message,
"request_id": id}``. Messages never carry object reprs (``clean_message``). Nothing here needs Ray,
so the checks are unit-testable in-process.

Rules a request meets (each answered with the status in brackets):

- JSON [400]: valid UTF-8 JSON, nesting depth <= ``MAX_JSON_DEPTH``, integers of at most
  ``MAX_INT_DIGITS`` digits; the body is an object with the fields above [422].
- Question [422]: non-empty, valid Unicode (no lone surrogates), at most ``max_question_chars``,
  and free of the model's control strings (``<image>``, codebook tokens, BOS/EOS/PAD/UNK, any other
  special token, the chat-template role markers ``USER:`` / ``ASSISTANT:``). Such a question is
  *rejected*, not rewritten: a silently edited question would get an answer to something the user
  did not ask.
- Image: PNG, JPEG, WebP or BMP only, recognised by its signature bytes [415 otherwise, e.g. GIF,
  TIFF, EPS, PDF]; broken bytes of an allowed format [400]; over ``max_image_pixels`` [413, read
  from the header before decoding]. 16-bit greyscale is scaled to 8 bits (``v / 257``, not
  clipped), float images are scaled from [0, 1] (or min-max when outside it), and any alpha is
  composited on a white background (``ALPHA_BACKGROUND``).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import io
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_utils
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from pixellm.config import ConfigError, ServeConfig

__all__ = [
    "ALLOWED_FORMATS",
    "ALPHA_BACKGROUND",
    "DEPLOYMENT_NAME",
    "TOKEN_ENV",
    "ErrorResponse",
    "Limits",
    "RequestError",
    "SegmentJob",
    "SegmentRequest",
    "SegmentResponse",
    "TargetOut",
    "check_bearer",
    "check_question",
    "clean_message",
    "decode_image",
    "resolve_bearer_token",
    "parse_segment_request",
    "prediction_to_response",
]

DEPLOYMENT_NAME = "PixelLM"  # the deployment of the app, for serve.get_deployment_handle

# Encoded bytes allowed per pixel of the limit: PNG of RGB noise is ~3 B/px; headers add a little.
_BYTES_PER_PIXEL = 4
_HEADER_SLACK = 64 * 1024
MAX_JSON_DEPTH = 4  # the body is a flat object; anything deeper is not a valid request
MAX_INT_DIGITS = 20
TOKEN_ENV = "PIXELLM_SERVE_TOKEN"
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP")
ALPHA_BACKGROUND = (255, 255, 255)  # transparent pixels are shown on white
ROLE_MARKERS = ("USER:", "ASSISTANT:")
_SIGNATURES = (  # (format, prefix, offset) of the allowed formats
    ("PNG", b"\x89PNG\r\n\x1a\n", 0),
    ("JPEG", b"\xff\xd8\xff", 0),
    ("WEBP", b"WEBP", 8),
    ("BMP", b"BM", 0),
)
_OTHER_FORMATS = (  # only to name what was sent
    ("GIF", b"GIF8"),
    ("TIFF", b"II*\x00"),
    ("TIFF", b"MM\x00*"),
    ("EPS", b"%!PS"),
    ("EPS", b"\xc5\xd0\xd3\xc6"),
    ("PDF", b"%PDF"),
    ("ICO", b"\x00\x00\x01\x00"),
)
_REPR = re.compile(r"<[^<>]*? at 0x[0-9a-fA-F]+>")


class RequestError(Exception):
    """A request the service cannot answer; ``status`` is the HTTP status (4xx)."""

    def __init__(self, status: int, message: str):
        message = clean_message(message)
        super().__init__(message)
        self.status = status
        self.message = message


def clean_message(message: str) -> str:
    """A message without object reprs (``<_io.BytesIO object at 0x...>`` → ``<object>``)."""
    return _REPR.sub("<object>", message)


@dataclass(frozen=True)
class Limits:
    """Per-request limits of a replica (from ``ServeConfig``, updatable through ``user_config``).

    ``bearer_token`` is resolved by ``resolve_bearer_token`` (environment or file), never read from
    the config.
    """

    max_image_pixels: int
    max_question_chars: int
    max_new_tokens: int
    bearer_token: str | None = None

    @classmethod
    def from_config(cls, cfg: ServeConfig, bearer_token: str | None = None) -> Limits:
        """The limits of a serve config, with the resolved token."""
        return cls(cfg.max_image_pixels, cfg.max_question_chars, cfg.max_new_tokens, bearer_token)

    @property
    def max_image_bytes(self) -> int:
        """Largest encoded image accepted (bytes)."""
        return _BYTES_PER_PIXEL * self.max_image_pixels + _HEADER_SLACK

    @property
    def max_body_bytes(self) -> int:
        """Largest request body: the base64 image, the question JSON-escaped (6 B/char), slack."""
        return self.max_image_bytes * 4 // 3 + 6 * self.max_question_chars + 4096


def resolve_bearer_token(cfg: ServeConfig, environ: dict[str, str] | None = None) -> str | None:
    """The API token: first line of ``serve.bearer_token_file``, else ``$PIXELLM_SERVE_TOKEN``.

    None (no auth) only when neither is set.

    Raises:
        ConfigError: the file cannot be read or is empty, or the variable is set but empty (auth
            was asked for with an empty token).
    """
    env = os.environ if environ is None else environ
    if cfg.bearer_token_file:
        path = Path(cfg.bearer_token_file).expanduser()
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(
                f"serve.bearer_token_file={str(path)!r} cannot be read "
                f"({type(err).__name__}: {getattr(err, 'strerror', None) or err})"
            ) from None
        token = lines[0].strip() if lines else ""
        if not token:
            raise ConfigError(
                f"serve.bearer_token_file={str(path)!r} is empty: auth was asked for with an "
                "empty token; write the token on its first line"
            )
        return token
    if TOKEN_ENV in env:
        token = env[TOKEN_ENV].strip()
        if not token:
            raise ConfigError(
                f"${TOKEN_ENV} is set but empty: auth was asked for with an empty token; set a "
                "token or unset the variable to serve without auth"
            )
        return token
    return None


class SegmentRequest(BaseModel):
    """Body of ``POST /v1/segment``. Types are strict: ``"5"`` is not an int."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image: StrictStr = Field(
        description="base64 of PNG/JPEG/WebP/BMP bytes (a data: URL prefix is ok)"
    )
    question: StrictStr = Field(description="question about the image, plain text")
    max_new_tokens: StrictInt | None = Field(
        None, description="generation budget (default: server)"
    )


class TargetOut(BaseModel):
    """One segmented target: the ``index``-th ``[SEG]`` of the answer text."""

    index: int
    rle: dict[str, Any]
    bbox: list[float]
    score: float


class SegmentResponse(BaseModel):
    """Body of a successful ``POST /v1/segment``."""

    text: str
    targets: list[TargetOut]


class ErrorResponse(BaseModel):
    """Body of every 4xx / 5xx answer."""

    error: str
    request_id: str | None = None


@dataclass(frozen=True)
class SegmentJob:
    """One validated request, ready for the batched model call.

    Attributes:
        image: ``(H, W, 3)`` uint8 RGB pixels.
        question: stripped question text.
        max_new_tokens: generation budget.
        answer: ground-truth answer for teacher-forced scoring, else None (generate).
    """

    image: np.ndarray
    question: str
    max_new_tokens: int
    answer: str | None = None


def check_bearer(header: str | None, token: str | None) -> None:
    """Check an ``Authorization`` header against the configured token (no token = open).

    Raises:
        RequestError: 401 when a token is configured and the header does not carry it.
    """
    if token is None:
        return
    if not header or not header.startswith("Bearer "):
        raise RequestError(401, "missing 'Authorization: Bearer <token>' header")
    if not hmac.compare_digest(header[len("Bearer ") :].encode(), token.encode()):
        raise RequestError(401, "bearer token is not valid")


def _sniff(data: bytes, where: str) -> str:
    for fmt, prefix, offset in _SIGNATURES:
        if data[offset : offset + len(prefix)] == prefix and (fmt != "WEBP" or data[:4] == b"RIFF"):
            return fmt
    seen = next((name for name, prefix in _OTHER_FORMATS if data.startswith(prefix)), None)
    raise RequestError(
        415,
        f"{where}: {'a ' + seen + ' image' if seen else 'bytes of an unknown type'} is not "
        "accepted; send PNG, JPEG, WebP or BMP",
    )


def _to_rgb8(img: Image.Image) -> np.ndarray:
    """Any decoded mode → ``(H, W, 3)`` uint8: 16-bit and float scaled, alpha on white."""
    mode = img.mode
    if mode.startswith("I") or mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        if mode == "F":
            finite = arr[np.isfinite(arr)]
            lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
            if lo < 0.0 or hi > 1.0:  # not a [0, 1] image: stretch its range
                arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
            arr = np.nan_to_num(arr, nan=0.0) * 255.0
        else:  # 16-bit (or 32-bit) integer samples, read as 16-bit
            arr = np.clip(arr, 0, 65535) / 257.0
        grey = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"), dtype=np.uint8)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def decode_image(data: bytes, max_pixels: int, where: str = "image") -> np.ndarray:
    """Decode encoded image bytes to RGB pixels, refusing images over the pixel limit.

    Only PNG, JPEG, WebP and BMP are opened (recognised by their signature, and Pillow is told to
    try that format only, so no other plugin, e.g. EPS via Ghostscript, ever runs). The size is
    read from the header before any pixel is decoded, so an oversized (or decompression-bomb)
    image costs nothing. See the module docstring for 16-bit, float and alpha handling.

    Args:
        data: the encoded bytes.
        max_pixels: largest allowed ``H * W``.
        where: name used in messages (the field or the sample id).

    Returns:
        ``(H, W, 3)`` uint8 array.

    Raises:
        RequestError: 415 for a format outside the allow-list, 400 when the bytes do not decode,
            413 when the image is too large.
    """
    fmt = _sniff(data, where)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=[fmt])
            w, h = img.size
            if w * h > max_pixels:
                raise RequestError(
                    413,
                    f"{where}: {w}x{h} = {w * h} pixels is over the limit of {max_pixels} "
                    "(serve.max_image_pixels); downscale the image",
                )
            img.load()
            pixels = _to_rgb8(img)
    except RequestError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise RequestError(413, f"{where}: {err}") from err
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as err:
        raise RequestError(
            400, f"{where}: bytes are not a decodable {fmt} image ({type(err).__name__}: {err})"
        ) from err
    if h == 0 or w == 0:
        raise RequestError(400, f"{where}: image has zero size {w}x{h}")
    return pixels


def check_question(question: str, control_strings: list[str], where: str = "question") -> None:
    """Refuse a question holding a model control string or invalid Unicode.

    Args:
        question: the stripped question.
        control_strings: the model's special tokens (``<image>``, codebook, BOS/EOS/...) and role
            markers; see ``PixelLMDeployment``.
        where: name used in messages.

    Raises:
        RequestError: 422 naming the offending string.
    """
    try:
        question.encode("utf-8")
    except UnicodeEncodeError as err:
        raise RequestError(
            422,
            f"'{where}' is not valid Unicode (lone surrogate at character {err.start}); "
            "send UTF-8 text",
        ) from None
    for s in control_strings:
        if s and s in question:
            raise RequestError(
                422,
                f"'{where}' contains the model control string {s!r} (special tokens and the chat "
                "template's role markers are not allowed in a question); remove it",
            )


def _b64_bytes(text: str, limits: Limits) -> bytes:
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]  # data:image/png;base64,<payload>
    if not text:
        raise RequestError(400, "'image' is empty; send the base64 of the image file bytes")
    limit = limits.max_image_bytes
    if len(text) * 3 // 4 > limit:
        raise RequestError(
            413, f"'image' is {len(text)} base64 chars, over the {limit}-byte limit for images"
        )
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise RequestError(400, f"'image' is not valid base64 ({err})") from err


def _format_validation(err: ValidationError) -> str:
    problems = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "body"
        if e["type"] == "missing":
            problems.append(f"'{field}' is required")
        elif e["type"] == "extra_forbidden":
            problems.append(f"'{field}' is not a field (expected image, question, max_new_tokens)")
        else:
            problems.append(f"'{field}': {e['msg']} (got {type(e.get('input')).__name__})")
    return "; ".join(problems)


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise RequestError(
            400, f"body has a {len(text)}-digit integer; integers have at most {MAX_INT_DIGITS}"
        )
    return int(text)


_STRINGS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')


def _check_depth(body: bytes) -> None:
    """Refuse nesting deeper than ``MAX_JSON_DEPTH`` (counted outside strings, before parsing)."""
    if body.count(b"[") + body.count(b"{") <= MAX_JSON_DEPTH:
        return  # fast path (a base64 image has no brackets): nothing can nest deeper
    depth = deepest = 0
    for ch in re.findall(rb"[\[\]{}]", _STRINGS.sub(b"", body)):
        depth += 1 if ch in (b"[", b"{") else -1
        deepest = max(deepest, depth)
        if deepest > MAX_JSON_DEPTH:
            raise RequestError(
                400, f"body nests arrays/objects deeper than {MAX_JSON_DEPTH} levels"
            )


def parse_json(body: bytes) -> Any:
    """JSON with limits: UTF-8, depth <= ``MAX_JSON_DEPTH``, integers <= ``MAX_INT_DIGITS`` digits.

    Raises:
        RequestError: 400 naming the problem.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RequestError(400, f"body is not valid UTF-8 JSON (byte {err.start})") from None
    _check_depth(body)
    try:
        return json.loads(text, parse_int=_bounded_int)
    except json.JSONDecodeError as err:
        raise RequestError(400, f"body is not valid JSON ({err})") from None
    except (ValueError, RecursionError) as err:
        raise RequestError(400, f"body is not valid JSON ({type(err).__name__}: {err})") from None


def parse_segment_request(
    body: bytes, limits: Limits, control_strings: list[str] | None = None
) -> SegmentJob:
    """Validate a raw ``/v1/segment`` body and decode its image.

    Args:
        body: the request body (JSON).
        limits: the replica's limits.
        control_strings: strings a question may not contain (``check_question``).

    Returns:
        A ``SegmentJob``.

    Raises:
        RequestError: 400 for bad JSON / base64 / image bytes, 413 for an oversized image, 415 for
            a format outside the allow-list, 422 for a missing, mistyped, out-of-range or
            control-string-bearing field.
    """
    obj = parse_json(body)
    if not isinstance(obj, dict):
        raise RequestError(422, f"body must be a JSON object, got {type(obj).__name__}")
    try:
        req = SegmentRequest.model_validate(obj)
    except ValidationError as err:
        raise RequestError(422, _format_validation(err)) from err
    question = req.question.strip()
    if not question:
        raise RequestError(422, "'question' is empty; ask something about the image")
    if len(question) > limits.max_question_chars:
        raise RequestError(
            422,
            f"'question' has {len(question)} characters, over the limit of "
            f"{limits.max_question_chars} (serve.max_question_chars)",
        )
    check_question(question, control_strings or [])
    max_new = limits.max_new_tokens if req.max_new_tokens is None else req.max_new_tokens
    if not 1 <= max_new <= limits.max_new_tokens:
        raise RequestError(
            422,
            f"'max_new_tokens'={max_new} is out of range [1, {limits.max_new_tokens}] "
            "(serve.max_new_tokens)",
        )
    pixels = decode_image(_b64_bytes(req.image, limits), limits.max_image_pixels)
    return SegmentJob(image=pixels, question=question, max_new_tokens=max_new)


def prediction_to_response(text: str, masks: list[dict], scores: list[float]) -> SegmentResponse:
    """Build the response of one prediction (masks are COCO RLE with ``counts`` a str)."""
    targets = []
    for k, (rle, score) in enumerate(zip(masks, scores, strict=True)):
        box = mask_utils.toBbox({"size": rle["size"], "counts": rle["counts"].encode()})
        targets.append(
            TargetOut(index=k, rle=rle, bbox=[float(v) for v in box], score=float(score))
        )
    return SegmentResponse(text=text, targets=targets)
