"""Every bad kind of record, per format: the exact reject reason, and every good record kept once.

Each case writes a small corpus of 3 good records (images ``img0..2.png``) plus the bad one, runs
the converter and the row materialisation in-process (no Ray, no Parquet file), and checks the
rows against ``SHARD_SCHEMA`` with ``pa.Table.from_pylist`` — the call a lone surrogate used to
crash. Escaping image names point at a FIFO sentinel outside ``--images`` that must never be
opened (see ``sentinel``).
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import struct
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from PIL import Image

from pixellm.data.formats import parse_format
from pixellm.data.formats.reasonseg import label_role
from pixellm.data.schema import SHARD_SCHEMA, Reject, RejectReason
from pixellm.data.writer import materialize
from pixellm.model.codebook import PLACEHOLDER

R = RejectReason
POLY = [[2.0, 2.0, 10.0, 2.0, 10.0, 10.0, 2.0, 10.0]]
OUTSIDE = [[2.0, 2.0, 40.0, 2.0, 40.0, 10.0]]  # x = 40 > width 32


# ---------------------------------------------------------------- images and the sentinel
def _png(path: Path, size: tuple[int, int] = (32, 24)) -> None:
    Image.new("RGB", size, (200, 10, 10)).save(path)


def _header_only_png(path: Path, w: int, h: int) -> None:
    """A PNG whose header claims ``w x h`` with almost no pixel data (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


class Sentinel:
    """A FIFO outside ``--images``; any open of it for reading is recorded.

    A watcher thread blocks in ``open(O_WRONLY)``, which returns only when someone opens the FIFO
    for reading; it records that *before* writing the bytes the reader waits for, so a reader
    can never get past its read without ``opened`` being set. ``stat`` does not open a FIFO.
    """

    def __init__(self, path: Path):
        self.path = path
        os.mkfifo(path)
        self.opened = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while True:
            fd = os.open(self.path, os.O_WRONLY)  # blocks until a reader opens the FIFO
            if self._done.is_set():
                os.close(fd)
                return
            self.opened += 1
            os.write(fd, b"SECRET")
            os.close(fd)
            while not self._done.is_set():  # let that reader finish before waiting for the next
                try:
                    os.close(os.open(self.path, os.O_WRONLY | os.O_NONBLOCK))
                except OSError:  # ENXIO: no reader left
                    break
                time.sleep(0.01)

    def close(self) -> None:
        self._done.set()
        fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)  # releases the blocked watcher
        self._thread.join(timeout=10)
        os.close(fd)


@pytest.fixture
def world(tmp_path: Path):
    """``tmp/images`` (good, corrupt, bomb, big, gif images) and the sentinel ``tmp/secret``."""
    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        _png(images / f"img{i}.png")
    (images / "corrupt.png").write_bytes(b"\x89PNG not really")
    _header_only_png(images / "bomb.png", 30000, 30000)  # 900 Mpx: Pillow's own bomb error
    _header_only_png(images / "big.png", 9000, 8000)  # 72 Mpx: over our cap, under Pillow's
    Image.new("RGB", (32, 24)).save(images / "anim.gif")
    sentinel = Sentinel(tmp_path / "secret")
    yield tmp_path, sentinel
    sentinel.close()
    assert sentinel.opened == 0, "the sentinel outside --images was opened"


def _convert(fmt: str, path: Path, images: Path) -> tuple[list[dict], list[Reject]]:
    """Converter + row materialisation in-process; the rows must fit ``SHARD_SCHEMA``."""
    specs, rejects = parse_format(fmt, path, images)
    rows, cache = [], {}
    for split in sorted(specs):
        for spec in specs[split]:
            got = materialize(spec, PLACEHOLDER, cache)
            (rejects.append(got) if isinstance(got, Reject) else rows.append(got))
    pa.Table.from_pylist(rows, schema=SHARD_SCHEMA)
    return rows, rejects


# ---------------------------------------------------------------- the five formats
def _muse_base(tmp: Path) -> Any:
    return [
        {
            "id": i + 1,
            "file_name": f"img{i}.png",
            "height": 24,
            "width": 32,
            "questions": ["Which shape is red?"],
            "answers": [[{"category_name": "circle", "segmentation": POLY}]],
            "text_answers": ["the circle {seg}."],
        }
        for i in range(3)
    ]


