"""Score a predictions file against a benchmark shards directory (``pixellm evaluate``).

``evaluate_predictions`` is the one entry point; Serve batch scoring calls it with in-memory
predictions. Splits are reported as found (``val``, ``test_less``, ``test_many``, ...); when both
``test_less`` and ``test_many`` are scored, ``test`` = their union is added (unless a ``test`` split
exists).

Predictions whose ``sample_id`` is not in the scored splits are skipped with a warning and counted
(``n_unknown_predictions``): a file may cover more splits than the ones asked for. If none of the
predictions match a scored sample, the files do not belong together and it is an error.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pixellm.eval.data import (
    PLACEHOLDER,
    BenchmarkSample,
    EvalInputError,
    Prediction,
    decode_rle,
    iter_benchmark,
    load_predictions,
)
from pixellm.eval.judge import Judge
from pixellm.eval.matching import MatchMethod
from pixellm.eval.metrics import QuestionResult, Rater, SplitMetrics, score_muse, score_referring

__all__ = ["EvalReport", "EvalProtocol", "evaluate_predictions", "prediction_masks"]

EvalProtocol = Literal["muse", "referring"]
PROTOCOLS: tuple[str, ...] = ("muse", "referring")


@dataclass
class EvalReport:
    """Result of scoring one predictions set.

    Attributes:
        protocol: ``"muse"`` or ``"referring"``.
        matching: matching cost used for ``muse`` (``"iou"`` or ``"bce_dice"``).
        splits: metrics per split name (plus ``test`` when both test halves were scored).
        judge: description of the judge (``{"name": "none"}`` without one).
        questions: per-question results keyed by sample id (for overlays and debugging).
        n_unknown_predictions: predictions whose sample id is not in the scored splits.
        n_placeholder_mismatch: predictions whose ``[SEG]`` count differs from their mask count.
    """

    protocol: str
    matching: str
    splits: dict[str, SplitMetrics]
    judge: dict[str, Any]
    questions: dict[str, QuestionResult] = field(default_factory=dict, repr=False)
    n_unknown_predictions: int = 0
    n_placeholder_mismatch: int = 0

    def to_dict(self) -> dict[str, Any]:
        """``{"protocol", "matching", "splits": {name: {giou, ciou, n_questions, ...}}, "judge",
        "n_unknown_predictions", "n_placeholder_mismatch"}``, JSON-ready."""
        return {
            "protocol": self.protocol,
            "matching": self.matching,
            "splits": {name: m.to_dict() for name, m in self.splits.items()},
            "judge": self.judge,
            "n_unknown_predictions": self.n_unknown_predictions,
            "n_placeholder_mismatch": self.n_placeholder_mismatch,
        }


def prediction_masks(pred: Prediction, sample: BenchmarkSample) -> np.ndarray:
    """Decode a prediction's RLE masks to ``(P, H, W)`` uint8, checked against the sample's size.

    Raises:
        EvalInputError: for a malformed RLE or a size that is not the image's.
    """
    out = np.zeros((len(pred.masks), sample.height, sample.width), dtype=np.uint8)
    for k, rle in enumerate(pred.masks):
        where = f"prediction for sample_id {pred.sample_id!r}: mask {k}"
        out[k] = decode_rle(rle, sample.height, sample.width, where)
    return out


def _rater(judge: Judge, sample: BenchmarkSample, pred: Prediction) -> Rater:
    def rate(pairs: list[tuple[int, int]]) -> list[int]:
        targets = [(p, sample.descriptions[g]) for p, g in pairs]
        return judge.rate(sample.question, pred.text, targets) if targets else []

    return rate


def _check_args(protocol: str, judge: Judge | None, matching: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol {protocol!r} is not one of {PROTOCOLS}")
    if judge is not None and protocol != "muse":
        raise ValueError(
            "a judge rates matched targets of the 'muse' protocol only; use judge=None"
        )
    if matching not in ("iou", "bce_dice"):
        raise ValueError(f"matching {matching!r} is not one of 'iou', 'bce_dice'")


def _with_test_union(splits: dict[str, SplitMetrics]) -> dict[str, SplitMetrics]:
    """Add ``test`` = less ∪ many, and order val, test_less, test_many, test, then the rest."""
    if "test_less" in splits and "test_many" in splits and "test" not in splits:
        splits["test"] = splits["test_less"].merged(splits["test_many"])
    first = [s for s in ("val", "test_less", "test_many", "test") if s in splits]
    return {s: splits[s] for s in first + [s for s in splits if s not in first]}


def _score_sample(
    sample: BenchmarkSample,
    pred: Prediction,
    protocol: str,
    judge: Judge | None,
    matching: MatchMethod,
    seed: int,
) -> QuestionResult:
    pm = prediction_masks(pred, sample)
    if protocol == "referring":
        return score_referring(sample.sample_id, sample.split, pm, sample.masks, sample.ignore)
    rater = _rater(judge, sample, pred) if judge is not None else None
    return score_muse(
        sample.sample_id,
        sample.split,
        pm,
        sample.masks,
        sample.ignore,
        method=matching,
        seed=seed,
        rater=rater,
    )


def evaluate_predictions(
    benchmark_dir: str | Path,
    predictions: dict[str, Prediction] | str | Path,
    protocol: str,
    splits: list[str] | None = None,
    judge: Judge | None = None,
    *,
    matching: MatchMethod = "iou",
    seed: int = 0,
) -> EvalReport:
    """Score predictions against a benchmark.

    Args:
        benchmark_dir: SHARDS_DIR with ``<split>/part-*.parquet``.
        predictions: predictions keyed by sample id, or the path of a predictions JSONL file.
        protocol: ``"muse"`` (Hungarian matching, paper §4.3) or ``"referring"`` (in order).
        splits: split names to score; None scores every split present.
        judge: rates matched targets (``muse`` only); None scores IoU only.
        matching: ``"iou"`` or the authors' ``"bce_dice"`` cost (``muse`` only).
        seed: point-sampling seed of ``"bce_dice"``.

    Returns:
        An ``EvalReport``.

    Raises:
        ValueError: for an unknown protocol or matching, or a judge with ``referring``.
        EvalInputError: for unreadable inputs, or predictions that match no benchmark sample.
        JudgeError: when the judge fails.
    """
    _check_args(protocol, judge, matching)
    preds = load_predictions(predictions) if isinstance(predictions, str | Path) else predictions
    metrics: dict[str, SplitMetrics] = {}
    questions: dict[str, QuestionResult] = {}
    mismatch = 0
    for sample in iter_benchmark(benchmark_dir, splits, with_images=False):
        pred = preds.get(sample.sample_id)
        missing = pred is None
        pred = pred if pred is not None else Prediction(sample_id=sample.sample_id)
        mismatch += int(not missing and pred.text.count(PLACEHOLDER) != len(pred.masks))
        q = _score_sample(sample, pred, protocol, judge, matching, seed)
        q.missing = missing
        metrics.setdefault(sample.split, SplitMetrics()).add(q)
        questions[sample.sample_id] = q
    unknown = [sid for sid in preds if sid not in questions]
    if preds and len(unknown) == len(preds):
        raise EvalInputError(
            f"none of the {len(preds)} predictions (e.g. {unknown[0]!r}) is a sample of "
            f"{benchmark_dir} splits {sorted(metrics) or splits}; check --benchmark and --split"
        )
    if unknown:
        warnings.warn(
            f"{len(unknown)} prediction(s) not in the scored splits were skipped "
            f"(e.g. {unknown[0]!r})",
            stacklevel=2,
        )
    return EvalReport(
        protocol=protocol,
        matching=matching if protocol == "muse" else "in_order",
        splits=_with_test_union(metrics),
        judge=judge.describe() if judge is not None else {"name": "none"},
        questions=questions,
        n_unknown_predictions=len(unknown),
        n_placeholder_mismatch=mismatch,
    )
