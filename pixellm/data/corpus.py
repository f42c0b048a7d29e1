"""The generated default corpus: one shape world written in the on-disk formats of the real corpora.

``pixellm corpus generate --out DIR`` writes::

    DIR/images/000000.png …                 shared images
    DIR/muse/muse_{train,val,test_less,test_many}.json
    DIR/coco/instances.json                 COCO instances (semantic-segmentation style)
    DIR/refer/refs(unc).p + instances.json  refer format (pickle + COCO)
    DIR/reasonseg/{train,val}/*.json        ReasonSeg / LabelMe style with "ignore" shapes
    DIR/llava/llava_instruct.json           LLaVA-Instruct style counting VQA

Every image draws from its own generator seeded by ``(seed, image index)``, and JSON / PNG / pickle
are written with fixed settings, so the same seed gives byte-identical files.

Annotations: an unoccluded, hole-free shape is annotated with its outline polygon (which pycocotools
decodes to exactly its pixels); an occluded shape or a ring (a hole) is annotated with RLE —
compressed ``str`` counts in MUSE as in the real files, uncompressed ``list`` counts in COCO JSON.
"""

from __future__ import annotations

import io
import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pixellm.data.questions import (
    MAX_TARGETS,
    Question,
    count_question,
    multi_refer_question,
    no_target_question,
    reasoning_questions,
    refer_question,
    relation_question,
)
from pixellm.data.schema import bbox_of_rle, encode_mask
from pixellm.data.world import SHAPES, Scene, Shape, sample_scene

__all__ = ["CorpusSummary", "generate_corpus"]

_CATEGORY_ID = {k: i + 1 for i, k in enumerate(SHAPES)}
_REFER_SPLIT = {"train": "train", "val": "val", "test": "testA"}


