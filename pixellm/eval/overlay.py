"""Overlay pictures of one scored question: prediction | ground truth, with the coloured answer.

The left panel shows the predicted masks, the right panel the ground-truth masks, over a greyed,
lightened copy of the image (so a mask is never confused with a coloured shape): each mask is a
translucent fill plus a solid contour in its colour. A matched target takes its prediction's colour.
Below, the question and the answer are printed with each ``[SEG]`` drawn as a chip in its mask's
colour (with the mask's score when the prediction has scores), then the targets.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

from pixellm.eval.data import PLACEHOLDER, BenchmarkSample
from pixellm.eval.metrics import QuestionResult

__all__ = ["PALETTE", "render_overlay"]

PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 200, 200),
    (240, 50, 230),
    (128, 128, 0),
    (0, 128, 128),
    (170, 110, 40),
)
_PANEL = 320  # longest side of each image panel, pixels
_PAD = 10
_ALPHA = 0.5

Token = tuple[str, tuple[int, int, int] | None]


def _font(size: int = 14) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def _contour(m: np.ndarray, width: int = 2) -> np.ndarray:
    """Pixels of ``m`` (``(h, w)`` bool) within ``width`` pixels of its boundary."""
    inner = m.copy()
    for _ in range(width):  # erosion by a 3x3 cross, ``width`` times
        shrunk = inner.copy()
        shrunk[1:] &= inner[:-1]
        shrunk[:-1] &= inner[1:]
        shrunk[:, 1:] &= inner[:, :-1]
        shrunk[:, :-1] &= inner[:, 1:]
        inner = shrunk
    return m & ~inner


def _panel(
    image: Image.Image, masks: np.ndarray, colours: list[tuple[int, int, int]]
) -> Image.Image:
    """Draw ``(K, H, W)`` masks (fill + contour) onto a greyed copy of the display-sized image."""
    size = image.size
    grey = np.asarray(image.convert("L"), dtype=np.float32)[..., None].repeat(3, 2)  # (h, w, 3)
    out = 90 + grey * 0.55  # light grey: shapes stay visible, never compete with mask colours
    for mask, colour in zip(masks, colours, strict=True):
        m = np.asarray(Image.fromarray(mask * 255).resize(size, Image.NEAREST)) > 0  # (h, w)
        c = np.asarray(colour, dtype=np.float32)
        out[m] = out[m] * (1 - _ALPHA) + c * _ALPHA
        out[_contour(m)] = c
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))


def _base_image(sample: BenchmarkSample) -> Image.Image:
    scale = _PANEL / max(sample.height, sample.width)
    size = (max(1, round(sample.width * scale)), max(1, round(sample.height * scale)))
    try:
        image = Image.open(io.BytesIO(sample.image or b"")).convert("RGB")
    except (UnidentifiedImageError, OSError):
        image = Image.new("RGB", (sample.width, sample.height), (128, 128, 128))
    return image.resize(size, Image.BILINEAR)


def _answer_tokens(
    text: str, n_masks: int, colours: list[tuple[int, int, int]], scores: list[float] | None
) -> list[Token]:
    tokens: list[Token] = [("A:", None)]
    for i, piece in enumerate(text.split(PLACEHOLDER)):
        if i:
            colour = colours[i - 1] if i - 1 < n_masks else (90, 90, 90)
            score = f" score {scores[i - 1]:.2f}" if scores and i - 1 < len(scores) else ""
            tokens.append((f"[SEG {i}{score}]", colour))
        tokens.extend((word, None) for word in piece.split())
    return tokens


def _layout(
    draw: ImageDraw.ImageDraw, lines: list[list[Token]], width: int, font: ImageFont.ImageFont
) -> tuple[list[tuple[int, int, str, tuple[int, int, int] | None]], int]:
    """Word-wrap token lines into ``(x, y, text, colour)`` placements; returns them and the height."""
    line_h = int(font.size * 1.5) if hasattr(font, "size") else 16
    placed, y = [], 0
    for tokens in lines:
        x = 0
        for text, colour in tokens:
            w = int(draw.textlength(text + " ", font=font))
            w += 6 if colour is not None else 0  # room for the chip's padding
            if x and x + w > width:
                x, y = 0, y + line_h
            placed.append((x, y, text, colour))
            x += w
        y += line_h
    return placed, y


def render_overlay(
    sample: BenchmarkSample,
    text: str,
    pred_masks: np.ndarray,
    question: QuestionResult | None,
    scores: list[float] | None = None,
) -> Image.Image:
    """Picture of one question: prediction and ground-truth panels, question, coloured answer.

    Args:
        sample: benchmark sample with its image bytes (a grey canvas stands in when absent).
        text: generated answer (one ``[SEG]`` per predicted mask).
        pred_masks: ``(P, H, W)`` predicted masks.
        question: the harness's result for this sample (colours matched targets), or None.
        scores: the prediction's score per mask, shown in its chip; None = not shown.

    Returns:
        An RGB image.
    """
    n_pred = pred_masks.shape[0]
    pred_colours = [PALETTE[k % len(PALETTE)] for k in range(n_pred)]
    matched = {p.gt: p.pred for p in (question.pairs if question else []) if p.pred >= 0}
    gt_colours, spare = [], n_pred
    for g in range(sample.masks.shape[0]):
        if g in matched:
            gt_colours.append(pred_colours[matched[g]])
        else:
            gt_colours.append(PALETTE[spare % len(PALETTE)])
            spare += 1
    base = _base_image(sample)
    left = _panel(base, pred_masks, pred_colours)
    right = _panel(base, sample.masks, gt_colours)
    font = _font()
    width = 2 * base.width + 3 * _PAD
    lines = [[("Q:", None)] + [(w, None) for w in sample.question.split()]]
    lines.append(_answer_tokens(text, n_pred, pred_colours, scores))
    for g, (desc, colour) in enumerate(zip(sample.descriptions, gt_colours, strict=True)):
        lines.append([(f"target {g + 1}", colour)] + [(w, None) for w in desc.split()])
    if not sample.masks.shape[0]:
        lines.append([("no target in this image", None)])
    if question is not None and question.denom:
        lines.append([(f"question gIoU {question.score / question.denom:.3f}", None)])
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    placed, text_h = _layout(scratch, lines, width - 2 * _PAD, font)
    title_h = 24
    canvas = Image.new("RGB", (width, title_h + base.height + text_h + 3 * _PAD), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((_PAD, _PAD), "prediction", fill="black", font=font)
    draw.text((2 * _PAD + base.width, _PAD), "ground truth", fill="black", font=font)
    canvas.paste(left, (_PAD, title_h + _PAD))
    canvas.paste(right, (2 * _PAD + base.width, title_h + _PAD))
    top = title_h + base.height + 2 * _PAD
    for x, y, token, colour in placed:
        xy = (_PAD + x, top + y)
        if colour is not None:
            box = draw.textbbox(xy, token, font=font)
            draw.rectangle((box[0] - 2, box[1] - 2, box[2] + 2, box[3] + 2), fill=colour)
            draw.text(xy, token, fill="white", font=font)
        else:
            draw.text(xy, token, fill="black", font=font)
    return canvas
