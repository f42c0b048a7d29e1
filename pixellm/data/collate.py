"""Collate preprocessed rows into a padded training batch.

Shape notation: B = batch, T = longest token sequence in the batch, S = model image side,
K_b = targets of sample b, h_b x w_b = its mask size (longest side <= ``data.mask_max_size``).

The pad id travels with the data: ``PreprocessBatch`` writes the tokenizer's ``pad_token_id`` into a
``pad_id`` column, so ``collate_batch(batch)`` needs nothing else. ``make_collate(pad_id)`` returns a
collate function with a fixed pad id instead (e.g. for rows produced elsewhere).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from pixellm.model.processing import IGNORE_INDEX

__all__ = ["collate_batch", "make_collate", "unpack_masks"]


def unpack_masks(packed: bytes | np.ndarray, shape: Any) -> np.ndarray:
    """Bit-packed masks (``np.packbits``) → ``(K, h, w)`` uint8 in {0, 1}."""
    k, h, w = (int(v) for v in shape)
    bits = np.unpackbits(np.frombuffer(bytes(packed), dtype=np.uint8), count=k * h * w)
    return bits.reshape(k, h, w)


def _pad(seqs: list[np.ndarray], value: int) -> torch.Tensor:
    t = max(len(s) for s in seqs)
    out = torch.full((len(seqs), t), value, dtype=torch.long)
    for b, s in enumerate(seqs):
        out[b, : len(s)] = torch.tensor(np.asarray(s, dtype=np.int64))
    return out


def _collate(batch: dict[str, Any], pad_id: int | None) -> dict[str, Any]:
    ids = [np.asarray(x) for x in batch["input_ids"]]
    if not ids:
        raise ValueError("cannot collate an empty batch")
    if pad_id is None:
        if "pad_id" not in batch:
            raise KeyError("batch has no 'pad_id' column; use make_collate(pad_id) instead")
        pad_id = int(np.asarray(batch["pad_id"])[0])
    input_ids = _pad(ids, pad_id)  # (B, T), right-padded
    attention_mask = _pad([np.ones(len(x), dtype=np.int64) for x in ids], 0)  # (B, T)
    labels = _pad([np.asarray(x) for x in batch["labels"]], IGNORE_INDEX)  # (B, T)
    pixel_values = torch.as_tensor(
        np.stack([np.asarray(p, dtype=np.float32) for p in batch["pixel_values"]])
    )
    gt_masks = [
        torch.from_numpy(unpack_masks(m, s).astype(np.float32))  # (K_b, h_b, w_b)
        for m, s in zip(batch["gt_masks"], batch["mask_shape"], strict=True)
    ]
    out = {
        "pixel_values": pixel_values,  # (B, 3, S, S)
        "valid_hw": torch.as_tensor(
            np.stack([np.asarray(v) for v in batch["valid_hw"]]), dtype=torch.long
        ),
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "gt_masks": gt_masks,
        "sample_id": [str(s) for s in batch["sample_id"]],
    }
    if "step" in batch:  # the training stream's optimizer step of each row (B,)
        out["step"] = [int(s) for s in batch["step"]]
    return out


def collate_batch(batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """Preprocessed rows (column → array) → a padded training batch.

    Args:
        batch: columns of ``PreprocessBatch`` output: ``input_ids``/``labels`` (B ragged ``(T_b,)``),
            ``pixel_values`` ``(B, 3, S, S)``, ``valid_hw`` ``(B, 2)``, ``gt_masks`` (B packed bytes),
            ``mask_shape`` ``(B, 3)``, ``pad_id`` ``(B,)``, ``sample_id`` ``(B,)``.

    Returns:
        ``pixel_values`` FloatTensor ``(B, 3, S, S)``, ``valid_hw`` LongTensor ``(B, 2)``,
        ``input_ids`` LongTensor ``(B, T)`` right-padded with the pad id, ``attention_mask``
        LongTensor ``(B, T)``, ``labels`` LongTensor ``(B, T)`` padded with -100, ``gt_masks`` list of
        B FloatTensors ``(K_b, h_b, w_b)`` in {0, 1}, ``sample_id`` list of B str, and ``step``
        (list of B int) when the batch has a ``step`` column (the training stream).

    Raises:
        ValueError: the batch is empty.
        KeyError: the batch has no ``pad_id`` column.
    """
    return _collate(batch, None)


def make_collate(pad_id: int) -> Callable[[dict[str, np.ndarray]], dict[str, Any]]:
    """A ``collate_batch`` that pads ``input_ids`` with ``pad_id`` (ignores any ``pad_id`` column)."""

    def collate(batch: dict[str, np.ndarray]) -> dict[str, Any]:
        return _collate(batch, pad_id)

    return collate