@dataclass
class CorpusSummary:
    """What ``generate_corpus`` wrote: file → record count."""

    out: str
    images: int
    files: dict[str, int]


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _write_json(path: Path, obj: Any) -> None:
    _write_bytes(path, json.dumps(obj, separators=(",", ":")).encode())


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO uncompressed RLE (column-major runs, starting with a background run)."""
    flat = mask.astype(np.uint8).flatten(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat[0] == 1:
        runs = [0, *runs]
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(r) for r in runs]}


def _segmentation(shape: Shape, compressed: bool) -> Any:
    if shape.polygon_exact:
        return [list(p) for p in shape.polygons]
    return encode_mask(shape.visible) if compressed else _uncompressed_rle(shape.visible)


def _ann(scene: Scene, shape: Shape, ann_id: int, compressed: bool) -> dict[str, Any]:
    return {
        "id": ann_id,
        "image_id": scene.image_id,
        "category_id": _CATEGORY_ID[shape.kind],
        "category_name": shape.kind,
        "rephrased_name": shape.description,
        "bbox": bbox_of_rle(encode_mask(shape.visible)),
        "area": shape.area,
        "iscrowd": 0,
        "segmentation": _segmentation(shape, compressed),
    }


# Share of images whose third MUSE question has no target (≈ 13% of MUSE questions): enough for a
# tiny model to learn to answer "there is no …" (at 0.15 it never did: no-target accuracy 0.0).
NO_TARGET_SHARE = 0.4


def _muse_questions(scene: Scene, rng: np.random.Generator) -> list[Question]:
    """About three questions per image: reasoning, multi-referring, relation or no target."""
    shapes = scene.shapes
    out: list[Question] = []
    reasons = [q for q in reasoning_questions(scene, rng) if 1 <= len(q.targets) <= MAX_TARGETS]
    if reasons:
        out.append(reasons[int(rng.integers(len(reasons)))])
    if len(shapes) >= 2:
        k = int(rng.integers(2, min(MAX_TARGETS, len(shapes)) + 1))
        pick = [shapes[i] for i in rng.permutation(len(shapes))[:k]]
        out.append(multi_refer_question(scene, pick))
    if rng.random() < NO_TARGET_SHARE:
        out.append(no_target_question(scene, rng))
    else:
        anchor = shapes[int(rng.integers(len(shapes)))]
        side, extreme = (
            ("left", "right")[int(rng.integers(2))],
            ("largest", "smallest")[int(rng.integers(2))],
        )
        q = relation_question(scene, anchor, side, extreme)
        out.append(q if q.targets else refer_question(scene, anchor))
    return out


def _muse_record(
    scene: Scene, questions: list[Question], ann_ids: dict[int, int], with_text: bool
) -> dict[str, Any]:
    anns = {s.index: _ann(scene, s, ann_ids[s.index], compressed=True) for s in scene.shapes}
    rec: dict[str, Any] = {
        "id": scene.image_id,
        "file_name": scene.file_name,
        "height": scene.height,
        "width": scene.width,
        "ann_list": [anns[s.index] for s in scene.shapes],
        "questions": [q.text for q in questions],
        "answers": [[anns[t.index] for t in q.targets] for q in questions],
    }
    if with_text:
        rec["text_answers"] = [q.answer for q in questions]
    return rec


def _refs(scene: Scene, ann_ids: dict[int, int], split: str, ref_start: int) -> list[dict]:
    refs = []
    pairs = [(s.colour, s.kind) for s in scene.shapes]
    for k, s in enumerate(scene.shapes):
        sents = [f"the {s.description}"]
        if pairs.count((s.colour, s.kind)) == 1:
            sents.append(f"the {s.colour} {s.kind}")
        ref_id = ref_start + k
        refs.append(
            {
                "ref_id": ref_id,
                "ann_id": ann_ids[s.index],
                "image_id": scene.image_id,
                "category_id": _CATEGORY_ID[s.kind],
                "split": _REFER_SPLIT[split],
                "file_name": f"{scene.image_id:06d}_{ref_id}.png",
                "sentences": [
                    {"sent": t, "raw": t, "tokens": t.split(), "sent_id": ref_id * 10 + j}
                    for j, t in enumerate(sents)
                ],
                "sent_ids": [ref_id * 10 + j for j in range(len(sents))],
            }
        )
    return refs


def _reasonseg(scene: Scene, rng: np.random.Generator) -> dict[str, Any] | None:
    """A ReasonSeg/LabelMe record with one polygon target and an ``ignore`` shape, or None."""
    cands = []
    for anchor in scene.shapes:
        for side in ("left", "right"):
            for extreme in ("largest", "smallest"):
                q = relation_question(scene, anchor, side, extreme)
                if q.targets and q.targets[0].polygon_exact:
                    cands.append((q, anchor, side, extreme))
    if not cands:
        return None
    q, anchor, side, extreme = cands[int(rng.integers(len(cands)))]
    target = q.targets[0]
    phrase = f"the {extreme} shape {side} of the {anchor.description}"
    sentence = bool(rng.random() < 0.5)
    text = (
        [f"Find {phrase}.", f"Find the {target.description}."]
        if sentence
        else [
            phrase,
            f"the {target.description}",
        ]
    )
    shapes = [{"label": "target", "points": _points(target.polygons[0]), "shape_type": "polygon"}]
    for s in scene.shapes:
        if s.occluded and s is not target:
            shapes.append(
                {"label": "ignore", "points": _points(s.polygons[0]), "shape_type": "polygon"}
            )
            break
    return {
        "text": text,
        "is_sentence": sentence,
        "shapes": shapes,
        "imagePath": scene.file_name,
        "imageHeight": scene.height,
        "imageWidth": scene.width,
    }


def _points(poly: list[float]) -> list[list[float]]:
    return [[poly[i], poly[i + 1]] for i in range(0, len(poly), 2)]


def _llava(scene: Scene, rng: np.random.Generator) -> dict[str, Any]:
    turns = []
    for t in range(2):
        q, a = count_question(scene, rng)
        turns += [
            {"from": "human", "value": ("<image>\n" if t == 0 else "") + q},
            {"from": "gpt", "value": a},
        ]
    return {"id": f"{scene.image_id:06d}", "image": scene.file_name, "conversations": turns}


def _split_of(seed: int, images: int, held_out_pool: int | None = None) -> list[str]:
    """Split of each image: val (a tenth) and test (a fifth) of the first ``held_out_pool`` images
    (default: all); the images after the pool are all train."""
    pool = images if held_out_pool is None else min(images, held_out_pool)
    order = np.random.default_rng([seed, 7919]).permutation(pool)
    n_val, n_test = max(1, pool // 10), max(1, pool // 5)
    split = ["train"] * images
    for i in order[:n_val]:
        split[int(i)] = "val"
    for i in order[n_val : n_val + n_test]:
        split[int(i)] = "test"
    return split


def generate_corpus(
    out: str | Path,
    seed: int = 0,
    images: int = 240,
    image_size: int = 128,
    held_out_pool: int | None = None,
) -> CorpusSummary:
    """Generate the default corpus under ``out`` (see the module docstring for the layout).

    Args:
        out: output directory (created; existing generated files are overwritten).
        seed: world seed; the same seed gives byte-identical files.
        images: number of images (>= 3, so every split gets one).
        image_size: S, the longest image side in pixels (>= 64 keeps shapes >= ~6 px).
        held_out_pool: val and test are drawn from the first this many images (default: all).
            Images are seeded by index, so with the same pool a larger corpus keeps exactly the
            same val and test records and only adds training images.

    Returns:
        A ``CorpusSummary`` with record counts per written file.

    Raises:
        ValueError: ``images`` < 3 or ``image_size`` < 64.
    """
    if images < 3 or image_size < 64:
        raise ValueError(
            f"need images >= 3 and image_size >= 64, got images={images}, image_size={image_size}"
        )
    if held_out_pool is not None and held_out_pool < 3:
        raise ValueError(f"need held_out_pool >= 3 (one image per split), got {held_out_pool}")
    root = Path(out)
    splits = _split_of(seed, images, held_out_pool)
    muse: dict[str, list] = {"train": [], "val": [], "test_less": [], "test_many": []}
    coco: dict[str, list] = {"images": [], "annotations": []}
    refs: list[dict] = []
    llava: list[dict] = []
    reason: dict[str, int] = {"train": 0, "val": 0}
    ann_next = 1
    for i in range(images):
        rng = np.random.default_rng([seed, i])
        scene = sample_scene(rng, i, image_size)
        _write_bytes(root / "images" / scene.file_name, _png(scene.pixels))
        ann_ids = {s.index: ann_next + k for k, s in enumerate(scene.shapes)}
        ann_next += len(scene.shapes)
        coco["images"].append(
            {"id": i, "file_name": scene.file_name, "height": scene.height, "width": scene.width}
        )
        coco["annotations"] += [
            _ann(scene, s, ann_ids[s.index], compressed=False) for s in scene.shapes
        ]
        refs += _refs(scene, ann_ids, splits[i], ref_start=ann_ids[0])
        llava.append(_llava(scene, rng))
        questions = _muse_questions(scene, rng)
        if splits[i] == "test":
            less = [q for q in questions if len(q.targets) <= 3]
            many = [q for q in questions if len(q.targets) > 3]
            for name, qs in (("test_less", less), ("test_many", many)):
                if qs:
                    muse[name].append(_muse_record(scene, qs, ann_ids, with_text=True))
        else:
            with_text = splits[i] != "train" or rng.random() >= 0.25
            muse[splits[i]].append(_muse_record(scene, questions, ann_ids, with_text))
        rs_split = "train" if splits[i] == "train" else "val"
        record = _reasonseg(scene, rng)
        if record is not None:
            _write_json(root / "reasonseg" / rs_split / f"{scene.image_id:06d}.json", record)
            reason[rs_split] += 1
    coco["categories"] = [
        {"id": c, "name": k, "supercategory": "shape"} for k, c in _CATEGORY_ID.items()
    ]
    files: dict[str, int] = {"images": images}
    for name, recs in muse.items():
        _write_json(root / "muse" / f"muse_{name}.json", recs)
        files[f"muse/muse_{name}.json"] = sum(len(r["questions"]) for r in recs)
    _write_json(root / "coco" / "instances.json", coco)
    _write_json(root / "refer" / "instances.json", coco)
    _write_bytes(root / "refer" / "refs(unc).p", pickle.dumps(refs, protocol=4))
    _write_json(root / "llava" / "llava_instruct.json", llava)
    files.update({"coco/annotations": len(coco["annotations"]), "refer/refs": len(refs)})
    files.update({f"reasonseg/{k}": v for k, v in reason.items()})
    files["llava/llava_instruct.json"] = len(llava)
    return CorpusSummary(str(root), images, files)
