"""Hand-drawn multi-target examples (coloured discs and squares) for the model tests."""

from __future__ import annotations

import numpy as np
import torch

COLOURS = {
    "red": (220, 30, 30),
    "blue": (30, 60, 220),
    "green": (30, 180, 60),
    "yellow": (230, 210, 40),
}


def draw_example(seed: int, size: int = 64) -> tuple[np.ndarray, list[np.ndarray], list[str]]:
    """A grey image with 2-3 coloured squares/discs; returns (image HxWx3, masks, colour names)."""
    rng = np.random.default_rng(seed)
    img = np.full((size, size, 3), 128, np.uint8)
    names = list(rng.choice(list(COLOURS), size=int(rng.integers(2, 4)), replace=False))
    masks = []
    yy, xx = np.mgrid[:size, :size]
    occupied = np.zeros((size, size), bool)
    for name in names:
        for _ in range(50):
            r = int(rng.integers(8, 13))
            cy, cx = (int(v) for v in rng.integers(r, size - r, 2))
            m = (
                (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
                if rng.random() < 0.5
                else ((abs(yy - cy) <= r) & (abs(xx - cx) <= r))
            )
            if not (m & occupied).any():
                break
        occupied |= m
        img[m] = COLOURS[name]
        masks.append(m.astype(np.uint8))
    return img, masks, names


def make_batch(model, examples) -> dict:
    """Model kwargs for a list of drawn examples (question names the colours; one [SEG] each)."""
    proc = model.processor
    pix, hw, ids, labels, gts = [], [], [], [], []
    for img, masks, names in examples:
        x, valid = proc.transform_image(img)
        conv = [
            {"role": "user", "text": "Please segment the " + " and the ".join(names) + " shapes."},
            {"role": "assistant", "text": ", ".join(f"the {n} one [SEG]" for n in names) + "."},
        ]
        enc = proc.encode_conversation(conv)
        pix.append(x)
        hw.append(valid)
        ids.append(enc.input_ids)
        labels.append(enc.labels)
        gts.append(torch.from_numpy(np.stack(masks)).float())
    pad = proc.tokenizer.pad_token_id
    return {
        "pixel_values": torch.stack(pix),
        "valid_hw": torch.tensor(hw),
        "input_ids": proc.pad(ids, pad),
        "attention_mask": proc.pad([[1] * len(i) for i in ids], 0),
        "labels": proc.pad(labels, -100),
        "gt_masks": gts,
    }
