"""The generated corpus: determinism, question families, annotation consistency."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image

from pixellm.data.corpus import generate_corpus


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_same_seed_is_byte_identical(tmp_path: Path) -> None:
    generate_corpus(tmp_path / "a", seed=3, images=12)
    generate_corpus(tmp_path / "b", seed=3, images=12)
    generate_corpus(tmp_path / "c", seed=4, images=12)
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert len(a) > 12 and a == b
    assert a != c


def test_more_images_with_the_same_held_out_pool_only_add_training_data(tmp_path: Path) -> None:
    generate_corpus(tmp_path / "small", seed=2, images=20, held_out_pool=20)
    generate_corpus(tmp_path / "large", seed=2, images=50, held_out_pool=20)
    generate_corpus(tmp_path / "all", seed=2, images=50)  # pool = every image

    def muse(name: str, split: str) -> list:
        return json.loads((tmp_path / name / f"muse/muse_{split}.json").read_text())

    for split in ("val", "test_less", "test_many"):
        assert muse("small", split) == muse("large", split)  # the same held-out records
    assert len(muse("large", "train")) > len(muse("small", "train"))
    assert {r["file_name"] for r in muse("large", "val")} <= {f"{i:06d}.png" for i in range(20)}
    assert len(muse("all", "val")) == 5  # a tenth of 50: the default pool is every image


def test_corpus_generate_command_rejects_bad_sizes_in_one_line(tmp_path: Path, capsys) -> None:
    from pixellm.cli import main

    for flags, bad in (
        (["--held-out-pool", "2"], "held_out_pool >= 3"),
        (["--images", "2"], "images >= 3"),
    ):
        out = tmp_path / "corpus"
        assert main(["corpus", "generate", "--out", str(out), "--images", "10", *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: pixellm corpus generate:") and bad in err, err
        assert "Traceback" not in err and not out.exists()


def test_layout_and_question_families(corpus_dir: Path) -> None:
    muse = {
        s: json.loads((corpus_dir / f"muse/muse_{s}.json").read_text())
        for s in ("train", "val", "test_less", "test_many")
    }
    assert all(muse.values())
    for split, records in muse.items():
        for rec in records:
            assert len(rec["questions"]) == len(rec["answers"])
            for i, anns in enumerate(rec["answers"]):
                if "text_answers" in rec:
                    assert rec["text_answers"][i].count("{seg}") == len(anns)
                if split == "test_less":
                    assert len(anns) <= 3
                if split == "test_many":
                    assert len(anns) > 3
    questions = [q for recs in muse.values() for r in recs for q in r["questions"]]
    assert any("could roll" in q for q in questions) or any("warm" in q for q in questions)
    assert any(not a for recs in muse.values() for r in recs for a in r["answers"])  # no-target
    assert any("text_answers" not in r for r in muse["train"])  # exercises the template path
    refs = pickle.loads((corpus_dir / "refer/refs(unc).p").read_bytes())
    assert refs and {"ref_id", "ann_id", "image_id", "sentences", "split"} <= set(refs[0])
    llava = json.loads((corpus_dir / "llava/llava_instruct.json").read_text())
    assert llava[0]["conversations"][0]["value"].startswith("<image>\nHow many")
    assert list((corpus_dir / "reasonseg/train").glob("*.json"))


def test_polygons_decode_to_painted_pixels(corpus_dir: Path) -> None:
    coco = json.loads((corpus_dir / "coco/instances.json").read_text())
    images = {im["id"]: im for im in coco["images"]}
    checked = 0
    for ann in coco["annotations"][:60]:
        im = images[ann["image_id"]]
        h, w = im["height"], im["width"]
        rle = mask_utils.frPyObjects(ann["segmentation"], h, w)
        mask = mask_utils.decode(mask_utils.merge(rle) if isinstance(rle, list) else rle).astype(
            bool
        )
        assert mask.sum() == ann["area"]
        pixels = np.asarray(Image.open(corpus_dir / "images" / im["file_name"]).convert("RGB"))
        colours = {tuple(c) for c in pixels[mask].reshape(-1, 3)}
        assert len(colours) == 1, f"annotation {ann['id']} covers {len(colours)} colours"
        checked += 1
    assert checked == 60
    radii = [a["bbox"][2] for a in coco["annotations"] if isinstance(a["segmentation"], list)]
    assert min(radii) >= 18  # smallest shapes are >= ~10 px in radius at 128 px
