"""Pixel overlaps and bipartite matching of predicted to ground-truth masks (paper §4.3).

Shapes: ``P`` predicted masks, ``G`` ground-truth masks, each ``(H, W)`` uint8 0/1; ``ignore`` is
``(H, W)`` with 1 on pixels excluded from every count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.optimize import linear_sum_assignment

__all__ = ["MatchMethod", "Overlaps", "iou_matrix", "match_masks", "overlaps"]

MatchMethod = Literal["iou", "bce_dice"]

# The released PixelLM matcher samples this many points per mask pair (Mask2Former's setting).
BCE_DICE_POINTS = 12_544
# Binary predictions are read as probabilities clipped to [EPS, 1 - EPS] so BCE stays finite.
_EPS = 1e-4


@dataclass
class Overlaps:
    """Pixel counts of every (prediction, target) pair with ignored pixels removed.

    Attributes:
        inter: ``(P, G)`` intersection areas.
        pred_area: ``(P,)`` predicted mask areas.
        gt_area: ``(G,)`` ground-truth mask areas.
    """

    inter: np.ndarray
    pred_area: np.ndarray
    gt_area: np.ndarray

    def union(self) -> np.ndarray:
        """``(P, G)`` union areas."""
        return self.pred_area[:, None] + self.gt_area[None, :] - self.inter


def overlaps(pred: np.ndarray, gt: np.ndarray, ignore: np.ndarray | None = None) -> Overlaps:
    """Intersection and area counts of ``(P, H, W)`` predictions against ``(G, H, W)`` targets.

    Args:
        pred: ``(P, H, W)`` 0/1 masks.
        gt: ``(G, H, W)`` 0/1 masks.
        ignore: ``(H, W)`` 0/1, pixels to leave out, or None.

    Returns:
        ``Overlaps`` with int64 counts.
    """
    keep = None if ignore is None else (ignore == 0).reshape(-1)
    hw = pred.shape[1] * pred.shape[2]
    p = pred.reshape(pred.shape[0], hw) != 0  # (P, HW)
    g = gt.reshape(gt.shape[0], hw) != 0  # (G, HW)
    if keep is not None:
        p, g = p & keep, g & keep
    # float64 matmul counts exactly up to 2**53 pixels and is far faster than integer matmul.
    inter = p.astype(np.float64) @ g.astype(np.float64).T  # (P, G)
    return Overlaps(
        inter=inter.astype(np.int64),
        pred_area=p.sum(axis=1, dtype=np.int64),
        gt_area=g.sum(axis=1, dtype=np.int64),
    )


def iou_matrix(ov: Overlaps) -> np.ndarray:
    """``(P, G)`` IoU; a pair whose union is empty (empty vs empty) has IoU 1."""
    union = ov.union()
    return np.where(union > 0, ov.inter / np.maximum(union, 1), 1.0)


def _bce_dice_cost(
    pred: np.ndarray, gt: np.ndarray, seed: int, num_points: int = BCE_DICE_POINTS
) -> np.ndarray:
    """``(P, G)`` BCE + DICE cost over ``num_points`` seeded random pixel samples.

    The released code samples points uniformly over the image (unseeded, bilinear on logits); the
    masks here are binary, so each point reads the nearest pixel and the RNG is seeded for
    reproducibility.
    """
    height, width = pred.shape[1:]
    rng = np.random.default_rng(seed)
    ys = np.minimum((rng.random(num_points) * height).astype(np.int64), height - 1)
    xs = np.minimum((rng.random(num_points) * width).astype(np.int64), width - 1)
    p = np.clip(pred[:, ys, xs].astype(np.float64), _EPS, 1 - _EPS)  # (P, N)
    t = gt[:, ys, xs].astype(np.float64)  # (G, N)
    # Mean binary cross-entropy of every prediction against every target: (P, G).
    bce = -(np.log(p) @ t.T + np.log(1 - p) @ (1 - t).T) / num_points
    dice = 1 - (2 * p @ t.T + 1) / (p.sum(1)[:, None] + t.sum(1)[None, :] + 1)
    return bce + dice


def match_masks(
    pred: np.ndarray,
    gt: np.ndarray,
    ignore: np.ndarray | None = None,
    method: MatchMethod = "iou",
    seed: int = 0,
) -> list[tuple[int, int]]:
    """Hungarian matching of predicted to ground-truth masks.

    Args:
        pred: ``(P, H, W)`` 0/1 predicted masks.
        gt: ``(G, H, W)`` 0/1 ground-truth masks.
        ignore: ``(H, W)`` pixels left out of the IoU, or None.
        method: ``"iou"`` maximises total IoU; ``"bce_dice"`` minimises the authors' point-sampled
            BCE + DICE cost.
        seed: RNG seed of the point sampling (``bce_dice`` only).

    Returns:
        ``min(P, G)`` pairs ``(pred_index, gt_index)`` sorted by prediction index.

    Raises:
        ValueError: for an unknown method.
    """
    if pred.shape[0] == 0 or gt.shape[0] == 0:
        return []
    if method == "iou":
        rows, cols = linear_sum_assignment(iou_matrix(overlaps(pred, gt, ignore)), maximize=True)
    elif method == "bce_dice":
        rows, cols = linear_sum_assignment(_bce_dice_cost(pred, gt, seed))
    else:
        raise ValueError(f"matching method {method!r} is not one of 'iou', 'bce_dice'")
    return sorted(zip(rows.tolist(), cols.tolist(), strict=True))