def _muse_write(tmp: Path, doc: Any) -> Path:
    (tmp / "muse").mkdir()
    (tmp / "muse/muse_val.json").write_text(json.dumps(doc))
    return tmp / "muse"


def _coco_base(tmp: Path) -> Any:
    return {
        "images": [
            {"id": i + 1, "file_name": f"img{i}.png", "height": 24, "width": 32} for i in range(3)
        ],
        "annotations": [
            {"id": 11 + i, "image_id": i + 1, "category_id": 1, "segmentation": POLY}
            for i in range(3)
        ],
        "categories": [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}],
    }


def _coco_write(tmp: Path, doc: Any) -> Path:
    (tmp / "coco").mkdir()
    (tmp / "coco/instances.json").write_text(json.dumps(doc))
    return tmp / "coco/instances.json"


def _refer_base(tmp: Path) -> Any:
    coco = _coco_base(tmp)
    coco["images"].append({"id": 4, "file_name": "img3.png", "height": 24, "width": 32})
    coco["annotations"].append({"id": 14, "image_id": 4, "category_id": 2, "segmentation": POLY})
    refs = [
        {
            "ref_id": 101 + i,
            "ann_id": 11 + i,
            "image_id": i + 1,
            "category_id": 1,
            "split": "val",
            "sentences": [{"sent": f"the red circle {i}"}],
        }
        for i in range(3)
    ]
    return {"instances": coco, "refs": refs}


def _refer_write(tmp: Path, doc: Any) -> Path:
    (tmp / "refer").mkdir()
    (tmp / "refer/instances.json").write_text(json.dumps(doc["instances"]))
    (tmp / "refer/refs(unc).p").write_bytes(pickle.dumps(doc["refs"]))
    return tmp / "refer"


def _reasonseg_base(tmp: Path) -> Any:
    return {
        f"{i:03d}": {
            "text": ["the red circle"],
            "is_sentence": False,
            "shapes": [{"label": "target", "points": [[2, 2], [10, 2], [10, 10]]}],
            "imagePath": f"img{i}.png",
            "imageHeight": 24,
            "imageWidth": 32,
        }
        for i in range(3)
    }


def _reasonseg_write(tmp: Path, doc: Any) -> Path:
    d = tmp / "reasonseg/val"
    d.mkdir(parents=True)
    for stem, rec in doc.items():
        data = rec if isinstance(rec, bytes) else json.dumps(rec).encode()
        (d / f"{stem}.json").write_bytes(data)
    return tmp / "reasonseg"


def _llava_base(tmp: Path) -> Any:
    return [
        {
            "id": f"a{i}",
            "image": f"img{i}.png",
            "conversations": [
                {"from": "human", "value": "<image>\nHow many circles?"},
                {"from": "gpt", "value": "One."},
            ],
        }
        for i in range(3)
    ]


def _llava_write(tmp: Path, doc: Any) -> Path:
    (tmp / "llava").mkdir()
    (tmp / "llava/l.json").write_text(json.dumps(doc))
    return tmp / "llava/l.json"


@dataclass
class Format:
    base: Callable[[Path], Any]
    write: Callable[[Path, Any], Path]
    good: list[str]  # sample ids of the 3 good records
    file: str  # the file the bad record is in


FORMATS = {
    "muse": Format(
        _muse_base, _muse_write, [f"muse/val/{i:06d}/q0" for i in range(3)], "muse_val.json"
    ),
    "coco": Format(
        _coco_base, _coco_write, [f"sem_seg/train/{i}/g0" for i in (1, 2, 3)], "instances.json"
    ),
    "refer": Format(
        _refer_base, _refer_write, [f"refer_seg/val/{101 + i}/s0" for i in range(3)], "refs(unc).p"
    ),
    "reasonseg": Format(
        _reasonseg_base,
        _reasonseg_write,
        [f"reason_seg/val/{i:03d}/t0" for i in range(3)],
        "val/bad.json",
    ),
    "llava": Format(
        _llava_base, _llava_write, [f"vqa/train/a{i}/r{i}" for i in range(3)], "l.json"
    ),
}


