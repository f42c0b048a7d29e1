"""Optimizer parameter groups of PixelLM: one learning rate per kind of trainable part.

Three groups, always in this order (DeepSpeed's ``WarmupDecayLR`` takes one peak / floor per group,
``pixellm.train.ds_config``):

- ``decoder``: the pixel decoder D with its projections (p_V→D, neck, text projection, φ, γ, the
  score head) and the vision-to-language projection p_V→T — all trained from scratch;
- ``lora``: the LoRA matrices on the LLM;
- ``codebook``: the codebook rows of the input embedding and of the output layer (peft trainable
  tokens).

Each group's peak rate is ``train.lr_<group>`` (``None`` = ``train.lr``); the schedule warms up
from, and decays linearly to, ``train.min_lr_ratio × peak`` (the floor), never to 0.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from pixellm.config import TrainConfig

__all__ = ["GROUPS", "group_lrs", "param_group_of", "param_groups"]

GROUPS = ("decoder", "lora", "codebook")


def param_group_of(name: str) -> str:
    """The group of a trainable parameter, from its qualified name."""
    if "lora_" in name:
        return "lora"
    if "trainable_tokens" in name:
        return "codebook"
    return "decoder"


def group_lrs(train: TrainConfig) -> tuple[list[float], list[float]]:
    """Peak and floor learning rates per group, in ``GROUPS`` order."""
    peaks = [getattr(train, f"lr_{g}") or train.lr for g in GROUPS]
    return peaks, [p * train.min_lr_ratio for p in peaks]


def param_groups(model: nn.Module, train: TrainConfig) -> list[dict[str, Any]]:
    """Torch/DeepSpeed parameter groups of every ``requires_grad`` parameter of ``model``.

    Raises:
        ValueError: a group is empty (a model without LoRA or codebook rows is not PixelLM).
    """
    members: dict[str, list[nn.Parameter]] = {g: [] for g in GROUPS}
    for name, p in model.named_parameters():
        if p.requires_grad:
            members[param_group_of(name)].append(p)
    empty = [g for g, ps in members.items() if not ps]
    if empty:
        raise ValueError(f"optimizer parameter groups {empty} have no trainable parameter")
    peaks, _ = group_lrs(train)
    return [
        {"name": g, "params": members[g], "lr": lr} for g, lr in zip(GROUPS, peaks, strict=True)
    ]
