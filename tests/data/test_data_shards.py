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
