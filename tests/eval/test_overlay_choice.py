"""Overlay choice and drawing: every split shows a no-target and its most-target question; masks
are drawn over a greyed image as fill + contour in the legend colour."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from pixellm.eval.data import BenchmarkSample
from pixellm.eval.overlay import PALETTE, render_overlay
from pixellm.eval.report import _choose_overlays


def _sample(sid: str, split: str, k: int, size: int = 40) -> BenchmarkSample:
    masks = np.zeros((k, size, size), np.uint8)
    for i in range(k):
        masks[i, 4 * i : 4 * i + 10, 5:20] = 1
    image = np.zeros((size, size, 3), np.uint8)
    image[..., 0] = 200  # a saturated red image: the greyed panel must not stay red
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return BenchmarkSample(
        sample_id=sid, split=split, task="mrefseg", question="Please segment.", answer="",
        height=size, width=size, masks=masks, descriptions=[f"t{i}" for i in range(k)],
        ignore=None, image=buf.getvalue(),
    )  # fmt: skip


def test_each_split_shows_a_no_target_and_its_most_target_question():
    samples = [
        _sample(f"{sp}{i}", sp, k)
        for sp in ("val", "test_many")
        for i, k in enumerate([1, 2, 0, 1, 5, 1, 1])
    ]
    chosen = _choose_overlays(samples, 6)
    assert len(chosen) == 6
    for split in ("val", "test_many"):
        mine = [s for s in chosen if s.split == split]
        assert len(mine) == 3
        assert any(s.masks.shape[0] == 0 for s in mine) and any(s.masks.shape[0] == 5 for s in mine)


def test_masks_are_drawn_in_their_legend_colour_over_a_grey_image():
    sample = _sample("a", "val", 1, size=64)
    picture = np.asarray(render_overlay(sample, "the t0 [SEG].", sample.masks, None, [0.8]))
    colour = np.asarray(PALETTE[0])
    assert (np.abs(picture.astype(int) - colour).sum(-1) == 0).sum() > 20  # the contour
    left = picture[30:300, 10:300]
    background = left[(np.abs(left.astype(int) - colour).sum(-1) > 60)]
    channel_spread = background.max(-1).astype(int) - background.min(-1).astype(int)
    assert np.median(channel_spread) < 10  # grey (or white), not the red of the image
