"""COCO instances JSON (``images``, ``annotations``, ``categories``) → semantic-segmentation rows.

One row per image and group of up to 3 categories (as the authors sample): "What is a, b and c
in this image?" → "a [SEG], b [SEG] and c [SEG].", each target the union of that category's
masks in the image. ``coco_index`` is shared with the refer converter.

Duplicated image or category ids are rejected for *every* record holding them (never merged:
which image an annotation means cannot be told); their annotations are rejected as
``duplicate_id`` too. An annotation naming a missing or rejected image/category is
``bad_reference``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field

from pixellm.data.formats.common import (
    ASK,
    Collector,
    Id,
    Record,
    RecordRejected,
    Segmentation,
    Side,
    Specs,
    Text,
    conversation,
    duplicates,
    expect,
    image_path,
    read_json,
    row_spec,
    validate,
)
from pixellm.data.questions import join_names
from pixellm.data.schema import Reject, RejectReason
from pixellm.model.codebook import PLACEHOLDER

__all__ = ["CocoAnnotation", "CocoCategory", "CocoImage", "CocoIndex", "coco_index", "parse_coco"]


class CocoImage(Record):
    id: Id
    file_name: Annotated[Text, Field(min_length=1)]
    height: Side
    width: Side


class CocoCategory(Record):
    id: Id
    name: Annotated[Text, Field(min_length=1)]


class CocoAnnotation(Record):
    id: Id | None = None
    image_id: Id
    category_id: Id
    segmentation: Segmentation


@dataclass
class CocoIndex:
    """The accepted records of one instances file, by id."""

    images: dict[Any, tuple[CocoImage, Path]] = field(default_factory=dict)
    categories: dict[Any, str] = field(default_factory=dict)
    anns_by_image: dict[Any, list[CocoAnnotation]] = field(
        default_factory=lambda: defaultdict(list)
    )
    anns_by_id: dict[Any, CocoAnnotation] = field(default_factory=dict)


def _section(
    coco: dict, key: str, model: type[Record], file: Path, out: Collector, split: str | None
) -> list[tuple[int, Any]]:
    items = expect(coco.get(key), list, file, f"{key!r}")
    good = []
    for i, item in enumerate(items):
        try:
            good.append((i, validate(model, item)))
        except RecordRejected as err:
            out.reject(file.name, f"{key}[{i}]", err.reason, err.detail, split)
    return good


def _unique(
    key: str, good: list[tuple[int, Any]], file: Path, out: Collector, split: str | None
) -> tuple[list[tuple[int, Any]], set]:
    """Drop (and reject) every record whose ``id`` repeats; returns (kept, duplicated ids)."""
    dup = duplicates(str(rec.id) for _, rec in good)  # 1 and "1" would share a sample_id
    index = [i for i, _ in good]
    kept = []
    for k, (i, rec) in enumerate(good):
        if str(rec.id) in dup:
            others = ", ".join(f"{key}[{index[j]}]" for j in dup[str(rec.id)] if j != k)
            out.reject(
                file.name,
                f"{key}[{i}]",
                RejectReason.DUPLICATE_ID,
                f"{key[:-1]} id {rec.id!r} also at {others}; every copy is rejected",
                split,
            )
        else:
            kept.append((i, rec))
    return kept, set(dup)


def _lookup(kind: str, ref: Any, table: dict, dup: set, failed: dict) -> None:
    if ref in table:
        return
    if str(ref) in dup:
        raise RecordRejected(RejectReason.DUPLICATE_ID, f"its {kind} id {ref!r} is duplicated")
    why = f" ({failed[ref]})" if ref in failed else ""
    raise RecordRejected(
        RejectReason.BAD_REFERENCE, f"{kind} id {ref!r} is not a valid {kind} of this file{why}"
    )


def coco_index(
    file: Path,
    images: Path,
    out: Collector,
    split: str | None,
    unique_ann_ids: bool = False,
) -> CocoIndex:
    """Validate one COCO instances file; every bad record goes to ``out`` as a reject.

    Args:
        file: the instances JSON.
        images: the image directory (names must stay inside it).
        out: collects rejects.
        split: split the rejects are filed under (None: shared by every split).
        unique_ann_ids: reject annotations whose ``id`` repeats (refer looks them up by id).

    Raises:
        DataError: the file is not a JSON object with ``images``/``annotations``/``categories``
            lists.
    """
    coco = expect(read_json(file), dict, file, "the top level (a COCO instances object)")
    idx = CocoIndex()
    cats, dup_cats = _unique(
        "categories", _section(coco, "categories", CocoCategory, file, out, split), file, out, split
    )
    idx.categories = {c.id: c.name for _, c in cats}
    imgs, dup_imgs = _unique(
        "images", _section(coco, "images", CocoImage, file, out, split), file, out, split
    )
    failed: dict[Any, str] = {}
    for i, im in imgs:
        try:
            idx.images[im.id] = (im, image_path(images, im.file_name))
        except RecordRejected as err:
            failed[im.id] = err.reason.value
            out.reject(file.name, f"images[{i}]", err.reason, err.detail, split)
    anns = _section(coco, "annotations", CocoAnnotation, file, out, split)
    dup_anns: dict = (
        duplicates(None if a.id is None else str(a.id) for _, a in anns) if unique_ann_ids else {}
    )
    for i, a in anns:
        try:
            if a.id is not None and str(a.id) in dup_anns:
                raise RecordRejected(
                    RejectReason.DUPLICATE_ID,
                    f"annotation id {a.id!r} repeats ({len(dup_anns[str(a.id)])} copies); every "
                    "copy is rejected",
                )
            _lookup("image", a.image_id, idx.images, dup_imgs, failed)
            _lookup("category", a.category_id, idx.categories, dup_cats, {})
        except RecordRejected as err:
            out.reject(file.name, f"annotations[{i}]", err.reason, err.detail, split)
            continue
        idx.anns_by_image[a.image_id].append(a)
        if a.id is not None:
            idx.anns_by_id[a.id] = a
    return idx


def _image_rows(idx: CocoIndex, image_id: Any, split: str, corpus: str, file: str) -> list[dict]:
    im, path = idx.images[image_id]
    by_cat: dict[Any, list] = defaultdict(list)
    for a in idx.anns_by_image[image_id]:
        by_cat[a.category_id].append(a.segmentation)
    cat_ids = sorted(by_cat, key=lambda c: (isinstance(c, str), c))  # ints by value, then str
    out = []
    for g in range(0, len(cat_ids), 3):  # up to 3 classes per question, as the authors sample
        names = [idx.categories[c] for c in cat_ids[g : g + 3]]
        targets = [
            {
                "name": idx.categories[c],
                "description": idx.categories[c],
                "segmentations": by_cat[c],
            }
            for c in cat_ids[g : g + 3]
        ]
        out.append(
            row_spec(
                sample_id=f"{corpus}/{split}/{image_id}/g{g // 3}",
                corpus=corpus,
                split=split,
                task="semseg",
                image=path,
                hw=(im.height, im.width),
                conv=conversation(
                    ASK.format(join_names(names)),
                    join_names([f"{n} {PLACEHOLDER}" for n in names]) + ".",
                ),
                targets=targets,
                file=file,
                record=f"image {image_id}",
                meta={"file_name": im.file_name, "image_id": image_id},
            )
        )
    return out


def parse_coco(
    path: Path, images: Path | None, corpus: str, split: str | None
) -> tuple[Specs, list[Reject]]:
    """Read ``instances.json`` (a directory holding it, or the file itself).

    Raises:
        DataError: the file cannot be read as COCO instances.
    """
    file = path / "instances.json" if path.is_dir() else path
    images = images or (file.parent.parent / "images")
    sp = split or "train"
    out = Collector()
    idx = coco_index(file, images, out, sp)
    for image_id in sorted(idx.anns_by_image, key=str):
        out.run(
            file.name,
            f"image {image_id}",
            sp,
            lambda i=image_id: _image_rows(idx, i, sp, corpus, file.name),
        )
    return out.result()
