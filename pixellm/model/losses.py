"""Mask losses of PixelLM (paper section 3.2): DICE and the target refinement loss L_ref.

The full objective is ``L = λ_txt·L_txt + λ_ref·L_ref + λ_dice·L_dice``; the text cross-entropy
lives with the model, the two mask terms here.

Shape letters: K masks of one question (targets, in answer order), H x W mask pixels.

Departures from the authors' release (reference/official-implementation-facts.md), following the
paper: L_ref is one α-weighted BCE (the release added a second BCE on overlap pixels and then
disabled it after an integer-precedence crash), and DICE is the plain formula below (the release
divided the sums by a scale of 1000).

Precision: every loss here is computed in float32 whatever the model's dtype (bf16 under DeepSpeed)
or an enclosing ``torch.autocast``: the logits are cast up and autocast is switched off inside.

The score loss trains the score head (``pixel_decoder.MaskScoreHead``): the MSE between each mask's
predicted IoU and its measured IoU ``mask_iou`` (a detached target, as in SAM).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from functools import wraps
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "MaskLosses",
    "alignment_loss",
    "dice_loss",
    "mask_iou",
    "mask_losses",
    "refinement_loss",
    "refinement_weight_map",
    "score_loss",
]


def _fp32(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``fn`` with autocast off and every floating tensor argument cast to float32."""

    def up(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            return x.float()
        if isinstance(x, list):
            return [up(v) for v in x]
        return x

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with ExitStack() as stack:
            for device in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
                stack.enter_context(torch.autocast(device_type=device, enabled=False))
            return fn(*[up(a) for a in args], **{k: up(v) for k, v in kwargs.items()})

    return wrapper


@dataclass
class MaskLosses:
    """Mask losses of a batch, averaged over its masks.

    Attributes:
        ref: scalar L_ref (α-weighted BCE), mean over masks of the batch.
        dice: scalar DICE loss, mean over masks of the batch.
        num_masks: masks that entered the losses (0 gives graph-connected zeros).
    """

    ref: torch.Tensor
    dice: torch.Tensor
    num_masks: int


def _check_pair(logits: torch.Tensor, targets: torch.Tensor, where: str) -> None:
    if logits.dim() != 3 or tuple(logits.shape) != tuple(targets.shape):
        raise ValueError(
            f"{where}: mask logits shape {tuple(logits.shape)} != ground-truth shape "
            f"{tuple(targets.shape)} (both must be (K, H, W))"
        )


def _zero(logits: torch.Tensor) -> torch.Tensor:
    """A scalar 0 that keeps the graph connected when ``logits`` requires grad."""
    return logits.sum() * 0.0


@_fp32
def dice_loss(logits: torch.Tensor, targets: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """DICE loss, mean over masks.

    For each mask k with p = σ(logits_k) and t = targets_k, summing over its pixels i::

        dice_k = 1 - (2 · Σ_i p_i t_i + eps) / (Σ_i p_i + Σ_i t_i + eps)

    An empty prediction of an empty target scores 0 (eps / eps).

    Args:
        logits: ``(K, H, W)`` mask logits.
        targets: ``(K, H, W)`` ground truth in [0, 1].
        eps: smoothing term.

    Returns:
        Scalar mean of ``dice_k`` over K; 0 (graph-connected) when K = 0.

    Raises:
        ValueError: shapes differ or are not 3-D.
    """
    _check_pair(logits, targets, "dice_loss")
    if logits.shape[0] == 0:
        return _zero(logits)
    p = torch.sigmoid(logits).flatten(1)  # (K, H*W)
    t = targets.to(p.dtype).flatten(1)  # (K, H*W)
    numerator = 2 * (p * t).sum(1) + eps  # (K,)
    denominator = p.sum(1) + t.sum(1) + eps  # (K,)
    return (1 - numerator / denominator).mean()


def refinement_weight_map(logits: torch.Tensor, alpha: float) -> torch.Tensor:
    """The map A of paper section 3.2 for one question's masks (no gradient).

    ``A_i = α`` where at least two of the K predicted masks are positive (logit > 0) at pixel i,
    else 1.

    Args:
        logits: ``(K, H, W)`` mask logits of one question.
        alpha: weight of pixels claimed by ≥ 2 masks.

    Returns:
        ``(H, W)`` detached weights in the dtype of ``logits``.

    Raises:
        ValueError: ``logits`` is not 3-D.
    """
    if logits.dim() != 3:
        raise ValueError(
            f"refinement_weight_map expects (K, H, W) logits, got {tuple(logits.shape)}"
        )
    with torch.no_grad():
        positives = (logits.detach() > 0).sum(0)  # (H, W) masks claiming each pixel
        weights = torch.ones(logits.shape[1:], dtype=logits.dtype, device=logits.device)
        return weights.masked_fill(positives >= 2, alpha)  # (H, W)


@_fp32
def refinement_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float) -> torch.Tensor:
    """Target refinement loss L_ref of one question (paper section 3.2).

    ``L_ref = 1/(K·H·W) · Σ_k Σ_i A_i · BCE(logit_ki, target_ki)`` with A from
    ``refinement_weight_map`` (treated as a constant).

    Args:
        logits: ``(K, H, W)`` mask logits of one question.
        targets: ``(K, H, W)`` ground truth in [0, 1], same order as the logits.
        alpha: weight of pixels claimed by ≥ 2 predicted masks.

    Returns:
        Scalar L_ref; 0 (graph-connected) when K = 0.

    Raises:
        ValueError: shapes differ or are not 3-D.
    """
    _check_pair(logits, targets, "refinement_loss")
    if logits.shape[0] == 0:
        return _zero(logits)
    weights = refinement_weight_map(logits, alpha)  # (H, W)
    bce = F.binary_cross_entropy_with_logits(
        logits, targets.to(logits.dtype), reduction="none"
    )  # (K, H, W)
    return (bce * weights).mean()  # mean = 1/(K·H·W) Σ


@_fp32
def mask_losses(
    mask_logits: list[torch.Tensor], gt_masks: list[torch.Tensor], alpha: float
) -> MaskLosses:
    """L_ref and DICE of a batch of questions, averaged over all its masks.

    Each question gets its own weight map A (overlaps only count between masks of the same
    question); its losses are weighted by its mask count K_b, so the result is the mean over masks
    of the batch. Questions with K_b = 0 contribute nothing.

    Args:
        mask_logits: per question ``(K_b, H_b, W_b)`` logits, in answer order.
        gt_masks: per question ``(K_b, H_b, W_b)`` ground truth in [0, 1].
        alpha: L_ref weight of pixels claimed by ≥ 2 predicted masks.

    Returns:
        ``MaskLosses(ref, dice, num_masks)``.

    Raises:
        ValueError: the lists differ in length, or a question's shapes differ.
    """
    if len(mask_logits) != len(gt_masks):
        raise ValueError(
            f"{len(mask_logits)} questions of mask logits but {len(gt_masks)} of ground-truth masks"
        )
    for b, (logits, targets) in enumerate(zip(mask_logits, gt_masks, strict=True)):
        _check_pair(logits, targets, f"question {b}")
    zero = torch.zeros(())
    if mask_logits:  # graph-connected zero on the logits' device, so K = 0 batches backprop
        zero = sum((_zero(m) for m in mask_logits[1:]), _zero(mask_logits[0]))
    ref, dice, count = zero, zero, 0
    for logits, targets in zip(mask_logits, gt_masks, strict=True):
        k = logits.shape[0]
        if k == 0:
            continue
        ref = ref + k * refinement_loss(logits, targets, alpha)
        dice = dice + k * dice_loss(logits, targets)
        count += k
    if count:
        ref, dice = ref / count, dice / count
    return MaskLosses(ref=ref, dice=dice, num_masks=count)


@torch.no_grad()
def mask_iou(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """IoU of each predicted mask ``logits > 0`` with its target ``targets > 0.5``.

    Args:
        logits: ``(K, H, W)`` mask logits.
        targets: ``(K, H, W)`` ground truth in [0, 1].

    Returns:
        ``(K,)`` float32 IoU in [0, 1]; 1 where both masks are empty (the gIoU convention).
    """
    _check_pair(logits, targets, "mask_iou")
    pred = (logits > 0).flatten(1)  # (K, H*W)
    gt = (targets > 0.5).flatten(1)
    inter = (pred & gt).sum(1).float()
    union = (pred | gt).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


@_fp32
def score_loss(scores: torch.Tensor, ious: torch.Tensor) -> torch.Tensor:
    """MSE between predicted (``scores``, ``(K,)``) and measured (``ious``, ``(K,)``, detached)
    mask IoU; graph-connected 0 when K = 0.

    Raises:
        ValueError: the shapes differ.
    """
    if scores.shape != ious.shape:
        raise ValueError(f"scores {tuple(scores.shape)} != ious {tuple(ious.shape)}")
    if scores.numel() == 0:
        return scores.sum() * 0.0
    return F.mse_loss(scores, ious.detach())


@_fp32
def alignment_loss(target_tokens: torch.Tensor, regions: torch.Tensor, tau: float) -> torch.Tensor:
    """Target-region alignment: symmetric InfoNCE between each fused target token h_k and the mean
    decoder feature under its ground-truth mask, the other targets of the micro-batch (same image
    or not) being the negatives; averaged over the L scales. Not in the paper (see
    ``LossConfig.lambda_align``).

    Args:
        target_tokens: ``(K, L, C)`` fused target tokens h.
        regions: ``(K, L, C)`` ``region_features`` of the same targets.
        tau: softmax temperature of the cosine similarities.

    Returns:
        Scalar; a graph-connected 0 when K < 2 (nothing to contrast).

    Raises:
        ValueError: the shapes differ.
    """
    if target_tokens.shape != regions.shape or target_tokens.dim() != 3:
        raise ValueError(
            f"target tokens {tuple(target_tokens.shape)} and regions {tuple(regions.shape)} must "
            "both be (K, L, C)"
        )
    k, num_scales, _ = target_tokens.shape
    if k < 2:
        return (target_tokens.sum() + regions.sum()) * 0.0
    labels = torch.arange(k, device=target_tokens.device)
    total = target_tokens.new_zeros(())
    for level in range(num_scales):
        h = F.normalize(target_tokens[:, level], dim=-1)  # (K, C)
        r = F.normalize(regions[:, level], dim=-1)  # (K, C)
        sim = h @ r.T / tau  # (K, K): row k = target k against every region
        total = total + (F.cross_entropy(sim, labels) + F.cross_entropy(sim.T, labels)) / 2
    return total / num_scales
