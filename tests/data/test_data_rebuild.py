"""File-level problems exit 2 with one line; re-runs (also after a SIGKILL midway) are idempotent."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from pixellm.cli import main
from pixellm.data.shards import build_shards


def _build(fmt: str, inp: Path, out: Path, *extra: str) -> list[str]:
    return ["shards", "build", "--format", fmt, "--input", str(inp), "--out", str(out), *extra]


def _rows(out: Path) -> list[dict]:
    return [r for f in sorted(out.rglob("part-*.parquet")) for r in pq.read_table(f).to_pylist()]


def _coco(images: list[dict], annotations: list | None = None, categories: object = None) -> dict:
    return {
        "images": images,
        "annotations": annotations or [],
        "categories": categories if categories is not None else [{"id": 1, "name": "circle"}],
    }


def _deep(n: int) -> str:
    return "[" * n + "]" * n


# (format, relative input, files to write {relative path: str | bytes}, words the line must hold)
FILE_CASES = {
    "muse-not-json": (
        "muse",
        "muse",
        {"muse/muse_val.json": "{not json"},
        ["muse_val.json", "not valid JSON"],
    ),
    "muse-not-utf8": (
        "muse",
        "muse",
        {"muse/muse_val.json": b'[{"q": "\xff\xfe"}]'},
        ["muse_val.json", "not UTF-8", "0xff"],
    ),
    "muse-top-level": (
        "muse",
        "muse",
        {"muse/muse_val.json": "{}"},
        ["muse_val.json", "must be a list", "dict"],
    ),
    "muse-too-deep": (
        "muse",
        "muse",
        {"muse/muse_val.json": _deep(200_000)},
        ["muse_val.json", "200000 levels deep"],
    ),
    "coco-categories-dict": (
        "coco",
        "coco/instances.json",
        {"coco/instances.json": json.dumps(_coco([], categories={"1": "circle"}))},
        ["instances.json", "'categories' must be a list", "dict"],
    ),
    "coco-top-level": (
        "coco",
        "coco/instances.json",
        {"coco/instances.json": "[]"},
        ["instances.json", "must be a dict"],
    ),
    "coco-no-images": (
        "coco",
        "coco/instances.json",
        {"coco/instances.json": '{"annotations": [], "categories": []}'},
        ["instances.json", "'images' must be a list"],
    ),
    "coco-too-deep": (
        "coco",
        "coco/instances.json",
        {"coco/instances.json": '{"images": ' + _deep(100) + "}"},
        ["instances.json", "101 levels deep"],
    ),
    "llava-top-level": (
        "llava",
        "llava/l.json",
        {"llava/l.json": '{"id": 1}'},
        ["l.json", "must be a list"],
    ),
    "llava-not-utf8": (
        "llava",
        "llava/l.json",
        {"llava/l.json": b"[\xc3\x28]"},
        ["l.json", "not UTF-8"],
    ),
    "refer-instances-not-json": (
        "refer",
        "refer",
        {"refer/instances.json": "nope", "refer/refs(unc).p": pickle.dumps([])},
        ["instances.json", "not valid JSON"],
    ),
    "refer-refs-not-list": (
        "refer",
        "refer",
        {
            "refer/instances.json": json.dumps(_coco([])),
            "refer/refs(unc).p": pickle.dumps({"a": 1}),
        },
        ["refs(unc).p", "expected a list"],
    ),
    "reasonseg-split-name": (
        "reasonseg",
        "reasonseg",
        {"reasonseg/val ue/a.json": "{}"},
        ["val ue", "split name"],
    ),
}


@pytest.mark.parametrize("name", sorted(FILE_CASES))
def test_file_level_problem_exits_2_with_one_line(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    fmt, rel, files, words = FILE_CASES[name]
    for path, data in files.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(data if isinstance(data, bytes) else data.encode())
    (tmp_path / "images").mkdir()
    code = main(_build(fmt, tmp_path / rel, tmp_path / "out", "--engine", "local"))
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), out
    assert all(w in lines[0] for w in words), lines[0]
    assert "Traceback" not in out + err
    assert not (tmp_path / "out/manifest.json").exists()


def test_images_must_be_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "l.json").write_text("[]")
    code = main(
        _build("llava", tmp_path / "l.json", tmp_path / "o", "--images", str(tmp_path / "x"))
    )
    assert code == 2 and "--images" in capsys.readouterr().out


# ---------------------------------------------------------------- idempotent re-runs
def _png(path: Path) -> None:
    Image.new("RGB", (32, 24), (10, 200, 10)).save(path)


def _bad_coco(tmp: Path) -> Path:
    """COCO with 6 good images and one record per kind of reject (split-less ones included)."""
    images = tmp / "images"
    images.mkdir()
    poly = [[2, 2, 10, 2, 10, 10, 2, 10]]
    ims = [{"id": i, "file_name": f"{i}.png", "height": 24, "width": 32} for i in range(6)]
    for i in range(6):
        _png(images / f"{i}.png")
    ims += [
        {"id": 2, "file_name": "dup.png", "height": 24, "width": 32},  # duplicate id
        {"id": 7, "file_name": "../x.png", "height": 24, "width": 32},  # escape
        {"id": 8, "file_name": "missing.png", "height": 24, "width": 32},
        {"id": 9, "file_name": 9, "height": 24, "width": 32},  # wrong type
    ]
    anns = [
        {"id": 100 + i, "image_id": i, "category_id": 1, "segmentation": poly}
        for i in (0, 1, 2, 3, 4, 5, 7, 8, 9)
    ]
    (tmp / "coco").mkdir()
    (tmp / "coco/instances.json").write_text(json.dumps(_coco(ims, anns)))
    return tmp / "coco/instances.json"


def test_rebuild_gives_the_same_rows_and_manifest(tmp_path: Path, capsys) -> None:
    inp, out = _bad_coco(tmp_path), tmp_path / "out"
    first = build_shards(
        "coco", inp, str(out), images=tmp_path / "images", engine="local", rows_per_shard=2
    )
    rows = _rows(out)
    assert len(rows) == 5  # images 0, 1, 3, 4, 5; image id 2 is duplicated
    assert first.manifest["rejected"]["by_reason"] == {
        "bad_reference": 2,  # the annotations of images 7 and 9
        "duplicate_id": 3,  # both images with id 2 and the annotation on id 2
        "image_missing": 1,
        "image_path_escape": 1,
        "malformed_record": 1,
    }
    for _ in range(2):
        again = build_shards(
            "coco", inp, str(out), images=tmp_path / "images", engine="local", rows_per_shard=2
        )
        assert again.manifest == first.manifest and again.written == 0
        assert _rows(out) == rows
    # the summary printed at the end of the CLI build: one line per reason
    main(
        _build(
            "coco",
            inp,
            out,
            "--images",
            str(tmp_path / "images"),
            "--engine",
            "local",
            "--rows-per-shard",
            "2",
        )
    )
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "sem_seg: 5 rows written, 8 records quarantined"
    assert printed[1].split()[:2] == ["bad_reference", "2"]
    assert json.loads(printed[-1])["rejected"] == first.manifest["rejected"]["by_reason"]


def test_rebuild_after_an_input_change_rewrites_only_the_changed_shard(tmp_path: Path) -> None:
    inp, out = _bad_coco(tmp_path), tmp_path / "out"
    kw = {"images": tmp_path / "images", "engine": "local", "rows_per_shard": 2}
    first = build_shards("coco", inp, str(out), **kw)
    coco = json.loads(inp.read_text())
    coco["categories"][0]["name"] = "disc"  # every row changes
    coco["images"] = coco["images"][:7] + coco["images"][8:]  # the escape image is fixed by removal
    inp.write_text(json.dumps(coco))
    second = build_shards("coco", inp, str(out), **kw)
    assert second.written == len(list(out.rglob("part-*.parquet"))) and second.skipped == 0
    assert {t["name"] for r in _rows(out) for t in r["targets"]} == {"disc"}
    assert second.manifest["rejected"]["count"] == first.manifest["rejected"]["count"] - 1


def test_refer_rebuild_does_not_accumulate_shared_file_rejects(
    corpus_dir: Path, tmp_path: Path
) -> None:
    refer = tmp_path / "refer"
    shutil.copytree(corpus_dir / "refer", refer)
    coco = json.loads((refer / "instances.json").read_text())
    coco["annotations"].append({"id": "bad", "image_id": 0, "category_id": 1})  # no segmentation
    (refer / "instances.json").write_text(json.dumps(coco))
    kw = {"images": corpus_dir / "images", "engine": "local"}
    first = build_shards("refer", refer, str(tmp_path / "out"), **kw)
    assert first.manifest["rejected"]["by_reason"] == {"malformed_record": 1}
    again = build_shards("refer", refer, str(tmp_path / "out"), **kw)
    assert again.manifest == first.manifest


_KILL_AT_SECOND_SHARD = """
import os, signal, sys
from pathlib import Path
import pixellm.data.shards as shards

