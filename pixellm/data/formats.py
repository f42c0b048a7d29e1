"""Readers of the on-disk corpus formats → row specs (one per future shard row) plus rejects.

A *row spec* is a JSON-able dict holding everything a shard row needs except the decoded image and
the RLE: ``sample_id, corpus, split, task, image_path, height, width, conversation, targets`` (each
``{name, description, segmentations: [raw COCO segmentation, …]}``), ``ignore`` (a list of raw
segmentations or None), ``meta`` and ``source``. ``pixellm.data.shards`` turns specs into rows and
quarantines the bad ones (missing or corrupt image, segmentation outside the image, ``[SEG]`` count
mismatch, empty question). Records that cannot even be read as specs are rejected here as
``malformed_record``; nothing in a record is fatal. Only an unreadable input *file* raises.

Templates follow the authors' code (reference facts): "What is {names} in this image? Please output
segmentation mask." and answers "Sure, [SEG]." / "a [SEG], b [SEG] and c [SEG]."
"""

from __future__ import annotations

import io
import json
import os
import pickle
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pixellm.data.questions import join_names
from pixellm.data.schema import CORPUS_BY_FORMAT, Reject
from pixellm.model.codebook import PLACEHOLDER

__all__ = ["DataError", "RestrictedUnpickler", "load_refs", "parse_format"]

Specs = dict[str, list[dict[str, Any]]]
_ASK = "What is {} in this image? Please output segmentation mask."


class DataError(ValueError):
    """An input file that cannot be read at all (missing, not JSON, unsafe pickle)."""


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that refuses every global: refs files hold only dicts, lists, str and numbers.

    A pickle that names any class or function (``os.system``, ``builtins.eval``, …) raises
    ``pickle.UnpicklingError`` instead of executing it.
    """

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(
            f"refusing to load global {module}.{name}: refer pickles may only hold plain data"
        )


def load_refs(path: str | Path) -> list[dict[str, Any]]:
    """Load a refer ``refs(*).p`` with restricted unpickling.

    Raises:
        DataError: the file is missing, not a pickle, names a global, or is not a list of dicts.
    """
    try:
        data = Path(path).read_bytes()
        refs = RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as err:
        raise DataError(f"{path}: cannot load refer pickle safely: {err}") from None
    if not isinstance(refs, list):
        raise DataError(f"{path}: expected a list of ref dicts, got {type(refs).__name__}")
    return refs


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot read JSON: {err}") from None


def _spec(
    sample_id: str,
    corpus: str,
    split: str,
    task: str,
    image_path: Path,
    hw: tuple,
    conv: list,
    targets: list,
    source: str,
    meta: dict,
    ignore: list | None = None,
) -> dict[str, Any]:
    return {
        "sample_id": sample_id,
        "corpus": corpus,
        "split": split,
        "task": task,
        "image_path": str(image_path),
        "height": hw[0],
        "width": hw[1],
        "conversation": conv,
        "targets": targets,
        "ignore": ignore,
        "meta": meta,
        "source": source,
    }


def _conv(question: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "text": question}, {"role": "assistant", "text": answer}]


def _hw(rec: dict) -> tuple[int | None, int | None]:
    h, w = rec.get("height"), rec.get("width")
    return (int(h), int(w)) if h is not None and w is not None else (None, None)


# ---------------------------------------------------------------- MUSE
def _muse_split(path: Path) -> str:
    stem = path.stem
    return stem[len("muse_") :] if stem.startswith("muse_") else stem


def _muse_answer(anns: list[dict]) -> str:
    """Template answer when a record has no ``text_answers``."""
    if not anns:
        return "There is no target in this image."
    names = [a.get("rephrased_name") or a["category_name"] for a in anns]
    return join_names([f"the {n} {PLACEHOLDER}" for n in names]) + "."


def _muse_record(
    rec: Any, r: int, split: str, corpus: str, images: Path, source: str
) -> list[dict]:
    if not isinstance(rec, dict):
        raise ValueError(f"record is a {type(rec).__name__}, expected an object")
    name = rec.get("file_name") or os.path.basename(str(rec.get("coco_url") or ""))
    if not name:
        raise ValueError("record has neither file_name nor coco_url")
    questions, answers = rec["questions"], rec["answers"]
    texts = rec.get("text_answers")
    if (
        not isinstance(questions, list)
        or not isinstance(answers, list)
        or len(questions) != len(answers)
    ):
        raise ValueError(
            f"questions/answers must be aligned lists, got {len(questions)} / {len(answers)}"
        )
    if texts is not None and (not isinstance(texts, list) or len(texts) != len(questions)):
        raise ValueError(f"text_answers must align with questions ({len(questions)})")
    out = []
    for q, (question, anns) in enumerate(zip(questions, answers, strict=True)):
        if not isinstance(anns, list) or not all(
            isinstance(a, dict) and "segmentation" in a for a in anns
        ):
            raise ValueError(f"answers[{q}] must be a list of instances with a segmentation")
        answer = texts[q].replace("{seg}", PLACEHOLDER) if texts is not None else _muse_answer(anns)
        targets = [
            {
                "name": str(a.get("category_name", "")),
                "description": str(a.get("rephrased_name") or a.get("category_name", "")),
                "segmentations": [a["segmentation"]],
            }
            for a in anns
        ]
        meta = {"file_name": name, "image_id": rec.get("id"), "templated": texts is None}
        out.append(
            _spec(
                f"{corpus}/{split}/{r:06d}/q{q}",
                corpus,
                split,
                "reason",
                images / name,
                _hw(rec),
                _conv(str(question), str(answer)),
                targets,
                f"{source}[{r}]",
                meta,
            )
        )
    return out


def parse_muse(
    path: Path, images: Path | None, corpus: str, split: str | None
) -> tuple[Specs, list[Reject]]:
    files = sorted(path.glob("muse_*.json")) if path.is_dir() else [path]
    if not files:
        raise DataError(f"{path}: no muse_*.json files found")
    images = images or (files[0].parent.parent / "images")
    specs: Specs = defaultdict(list)
    rejects: list[Reject] = []
    for f in files:
        sp = split or _muse_split(f)
        records = _load_json(f)
        if not isinstance(records, list):
            raise DataError(f"{f}: expected a list of image records, got {type(records).__name__}")
        for r, rec in enumerate(records):
            _guard(
                lambda rec=rec, r=r, sp=sp, f=f: specs[sp].extend(
                    _muse_record(rec, r, sp, corpus, images, f.name)
                ),
                rejects,
                f"{f.name}[{r}]",
                sp,
            )
    return specs, rejects


def _guard(fn: Callable[[], Any], rejects: list[Reject], source: str, split: str | None) -> None:
    """Run one record's parser; a malformed record becomes a reject, never an exception."""
    try:
        fn()
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
        detail = f"missing key {err}" if isinstance(err, KeyError) else str(err)
        rejects.append(Reject(source, "malformed_record", detail, split=split))


