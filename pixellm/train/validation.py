"""Validation during training: teacher-forced mask gIoU on a fixed val subset (``val/giou``).

Every ``train.eval_every`` optimizer steps each rank runs its share of a fixed subset of
``train.eval_samples`` val samples that have at least one target (the first ones of a seed-0 plan
of ``data.val_split`` over the corpora of the training mixture that have that split): rank r takes samples r, r + world, …. The masks
are decoded teacher-forced (from the ground-truth answer, as ``learning.teacher_forced_giou``),
scored per question with ``question_giou`` (Σ IoU / max(#pred, #gt)), and the sums are all-reduced,
so every rank runs the same number of forward passes (ZeRO-3 gathers parameters collectively; a
rank with fewer samples repeats its last one with weight 0).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from pixellm.config import DataConfig, Recipe

__all__ = ["ValSubset", "load_val_subset", "val_data", "validate_giou"]

_MODEL_KEYS = ("pixel_values", "valid_hw", "input_ids", "attention_mask", "labels", "gt_masks")
ValSubset = list[tuple[dict[str, Any], float]]  # (one-sample batch, weight)


def val_data(data: DataConfig) -> DataConfig:
    """``data`` with the mixture cut to the corpora that have ``data.val_split`` shards.

    Raises:
        DataError: no corpus of the mixture has a val split.
    """
    from pixellm.data.formats import DataError
    from pixellm.data.shards import read_manifest

    root = data.shards_root.rstrip("/")
    have = {
        k: v
        for k, v in data.mixture.items()
        if v > 0
        and ((read_manifest(f"{root}/{k}") or {}).get("splits", {}).get(data.val_split) or {}).get(
            "rows"
        )
    }
    if not have:
        raise DataError(
            f"train.eval_every > 0 but no corpus of data.mixture has {data.val_split!r} shards under "
            f"{root}; build val shards or set train.eval_every=0"
        )
    return data.model_copy(update={"mixture": have})


def load_val_subset(recipe: Recipe, rank: int, world: int) -> ValSubset:
    """This rank's share of the fixed val subset, preprocessed and collated one sample per batch.

    Raises:
        DataError: no corpus of the mixture has shards for ``data.val_split``.
        RuntimeError: the val split has fewer than ``world`` samples with targets.
    """
    from pixellm.data.collate import collate_batch
    from pixellm.data.stream import PreprocessBatch, fetch_rows, make_plan, rows_to_columns

    n = recipe.train.eval_samples
    plan = make_plan(val_data(recipe.data), recipe.data.val_split, 4 * n + 16, seed=0)
    pre = PreprocessBatch(recipe.model, recipe.data)
    rows = [r for r in pre.process_rows(fetch_rows(plan).to_pylist()) if r["num_targets"] > 0][:n]
    if len(rows) < world:
        raise RuntimeError(
            f"val split {recipe.data.val_split!r} gave {len(rows)} samples with targets, fewer than "
            f"the {world} workers; set train.eval_every=0 or add val shards"
        )
    mine = rows[rank::world]
    per_rank = math.ceil(len(rows) / world)
    weighted = [(r, 1.0) for r in mine] + [(mine[-1], 0.0)] * (per_rank - len(mine))
    return [(collate_batch(rows_to_columns([r], recipe.model.image_size)), w) for r, w in weighted]


def validate_giou(engine: Any, subset: ValSubset) -> float:
    """Mean teacher-forced gIoU over every rank's subset (collective: call on every rank)."""
    import torch.distributed as dist

    from pixellm.train.learning import question_giou

    totals = torch.zeros(2, dtype=torch.float64)  # (Σ weight · gIoU, Σ weight)
    engine.eval()
    with torch.no_grad():
        for batch, weight in subset:
            inputs = {
                k: [t.to(engine.device) for t in v] if isinstance(v, list) else v.to(engine.device)
                for k, v in ((k, batch[k]) for k in _MODEL_KEYS)
            }
            out = engine(**inputs)
            for logits, gt in zip(out.mask_logits, batch["gt_masks"], strict=True):
                pred = list((logits.float() > 0).cpu().numpy())
                totals += torch.tensor(
                    [weight * question_giou(pred, list(gt.numpy() > 0.5)), weight]
                )
    engine.train()
    if dist.is_available() and dist.is_initialized():
        reduced = totals.to(engine.device)  # NCCL reduces device tensors only
        dist.all_reduce(reduced)
        totals = reduced.cpu()
    return float(totals[0] / totals[1]) if totals[1] > 0 else float(np.nan)
