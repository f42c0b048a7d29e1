"""MUSE (``muse_{train,val,test_less,test_many}.json``): one record per image, several questions.

A record (reference facts): ``file_name`` or ``coco_url``, ``height``, ``width``, ``questions``,
``answers`` (aligned; each a list of instance dicts with ``category_name``, optional
``rephrased_name`` and a COCO ``segmentation``), optional ``text_answers`` (aligned; ``{seg}``
marks each instance). One row per question; the split is the file name's suffix.

A duplicated image ``id`` within one file is rejected for *every* record holding it: which one
the annotator meant cannot be told. Records without ``id`` are not compared (several records may
ask about one image file; their rows never merge).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

from pydantic import Field, model_validator

from pixellm.data.formats.common import (
    Collector,
    DataError,
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
    split_name,
    validate,
)
from pixellm.data.questions import join_names
from pixellm.data.schema import Reject, RejectReason
from pixellm.model.codebook import PLACEHOLDER

__all__ = ["MuseInstance", "MuseRecord", "parse_muse"]


class MuseInstance(Record):
    """One instance answering a question."""

    category_name: Annotated[Text, Field(min_length=1)]
    rephrased_name: Text | None = None
    segmentation: Segmentation


class MuseRecord(Record):
    """One MUSE image record."""

    id: Id | None = None
    file_name: Text | None = None
    coco_url: Text | None = None
    height: Side | None = None
    width: Side | None = None
    questions: list[Text]
    answers: list[list[MuseInstance]]
    text_answers: list[Text] | None = None

    @model_validator(mode="after")
    def _aligned(self) -> MuseRecord:
        if not (self.file_name or self.coco_url):
            raise ValueError("record has neither file_name nor coco_url")
        if len(self.answers) != len(self.questions):
            raise ValueError(
                f"questions/answers must align, got {len(self.questions)} / {len(self.answers)}"
            )
        if self.text_answers is not None and len(self.text_answers) != len(self.questions):
            raise ValueError(
                f"text_answers ({len(self.text_answers)}) must align with questions "
                f"({len(self.questions)})"
            )
        if (self.height is None) != (self.width is None):
            raise ValueError("height and width must be given together")
        return self

    @property
    def image_name(self) -> str:
        return self.file_name or os.path.basename(self.coco_url or "")


def _answer(anns: list[MuseInstance]) -> str:
    """Template answer when a record has no ``text_answers``."""
    if not anns:
        return "There is no target in this image."
    names = [a.rephrased_name or a.category_name for a in anns]
    return join_names([f"the {n} {PLACEHOLDER}" for n in names]) + "."


def _rows(rec: MuseRecord, r: int, split: str, corpus: str, images: Path, file: Path) -> list[dict]:
    image = image_path(images, rec.image_name)
    # a forced --split gathers several files into one split: their record indexes would collide
    key = f"{r:06d}" if _split_of(file) == split else f"{file.stem}/{r:06d}"
    out = []
    for q, (question, anns) in enumerate(zip(rec.questions, rec.answers, strict=True)):
        texts = rec.text_answers
        answer = texts[q].replace("{seg}", PLACEHOLDER) if texts is not None else _answer(anns)
        targets = [
            {
                "name": a.category_name,
                "description": a.rephrased_name or a.category_name,
                "segmentations": [a.segmentation],
            }
            for a in anns
        ]
        out.append(
            row_spec(
                sample_id=f"{corpus}/{split}/{key}/q{q}",
                corpus=corpus,
                split=split,
                task="reason",
                image=image,
                hw=(rec.height, rec.width),
                conv=conversation(question, answer),
                targets=targets,
                file=file.name,
                record=f"[{r}]",
                meta={"file_name": rec.image_name, "image_id": rec.id, "templated": texts is None},
            )
        )
    return out


def _split_of(path: Path) -> str:
    stem = path.stem
    return stem[len("muse_") :] if stem.startswith("muse_") else stem


def _parse_file(f: Path, split: str, corpus: str, images: Path, out: Collector) -> None:
    raw = expect(read_json(f), list, f, "the top level (a list of image records)")
    recs: list[MuseRecord | None] = []
    for r, item in enumerate(raw):
        try:
            recs.append(validate(MuseRecord, item))
        except RecordRejected as err:
            out.reject(f.name, f"[{r}]", err.reason, err.detail, split)
            recs.append(None)
    keys = [None if m is None or m.id is None else str(m.id) for m in recs]
    dup = duplicates(keys)
    for r, rec in enumerate(recs):
        if rec is None:
            continue
        if keys[r] in dup:
            others = [f"[{i}]" for i in dup[keys[r]] if i != r]
            out.reject(
                f.name,
                f"[{r}]",
                RejectReason.DUPLICATE_ID,
                f"image {keys[r]!r} also at {', '.join(others)}; every copy is rejected",
                split,
            )
            continue
        out.run(
            f.name,
            f"[{r}]",
            split,
            lambda rec=rec, r=r: _rows(rec, r, split, corpus, images, f),
        )


def parse_muse(
    path: Path, images: Path | None, corpus: str, split: str | None
) -> tuple[Specs, list[Reject]]:
    """Read a MUSE directory (every ``muse_*.json``) or one MUSE file.

    Raises:
        DataError: no MUSE file, or a file that is not a JSON list.
    """
    files = sorted(path.glob("muse_*.json")) if path.is_dir() else [path]
    if not files:
        raise DataError(f"{path}: no muse_*.json files found")
    images = images or (files[0].parent.parent / "images")
    out = Collector()
    for f in files:
        try:
            sp = split_name(split or _split_of(f))
        except ValueError as err:
            raise DataError(f"{f}: {err}") from None
        _parse_file(f, sp, corpus, images, out)
    return out.result()
