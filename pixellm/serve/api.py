"""The HTTP JSON API of the PixelLM Serve application: request parsing, limits and responses.

``POST /v1/segment`` takes ``{"image": base64, "question": str, "max_new_tokens"?: int}`` and returns
``{"text", "targets": [{"index", "rle", "bbox", "score"}]}`` where ``rle`` is a COCO RLE of the mask
at the original image size (``counts`` a str), ``bbox`` its ``[x, y, w, h]`` box in pixels and
``score`` the decoder's confidence. The k-th target belongs to the k-th ``[SEG]`` of ``text``.

Every problem with a request is a ``RequestError`` carrying a 4xx status and a message that names the
field, the value seen and what is expected; the app turns it into ``{"error": message}``. Nothing here
needs Ray, so the checks are unit-testable in-process.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import io
import json
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_utils
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from pixellm.config import ServeConfig

__all__ = [
    "DEPLOYMENT_NAME",
    "ErrorResponse",
    "Limits",
    "RequestError",
    "SegmentJob",
    "SegmentRequest",
    "SegmentResponse",
    "TargetOut",
    "check_bearer",
    "decode_image",
    "parse_segment_request",
    "prediction_to_response",
]

DEPLOYMENT_NAME = "PixelLM"  # the deployment of the app, for serve.get_deployment_handle

# Encoded bytes allowed per pixel of the limit: PNG of RGB noise is ~3 B/px; headers add a little.
_BYTES_PER_PIXEL = 4
_HEADER_SLACK = 64 * 1024


class RequestError(Exception):
    """A request the service cannot answer; ``status`` is the HTTP status (4xx)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Limits:
    """Per-request limits of a replica (from ``ServeConfig``, updatable through ``user_config``)."""

    max_image_pixels: int
    max_question_chars: int
    max_new_tokens: int
    bearer_token: str | None = None

    @classmethod
    def from_config(cls, cfg: ServeConfig) -> Limits:
        """The limits of a serve config."""
        return cls(
            cfg.max_image_pixels, cfg.max_question_chars, cfg.max_new_tokens, cfg.bearer_token
        )


class SegmentRequest(BaseModel):
    """Body of ``POST /v1/segment``. Types are strict: ``"5"`` is not an int."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image: StrictStr = Field(description="base64 of PNG/JPEG/... bytes (a data: URL prefix is ok)")
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


def decode_image(data: bytes, max_pixels: int, where: str = "image") -> np.ndarray:
    """Decode encoded image bytes to RGB pixels, refusing images over the pixel limit.

    The size is read from the header before any pixel is decoded, so an oversized (or
    decompression-bomb) image costs nothing.

    Args:
        data: PNG / JPEG / ... bytes.
        max_pixels: largest allowed ``H * W``.
        where: name used in messages (the field or the sample id).

    Returns:
        ``(H, W, 3)`` uint8 array.

    Raises:
        RequestError: 400 when the bytes are not a decodable image, 413 when it is too large.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise RequestError(
                    413,
                    f"{where}: {w}x{h} = {w * h} pixels is over the limit of {max_pixels} "
                    "(serve.max_image_pixels); downscale the image",
                )
            rgb = img.convert("RGB")
    except RequestError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise RequestError(400, f"{where}: bytes are not a decodable image ({err})") from err
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise RequestError(413, f"{where}: {err}") from err
    if h == 0 or w == 0:
        raise RequestError(400, f"{where}: image has zero size {w}x{h}")
    return np.asarray(rgb, dtype=np.uint8)


def _b64_bytes(text: str, max_pixels: int) -> bytes:
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]  # data:image/png;base64,<payload>
    if not text:
        raise RequestError(400, "'image' is empty; send the base64 of the image file bytes")
    limit = _BYTES_PER_PIXEL * max_pixels + _HEADER_SLACK
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


def parse_segment_request(body: bytes, limits: Limits) -> SegmentJob:
    """Validate a raw ``/v1/segment`` body and decode its image.

    Args:
        body: the request body (JSON).
        limits: the replica's limits.

    Returns:
        A ``SegmentJob``.

    Raises:
        RequestError: 400 for bad JSON / base64 / image bytes, 413 for an oversized image, 422 for
            a missing, mistyped or out-of-range field.
    """
    try:
        obj = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RequestError(400, f"body is not valid JSON ({err})") from err
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
    max_new = limits.max_new_tokens if req.max_new_tokens is None else req.max_new_tokens
    if not 1 <= max_new <= limits.max_new_tokens:
        raise RequestError(
            422,
            f"'max_new_tokens'={max_new} is out of range [1, {limits.max_new_tokens}] "
            "(serve.max_new_tokens)",
        )
    pixels = decode_image(_b64_bytes(req.image, limits.max_image_pixels), limits.max_image_pixels)
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
