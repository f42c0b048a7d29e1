"""Converters on the generated corpus and on each kind of bad input."""

from __future__ import annotations

import json
import os
import pickle
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pycocotools.mask as mask_utils
import pytest

from pixellm.data.formats import DataError, load_refs
from pixellm.data.schema import SHARD_SCHEMA, rle_to_mask
from pixellm.data.shards import build_shards
from pixellm.model.codebook import PLACEHOLDER


def _rows(root: Path) -> list[dict]:
    return [r for f in sorted(root.rglob("part-*.parquet")) for r in pq.read_table(f).to_pylist()]


def _expected_rows(corpus_dir: Path) -> dict[str, int]:
    muse = sum(
        len(r["questions"])
        for f in (corpus_dir / "muse").glob("*.json")
        for r in json.loads(f.read_text())
    )
    coco = json.loads((corpus_dir / "coco/instances.json").read_text())
    cats: dict[int, set] = {}
    for a in coco["annotations"]:
        cats.setdefault(a["image_id"], set()).add(a["category_id"])
    refs = pickle.loads((corpus_dir / "refer/refs(unc).p").read_bytes())
    per_image = Counter((r["image_id"], r["split"]) for r in refs)
    refer = sum(len(r["sentences"]) for r in refs) + sum(
        sum(n >= k for k in (6, 5, 4)) for n in per_image.values()
    )
    reason = sum(
        len(json.loads(f.read_text())["text"]) for f in (corpus_dir / "reasonseg").rglob("*.json")
    )
    llava = len(json.loads((corpus_dir / "llava/llava_instruct.json").read_text()))
    return {
        "muse": muse,
        "sem_seg": sum((len(c) + 2) // 3 for c in cats.values()),
        "refer_seg": refer,
        "reason_seg": reason,
        "vqa": llava,
    }


def test_every_format_converts_with_exact_row_counts(
    corpus_dir: Path, shards_root: Path, corpus_sources: dict
) -> None:
    expected = _expected_rows(corpus_dir)
    for corpus in corpus_sources:
        manifest = json.loads((shards_root / corpus / "manifest.json").read_text())
        rows = _rows(shards_root / corpus)
        assert manifest["rejected"]["count"] == 0, manifest["rejected"]
        assert len(rows) == sum(s["rows"] for s in manifest["splits"].values()) == expected[corpus]
        assert len({r["sample_id"] for r in rows}) == len(rows)
        for r in rows:
            text = " ".join(t["text"] for t in r["conversation"] if t["role"] == "assistant")
            assert text.count(PLACEHOLDER) == len(r["targets"]), r["sample_id"]
            assert r["corpus"] == corpus
    schema = pq.read_schema(next((shards_root / "muse").rglob("part-*.parquet")))
    assert schema.remove_metadata().equals(SHARD_SCHEMA)
    tasks = Counter(r["task"] for r in _rows(shards_root / "refer_seg"))
    assert tasks["refseg"] > 0 and tasks["mrefseg"] > 0
    group_sizes = {
        len(r["targets"]) for r in _rows(shards_root / "refer_seg") if r["task"] == "mrefseg"
    }
    assert group_sizes <= {4, 5, 6} and 4 in group_sizes
    reason = _rows(shards_root / "reason_seg")
    assert any(r["ignore"] is not None for r in reason)
    assert {r["split"] for r in _rows(shards_root / "muse")} == {
        "train",
        "val",
        "test_less",
        "test_many",
    }


def test_rle_areas_equal_pycocotools_polygon_decoding(corpus_dir: Path, shards_root: Path) -> None:
    records = json.loads((corpus_dir / "muse/muse_val.json").read_text())
    rows = {r["sample_id"]: r for r in _rows(shards_root / "muse") if r["split"] == "val"}
    compared = 0
    for i, rec in enumerate(records):
        for q, anns in enumerate(rec["answers"]):
            row = rows[f"muse/val/{i:06d}/q{q}"]
            for ann, target in zip(anns, row["targets"], strict=True):
                seg = ann["segmentation"]
                if not isinstance(seg, list):
                    continue
                src = mask_utils.merge(mask_utils.frPyObjects(seg, rec["height"], rec["width"]))
                assert rle_to_mask(target["rle"]).sum() == mask_utils.area(src)
                assert target["rle"]["counts"] == src["counts"].decode()
                compared += 1
    assert compared > 10


def test_muse_without_text_answers_uses_templates(shards_root: Path) -> None:
    rows = [r for r in _rows(shards_root / "muse") if json.loads(r["meta"])["templated"]]
    assert rows
    for r in rows:
        answer = r["conversation"][1]["text"]
        for t in r["targets"]:
            assert f"the {t['description']} {PLACEHOLDER}" in answer


def _png(path: Path, size: tuple[int, int] = (32, 24)) -> None:
    from PIL import Image

    Image.new("RGB", size, (200, 10, 10)).save(path)


def _ann(seg: object) -> dict:
    return {"category_id": 1, "category_name": "circle", "segmentation": seg}


def test_bad_muse_records_are_quarantined_and_named(tmp_path: Path) -> None:
    img = tmp_path / "images"
    img.mkdir()
    _png(img / "ok.png")
    (img / "corrupt.png").write_bytes(b"\x89PNG not really")
    poly = [[2, 2, 10, 2, 10, 10, 2, 10]]

    def rec(
        name: str, q: str = "Which shapes could roll?", seg: object = poly, text: str | None = None
    ):
        r = {
            "file_name": name,
            "height": 24,
            "width": 32,
            "ann_list": [],
            "questions": [q],
            "answers": [[_ann(seg)]],
        }
        if text is not None:
            r["text_answers"] = [text]
        return r

    records = [
        rec("ok.png"),
        rec("corrupt.png"),
        rec("missing.png"),
        rec("ok.png", seg=[[2, 2, 40, 2, 40, 10]]),  # x = 40 > width 32
        rec("ok.png", seg={"size": [10, 10], "counts": "PX"}),  # RLE of another size
        rec("ok.png", text="the circle {seg} and {seg}."),
        rec("ok.png", q="   "),
        {"file_name": "ok.png", "questions": "not a list", "answers": []},
    ]
    (tmp_path / "muse").mkdir()
    (tmp_path / "muse/muse_val.json").write_text(json.dumps(records))
    result = build_shards("muse", tmp_path / "muse", str(tmp_path / "out"), engine="local")
    rejected = result.manifest["rejected"]
    assert result.manifest["splits"]["val"]["rows"] == 1
    assert rejected["count"] == 7
    assert rejected["by_reason"] == {
        "empty_question": 1,
        "image_missing": 1,
        "image_unreadable": 1,
        "malformed_record": 1,
        "seg_count_mismatch": 1,
        "segmentation_out_of_bounds": 1,
        "segmentation_size_mismatch": 1,
    }
    by_reason = {r["reason"]: r for r in rejected["rows"]}
    assert by_reason["image_missing"]["sample_id"] == "muse/val/000002/q0"
    assert "missing.png" in by_reason["image_missing"]["detail"]
    assert (by_reason["malformed_record"]["file"], by_reason["malformed_record"]["record"]) == (
        "muse_val.json",
        "[7]",
    )
    assert "outside the 32x24 image" in by_reason["segmentation_out_of_bounds"]["detail"]


class _Exploit:
    def __reduce__(self) -> tuple:
        return (os.system, ("echo pwned > pwned.txt",))


def test_refer_pickle_is_loaded_without_executing_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "refs(unc).p"
    bad.write_bytes(pickle.dumps([{"ref_id": 1, "payload": _Exploit()}]))
    with pytest.raises(DataError, match=r"refusing to load global (posix|os|nt)\.system"):
        load_refs(bad)
    assert not (tmp_path / "pwned.txt").exists()
    good = tmp_path / "good.p"
    good.write_bytes(pickle.dumps([{"ref_id": 1, "sentences": [{"sent": "x"}]}]))
    assert load_refs(good)[0]["ref_id"] == 1
