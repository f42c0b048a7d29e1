"""Does the per-mask score mean something? Score vs IoU of every predicted mask, and a plot.

Each predicted mask is paired with the ground-truth mask the Hungarian matching of the MUSE
protocol gives it (``match_masks``, IoU); an unmatched prediction (more masks than targets, or a
question without target) has IoU 0. The summary is Spearman's rank correlation of score and IoU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pixellm.eval.data import BenchmarkSample, Prediction
from pixellm.eval.harness import prediction_masks
from pixellm.eval.matching import iou_matrix, match_masks, overlaps

__all__ = ["ScoreIoU", "plot_score_vs_iou", "score_iou_pairs"]


@dataclass
class ScoreIoU:
    """Scores and IoUs of every scored predicted mask (``(M,)`` each) and their Spearman rho."""

    scores: np.ndarray
    ious: np.ndarray

    @property
    def spearman(self) -> float | None:
        """Spearman's rho, None with fewer than 3 masks or a constant series."""
        from scipy.stats import spearmanr

        if len(self.scores) < 3 or np.ptp(self.scores) == 0 or np.ptp(self.ious) == 0:
            return None
        return float(spearmanr(self.scores, self.ious).statistic)


def score_iou_pairs(
    samples: list[BenchmarkSample], predictions: dict[str, Prediction], split: str | None = None
) -> ScoreIoU:
    """(score, IoU) of every predicted mask with a score, over ``samples`` (of ``split``)."""
    scores: list[float] = []
    ious: list[float] = []
    for sample in samples:
        pred = predictions.get(sample.sample_id)
        if pred is None or not pred.scores or (split and sample.split != split):
            continue
        pm = prediction_masks(pred, sample)
        iou = np.zeros(len(pred.masks))
        pairs = match_masks(pm, sample.masks, sample.ignore)
        if pairs:
            matrix = iou_matrix(overlaps(pm, sample.masks, sample.ignore))
            for p, g in pairs:
                iou[p] = matrix[p, g]
        scores += list(pred.scores)
        ious += iou.tolist()
    return ScoreIoU(np.asarray(scores, float), np.asarray(ious, float))


def plot_score_vs_iou(result: ScoreIoU, path: str | Path, title: str) -> Path:
    """Scatter of predicted score against measured IoU (one dot per mask) → PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.scatter(result.ious, result.scores, s=10, alpha=0.6)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="score = IoU")
    rho = result.spearman
    ax.set_xlabel("IoU with the matched target")
    ax.set_ylabel("predicted score")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(
        f"{title}\nSpearman ρ = {'–' if rho is None else f'{rho:.2f}'}, {len(result.ious)} masks"
    )
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