# ---------------------------------------------------------------- the bad records
def _muse(**kw: Any) -> Callable[[Any, Path], None]:
    """Append a 4th MUSE record: the good one with ``kw`` overriding (None value = key removed)."""

    def add(doc: Any, tmp: Path) -> None:
        rec = copy.deepcopy(doc[0]) | {"id": 99, "file_name": "img3.png"}
        for k, v in kw.items():
            rec.pop(k) if v is None else rec.__setitem__(k, v(tmp) if callable(v) else v)
        doc.append(rec)

    return add


def _coco_image(**kw: Any) -> Callable[[Any, Path], None]:
    """Append image id 4 (``kw`` overriding its fields) and one annotation on it."""

    def add(doc: Any, tmp: Path) -> None:
        im = {"id": 4, "file_name": "img3.png", "height": 24, "width": 32}
        for k, v in kw.items():
            im.pop(k) if v is None else im.__setitem__(k, v(tmp) if callable(v) else v)
        doc["images"].append(im)
        doc["annotations"].append(
            {"id": 14, "image_id": im["id"], "category_id": 1, "segmentation": kw.get("seg", POLY)}
        )

    return add


def _coco_ann(**kw: Any) -> Callable[[Any, Path], None]:
    def add(doc: Any, tmp: Path) -> None:
        doc["annotations"].append(
            {"id": 14, "image_id": 1, "category_id": 1, "segmentation": POLY} | kw
        )

    return add


def _coco_cat(cat: dict) -> Callable[[Any, Path], None]:
    def add(doc: Any, tmp: Path) -> None:
        doc["categories"].append(cat)
        doc["annotations"].append({"id": 14, "image_id": 1, "category_id": 3, "segmentation": POLY})

    return add


def _ref(**kw: Any) -> Callable[[Any, Path], None]:
    """Append ref 104 on annotation 14 / image 4 (``kw`` overriding; None = key removed)."""

    def add(doc: Any, tmp: Path) -> None:
        ref = {
            "ref_id": 104,
            "ann_id": 14,
            "image_id": 4,
            "split": "val",
            "sentences": [{"sent": "the blue square"}],
        }
        for k, v in kw.items():
            ref.pop(k) if v is None else ref.__setitem__(k, v)
        doc["refs"].append(ref)

    return add


def _ref_image(file_name: Callable[[Path], str] | str) -> Callable[[Any, Path], None]:
    def change(doc: Any, tmp: Path) -> None:
        doc["instances"]["images"][3]["file_name"] = (
            file_name(tmp) if callable(file_name) else file_name
        )
        _ref()(doc, tmp)

    return change


def _rs(rec: Any = None, **kw: Any) -> Callable[[Any, Path], None]:
    """Add ``val/bad.json``: ``rec`` as is (bytes or dict), or the good record with ``kw``."""

    def add(doc: Any, tmp: Path) -> None:
        if rec is not None:
            doc["bad"] = rec
            return
        bad = copy.deepcopy(doc["000"]) | {"imagePath": "img3.png"}
        for k, v in kw.items():
            bad.pop(k) if v is None else bad.__setitem__(k, v(tmp) if callable(v) else v)
        doc["bad"] = bad

    return add


def _llava(turns: list | None = None, **kw: Any) -> Callable[[Any, Path], None]:
    def add(doc: Any, tmp: Path) -> None:
        rec = copy.deepcopy(doc[0]) | {"id": "z", "image": "img3.png"}
        if turns is not None:
            rec["conversations"] = turns
        for k, v in kw.items():
            rec.pop(k) if v is None else rec.__setitem__(k, v(tmp) if callable(v) else v)
        doc.append(rec)

    return add


def _abs(tmp: Path) -> str:
    return str(tmp / "secret")


UP = "../secret"  # from tmp/images: the sentinel
ESC, TOO_LARGE = R.IMAGE_PATH_ESCAPE, R.IMAGE_TOO_LARGE


@dataclass
class Case:
    fmt: str
    kind: str
    mutate: Callable[[Any, Path], None]
    rejects: list[tuple[str, str, RejectReason]]  # (file, record, reason)
    dropped: set[int] = field(default_factory=set)  # good records lost with the bad one
    extra: list[str] = field(default_factory=list)  # sample ids the bad-looking record adds


def _one(fmt: str, record: str, reason: RejectReason) -> list[tuple[str, str, RejectReason]]:
    return [(FORMATS[fmt].file, record, reason)]