real, calls = shards.write_shard, []

def write_then_die(job):
    if calls:  # the first shard is on disk; die before the second, like a preempted node
        os.kill(os.getpid(), signal.SIGKILL)
    calls.append(job["index"])
    return real(job)

shards.write_shard = write_then_die
inp, images, out = sys.argv[1:]
shards.build_shards("muse", inp, out, images=images, rows_per_shard=20, engine="local")
"""


def test_build_killed_midway_then_rerun_completes_without_duplicates(
    corpus_dir: Path, tmp_path: Path
) -> None:
    muse = tmp_path / "muse"
    shutil.copytree(corpus_dir / "muse", muse)
    train = json.loads((muse / "muse_train.json").read_text())
    train[0]["questions"][0] = "bad \udcff"  # json.dumps writes it as an escape
    train[1]["file_name"] = "/etc/hostname"
    (muse / "muse_train.json").write_text(json.dumps(train))
    out, images = tmp_path / "out", corpus_dir / "images"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[2]))
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(_KILL_AT_SECOND_SHARD),
            str(muse),
            str(images),
            str(out),
        ],
        env=env,
        capture_output=True,
        timeout=300,
    )
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    written = list(out.rglob("part-*.parquet"))
    assert len(written) == 1 and not (out / "manifest.json").exists()

    rerun = build_shards("muse", muse, str(out), images=images, rows_per_shard=20, engine="local")
    clean = build_shards(
        "muse", muse, str(tmp_path / "clean"), images=images, rows_per_shard=20, engine="local"
    )
    assert rerun.skipped == 1 and rerun.written == clean.written - 1
    assert rerun.manifest == clean.manifest
    assert rerun.manifest["rejected"]["by_reason"] == {"image_path_escape": 1, "invalid_text": 1}
    ids = [r["sample_id"] for r in _rows(out)]
    assert len(ids) == len(set(ids)) == sum(s["rows"] for s in clean.manifest["splits"].values())
