"""Benchmark shards and prediction files, read for scoring.

A benchmark is a shards directory written by the converters: ``SHARDS_DIR/<split>/part-*.parquet``
(one row = one question about one image; see DESIGN.md §3). Masks are decoded to numpy arrays of
shape ``(K, H, W)`` (``K`` targets, ``H`` x ``W`` image pixels), dtype ``uint8`` with values 0/1.

Predictions are JSON Lines, one object per benchmark sample::

    {"sample_id": "muse-val-000017", "text": "Use the [SEG] and the [SEG].",
     "masks": [{"size": [H, W], "counts": "<pycocotools RLE string>"}, ...],
     "scores": [0.93, 0.71]}

``text`` holds one ``[SEG]`` per predicted mask, in the order of ``masks``; ``scores`` is optional.
A benchmark sample without a line is scored as an empty prediction (no text, no mask) and counted.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from pycocotools import mask as mask_utils

__all__ = [
    "BenchmarkSample",
    "EvalInputError",
    "PLACEHOLDER",
    "Prediction",
    "decode_rle",
    "encode_mask",
    "find_splits",
    "iter_benchmark",
    "load_benchmark",
    "load_predictions",
]

# The user-facing target placeholder, equal to ``pixellm.model.codebook.PLACEHOLDER``. Defined here
# so that scoring never imports torch / transformers (a test checks that the two agree).
PLACEHOLDER = "[SEG]"

_ROW_COLUMNS = (
    "sample_id",
    "split",
    "task",
    "height",
    "width",
    "conversation",
    "targets",
    "ignore",
)


class EvalInputError(ValueError):
    """A benchmark or prediction file that cannot be scored; the message names the file and line."""


@dataclass
class BenchmarkSample:
    """One benchmark question with its decoded ground truth.

    Attributes:
        sample_id: stable id shared with the predictions file.
        split: the split directory the row came from (``val``, ``test_less``, ...).
        task: ``semseg | refseg | mrefseg | reason | vqa``.
        question: text of the first user turn.
        answer: text of the first assistant turn (one ``[SEG]`` per target).
        height: image height H.
        width: image width W.
        masks: ground-truth masks, ``(K, H, W)`` uint8, in answer order.
        descriptions: one description per target (the name when the description is empty).
        ignore: ``(H, W)`` uint8, 1 where pixels are excluded from scoring, or None.
        image: encoded image bytes, or None when loaded without images.
    """

    sample_id: str
    split: str
    task: str
    question: str
    answer: str
    height: int
    width: int
    masks: np.ndarray
    descriptions: list[str]
    ignore: np.ndarray | None = None
    image: bytes | None = None


@dataclass
class Prediction:
    """A model's answer to one benchmark question.

    Attributes:
        sample_id: id of the benchmark sample.
        text: generated answer with one ``[SEG]`` per mask, in order.
        masks: pycocotools RLE dicts ``{"size": [H, W], "counts": str}``, in answer order.
        scores: optional confidence per mask.
    """

    sample_id: str
    text: str = ""
    masks: list[dict[str, Any]] = field(default_factory=list)
    scores: list[float] | None = None


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """Encode one ``(H, W)`` binary mask as a JSON-ready RLE dict (``counts`` a str).

    Args:
        mask: ``(H, W)`` array; non-zero pixels are foreground.

    Returns:
        ``{"size": [H, W], "counts": str}`` as pycocotools writes it.
    """
    rle = mask_utils.encode(np.asfortranarray((mask != 0).astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode_rle(rle: Any, height: int, width: int, where: str) -> np.ndarray:
    """Decode one RLE dict to an ``(H, W)`` uint8 mask, checking it against the image size.

    Args:
        rle: ``{"size": [H, W], "counts": str | bytes}``.
        height: expected H.
        width: expected W.
        where: location used in error messages (``file:line`` and which mask).

    Returns:
        ``(H, W)`` uint8 array of 0/1.

    Raises:
        EvalInputError: when the RLE is malformed or its size differs from ``(height, width)``.
    """
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise EvalInputError(f"{where}: expected an RLE object {{size, counts}}, got {rle!r:.80}")
    size = rle["size"]
    if not isinstance(size, list | tuple) or [int(s) for s in size] != [height, width]:
        raise EvalInputError(
            f"{where}: RLE size {size} != image (H, W)=({height}, {width}); "
            "encode masks at the original image resolution"
        )
    counts = rle["counts"]
    if not isinstance(counts, str | bytes):
        raise EvalInputError(
            f"{where}: RLE counts must be the compressed string pycocotools writes, "
            f"got {type(counts).__name__}"
        )
    try:
        with warnings.catch_warnings():
            # pycocotools' Cython decoder trips numpy 2's copy-keyword DeprecationWarning per call.
            warnings.simplefilter("ignore", DeprecationWarning)
            mask = mask_utils.decode({"size": [height, width], "counts": counts})
    except (ValueError, TypeError) as err:
        raise EvalInputError(f"{where}: cannot decode RLE counts {counts!r:.40}: {err}") from err
    return np.ascontiguousarray(mask, dtype=np.uint8)


def find_splits(benchmark_dir: str | Path) -> list[str]:
    """Names of the split directories of a shards directory that hold ``part-*.parquet`` files."""
    root = Path(benchmark_dir)
    if not root.is_dir():
        raise EvalInputError(f"{root}: benchmark directory not found; pass the SHARDS_DIR")
    return sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.glob("part-*.parquet")))


def _question_and_answer(conversation: Any, where: str) -> tuple[str, str]:
    if not isinstance(conversation, list):
        raise EvalInputError(f"{where}: conversation is {type(conversation).__name__}, not a list")
    users = [t["text"] for t in conversation if t and t.get("role") in ("user", "human")]
    answers = [t["text"] for t in conversation if t and t.get("role") in ("assistant", "gpt")]
    if not users or not isinstance(users[0], str):
        raise EvalInputError(f"{where}: conversation has no user turn; the question is missing")
    return users[0], (answers[0] if answers and isinstance(answers[0], str) else "")


def _sample_from_row(row: dict[str, Any], split: str, where: str) -> BenchmarkSample:
    height, width = int(row["height"]), int(row["width"])
    question, answer = _question_and_answer(row["conversation"], where)
    targets = row["targets"] or []
    masks = np.zeros((len(targets), height, width), dtype=np.uint8)
    descriptions = []
    for k, target in enumerate(targets):
        masks[k] = decode_rle(target["rle"], height, width, f"{where}: target {k}")
        descriptions.append(target.get("description") or target.get("name") or f"target {k + 1}")
    ignore = None
    if row.get("ignore") is not None:
        ignore = decode_rle(row["ignore"], height, width, f"{where}: ignore")
    return BenchmarkSample(
        sample_id=str(row["sample_id"]),
        split=split,
        task=str(row.get("task") or ""),
        question=question,
        answer=answer,
        height=height,
        width=width,
        masks=masks,
        descriptions=descriptions,
        ignore=ignore,
        image=row.get("image"),
    )


def iter_benchmark(
    benchmark_dir: str | Path, splits: list[str] | None = None, with_images: bool = True
) -> Iterator[BenchmarkSample]:
    """Stream the samples of a shards directory, split by split, decoding masks row by row.

    Args:
        benchmark_dir: the SHARDS_DIR holding ``<split>/part-*.parquet``.
        splits: split names to read; None reads every split present.
        with_images: also read the encoded image bytes (needed for overlays only).

    Yields:
        One ``BenchmarkSample`` per row.

    Raises:
        EvalInputError: for a missing split, a missing column or an undecodable row.
    """
    root = Path(benchmark_dir)
    present = find_splits(root)
    wanted = present if splits is None else list(splits)
    missing = [s for s in wanted if s not in present]
    if missing:
        raise EvalInputError(
            f"{root}: split(s) {missing} not found; splits present: {present or 'none'}"
        )
    columns = list(_ROW_COLUMNS) + (["image"] if with_images else [])
    for split in wanted:
        for path in sorted((root / split).glob("part-*.parquet")):
            shard = pq.ParquetFile(path)
            absent = [c for c in columns if c not in shard.schema_arrow.names]
            if absent:
                raise EvalInputError(f"{path}: missing column(s) {absent}; re-run the converter")
            row_index = 0
            for batch in shard.iter_batches(batch_size=64, columns=columns):
                for row in batch.to_pylist():
                    yield _sample_from_row(row, split, f"{path}: row {row_index}")
                    row_index += 1


def load_benchmark(
    benchmark_dir: str | Path, splits: list[str] | None = None, with_images: bool = True
) -> list[BenchmarkSample]:
    """Read every sample of the given splits (see ``iter_benchmark``) into a list."""
    return list(iter_benchmark(benchmark_dir, splits, with_images=with_images))


def _prediction_from_obj(obj: Any, where: str) -> Prediction:
    if not isinstance(obj, dict):
        raise EvalInputError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    sample_id = obj.get("sample_id")
    if not isinstance(sample_id, str) or not sample_id:
        raise EvalInputError(f"{where}: 'sample_id' must be a non-empty string, got {sample_id!r}")
    text = obj.get("text", "")
    if not isinstance(text, str):
        raise EvalInputError(f"{where}: 'text' must be a string, got {type(text).__name__}")
    masks = obj.get("masks", [])
    if not isinstance(masks, list) or not all(isinstance(m, dict) for m in masks):
        raise EvalInputError(f"{where}: 'masks' must be a list of RLE objects {{size, counts}}")
    scores = obj.get("scores")
    if scores is not None:
        ok = isinstance(scores, list) and all(
            isinstance(s, int | float) and not isinstance(s, bool) for s in scores
        )
        if not ok or len(scores) != len(masks):
            raise EvalInputError(
                f"{where}: 'scores' must be a list of {len(masks)} numbers (one per mask)"
            )
        scores = [float(s) for s in scores]
    return Prediction(sample_id=sample_id, text=text, masks=masks, scores=scores)


def load_predictions(path: str | Path) -> dict[str, Prediction]:
    """Read a predictions JSONL file (format in the module docstring).

    Blank lines are skipped. RLE masks are checked against the image size when scored.

    Args:
        path: the ``.jsonl`` file.

    Returns:
        Predictions keyed by ``sample_id``.

    Raises:
        EvalInputError: for a missing file, a line that is not a prediction object, or a
            ``sample_id`` given twice (naming both lines).
    """
    path = Path(path)
    if not path.is_file():
        raise EvalInputError(f"{path}: predictions file not found")
    predictions: dict[str, Prediction] = {}
    first_line: dict[str, int] = {}
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise EvalInputError(f"{where}: not valid JSON ({err.msg})") from err
            pred = _prediction_from_obj(obj, where)
            if pred.sample_id in predictions:
                raise EvalInputError(
                    f"{where}: sample_id {pred.sample_id!r} already predicted on line "
                    f"{first_line[pred.sample_id]}; keep one line per sample"
                )
            predictions[pred.sample_id] = pred
            first_line[pred.sample_id] = lineno
    return predictions
