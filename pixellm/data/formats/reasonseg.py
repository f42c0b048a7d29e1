"""ReasonSeg (LISA; LabelMe-style JSON): ``{train,val,test}/<name>.json`` beside ``<name>.jpg``.

A file is one record: ``text`` (an instruction or a list of them), ``is_sentence``, ``shapes`` =
``[{label, points: [[x, y], …]}]``. One row per text; the split is the sub-directory name.

Label rule (the reference loader's, so scores stay comparable): a shape labelled ``flag`` (any
case) is skipped; a label *containing* ``ignore`` (any case) is an ignore region (excluded from
scoring); every other label is part of the one target. A file without a target shape is rejected
as ``no_target``. Where a target and an ignore region overlap, the overlap is ignored (the
reference paints smaller polygons over larger ones instead).

Each file is read as UTF-8, falling back to cp1252 as the reference loader does; because a file
is a single record, a file that cannot be read at all is quarantined as that record
(``malformed_record``) rather than stopping the build.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field

from pixellm.data.formats.common import (
    ASK,
    Collector,
    DataError,
    Record,
    RecordRejected,
    Side,
    Specs,
    Text,
    conversation,
    image_path,
    read_json,
    row_spec,
    split_name,
    validate,
)
from pixellm.data.schema import Reject, RejectReason
from pixellm.model.codebook import PLACEHOLDER

__all__ = ["ReasonSegRecord", "ReasonSegShape", "label_role", "parse_reasonseg"]

_IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg")


class ReasonSegShape(Record):
    label: Text
    points: Annotated[
        list[Annotated[list[float], Field(min_length=2, max_length=2)]], Field(min_length=3)
    ]


class ReasonSegRecord(Record):
    text: Annotated[Text, Field(min_length=1)] | Annotated[list[Text], Field(min_length=1)]
    is_sentence: bool = False
    shapes: list[ReasonSegShape]
    imagePath: Text | None = None  # noqa: N815 (LabelMe's key)
    imageHeight: Side | None = None  # noqa: N815
    imageWidth: Side | None = None  # noqa: N815


def label_role(label: str) -> str:
    """``"target"``, ``"ignore"`` or ``"skip"`` for a shape label (see the module docstring)."""
    low = label.strip().lower()
    if low == "flag":
        return "skip"
    return "ignore" if "ignore" in low else "target"


def _image(json_path: Path, rec: ReasonSegRecord, images: Path) -> Path:
    """The image beside the JSON (named after the JSON itself), else ``imagePath`` in images."""
    for ext in _IMAGE_SUFFIXES:
        beside = json_path.with_suffix(ext)
        if beside.exists():
            return beside
    return image_path(images, rec.imagePath or json_path.with_suffix(".jpg").name)


def _rows(f: Path, sp: str, corpus: str, images: Path) -> list[dict]:
    try:
        raw = read_json(f, fallback_encoding="cp1252")
    except DataError as err:
        raise RecordRejected(
            RejectReason.MALFORMED_RECORD, str(err).removeprefix(f"{f}: ")
        ) from None
    rec = validate(ReasonSegRecord, raw)
    polys: dict[str, list] = {"target": [], "ignore": [], "skip": []}
    for s in rec.shapes:
        polys[label_role(s.label)].append([v for pt in s.points for v in pt])
    if not polys["target"]:
        labels = sorted({s.label for s in rec.shapes})
        raise RecordRejected(RejectReason.NO_TARGET, f"no target shape (labels seen: {labels})")
    texts = [rec.text] if isinstance(rec.text, str) else rec.text
    # a forced --split gathers several directories into one split: their file names could collide
    key = f.stem if f.parent.name == sp else f"{f.parent.name}/{f.stem}"
    image = _image(f, rec, images)
    out = []
    for t, text in enumerate(texts):
        text = text.strip()
        question = (
            f"{text} Please output segmentation mask." if rec.is_sentence else ASK.format(text)
        )
        out.append(
            row_spec(
                sample_id=f"{corpus}/{sp}/{key}/t{t}",
                corpus=corpus,
                split=sp,
                task="reason",
                image=image,
                hw=(rec.imageHeight, rec.imageWidth)
                if rec.imageHeight and rec.imageWidth
                else (None, None),
                conv=conversation(question if text else "", f"Sure, {PLACEHOLDER}."),
                targets=[
                    {"name": "target", "description": text, "segmentations": [polys["target"]]}
                ],
                file=f"{f.parent.name}/{f.name}",
                record="[0]",
                meta={"file_name": f.stem, "is_sentence": rec.is_sentence},
                ignore=[polys["ignore"]] if polys["ignore"] else None,
            )
        )
    return out


def parse_reasonseg(
    path: Path, images: Path | None, corpus: str, split: str | None
) -> tuple[Specs, list[Reject]]:
    """Read a ReasonSeg directory (one sub-directory per split) or one split directory.

    Raises:
        DataError: a split directory name that cannot name a shard directory.
    """
    dirs = (
        sorted(d for d in path.iterdir() if d.is_dir() and any(d.glob("*.json")))
        if path.is_dir()
        else []
    )
    dirs = dirs or [path]
    images = images or (path.parent / "images")
    if not any(any(d.glob("*.json")) for d in dirs):
        raise DataError(f"{path}: no ReasonSeg *.json files found (one directory per split)")
    out = Collector()
    for d in dirs:
        try:
            sp = split_name(split or d.name)
        except ValueError as err:
            raise DataError(f"{d}: {err}") from None
        for f in sorted(d.glob("*.json")):
            out.run(
                f"{d.name}/{f.name}", "[0]", sp, lambda f=f, sp=sp: _rows(f, sp, corpus, images)
            )
    return out.result()
