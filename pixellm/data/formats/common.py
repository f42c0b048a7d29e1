"""What every converter shares: file loading, record validation, image paths, row specs.

A *row spec* is a JSON-able dict holding everything a shard row needs except the decoded image and
the RLE: ``sample_id, corpus, split, task, image_path, height, width, conversation, targets`` (each
``{name, description, segmentations: [raw COCO segmentation, …]}``), ``ignore`` (a list of raw
segmentations or None), ``meta``, and ``file`` / ``record`` (where it came from).

Two kinds of problems, never confused:

- a *file* that cannot be read as the format (missing, not UTF-8, not JSON, nested deeper than
  ``MAX_JSON_DEPTH``, top level of the wrong type) raises ``DataError`` — the CLI prints one line
  and exits 2;
- a bad *record* raises ``RecordRejected`` inside its converter, which ``Collector`` turns into a
  ``Reject`` (reason from the closed ``RejectReason`` set, file, record index or id).
"""

from __future__ import annotations

import json
import os
import re
import reprlib
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import numpy as np
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, with_config
from pydantic_core import PydanticCustomError
from typing_extensions import TypedDict

from pixellm.data.schema import Reject, RejectReason

__all__ = [
    "ASK",
    "MAX_JSON_DEPTH",
    "Collector",
    "DataError",
    "Id",
    "Record",
    "RecordRejected",
    "Segmentation",
    "Side",
    "Specs",
    "Text",
    "conversation",
    "duplicates",
    "expect",
    "image_path",
    "read_json",
    "row_spec",
    "split_name",
    "validate",
]

Specs = dict[str, list[dict[str, Any]]]
ASK = "What is {} in this image? Please output segmentation mask."
MAX_JSON_DEPTH = 64  # real corpora nest at most 7 levels (MUSE polygons); Python's parser ~1000
_SPLIT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
M = TypeVar("M", bound=BaseModel)
_SHORT = reprlib.Repr()  # depth-limited: a 100,000-deep value is shown as [[[...]]]
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother, _SHORT.maxlist, _SHORT.maxdict = 3, 60, 60, 4, 4


class DataError(ValueError):
    """An input file that cannot be read at all (missing, not UTF-8/JSON, too deep, wrong type)."""


