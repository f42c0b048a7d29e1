"""refer format (refCOCO / refCOCO+ / refCOCOg): ``refs(*).p`` + ``instances.json`` → rows.

Each expression (sentence) of a ref is one ``refseg`` row; the refs of one image are also grouped
6, 5 and 4 per question (MrefCOCO, reference facts) as ``mrefseg`` rows. A target's ``name`` is
the COCO category name of its annotation, its ``description`` the expression.

The pickle is loaded with ``RestrictedUnpickler``: a pickle naming any global is refused, never
run. A ref whose ``ref_id`` repeats is rejected (every copy), as is a ref naming a missing,
rejected or mismatched image/annotation (``bad_reference``).
"""

from __future__ import annotations

import io
import pickle
from collections import defaultdict
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field

from pixellm.data.formats.coco import CocoIndex, coco_index
from pixellm.data.formats.common import (
    ASK,
    Collector,
    DataError,
    Id,
    Record,
    RecordRejected,
    Specs,
    Text,
    conversation,
    duplicates,
    row_spec,
    split_name,
    validate,
)
from pixellm.data.questions import join_names
from pixellm.data.schema import Reject, RejectReason
from pixellm.model.codebook import PLACEHOLDER

__all__ = ["ReferRef", "RestrictedUnpickler", "load_refs", "parse_refer"]


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that refuses every global: refs files hold only dicts, lists, str and numbers.

    A pickle that names any class or function (``os.system``, ``builtins.eval``, …) raises
    ``pickle.UnpicklingError`` instead of executing it.
    """

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(
            f"refusing to load global {module}.{name}: refer pickles may only hold plain data"
        )


def load_refs(path: str | Path) -> list[Any]:
    """Load a refer ``refs(*).p`` with restricted unpickling.

    Raises:
        DataError: the file is missing, not a pickle, names a global, or is not a list.
    """
    try:
        data = Path(path).read_bytes()
        refs = RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, RecursionError) as err:
        raise DataError(f"{path}: cannot load refer pickle safely: {err}") from None
    if not isinstance(refs, list):
        raise DataError(f"{path}: expected a list of ref dicts, got {type(refs).__name__}")
    return refs


class ReferSentence(Record):
    sent: Text


class ReferRef(Record):
    """One referred object: its annotation and the expressions describing it."""

    ref_id: Id
    ann_id: Id
    image_id: Id
    split: Text
    sentences: Annotated[list[ReferSentence], Field(min_length=1)]


def _check_ref(ref: ReferRef, idx: CocoIndex) -> tuple[Any, str]:
    """(the ref's annotation, its category name) or a reject."""
    if ref.image_id not in idx.images:
        raise RecordRejected(
            RejectReason.BAD_REFERENCE,
            f"image id {ref.image_id!r} is not a valid image of instances.json",
        )
    ann = idx.anns_by_id.get(ref.ann_id)
    if ann is None:
        raise RecordRejected(
            RejectReason.BAD_REFERENCE,
            f"ann id {ref.ann_id!r} is not a valid annotation of instances.json",
        )
    if str(ann.image_id) != str(ref.image_id):
        raise RecordRejected(
            RejectReason.BAD_REFERENCE,
            f"ann {ref.ann_id!r} belongs to image {ann.image_id!r}, the ref says {ref.image_id!r}",
        )
    if not any(s.sent.strip() for s in ref.sentences):
        raise RecordRejected(RejectReason.MALFORMED_RECORD, "every sentence is empty")
    return ann, idx.categories[ann.category_id]


def _ref_rows(
    ref: ReferRef, sp: str, idx: CocoIndex, corpus: str, file: str, r: int, groups: dict
) -> list[dict]:
    ann, name = _check_ref(ref, idx)
    im, path = idx.images[ref.image_id]
    out = []
    for j, s in enumerate(ref.sentences):
        sent = s.sent.strip()
        out.append(
            row_spec(
                sample_id=f"{corpus}/{sp}/{ref.ref_id}/s{j}",
                corpus=corpus,
                split=sp,
                task="refseg",
                image=path,
                hw=(im.height, im.width),
                conv=conversation(ASK.format(sent) if sent else "", f"Sure, {PLACEHOLDER}."),
                targets=[{"name": name, "description": sent, "segmentations": [ann.segmentation]}],
                file=file,
                record=f"[{r}]",
                meta={"file_name": im.file_name, "image_id": ref.image_id, "ref_id": ref.ref_id},
            )
        )
    first = next(s.sent.strip() for s in ref.sentences if s.sent.strip())
    target = {"name": name, "description": first, "segmentations": [ann.segmentation]}
    groups[(sp, str(ref.image_id))].append((first, target, ref.image_id))
    return out


def _group_rows(groups: dict, idx: CocoIndex, corpus: str, file: str) -> list[dict]:
    out = []
    for (sp, key), items in sorted(groups.items()):
        image_id = items[0][2]
        im, path = idx.images[image_id]
        for k in (6, 5, 4):  # MrefCOCO: 6, 5, 4 expressions per question
            if len(items) < k:
                continue
            chosen = items[:k] if k == 6 else items[len(items) - k :]
            out.append(
                row_spec(
                    sample_id=f"{corpus}/{sp}/{key}/m{k}",
                    corpus=corpus,
                    split=sp,
                    task="mrefseg",
                    image=path,
                    hw=(im.height, im.width),
                    conv=conversation(
                        ASK.format(join_names([s for s, _, _ in chosen])),
                        "Sure, " + join_names([PLACEHOLDER] * k) + ".",
                    ),
                    targets=[t for _, t, _ in chosen],
                    file=file,
                    record=f"image {image_id}",
                    meta={"file_name": im.file_name, "image_id": image_id},
                )
            )
    return out


def _raw_split(item: Any, split: str | None) -> str | None:
    """The split a ref's reject is filed under (its own when readable, else None)."""
    if split:
        return split
    raw = item.get("split") if isinstance(item, dict) else None
    try:
        return split_name(raw)
    except ValueError:
        return None


def parse_refer(
    path: Path, images: Path | None, corpus: str, split: str | None
) -> tuple[Specs, list[Reject]]:
    """Read a refer directory (``refs(*).p`` + ``instances.json``) or one refs pickle beside it.

    Raises:
        DataError: no pickle, an unsafe pickle, or an unreadable ``instances.json``.
    """
    pickles = sorted(path.glob("refs(*).p")) if path.is_dir() else [path]
    if not pickles:
        raise DataError(f"{path}: no refs(*).p file found")
    folder, pkl = pickles[0].parent, pickles[0].name
    images = images or (folder.parent / "images")
    out = Collector()
    idx = coco_index(folder / "instances.json", images, out, split, unique_ann_ids=True)
    refs = load_refs(pickles[0])
    valid: list[tuple[int, ReferRef]] = []
    for r, item in enumerate(refs):
        try:
            ref = validate(ReferRef, item)
            split_name(split or ref.split)
        except ValueError as err:  # a bad split name in the record
            out.reject(pkl, f"[{r}]", RejectReason.MALFORMED_RECORD, f"split: {err}")
            continue
        except RecordRejected as err:
            out.reject(pkl, f"[{r}]", err.reason, err.detail, _raw_split(item, split))
            continue
        valid.append((r, ref))
    dup = duplicates(str(ref.ref_id) for _, ref in valid)
    groups: dict[tuple[str, str], list] = defaultdict(list)
    for r, ref in valid:
        sp = split or ref.split
        if str(ref.ref_id) in dup:
            others = ", ".join(f"[{valid[j][0]}]" for j in dup[str(ref.ref_id)] if valid[j][0] != r)
            out.reject(
                pkl,
                f"[{r}]",
                RejectReason.DUPLICATE_ID,
                f"ref_id {ref.ref_id!r} also at {others}; every copy is rejected",
                sp,
            )
            continue
        out.run(
            pkl,
            f"[{r}]",
            sp,
            lambda ref=ref, r=r, sp=sp: _ref_rows(ref, sp, idx, corpus, pkl, r, groups),
        )
    for s in _group_rows(groups, idx, corpus, pkl):
        out.specs[s["split"]].append(s)
    return out.result()