# ---------------------------------------------------------------- COCO (semantic style)
def _coco_index(coco: Any, src: str, rejects: list[Reject]) -> tuple[dict, dict, dict]:
    if not isinstance(coco, dict) or not isinstance(coco.get("images"), list):
        raise DataError(f"{src}: not a COCO instances file (no 'images' list)")
    images, anns = {}, defaultdict(list)
    cats = {c["id"]: c["name"] for c in coco.get("categories", [])}
    for i, im in enumerate(coco["images"]):
        _guard(
            lambda im=im: images.__setitem__(
                im["id"], (im["file_name"], int(im["height"]), int(im["width"]))
            ),
            rejects,
            f"{src}:images[{i}]",
            None,
        )
    for i, a in enumerate(coco.get("annotations", [])):

        def add(a: Any = a) -> None:
            if (
                a["image_id"] not in images
                or a["category_id"] not in cats
                or "segmentation" not in a
            ):
                raise ValueError(
                    f"annotation {a.get('id')} has an unknown image/category or no segmentation"
                )
            anns[a["image_id"]].append(a)

        _guard(add, rejects, f"{src}:annotations[{i}]", None)
    return images, anns, cats


def parse_coco(
    path: Path, images: Path | None, corpus: str, split: str | None
) -> tuple[Specs, list[Reject]]:
    file = path / "instances.json" if path.is_dir() else path
    images = images or (file.parent.parent / "images")
    split = split or "train"
    rejects: list[Reject] = []
    index, anns, cats = _coco_index(_load_json(file), file.name, rejects)
    specs: Specs = defaultdict(list)
    for image_id in sorted(anns, key=str):
        name, h, w = index[image_id]
        by_cat: dict[int, list] = defaultdict(list)
        for a in anns[image_id]:
            by_cat[a["category_id"]].append(a["segmentation"])
        cat_ids = sorted(by_cat)
        for g in range(0, len(cat_ids), 3):  # up to 3 classes per question, as the authors sample
            group = cat_ids[g : g + 3]
            names = [cats[c] for c in group]
            targets = [
                {"name": cats[c], "description": cats[c], "segmentations": by_cat[c]} for c in group
            ]
            answer = join_names([f"{n} {PLACEHOLDER}" for n in names]) + "."
            specs[split].append(
                _spec(
                    f"{corpus}/{split}/{image_id}/g{g // 3}",
                    corpus,
                    split,
                    "semseg",
                    images / name,
                    (h, w),
                    _conv(_ASK.format(join_names(names)), answer),
                    targets,
                    f"{file.name}:image {image_id}",
                    {"file_name": name, "image_id": image_id},
                )
            )
    return specs, rejects


