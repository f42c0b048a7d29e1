"""A deterministic world of coloured shapes: scene sampling, rendering and visible masks.

Each scene holds 2-7 shapes drawn in z-order on a flat grey background; a later shape covers an
earlier one, and every mask is the *visible* part after occlusion. Shapes are rasterised with
pycocotools from the very polygons written to the annotation files, so decoding an annotation's
polygon with pycocotools gives exactly the pixels that were painted.

Sizes scale with the image side S (longest side): small r ~ 0.09 S, medium ~ 0.14 S, large ~ 0.20 S
(r >= 11 px at S = 128), so the shapes stay learnable for a tiny model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pycocotools.mask as mask_utils

__all__ = [
    "COLOURS",
    "COOL",
    "POINTY",
    "ROUND",
    "SHAPES",
    "SIZES",
    "WARM",
    "Scene",
    "Shape",
    "sample_scene",
]

SHAPES = ("circle", "square", "triangle", "star", "ring", "diamond", "hexagon")
ROUND = frozenset({"circle", "ring"})  # "could roll"
POINTY = frozenset({"triangle", "star", "diamond"})  # "sharp corners"
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 15),
    "yellow": (240, 215, 25),
    "pink": (245, 115, 195),
    "green": (35, 165, 55),
    "blue": (35, 75, 225),
    "purple": (135, 55, 185),
    "cyan": (25, 195, 205),
}
WARM = frozenset({"red", "orange", "yellow", "pink"})
COOL = frozenset({"green", "blue", "purple", "cyan"})
SIZES: dict[str, float] = {"small": 0.09, "medium": 0.14, "large": 0.20}  # radius / S
_SIZE_RANK = {"small": 0, "medium": 1, "large": 2}


@dataclass
class Shape:
    """One object of a scene; ``visible`` is its ``(h, w)`` bool mask after occlusion."""

    index: int  # z-order (later covers earlier)
    kind: str
    colour: str
    size: str
    cx: float
    cy: float
    r: float
    polygons: list[list[float]]  # outline(s) used for rasterisation (ring: [outer, inner])
    full: np.ndarray = field(repr=False)
    visible: np.ndarray = field(repr=False, default=None)  # type: ignore[assignment]

    @property
    def description(self) -> str:
        """``"small red circle"`` — unique within its scene."""
        return f"{self.size} {self.colour} {self.kind}"

    @property
    def area(self) -> int:
        return int(self.visible.sum())

    @property
    def occluded(self) -> bool:
        return self.area < int(self.full.sum())

    @property
    def polygon_exact(self) -> bool:
        """True when the outline polygon decodes to exactly the visible pixels."""
        return self.kind != "ring" and not self.occluded

    @property
    def size_rank(self) -> tuple[int, int]:
        """Sort key for "largest": size class, then visible area."""
        return _SIZE_RANK[self.size], self.area


@dataclass
class Scene:
    """One image: ``pixels`` is ``(h, w, 3)`` uint8; ``shapes`` in z-order."""

    image_id: int
    height: int
    width: int
    background: tuple[int, int, int]
    shapes: list[Shape]
    pixels: np.ndarray = field(repr=False)

    @property
    def file_name(self) -> str:
        return f"{self.image_id:06d}.png"

    def left_to_right(self, shapes: list[Shape]) -> list[Shape]:
        """Answer order: by centre x, then y."""
        return sorted(shapes, key=lambda s: (round(s.cx, 3), round(s.cy, 3), s.index))


def _regular(cx: float, cy: float, radius: float, n: int, phase: float) -> list[float]:
    pts: list[float] = []
    for k in range(n):
        a = phase + 2 * math.pi * k / n
        pts += [round(cx + radius * math.cos(a), 2), round(cy + radius * math.sin(a), 2)]
    return pts


def _outline(kind: str, cx: float, cy: float, r: float) -> list[list[float]]:
    """Polygon(s) of a shape; image y grows downwards."""
    if kind in ("circle", "ring"):
        outer = _regular(cx, cy, r, 40, 0.0)
        return [outer, _regular(cx, cy, 0.55 * r, 40, 0.0)] if kind == "ring" else [outer]
    if kind == "square":
        return [_regular(cx, cy, r * 1.2, 4, math.pi / 4)]
    if kind == "diamond":
        return [_regular(cx, cy, r * 1.1, 4, 0.0)]
    if kind == "triangle":
        return [_regular(cx, cy + 0.15 * r, r * 1.15, 3, -math.pi / 2)]
    if kind == "hexagon":
        return [_regular(cx, cy, r, 6, 0.0)]
    if kind == "star":
        pts: list[float] = []
        for k in range(10):
            a = -math.pi / 2 + math.pi * k / 5
            rad = r * 1.15 if k % 2 == 0 else r * 0.5
            pts += [round(cx + rad * math.cos(a), 2), round(cy + rad * math.sin(a), 2)]
        return [pts]
    raise ValueError(f"unknown shape kind {kind!r}; expected one of {SHAPES}")


def _rasterise(polys: list[list[float]], kind: str, h: int, w: int) -> np.ndarray:
    """Fill polygons exactly as pycocotools decodes them (ring = outer minus inner)."""
    masks = mask_utils.decode(mask_utils.frPyObjects(polys, h, w))  # (h, w, P)
    full = masks[:, :, 0].astype(bool)
    if kind == "ring":
        full &= ~masks[:, :, 1].astype(bool)
    return full


def _place(rng: np.random.Generator, r: float, h: int, w: int) -> tuple[float, float]:
    m = r * 1.2 + 1
    return float(rng.uniform(m, w - m)), float(rng.uniform(m, h - m))


def _fits(label: np.ndarray, full: np.ndarray, shapes: list[Shape]) -> bool:
    """Adding ``full`` on top keeps every earlier shape at least half visible."""
    for s in shapes:
        left = np.count_nonzero((label == s.index) & ~full)
        if left < 0.5 * s.full.sum():
            return False
    return True


def sample_scene(rng: np.random.Generator, image_id: int, side: int) -> Scene:
    """Sample and render one scene.

    Args:
        rng: the generator (the corpus seeds one per image, so scenes are independent).
        image_id: id used in file names and annotations.
        side: S, the longest image side in pixels.

    Returns:
        A rendered ``Scene``; every shape's ``(size, colour, kind)`` is unique within it.
    """
    h, w = (side, side) if rng.random() < 0.5 else (int(round(side * 0.75)), side)
    grey = int(rng.integers(200, 236))
    background = (grey, grey, grey)
    label = np.full((h, w), -1, dtype=np.int16)
    shapes: list[Shape] = []
    seen: set[tuple[str, str, str]] = set()
    for _ in range(int(rng.integers(2, 8))):
        for _attempt in range(40):
            kind = SHAPES[int(rng.integers(len(SHAPES)))]
            colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
            size = list(SIZES)[int(rng.integers(len(SIZES)))]
            if (size, colour, kind) in seen:
                continue
            r = SIZES[size] * side * float(rng.uniform(0.95, 1.08))
            cx, cy = _place(rng, r, h, w)
            polys = _outline(kind, cx, cy, r)
            full = _rasterise(polys, kind, h, w)
            if _fits(label, full, shapes):
                break
        else:
            continue
        seen.add((size, colour, kind))
        idx = len(shapes)
        label[full] = idx
        shapes.append(Shape(idx, kind, colour, size, cx, cy, r, polys, full))
    pixels = np.empty((h, w, 3), dtype=np.uint8)
    pixels[:] = background
    for s in shapes:
        s.visible = label == s.index
        pixels[s.visible] = COLOURS[s.colour]
    return Scene(image_id, h, w, background, shapes, pixels)
