"""Readers of the on-disk corpus formats → row specs (one per future shard row) plus rejects.

One module per format, each with the pydantic model of its record next to its converter:
``muse``, ``coco``, ``refer``, ``reasonseg``, ``llava``; ``common`` holds what they share (file
loading, validation, image paths, the row spec). ``pixellm.data.shards`` turns specs into rows and
quarantines the rows that fail there (image, segmentation, ``[SEG]`` count, empty question).

Templates follow the authors' code (reference facts): "What is {names} in this image? Please output
segmentation mask." and answers "Sure, [SEG]." / "a [SEG], b [SEG] and c [SEG]."
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pixellm.data.formats.coco import parse_coco
from pixellm.data.formats.common import DataError, Specs, split_name
from pixellm.data.formats.llava import parse_llava
from pixellm.data.formats.muse import parse_muse
from pixellm.data.formats.reasonseg import parse_reasonseg
from pixellm.data.formats.refer import RestrictedUnpickler, load_refs, parse_refer
from pixellm.data.schema import CORPUS_BY_FORMAT, Reject, RejectReason

__all__ = ["PARSERS", "DataError", "RestrictedUnpickler", "load_refs", "parse_format"]

Parser = Callable[[Path, Path | None, str, str | None], tuple[Specs, list[Reject]]]
PARSERS: dict[str, Parser] = {
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
        DataError: the input cannot be read at all (missing, not UTF-8 / JSON, nested too deep,
            top level of the wrong type, unsafe pickle) or ``--images`` / ``--split`` is unusable.
        ValueError: unknown format.
    """
    if fmt not in PARSERS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {sorted(PARSERS)}")
    path = Path(input_path).absolute()  # Ray workers may run in another directory
    if not path.exists():
        raise DataError(f"--input {path} does not exist")
    if images is not None and not Path(images).is_dir():
        raise DataError(f"--images {images} is not a directory")
    if split is not None:
        try:
            split_name(split)
        except ValueError as err:
            raise DataError(f"--split: {err}") from None
    specs, rejects = PARSERS[fmt](
        path, Path(images).absolute() if images else None, corpus or CORPUS_BY_FORMAT[fmt], split
    )
    return _unique_sample_ids(specs, rejects)


def _unique_sample_ids(specs: Specs, rejects: list[Reject]) -> tuple[Specs, list[Reject]]:
    """The shards' key, enforced for every format: a second spec with a sample_id is rejected."""
    first: dict[str, dict] = {}
    kept: Specs = {}
    for split, rows in specs.items():
        kept[split] = []
        for s in rows:
            if s["sample_id"] in first:
                was = first[s["sample_id"]]
                rejects.append(
                    Reject(
                        s["file"],
                        s["record"],
                        RejectReason.DUPLICATE_ID,
                        f"sample_id {s['sample_id']!r} was already made from {was['file']} "
                        f"{was['record']}",
                        s["sample_id"],
                        split,
                    )
                )
                continue
            first[s["sample_id"]] = s
            kept[split].append(s)
    return kept, rejects
