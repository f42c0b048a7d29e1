"""The one shard row schema (DESIGN section 3) and the segmentation → RLE helpers every converter uses.

Shape notation: K = targets of a row, h x w = original image size.

One row = one conversation about one image. ``targets`` are in answer order: the k-th ``[SEG]`` of
the assistant text is the k-th target. Masks are COCO RLE as pycocotools produces them, with the
``counts`` bytes decoded to ``str``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np
import pyarrow as pa
import pycocotools.mask as mask_utils

__all__ = [
    "CORPUS_BY_FORMAT",
    "FORMATS",
    "SCHEMA_VERSION",
    "SHARD_SCHEMA",
    "TASKS",
    "BadSegmentation",
    "Reject",
    "RejectReason",
    "bbox_of_rle",
    "encode_mask",
    "rle_to_mask",
    "segmentation_to_rle",
]

SCHEMA_VERSION = 1
FORMATS = ("muse", "coco", "refer", "reasonseg", "llava")
CORPUS_BY_FORMAT = {
    "muse": "muse",
    "coco": "sem_seg",
    "refer": "refer_seg",
    "reasonseg": "reason_seg",
    "llava": "vqa",
}
TASKS = ("semseg", "refseg", "mrefseg", "reason", "vqa")

_RLE = pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.string())])
SHARD_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("corpus", pa.string()),
        ("split", pa.string()),
        ("task", pa.string()),
        ("image", pa.binary()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("conversation", pa.list_(pa.struct([("role", pa.string()), ("text", pa.string())]))),
        (
            "targets",
            pa.list_(
                pa.struct(
                    [
                        ("name", pa.string()),
                        ("description", pa.string()),
                        ("rle", _RLE),
                        ("bbox", pa.list_(pa.float32())),
                    ]
                )
            ),
        ),
        ("ignore", _RLE),
        ("meta", pa.string()),
    ]
)


class RejectReason(StrEnum):
    """The closed set of reasons a record is quarantined (table in ``pixellm/data/README.md``)."""

    # converters (pixellm.data.formats): the record itself
    MALFORMED_RECORD = "malformed_record"  # fails its format's record model
    INVALID_TEXT = "invalid_text"  # a string that is not valid UTF-8 (lone surrogate)
    DUPLICATE_ID = "duplicate_id"  # an id that must be unique repeats; every holder rejected
    BAD_REFERENCE = "bad_reference"  # points at an id that is missing or rejected
    IMAGE_PATH_ESCAPE = "image_path_escape"  # image name absolute or leaving --images
    NO_TARGET = "no_target"  # ReasonSeg file without a target shape
    # writer (pixellm.data.writer): the row built from it
    EMPTY_QUESTION = "empty_question"
    SEG_COUNT_MISMATCH = "seg_count_mismatch"
    IMAGE_MISSING = "image_missing"
    IMAGE_UNREADABLE = "image_unreadable"
    IMAGE_FORMAT = "image_format"
    IMAGE_TOO_LARGE = "image_too_large"
    IMAGE_SIZE_MISMATCH = "image_size_mismatch"
    MALFORMED_SEGMENTATION = "malformed_segmentation"
    SEGMENTATION_OUT_OF_BOUNDS = "segmentation_out_of_bounds"
    SEGMENTATION_SIZE_MISMATCH = "segmentation_size_mismatch"


@dataclass(frozen=True)
class Reject:
    """One quarantined input record: the file and record it came from, why, and the detail.

    ``record`` is the record's index or id inside ``file`` (``"[7]"``, ``"images[3]"``,
    ``"image 12"``); ``reason`` must be a ``RejectReason`` (an unknown code raises ValueError).
    """

    file: str
    record: str
    reason: RejectReason
    detail: str  # human-readable explanation naming the value seen
    sample_id: str | None = None
    split: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "reason", RejectReason(self.reason))

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "record": self.record,
            "reason": self.reason.value,
            "detail": self.detail,
            "sample_id": self.sample_id,
            "split": self.split,
        }


class BadSegmentation(ValueError):
    """A polygon or RLE that does not fit its image (``reason`` is the manifest code)."""

    def __init__(
        self, message: str, reason: RejectReason = RejectReason.SEGMENTATION_OUT_OF_BOUNDS
    ):
        super().__init__(message)
        self.reason = reason


def _check_polygons(polys: list, h: int, w: int) -> None:
    for i, poly in enumerate(polys):
        if not isinstance(poly, (list, tuple)) or len(poly) < 6 or len(poly) % 2:
            raise BadSegmentation(
                f"polygon {i} must be a flat [x0, y0, x1, y1, ...] list of >= 3 points, got "
                f"{str(poly)[:80]}",
                RejectReason.MALFORMED_SEGMENTATION,
            )
        xy = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
        if not np.isfinite(xy).all():
            raise BadSegmentation(
                f"polygon {i} has non-finite coordinates", RejectReason.MALFORMED_SEGMENTATION
            )
        # pycocotools silently clips outside points; a polygon outside the image is a wrong record.
        if (
            xy[:, 0].min() < -0.5
            or xy[:, 1].min() < -0.5
            or xy[:, 0].max() > w + 0.5
            or (xy[:, 1].max() > h + 0.5)
        ):
            raise BadSegmentation(
                f"polygon {i} spans x [{xy[:, 0].min():.1f}, {xy[:, 0].max():.1f}] y "
                f"[{xy[:, 1].min():.1f}, {xy[:, 1].max():.1f}], outside the {w}x{h} image"
            )


def segmentation_to_rle(seg: Any, h: int, w: int) -> dict[str, Any]:
    """COCO segmentation (polygons, uncompressed or compressed RLE) → one compressed RLE.

    Args:
        seg: a list of flat polygons, or ``{"size": [h, w], "counts": list | str}``.
        h: image height.
        w: image width.

    Returns:
        ``{"size": [h, w], "counts": str}`` (pycocotools' compressed counts, decoded to str).

    Raises:
        BadSegmentation: the segmentation is malformed or does not fit the ``h x w`` image.
    """
    if isinstance(seg, list):
        if not seg:
            raise BadSegmentation("empty polygon list", RejectReason.MALFORMED_SEGMENTATION)
        _check_polygons(seg, h, w)
        rle = mask_utils.merge(mask_utils.frPyObjects([list(map(float, p)) for p in seg], h, w))
    elif isinstance(seg, dict) and "size" in seg and "counts" in seg:
        size = list(seg["size"])
        if size != [h, w]:
            raise BadSegmentation(
                f"RLE size {size} != image (h, w)=({h}, {w})",
                RejectReason.SEGMENTATION_SIZE_MISMATCH,
            )
        counts = seg["counts"]
        if isinstance(counts, list):
            if sum(int(c) for c in counts) != h * w or any(int(c) < 0 for c in counts):
                raise BadSegmentation(
                    f"uncompressed RLE covers {sum(int(c) for c in counts)} pixels, image has "
                    f"{h * w}",
                    RejectReason.SEGMENTATION_SIZE_MISMATCH,
                )
            rle = mask_utils.frPyObjects({"size": size, "counts": counts}, h, w)
        elif isinstance(counts, (str, bytes)):
            raw = counts.encode() if isinstance(counts, str) else counts
            rle = {"size": size, "counts": raw}
            try:
                covered = _rle_pixels(raw)
            except ValueError as err:
                raise BadSegmentation(
                    f"corrupt RLE counts: {err}", RejectReason.MALFORMED_SEGMENTATION
                ) from None
            if covered > h * w:
                raise BadSegmentation(
                    f"RLE covers {covered} pixels, image has {h * w}",
                    RejectReason.SEGMENTATION_SIZE_MISMATCH,
                )
        else:
            raise BadSegmentation(
                f"RLE counts must be a list or str, got {type(counts).__name__}",
                RejectReason.MALFORMED_SEGMENTATION,
            )
    else:
        raise BadSegmentation(
            f"segmentation must be polygons or an RLE dict, got {type(seg).__name__}",
            RejectReason.MALFORMED_SEGMENTATION,
        )
    counts = rle["counts"]
    return {"size": [h, w], "counts": counts.decode() if isinstance(counts, bytes) else counts}


def _rle_pixels(counts: bytes) -> int:
    """Total run length of compressed COCO counts (LEB128-like, 5 bits per char, delta coded)."""
    total, runs, p = 0, [], 0
    while p < len(counts):
        x, k, more = 0, 0, True
        while more:
            if p >= len(counts):
                raise ValueError("truncated counts string")
            c = counts[p] - 48
            if c < 0 or c > 63:
                raise ValueError(f"byte {counts[p]} outside the RLE alphabet")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        if x < 0:
            raise ValueError("negative run length")
        runs.append(x)
        total += x
    return total


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """Binary ``(h, w)`` mask → ``{"size": [h, w], "counts": str}``."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode()}


def rle_to_mask(rle: dict[str, Any]) -> np.ndarray:
    """``{"size", "counts": str | bytes}`` → ``(h, w)`` uint8 mask in {0, 1}."""
    counts = rle["counts"]
    raw = counts.encode() if isinstance(counts, str) else counts
    return mask_utils.decode({"size": [int(s) for s in rle["size"]], "counts": raw})


def bbox_of_rle(rle: dict[str, Any]) -> list[float]:
    """Tight ``[x, y, w, h]`` box of an RLE (all zeros when the mask is empty)."""
    counts = rle["counts"]
    raw = counts.encode() if isinstance(counts, str) else counts
    return [float(v) for v in mask_utils.toBbox({"size": list(rle["size"]), "counts": raw})]