CASES = [
    # ---- muse (bad record at [3])
    Case(
        "muse", "wrong_type", _muse(questions="not a list"), _one("muse", "[3]", R.MALFORMED_RECORD)
    ),
    Case("muse", "missing_key", _muse(answers=None), _one("muse", "[3]", R.MALFORMED_RECORD)),
    Case("muse", "null_value", _muse(text_answers=[None]), _one("muse", "[3]", R.MALFORMED_RECORD)),
    Case(
        "muse", "misaligned", _muse(questions=["a?", "b?"]), _one("muse", "[3]", R.MALFORMED_RECORD)
    ),
    Case(
        "muse",
        "surrogate",
        _muse(questions=["Which \udcff one?"]),
        _one("muse", "[3]", R.INVALID_TEXT),
    ),
    Case("muse", "absolute_path", _muse(file_name=_abs), _one("muse", "[3]", ESC)),
    Case("muse", "dotdot_path", _muse(file_name=UP), _one("muse", "[3]", ESC)),
    Case("muse", "decompression_bomb", _muse(file_name="bomb.png"), _one("muse", "[3]", TOO_LARGE)),
    Case("muse", "pixel_cap", _muse(file_name="big.png"), _one("muse", "[3]", TOO_LARGE)),
    Case("muse", "format", _muse(file_name="anim.gif"), _one("muse", "[3]", R.IMAGE_FORMAT)),
    Case(
        "muse",
        "corrupt_image",
        _muse(file_name="corrupt.png"),
        _one("muse", "[3]", R.IMAGE_UNREADABLE),
    ),
    Case(
        "muse", "missing_image", _muse(file_name="nope.png"), _one("muse", "[3]", R.IMAGE_MISSING)
    ),
    Case("muse", "size_mismatch", _muse(height=99), _one("muse", "[3]", R.IMAGE_SIZE_MISMATCH)),
    Case(
        "muse",
        "duplicate_id",
        _muse(id=1),
        _one("muse", "[0]", R.DUPLICATE_ID) + _one("muse", "[3]", R.DUPLICATE_ID),
        {0},
    ),
    Case(
        "muse",
        "out_of_bounds",
        _muse(answers=[[{"category_name": "circle", "segmentation": OUTSIDE}]]),
        _one("muse", "[3]", R.SEGMENTATION_OUT_OF_BOUNDS),
    ),
    Case(
        "muse",
        "short_polygon",
        _muse(answers=[[{"category_name": "circle", "segmentation": [[1, 2, 3, 4]]}]]),
        _one("muse", "[3]", R.MALFORMED_SEGMENTATION),
    ),
    Case(
        "coco",
        "rle_size",
        _coco_image(seg={"size": [10, 10], "counts": [100]}),
        _one("coco", "image 4", R.SEGMENTATION_SIZE_MISMATCH),
    ),
    Case(
        "muse",
        "seg_count",
        _muse(text_answers=["{seg} and {seg}"]),
        _one("muse", "[3]", R.SEG_COUNT_MISMATCH),
    ),
    Case("muse", "empty_question", _muse(questions=["  "]), _one("muse", "[3]", R.EMPTY_QUESTION)),
    # ---- coco (image id 4 at images[3], its annotation at annotations[3])
    Case(
        "coco",
        "wrong_type",
        _coco_ann(segmentation="x"),
        _one("coco", "annotations[3]", R.MALFORMED_RECORD),
    ),
    Case(
        "coco",
        "missing_key",
        _coco_image(height=None),
        _one("coco", "images[3]", R.MALFORMED_RECORD)
        + _one("coco", "annotations[3]", R.BAD_REFERENCE),
    ),
    Case(
        "coco",
        "category_without_name",
        _coco_cat({"id": 3}),
        _one("coco", "categories[2]", R.MALFORMED_RECORD)
        + _one("coco", "annotations[3]", R.BAD_REFERENCE),
    ),
    Case(
        "coco",
        "surrogate",
        _coco_cat({"id": 3, "name": "bad \udcff"}),
        _one("coco", "categories[2]", R.INVALID_TEXT)
        + _one("coco", "annotations[3]", R.BAD_REFERENCE),
    ),
    Case(
        "coco",
        "absolute_path",
        _coco_image(file_name=_abs),
        _one("coco", "images[3]", ESC) + _one("coco", "annotations[3]", R.BAD_REFERENCE),
    ),
    Case(
        "coco",
        "dotdot_path",
        _coco_image(file_name=UP),
        _one("coco", "images[3]", ESC) + _one("coco", "annotations[3]", R.BAD_REFERENCE),
    ),
    Case(
        "coco",
        "decompression_bomb",
        _coco_image(file_name="bomb.png"),
        _one("coco", "image 4", TOO_LARGE),
    ),
    Case(
        "coco", "format", _coco_image(file_name="anim.gif"), _one("coco", "image 4", R.IMAGE_FORMAT)
    ),
    Case(
        "coco",
        "duplicate_id",
        _coco_image(id=1),
        _one("coco", "images[0]", R.DUPLICATE_ID)
        + _one("coco", "images[3]", R.DUPLICATE_ID)
        + _one("coco", "annotations[0]", R.DUPLICATE_ID)
        + _one("coco", "annotations[3]", R.DUPLICATE_ID),
        {0},
    ),
    Case(
        "coco",
        "bad_reference",
        _coco_ann(image_id=999),
        _one("coco", "annotations[3]", R.BAD_REFERENCE),
    ),
    Case(
        "coco",
        "out_of_bounds",
        _coco_image(seg=OUTSIDE),
        _one("coco", "image 4", R.SEGMENTATION_OUT_OF_BOUNDS),
    ),
    # ---- refer (ref 104 at [3], on image 4 / annotation 14 of instances.json)
    Case(
        "refer",
        "wrong_type",
        _ref(sentences="the blue square"),
        _one("refer", "[3]", R.MALFORMED_RECORD),
    ),
    Case("refer", "missing_key", _ref(ann_id=None), _one("refer", "[3]", R.MALFORMED_RECORD)),
    Case(
        "refer",
        "empty_sentences",
        _ref(sentences=[{"sent": " "}]),
        _one("refer", "[3]", R.MALFORMED_RECORD),
    ),
    Case("refer", "bad_split", _ref(split="../../etc"), _one("refer", "[3]", R.MALFORMED_RECORD)),
    Case(
        "refer",
        "surrogate",
        _ref(sentences=[{"sent": "the \udcff one"}]),
        _one("refer", "[3]", R.INVALID_TEXT),
    ),
    Case(
        "refer",
        "absolute_path",
        _ref_image(_abs),
        [
            ("instances.json", "images[3]", ESC),
            ("instances.json", "annotations[3]", R.BAD_REFERENCE),
        ]
        + _one("refer", "[3]", R.BAD_REFERENCE),
    ),
    Case(
        "refer",
        "dotdot_path",
        _ref_image(UP),
        [
            ("instances.json", "images[3]", ESC),
            ("instances.json", "annotations[3]", R.BAD_REFERENCE),
        ]
        + _one("refer", "[3]", R.BAD_REFERENCE),
    ),
    Case("refer", "decompression_bomb", _ref_image("bomb.png"), _one("refer", "[3]", TOO_LARGE)),
    Case("refer", "format", _ref_image("anim.gif"), _one("refer", "[3]", R.IMAGE_FORMAT)),
    Case(
        "refer",
        "duplicate_id",
        _ref(ref_id=101),
        _one("refer", "[0]", R.DUPLICATE_ID) + _one("refer", "[3]", R.DUPLICATE_ID),
        {0},
    ),
    Case("refer", "bad_reference", _ref(ann_id=999), _one("refer", "[3]", R.BAD_REFERENCE)),
    Case(
        "refer", "other_images_annotation", _ref(ann_id=11), _one("refer", "[3]", R.BAD_REFERENCE)
    ),
    # ---- reasonseg (the bad record is the file val/bad.json)
    Case("reasonseg", "wrong_type", _rs(text=5), _one("reasonseg", "[0]", R.MALFORMED_RECORD)),
    Case(
        "reasonseg", "missing_key", _rs(shapes=None), _one("reasonseg", "[0]", R.MALFORMED_RECORD)
    ),
    Case(
        "reasonseg",
        "bad_points",
        _rs(shapes=[{"label": "target", "points": [[1, "x"], [2, 2], [3, 1]]}]),
        _one("reasonseg", "[0]", R.MALFORMED_RECORD),
    ),
    Case("reasonseg", "not_json", _rs(b"{not json"), _one("reasonseg", "[0]", R.MALFORMED_RECORD)),
    Case(
        "reasonseg",
        "surrogate",
        _rs(text=["the \udcff one"]),
        _one("reasonseg", "[0]", R.INVALID_TEXT),
    ),
    Case("reasonseg", "absolute_path", _rs(imagePath=_abs), _one("reasonseg", "[0]", ESC)),
    Case("reasonseg", "dotdot_path", _rs(imagePath=UP), _one("reasonseg", "[0]", ESC)),
    Case(
        "reasonseg",
        "decompression_bomb",
        _rs(imagePath="bomb.png"),
        _one("reasonseg", "[0]", TOO_LARGE),
    ),
    Case(
        "reasonseg", "format", _rs(imagePath="anim.gif"), _one("reasonseg", "[0]", R.IMAGE_FORMAT)
    ),
    Case(
        "reasonseg",
        "no_target",
        _rs(
            shapes=[
                {"label": "flag", "points": [[1, 1], [5, 1], [5, 5]]},
                {"label": "ignore", "points": [[1, 1], [5, 1], [5, 5]]},
            ]
        ),
        _one("reasonseg", "[0]", R.NO_TARGET),
    ),
    Case("reasonseg", "empty_text", _rs(text=[" "]), _one("reasonseg", "[0]", R.EMPTY_QUESTION)),
    # ---- llava (bad record at [3])
    Case(
        "llava",
        "null_value",
        _llava([{"from": "human", "value": None}, {"from": "gpt", "value": "x"}]),
        _one("llava", "[3]", R.MALFORMED_RECORD),
    ),
    Case(
        "llava",
        "dict_value",
        _llava([{"from": "human", "value": {"q": 1}}, {"from": "gpt", "value": "x"}]),
        _one("llava", "[3]", R.MALFORMED_RECORD),
    ),
    Case("llava", "missing_key", _llava(image=None), _one("llava", "[3]", R.MALFORMED_RECORD)),
    Case(
        "llava",
        "roles",
        _llava([{"from": "gpt", "value": "x"}, {"from": "gpt", "value": "y"}]),
        _one("llava", "[3]", R.MALFORMED_RECORD),
    ),
    Case(
        "llava",
        "surrogate",
        _llava([{"from": "human", "value": "\udcff?"}, {"from": "gpt", "value": "x"}]),
        _one("llava", "[3]", R.INVALID_TEXT),
    ),
    Case("llava", "absolute_path", _llava(image=_abs), _one("llava", "[3]", ESC)),
    Case("llava", "dotdot_path", _llava(image="sub/../../secret"), _one("llava", "[3]", ESC)),
    Case("llava", "decompression_bomb", _llava(image="bomb.png"), _one("llava", "[3]", TOO_LARGE)),
    Case("llava", "format", _llava(image="anim.gif"), _one("llava", "[3]", R.IMAGE_FORMAT)),
    Case(
        "llava",
        "seg_in_answer",
        _llava([{"from": "human", "value": "Where?"}, {"from": "gpt", "value": "[SEG]"}]),
        _one("llava", "[3]", R.SEG_COUNT_MISMATCH),
    ),
    Case("llava", "repeated_id", _llava(id="a0"), [], extra=["vqa/train/a0/r3"]),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c.fmt}-{c.kind}" for c in CASES])
