"""Per-question scores and per-split gIoU / cIoU (DESIGN.md §5, paper §4.3).

``referring``: the k-th predicted mask pairs with the k-th target (a missing prediction is an empty
mask, extra predictions are not scored); gIoU = mean per-target IoU (empty vs empty = 1),
cIoU = Σ I / Σ U.

``muse``: Hungarian matching per question; each matched pair scores IoU × (rating / 10 with a
judge, else 1); unmatched masks on either side score 0; gIoU = Σ score / Σ max(#pred, #gt);
cIoU = Σ (I × rating / 10) / Σ U, where an unmatched mask adds its area to U.

Ignored pixels are removed from every intersection, union and area. Shapes: ``(P, H, W)``
predictions and ``(G, H, W)`` targets, uint8 0/1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from pixellm.eval.matching import MatchMethod, iou_matrix, match_masks, overlaps

__all__ = ["MatchedPair", "QuestionResult", "SplitMetrics", "score_muse", "score_referring"]

# Called with the matched (pred, gt) pairs worth rating; returns one rating 1..10 per pair.
Rater = Callable[[list[tuple[int, int]]], list[int]]


@dataclass
class MatchedPair:
    """One scored (prediction, target) pair; ``pred`` is -1 for a missing referring prediction."""

    pred: int
    gt: int
    iou: float
    inter: int
    union: int
    rating: int | None = None

    @property
    def weight(self) -> float:
        """Judge factor rating / 10, or 1 without a judge."""
        return 1.0 if self.rating is None else self.rating / 10


@dataclass
class QuestionResult:
    """Scores of one question: what it adds to its split's sums."""

    sample_id: str
    split: str
    n_pred: int
    n_gt: int
    pairs: list[MatchedPair]
    score: float  # Σ IoU (× rating / 10)
    denom: int  # referring: #gt; muse: max(#pred, #gt)
    inter: float  # Σ I (× rating / 10)
    union: int  # Σ U, unmatched areas included for muse
    missing: bool = False


@dataclass
class SplitMetrics:
    """Running sums of one split; ``to_dict`` gives the reported figures."""

    n_questions: int = 0
    n_targets: int = 0
    n_pred_masks: int = 0
    n_missing_predictions: int = 0
    n_no_target_questions: int = 0
    n_no_target_correct: int = 0
    score_sum: float = 0.0
    denom_sum: int = 0
    inter_sum: float = 0.0
    union_sum: int = 0

    def add(self, q: QuestionResult) -> None:
        """Add one question's sums."""
        self.n_questions += 1
        self.n_targets += q.n_gt
        self.n_pred_masks += q.n_pred
        self.n_missing_predictions += int(q.missing)
        if q.n_gt == 0:
            self.n_no_target_questions += 1
            self.n_no_target_correct += int(q.n_pred == 0)
        self.score_sum += q.score
        self.denom_sum += q.denom
        self.inter_sum += q.inter
        self.union_sum += q.union

    def merged(self, other: SplitMetrics) -> SplitMetrics:
        """Sums of both splits (e.g. test = test_less ∪ test_many)."""
        values = {k: v + getattr(other, k) for k, v in asdict(self).items()}
        return SplitMetrics(**values)

    def to_dict(self) -> dict[str, Any]:
        """gIoU, cIoU (None when undefined) and the counts, JSON-ready."""
        n_nt = self.n_no_target_questions
        return {
            "giou": self.score_sum / self.denom_sum if self.denom_sum else None,
            "ciou": self.inter_sum / self.union_sum if self.union_sum else None,
            "n_questions": self.n_questions,
            "n_targets": self.n_targets,
            "n_pred_masks": self.n_pred_masks,
            "no_target_accuracy": self.n_no_target_correct / n_nt if n_nt else None,
            "n_no_target_questions": n_nt,
            "n_missing_predictions": self.n_missing_predictions,
        }


def score_referring(
    sample_id: str, split: str, pred: np.ndarray, gt: np.ndarray, ignore: np.ndarray | None
) -> QuestionResult:
    """Score one referring question: the k-th prediction against the k-th target.

    Args:
        sample_id: benchmark id (kept in the result).
        split: split name (kept in the result).
        pred: ``(P, H, W)`` predicted masks.
        gt: ``(G, H, W)`` target masks.
        ignore: ``(H, W)`` ignored pixels, or None.

    Returns:
        The question's ``QuestionResult``; ``denom`` is ``G``.
    """
    n_pred, n_gt = pred.shape[0], gt.shape[0]
    padded = np.zeros_like(gt)
    k = min(n_pred, n_gt)
    padded[:k] = pred[:k]
    ov = overlaps(padded, gt, ignore)
    ious = iou_matrix(ov)
    unions = ov.union()
    pairs = [
        MatchedPair(
            pred=i if i < n_pred else -1,
            gt=i,
            iou=float(ious[i, i]),
            inter=int(ov.inter[i, i]),
            union=int(unions[i, i]),
        )
        for i in range(n_gt)
    ]
    return QuestionResult(
        sample_id=sample_id,
        split=split,
        n_pred=n_pred,
        n_gt=n_gt,
        pairs=pairs,
        score=sum(p.iou for p in pairs),
        denom=n_gt,
        inter=float(sum(p.inter for p in pairs)),
        union=sum(p.union for p in pairs),
    )


def score_muse(
    sample_id: str,
    split: str,
    pred: np.ndarray,
    gt: np.ndarray,
    ignore: np.ndarray | None,
    *,
    method: MatchMethod = "iou",
    seed: int = 0,
    rater: Rater | None = None,
) -> QuestionResult:
    """Score one MUSE question: Hungarian matching, unmatched = 0, optional judge factor.

    Args:
        sample_id: benchmark id (kept in the result).
        split: split name (kept in the result).
        pred: ``(P, H, W)`` predicted masks.
        gt: ``(G, H, W)`` target masks.
        ignore: ``(H, W)`` ignored pixels, or None.
        method: matching cost, ``"iou"`` or ``"bce_dice"``.
        seed: point-sampling seed for ``"bce_dice"``.
        rater: judge callback for the matched pairs with IoU > 0 (the others score 0 anyway).

    Returns:
        The question's ``QuestionResult``; ``denom`` is ``max(P, G)``.
    """
    ov = overlaps(pred, gt, ignore)
    ious = iou_matrix(ov)
    unions = ov.union()
    pairs = [
        MatchedPair(p, g, float(ious[p, g]), int(ov.inter[p, g]), int(unions[p, g]))
        for p, g in match_masks(pred, gt, ignore, method=method, seed=seed)
    ]
    if rater is not None:
        rated = [pair for pair in pairs if pair.iou > 0]
        for pair, rating in zip(rated, rater([(p.pred, p.gt) for p in rated]), strict=True):
            pair.rating = rating
        for pair in pairs:
            if pair.iou <= 0:
                pair.rating = 0
    matched_pred = {p.pred for p in pairs}
    matched_gt = {p.gt for p in pairs}
    unmatched_area = sum(int(a) for i, a in enumerate(ov.pred_area) if i not in matched_pred)
    unmatched_area += sum(int(a) for j, a in enumerate(ov.gt_area) if j not in matched_gt)
    return QuestionResult(
        sample_id=sample_id,
        split=split,
        n_pred=pred.shape[0],
        n_gt=gt.shape[0],
        pairs=pairs,
        score=sum(p.iou * p.weight for p in pairs),
        denom=max(pred.shape[0], gt.shape[0]),
        inter=sum(p.inter * p.weight for p in pairs),
        union=sum(p.union for p in pairs) + unmatched_area,
    )
