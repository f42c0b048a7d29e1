"""Shard writing: atomic, idempotent, checksummed; the Ray Data job and pyarrow URIs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pixellm.cli import main
from pixellm.data.shards import build_shards


def test_rerun_skips_finished_shards_and_repairs_missing_ones(
    corpus_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "muse"
    first = build_shards(
        "muse", corpus_dir / "muse", str(out), rows_per_shard=30, row_group_size=8, engine="local"
    )
    shards = sorted(out.rglob("part-*.parquet"))
    assert first.written == len(shards) > 3 and first.skipped == 0
    for entry in (s for sp in first.manifest["splits"].values() for s in sp["shards"]):
        data = (out / entry["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"] and len(data) == entry["bytes"]
        md = pq.ParquetFile(out / entry["path"]).metadata
        assert [md.row_group(i).num_rows for i in range(md.num_row_groups)] == entry["row_groups"]
        assert max(entry["row_groups"]) <= 8
    mtimes = {p: p.stat().st_mtime_ns for p in shards}

    again = build_shards(
        "muse", corpus_dir / "muse", str(out), rows_per_shard=30, row_group_size=8, engine="local"
    )
    assert again.written == 0 and again.skipped == len(shards)
    assert again.manifest == first.manifest
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())

    victim = shards[1]
    victim.unlink()
    stale = victim.parent / f".{victim.name}.tmp-deadbeef"  # a writer that died mid-shard
    stale.write_bytes(b"partial")
    repaired = build_shards(
        "muse", corpus_dir / "muse", str(out), rows_per_shard=30, row_group_size=8, engine="local"
    )
    assert repaired.written == 1 and repaired.skipped == len(shards) - 1
    assert repaired.manifest == first.manifest  # deterministic bytes: same sha256
    assert not stale.exists() and not list(out.rglob("*.tmp-*"))


@pytest.mark.integration
def test_ray_data_job_writes_to_a_filesystem_uri(
    corpus_dir: Path, tmp_path: Path, ray_cluster
) -> None:
    uri = f"file://{tmp_path}/refer"
    result = build_shards("refer", corpus_dir / "refer", uri, rows_per_shard=64, engine="ray")
    local = build_shards(
        "refer", corpus_dir / "refer", str(tmp_path / "local"), rows_per_shard=64, engine="local"
    )
    assert result.written > 1
    assert result.manifest == local.manifest  # same shards, same checksums, either engine
    assert json.loads((tmp_path / "refer/manifest.json").read_text())["corpus"] == "refer_seg"


def test_cli_generate_and_build(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert (
        main(["corpus", "generate", "--out", str(tmp_path / "c"), "--images", "6", "--seed", "1"])
        == 0
    )
    code = main(
        [
            "shards",
            "build",
            "--format",
            "llava",
            "--input",
            str(tmp_path / "c/llava/llava_instruct.json"),
            "--out",
            str(tmp_path / "s"),
            "--engine",
            "local",
        ]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["rows"] == {"train": 6} and summary["corpus"] == "vqa"
    assert (
        main(
            [
                "shards",
                "build",
                "--format",
                "muse",
                "--input",
                str(tmp_path / "nope"),
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )


@pytest.mark.integration
def test_ray_job_quarantines_bombs_escapes_and_surrogates(tmp_path: Path, ray_cluster) -> None:
    """The inputs that used to abort the Ray job: rejected with reasons, the job completes."""
    import struct
    import zlib

    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.new("RGB", (32, 24), (200, 10, 10)).save(images / f"{i}.png")
    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    (images / "bomb.png").write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
    )
    turn = [{"from": "human", "value": "How many?"}, {"from": "gpt", "value": "One."}]
    recs = [{"id": "x", "image": f"{i}.png", "conversations": turn} for i in range(3)]
    recs += [
        {"id": "x", "image": "bomb.png", "conversations": turn},
        {"id": "x", "image": "/etc/hostname", "conversations": turn},
        {
            "id": "x",
            "image": "0.png",
            "conversations": [turn[0], {"from": "gpt", "value": "\udcff"}],
        },
        {"id": "x", "image": "0.png", "conversations": [turn[0], {"from": "gpt", "value": None}]},
    ]
    (tmp_path / "l.json").write_text(json.dumps(recs))
    kw = {"images": images, "rows_per_shard": 2}
    ray_run = build_shards("llava", tmp_path / "l.json", str(tmp_path / "ray"), engine="ray", **kw)
    again = build_shards("llava", tmp_path / "l.json", str(tmp_path / "ray"), engine="ray", **kw)
    local = build_shards(
        "llava", tmp_path / "l.json", str(tmp_path / "local"), engine="local", **kw
    )
    assert ray_run.manifest["rejected"]["by_reason"] == {
        "image_path_escape": 1,
        "image_too_large": 1,
        "invalid_text": 1,
        "malformed_record": 1,
    }
    assert ray_run.manifest == again.manifest == local.manifest
    assert ray_run.manifest["splits"]["train"]["rows"] == 3  # one id, three unique sample_ids