def test_bad_record_is_quarantined_and_good_ones_kept_once(case: Case, world) -> None:
    tmp, sentinel = world
    fmt = FORMATS[case.fmt]
    doc = fmt.base(tmp)
    case.mutate(doc, tmp)
    rows, rejects = _convert(case.fmt, fmt.write(tmp, doc), tmp / "images")
    got = sorted((r.file, r.record, r.reason) for r in rejects)
    assert got == sorted(case.rejects), [r.detail for r in rejects]
    assert all(r.detail for r in rejects)
    expected = [s for i, s in enumerate(fmt.good) if i not in case.dropped] + case.extra
    assert Counter(r["sample_id"] for r in rows) == Counter(expected)


def test_every_reason_is_documented_and_tested() -> None:
    readme = (Path(__file__).parents[2] / "pixellm/data/README.md").read_text()
    for reason in RejectReason:
        assert f"| `{reason.value}` |" in readme, reason
    assert {reason for c in CASES for _, _, reason in c.rejects} == set(RejectReason)


def test_reject_reason_is_a_closed_set() -> None:
    with pytest.raises(ValueError, match="not_a_reason"):
        Reject("f.json", "[0]", "not_a_reason", "x")  # type: ignore[arg-type]


def test_refer_target_carries_the_category_name(world) -> None:
    tmp, _ = world
    doc = _refer_base(tmp)
    _ref()(doc, tmp)
    rows, rejects = _convert("refer", _refer_write(tmp, doc), tmp / "images")
    assert not rejects
    names = {r["sample_id"]: [t["name"] for t in r["targets"]] for r in rows}
    assert names["refer_seg/val/101/s0"] == ["circle"]
    assert names["refer_seg/val/104/s0"] == ["square"]  # annotation 14's category 2