# ---------------------------------------------------------------- refer (refCOCO family)
def _first_sentence(ref: dict) -> str:
    sents = ref["sentences"]
    if not sents or not str(sents[0].get("sent", "")).strip():
        raise ValueError(f"ref {ref.get('ref_id')} has no sentence")
    return str(sents[0]["sent"]).strip()


def parse_refer(
    path: Path, images: Path | None, corpus: str, split: str | None
) -> tuple[Specs, list[Reject]]:
    pickles = sorted(path.glob("refs(*).p")) if path.is_dir() else [path]
    if not pickles:
        raise DataError(f"{path}: no refs(*).p file found")
    folder = pickles[0].parent
    images = images or (folder.parent / "images")
    rejects: list[Reject] = []
    index, anns, _ = _coco_index(_load_json(folder / "instances.json"), "instances.json", rejects)
    ann_by_id = {a["id"]: a for group in anns.values() for a in group if "id" in a}
    refs = load_refs(pickles[0])
    specs: Specs = defaultdict(list)
    groups: dict[tuple[str, Any], list[tuple[str, dict]]] = defaultdict(list)
    for i, ref in enumerate(refs):

        def add(ref: Any = ref, i: int = i) -> None:
            sp = split or str(ref["split"])
            name, h, w = index[ref["image_id"]]
            ann = ann_by_id[ref["ann_id"]]
            first = _first_sentence(ref)
            target = {
                "name": str(ref.get("category_id", "")),
                "description": first,
                "segmentations": [ann["segmentation"]],
            }
            for j, s in enumerate(ref["sentences"]):
                sent = str(s.get("sent", "")).strip()
                specs[sp].append(
                    _spec(
                        f"{corpus}/{sp}/{ref['ref_id']}/s{j}",
                        corpus,
                        sp,
                        "refseg",
                        images / name,
                        (h, w),
                        _conv(_ASK.format(sent), f"Sure, {PLACEHOLDER}."),
                        [dict(target, description=sent)],
                        f"{pickles[0].name}[{i}]",
                        {"file_name": name, "image_id": ref["image_id"], "ref_id": ref["ref_id"]},
                    )
                )
            groups[(sp, ref["image_id"])].append((first, target))

        _guard(add, rejects, f"{pickles[0].name}[{i}]", split)
    for (sp, image_id), items in sorted(groups.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        name, h, w = index[image_id]
        for k in (6, 5, 4):  # MrefCOCO: 6, 5, 4 expressions per question
            if len(items) < k:
                continue
            chosen = items[:k] if k == 6 else items[len(items) - k :]
            sents = [s for s, _ in chosen]
            answer = "Sure, " + join_names([PLACEHOLDER] * k) + "."
            specs[sp].append(
                _spec(
                    f"{corpus}/{sp}/{image_id}/m{k}",
                    corpus,
                    sp,
                    "mrefseg",
                    images / name,
                    (h, w),
                    _conv(_ASK.format(join_names(sents)), answer),
                    [t for _, t in chosen],
                    f"{pickles[0].name}:image {image_id}",
                    {"file_name": name, "image_id": image_id},
                )
            )
    return specs, rejects


# ---------------------------------------------------------------- ReasonSeg
def _reason_image(json_path: Path, rec: dict, images: Path) -> Path:
    for ext in (".jpg", ".png", ".jpeg"):
        beside = json_path.with_suffix(ext)
        if beside.exists():
            return beside
    return images / str(rec.get("imagePath") or json_path.with_suffix(".jpg").name)


def _reason_file(f: Path, sp: str, corpus: str, images: Path) -> list[dict]:
    rec = _load_json(f)
    if not isinstance(rec, dict):
        raise ValueError(f"expected an object, got {type(rec).__name__}")
    texts, shapes = rec["text"], rec["shapes"]
    texts = [texts] if isinstance(texts, str) else texts
    polys: dict[str, list] = {"target": [], "ignore": []}
    for s in shapes:
        if s["label"] in polys:
            polys[s["label"]].append([float(v) for pt in s["points"] for v in pt])
    if not polys["target"]:
        raise ValueError("no shape labelled 'target'")
    hw = (rec.get("imageHeight"), rec.get("imageWidth"))
    hw = (int(hw[0]), int(hw[1])) if None not in hw else (None, None)
    target = {"name": "target", "description": "", "segmentations": [polys["target"]]}
    out = []
    for t, text in enumerate(texts):
        text = str(text).strip()
        question = (
            f"{text} Please output segmentation mask."
            if rec.get("is_sentence")
            else _ASK.format(text)
        )
        out.append(
            _spec(
                f"{corpus}/{sp}/{f.stem}/t{t}",
                corpus,
                sp,
                "reason",
                _reason_image(f, rec, images),
                hw,
                _conv(question if text else "", f"Sure, {PLACEHOLDER}."),
                [dict(target, description=text)],
                f.name,
                {"file_name": f.stem, "is_sentence": bool(rec.get("is_sentence"))},
                ignore=[polys["ignore"]] if polys["ignore"] else None,
            )
        )
    return out


def parse_reasonseg(
    path: Path, images: Path | None, corpus: str, split: str | None
) -> tuple[Specs, list[Reject]]:
    dirs = (
        sorted(d for d in path.iterdir() if d.is_dir() and any(d.glob("*.json")))
        if path.is_dir()
        else []
    )
    dirs = dirs or [path]
    images = images or (path.parent / "images")
    specs: Specs = defaultdict(list)
    rejects: list[Reject] = []
    for d in dirs:
        sp = split or d.name
        for f in sorted(d.glob("*.json")):
            _guard(
                lambda f=f, sp=sp: specs[sp].extend(_reason_file(f, sp, corpus, images)),
                rejects,
                f"{d.name}/{f.name}",
                sp,
            )
    return specs, rejects


# ---------------------------------------------------------------- LLaVA-Instruct
_ROLES = {"human": "user", "gpt": "assistant", "user": "user", "assistant": "assistant"}


def _llava_record(rec: Any, r: int, sp: str, corpus: str, images: Path, source: str) -> dict:
    turns = rec["conversations"]
    if not isinstance(turns, list) or not turns or len(turns) % 2:
        raise ValueError(
            f"conversations must be a non-empty list of user/assistant pairs, got {len(turns)}"
        )
    conv = []
    for t, turn in enumerate(turns):
        role = _ROLES.get(str(turn["from"]))
        if role != ("user" if t % 2 == 0 else "assistant"):
            raise ValueError(f"turn {t} has role {turn['from']!r}; expected alternating human/gpt")
        conv.append({"role": role, "text": str(turn["value"]).replace("<image>", "").strip()})
    name = str(rec["image"])
    return _spec(
        f"{corpus}/{sp}/{rec.get('id', r)}",
        corpus,
        sp,
        "vqa",
        images / name,
        (None, None),
        conv,
        [],
        f"{source}[{r}]",
        {"file_name": name, "id": rec.get("id")},
    )


def parse_llava(
    path: Path, images: Path | None, corpus: str, split: str | None
) -> tuple[Specs, list[Reject]]:
    file = (
        path if path.is_file() else next(iter(sorted(path.glob("*.json"))), path / "missing.json")
    )
    images = images or (file.parent.parent / "images")
    sp = split or "train"
    records = _load_json(file)
    if not isinstance(records, list):
        raise DataError(f"{file}: expected a list of records, got {type(records).__name__}")
    specs: Specs = defaultdict(list)
    rejects: list[Reject] = []
    for r, rec in enumerate(records):
        _guard(
            lambda rec=rec, r=r: specs[sp].append(
                _llava_record(rec, r, sp, corpus, images, file.name)
            ),
            rejects,
            f"{file.name}[{r}]",
            sp,
        )
    return specs, rejects


_PARSERS = {
    "muse": parse_muse,
    "coco": parse_coco,
    "refer": parse_refer,
    "reasonseg": parse_reasonseg,
    "llava": parse_llava,
}


def parse_format(
    fmt: str,
    input_path: str | Path,
    images: str | Path | None = None,
    corpus: str | None = None,
    split: str | None = None,
) -> tuple[Specs, list[Reject]]:
    """Read one corpus in its on-disk format.

    Args:
        fmt: muse | coco | refer | reasonseg | llava.
        input_path: the file or directory of the format (see each ``parse_*``).
        images: image directory (default: ``images/`` beside the format's directory).
        corpus: corpus name written into rows (default per format, ``CORPUS_BY_FORMAT``).
        split: force one split name (default: from the files — MUSE file names, refer ``split``
            fields, ReasonSeg sub-directories; ``train`` for coco and llava).

    Returns:
        ``({split: [row spec, …]}, [Reject, …])`` in a deterministic order.

    Raises:
        DataError: the input cannot be read at all (missing file, bad JSON, unsafe pickle).
        ValueError: unknown format.
    """
    if fmt not in _PARSERS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {sorted(_PARSERS)}")
    path = Path(input_path)
    if not path.exists():
        raise DataError(f"--input {path} does not exist")
    specs, rejects = _PARSERS[fmt](
        path, Path(images) if images else None, corpus or CORPUS_BY_FORMAT[fmt], split
    )
    return dict(specs), rejects