class RecordRejected(Exception):
    """One record is quarantined: raised inside a converter, caught by ``Collector.run``."""

    def __init__(self, reason: RejectReason, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


# ---------------------------------------------------------------- record models
class Record(BaseModel):
    """Base of the per-format record models: strict types, unknown keys ignored (corpora carry
    many fields we do not use), frozen."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


def _utf8(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise PydanticCustomError(
            "invalid_text",
            "not valid UTF-8 text: {bad} at character {at}",
            {"bad": ascii(text[err.start : err.end]), "at": err.start},
        ) from None
    return text


# Every string a record model accepts: a lone surrogate ("\udcff", legal in JSON escapes and in
# pickles) would crash pa.Table.from_pylist much later, so it is a reject here.
Text = Annotated[str, AfterValidator(_utf8)]
Id = int | Text
Side = Annotated[int, Field(ge=1, le=1_000_000)]  # pixels


@with_config(ConfigDict(strict=True))
class RLE(TypedDict):
    """COCO RLE: ``counts`` uncompressed (run lengths) or compressed (pycocotools string)."""

    size: Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=2, max_length=2)]
    counts: list[Annotated[int, Field(ge=0)]] | Text


# Flat polygons [x0, y0, x1, y1, …] or an RLE; geometry (point count, bounds) is the writer's check.
Segmentation = list[list[float]] | RLE


def validate(model: type[M], rec: Any) -> M:
    """``rec`` → a validated ``model``; a record that does not fit is rejected, never raises else.

    Raises:
        RecordRejected: ``invalid_text`` (a lone surrogate in any string the model reads) or
            ``malformed_record`` (pydantic's first errors, naming the field and the value seen).
    """
    try:
        return model.model_validate(rec)
    except ValidationError as err:
        errs = err.errors(include_url=False)
        text = [e for e in errs if e["type"] == "invalid_text"]
        if text:
            loc = ".".join(str(x) for x in text[0]["loc"])
            raise RecordRejected(RejectReason.INVALID_TEXT, f"{loc}: {text[0]['msg']}") from None
        parts = []
        for e in errs[:3]:
            loc = ".".join(str(x) for x in e["loc"]) or "record"
            parts.append(f"{loc}: {e['msg']} (got {_SHORT.repr(e['input'])})")
        more = f"; and {len(errs) - 3} more" if len(errs) > 3 else ""
        raise RecordRejected(RejectReason.MALFORMED_RECORD, "; ".join(parts) + more) from None
    except RecursionError:
        raise RecordRejected(RejectReason.MALFORMED_RECORD, "record nested too deep") from None


# ---------------------------------------------------------------- files
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_BRACKET = np.zeros(256, dtype=np.int8)
_BRACKET[[ord("["), ord("{")]] = 1
_BRACKET[[ord("]"), ord("}")]] = -1


def _json_depth(raw: bytes) -> tuple[int, int]:
    """(max nesting depth, byte offset where it is reached) of JSON text, strings skipped.

    Linear and C-speed (regex + numpy), so a 200,000-deep value is measured, never recursed into.
    """
    step = _BRACKET[np.frombuffer(_STRING.sub(b'""', raw), dtype=np.uint8)]
    where = np.flatnonzero(step)
    if where.size == 0:
        return 0, 0
    depth = np.cumsum(step[where], dtype=np.int32)
    top = int(depth.argmax())
    return int(depth[top]), int(where[top])


def read_json(path: Path, fallback_encoding: str | None = None) -> Any:
    """Parse one JSON file, refusing anything that is not UTF-8 JSON nested <= ``MAX_JSON_DEPTH``.

    Args:
        path: the file.
        fallback_encoding: tried when the bytes are not UTF-8 (ReasonSeg: ``cp1252``, as the
            reference loader does).

    Raises:
        DataError: one line naming the file and the problem.
    """
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read: {err.strerror or err}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        if fallback_encoding is None:
            raise DataError(
                f"{path}: not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start}); "
                "re-encode the file as UTF-8"
            ) from None
        try:
            text = raw.decode(fallback_encoding)
        except UnicodeDecodeError:
            raise DataError(
                f"{path}: neither UTF-8 nor {fallback_encoding} text (byte 0x{raw[err.start]:02x} "
                f"at offset {err.start})"
            ) from None
    depth, at = _json_depth(raw)
    if depth > MAX_JSON_DEPTH:
        raise DataError(
            f"{path}: JSON nested {depth} levels deep (at byte {at}); the limit is {MAX_JSON_DEPTH}"
        )
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as err:
        raise DataError(f"{path}: not valid JSON: {err}") from None


def expect(value: Any, kind: type, path: Path | str, what: str) -> Any:
    """File-level type check: ``value`` must be a ``kind`` or the file is refused.

    Raises:
        DataError: ``"{path}: {what} must be a {kind}, got {type}"``.
    """
    if not isinstance(value, kind):
        got = "null or nothing" if value is None else f"a {type(value).__name__}"
        raise DataError(f"{path}: {what} must be a {kind.__name__}, got {got}")
    return value


# ---------------------------------------------------------------- records
def image_path(root: Path, name: str) -> Path:
    """``root / name`` for an image name taken from a corpus file, which must stay inside ``root``.

    The check is on the name (absolute, ``..`` leaving ``root``, NUL byte): the file is never
    opened or even stat'ed when it fails. Symlinks inside ``root`` are the operator's and followed.

    Raises:
        RecordRejected: ``image_path_escape``.
    """
    norm = os.path.normpath(name) if name else ""
    if (
        not norm
        or "\x00" in name
        or os.path.isabs(name)
        or name.startswith(("/", "\\"))
        or norm == ".."
        or norm.startswith(("../", "..\\"))
    ):
        raise RecordRejected(
            RejectReason.IMAGE_PATH_ESCAPE,
            f"image name {name!r} is empty, absolute or leaves the image directory {root}",
        )
    return root / norm


def split_name(name: str) -> str:
    """A split name as used in shard paths (``OUT/<split>/…``): letters, digits, ``_.-``.

    Raises:
        ValueError: any other name (it would write outside ``--out``).
    """
    if not isinstance(name, str) or not _SPLIT.fullmatch(name):
        raise ValueError(
            f"split name {name!r} must match {_SPLIT.pattern} (it names a directory under --out)"
        )
    return name


def duplicates(keys: Iterable[Hashable | None]) -> dict[Hashable, list[int]]:
    """``key → [indexes]`` of every key that occurs more than once (None keys are skipped)."""
    seen: dict[Hashable, list[int]] = defaultdict(list)
    for i, k in enumerate(keys):
        if k is not None:
            seen[k].append(i)
    return {k: v for k, v in seen.items() if len(v) > 1}


def conversation(question: str, answer: str) -> list[dict[str, str]]:
    """One user / assistant exchange."""
    return [{"role": "user", "text": question}, {"role": "assistant", "text": answer}]


def row_spec(
    *,
    sample_id: str,
    corpus: str,
    split: str,
    task: str,
    image: Path,
    hw: tuple[int | None, int | None],
    conv: list[dict[str, str]],
    targets: list[dict[str, Any]],
    file: str,
    record: str,
    meta: dict[str, Any],
    ignore: list | None = None,
) -> dict[str, Any]:
    """The row spec dict (see the module docstring)."""
    return {
        "sample_id": sample_id,
        "corpus": corpus,
        "split": split,
        "task": task,
        "image_path": str(image),
        "height": hw[0],
        "width": hw[1],
        "conversation": conv,
        "targets": targets,
        "ignore": ignore,
        "meta": meta,
        "file": file,
        "record": record,
    }


class Collector:
    """Row specs by split plus rejects, filled record by record."""

    def __init__(self) -> None:
        self.specs: Specs = defaultdict(list)
        self.rejects: list[Reject] = []

    def reject(
        self, file: str, record: str, reason: RejectReason, detail: str, split: str | None = None
    ) -> None:
        self.rejects.append(Reject(file, record, reason, detail, split=split))

    def run(
        self, file: str, record: str, split: str | None, fn: Callable[[], list[dict[str, Any]]]
    ) -> bool:
        """Add ``fn()``'s specs; a ``RecordRejected`` becomes a reject. True when accepted."""
        try:
            specs = fn()
        except RecordRejected as err:
            self.reject(file, record, err.reason, err.detail, split)
            return False
        for s in specs:
            self.specs[s["split"]].append(s)
        return True

    def result(self) -> tuple[Specs, list[Reject]]:
        return dict(self.specs), list(self.rejects)