def test_reasonseg_label_rule_follows_the_reference_loader(world) -> None:
    assert [
        label_role(x) for x in ("target", "Target_2", "", "IGNORE", "ignore_region", "flag", "Flag")
    ] == [
        "target",
        "target",
        "target",
        "ignore",
        "ignore",
        "skip",
        "skip",
    ]
    tmp, _ = world
    shapes = [
        {"label": "target", "points": [[2, 2], [6, 2], [6, 6], [2, 6]]},
        {
            "label": "hand",
            "points": [[20, 2], [24, 2], [24, 6], [20, 6]],
        },  # any other label: target
        {"label": "Ignore", "points": [[10, 10], [14, 10], [14, 14], [10, 14]]},
        {"label": "flag", "points": [[0, 0], [31, 0], [31, 23], [0, 23]]},  # skipped
    ]
    doc = {"000": _reasonseg_base(tmp)["000"] | {"shapes": shapes}}
    rows, rejects = _convert("reasonseg", _reasonseg_write(tmp, doc), tmp / "images")
    assert not rejects and len(rows) == 1
    from pixellm.data.schema import rle_to_mask

    assert int(rle_to_mask(rows[0]["targets"][0]["rle"]).sum()) == 2 * 16
    assert int(rle_to_mask(rows[0]["ignore"]).sum()) == 16


def test_sentinel_records_a_read(tmp_path: Path) -> None:
    """The detector itself: reading the FIFO is seen (so 0 opens above means none happened)."""
    sentinel = Sentinel(tmp_path / "secret")
    assert (tmp_path / "secret").read_bytes() == b"SECRET"
    sentinel.close()
    assert sentinel.opened == 1


def test_deeply_nested_record_value_is_a_reject_not_a_recursion_error() -> None:
    """Pickles unpickle iteratively, so a refs file can hold a 100,000-deep value."""
    from pixellm.data.formats.common import RecordRejected, validate
    from pixellm.data.formats.refer import ReferRef

    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    ref = {"ref_id": 1, "ann_id": 1, "image_id": 1, "split": "val", "sentences": deep}
    with pytest.raises(RecordRejected) as err:
        validate(ReferRef, ref)
    assert err.value.reason == R.MALFORMED_RECORD and "sentences" in err.value.detail


@pytest.mark.parametrize("fmt", ["muse", "reasonseg"])
def test_forced_split_over_several_files_keeps_sample_ids_unique(
    fmt: str, corpus_dir: Path
) -> None:
    """``--split all`` gathers MUSE files / ReasonSeg directories whose indexes or names repeat."""
    specs, rejects = parse_format(fmt, corpus_dir / fmt, corpus_dir / "images", split="all")
    natural, _ = parse_format(fmt, corpus_dir / fmt, corpus_dir / "images")
    ids = [s["sample_id"] for s in specs["all"]]
    assert not rejects and list(specs) == ["all"]
    assert len(ids) == len(set(ids)) == sum(len(v) for v in natural.values())


def test_a_repeated_sample_id_is_rejected_centrally(monkeypatch, world) -> None:
    """Whatever a converter does, two rows never share a sample_id."""
    import pixellm.data.formats as formats

    tmp, _ = world
    real = formats.PARSERS["llava"]

    def twice(*args: Any) -> Any:
        specs, rejects = real(*args)
        return {"train": specs["train"] + specs["train"][:1]}, rejects

    monkeypatch.setitem(formats.PARSERS, "llava", twice)
    rows, rejects = _convert("llava", _llava_write(tmp, _llava_base(tmp)), tmp / "images")
    assert [(r.record, r.reason) for r in rejects] == [("[0]", R.DUPLICATE_ID)]
    assert len(rows) == 3
