"""Row specs → validated rows → Parquet shards with a manifest, as a Ray Data job.

Layout of one corpus directory (a local path or any pyarrow filesystem URI)::

    OUT/<split>/part-00000.parquet …   bounded row groups, schema ``SHARD_SCHEMA``
    OUT/manifest.json                  rows / bytes / sha256 per shard, schema version, rejects

Each shard is written to a temporary name and renamed, so a reader never sees half a file; a
re-run skips every shard that already exists (its row count and rejects are read back from the
Parquet footer metadata, together with the key of the job that wrote it: a shard from different
specs is rewritten). Bad input records are quarantined: counted by reason and named (file, record
index or id, detail) in the manifest, never fatal. A re-run — after success or after a kill midway —
gives the same rows and the same manifest.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from pixellm.data.formats import parse_format
from pixellm.data.schema import CORPUS_BY_FORMAT, SCHEMA_VERSION, Reject
from pixellm.data.writer import (
    MAX_IMAGE_PIXELS,
    materialize,
    resolve_fs,
    write_shard,
    write_shard_row,
)
from pixellm.model.codebook import PLACEHOLDER

__all__ = [
    "BuildResult",
    "build_shards",
    "materialize",
    "read_manifest",
    "reject_summary",
    "resolve_fs",
    "write_shard",
]


@dataclass
class BuildResult:
    """Outcome of ``build_shards``: the manifest written, shards written vs skipped, wall time."""

    manifest: dict[str, Any]
    written: int
    skipped: int
    seconds: float


def _run_jobs(jobs: list[dict], engine: str) -> list[dict]:
    if engine == "local":
        return [write_shard(j) for j in jobs]
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    items = [{"job": json.dumps(j)} for j in jobs]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    ds = ds.map(write_shard_row)
    results = [json.loads(r["result"]) for r in ds.take_all()]
    return sorted(results, key=lambda r: r["path"])


def read_manifest(out: str) -> dict[str, Any] | None:
    """The ``manifest.json`` of a shard directory, or None when there is none yet."""
    fs, base = resolve_fs(out)
    path = f"{base}/manifest.json"
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_file(path) as f:
        return json.loads(f.read())


def _cleanup(fs: pafs.FileSystem, base: str, split: str, keep: set[str]) -> None:
    """Drop stale temporaries and shards beyond the new shard count of a rebuilt split."""
    sel = pafs.FileSelector(f"{base}/{split}", allow_not_found=True)
    for info in fs.get_file_info(sel):
        name = info.base_name
        if (".tmp-" in name) or (name.startswith("part-") and f"{split}/{name}" not in keep):
            fs.delete_file(info.path)


def _write_manifest(fs: pafs.FileSystem, base: str, manifest: dict) -> None:
    tmp = f"{base}/.manifest.json.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open_output_stream(tmp) as f:
        f.write(json.dumps(manifest, indent=1, sort_keys=True).encode())
    fs.move(tmp, f"{base}/manifest.json")


def _reject_order(r: dict) -> tuple:
    keys = ("split", "file", "record", "reason", "sample_id")  # .get: manifests before "file"
    return tuple(str(r.get(k) or "") for k in keys)


def _manifest(
    old: dict | None,
    fmt: str,
    corpus: str,
    results: list[dict],
    rejects: list[Reject],
    rebuilt: set[str],
) -> dict:
    """The new manifest: ``rebuilt`` splits replaced, other splits of ``old`` kept.

    Rejects with no split come from a file every split shares (refer's ``instances.json``); every
    build re-reads it, so old ones are always replaced — a re-run never accumulates rejects.
    """
    splits = {k: v for k, v in ((old or {}).get("splits") or {}).items() if k not in rebuilt}
    kept_rejects = [
        r
        for r in ((old or {}).get("rejected") or {}).get("rows", [])
        if r.get("split") is not None and r.get("split") not in rebuilt
    ]
    for r in results:
        entry = splits.setdefault(r["split"], {"rows": 0, "shards": []})
        entry["rows"] += r["rows"]
        entry["shards"].append({k: r[k] for k in ("path", "rows", "row_groups", "bytes", "sha256")})
    rows = (
        kept_rejects + [x.to_dict() for x in rejects] + [x for r in results for x in r["rejected"]]
    )
    rows.sort(key=_reject_order)
    return {
        "schema_version": SCHEMA_VERSION,
        "format": fmt,
        "corpus": corpus,
        "splits": dict(sorted(splits.items())),
        "rejected": {
            "count": len(rows),
            "by_reason": dict(sorted(Counter(r["reason"] for r in rows).items())),
            "rows": rows,
        },
    }


def reject_summary(manifest: dict[str, Any], examples: int = 1) -> list[str]:
    """Human-readable lines: rows kept, then one line per reject reason with an example."""
    rows = sum(v["rows"] for v in manifest["splits"].values())
    rej = manifest["rejected"]
    lines = [f"{manifest['corpus']}: {rows} rows written, {rej['count']} records quarantined"]
    for reason, n in rej["by_reason"].items():
        first = [r for r in rej["rows"] if r["reason"] == reason][:examples]
        eg = "; ".join(f"{r['file']} {r['record']}: {r['detail']}" for r in first)
        lines.append(f"  {reason:28s} {n:7d}  e.g. {eg[:160]}")
    return lines


def build_shards(
    fmt: str,
    input_path: str | Path,
    out: str,
    images: str | Path | None = None,
    corpus: str | None = None,
    split: str | None = None,
    rows_per_shard: int = 256,
    row_group_size: int = 64,
    engine: str = "ray",
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> BuildResult:
    """Convert one corpus to Parquet shards plus ``manifest.json`` (see the module docstring).

    Args:
        fmt: muse | coco | refer | reasonseg | llava.
        input_path: the corpus file or directory in its on-disk format.
        out: the corpus's shard directory (local path or pyarrow filesystem URI).
        images: image directory (default: ``images/`` beside the format's directory).
        corpus: corpus name (default per format, e.g. refer → ``refer_seg``).
        split: force one split name (default: taken from the input).
        rows_per_shard: row specs per Parquet file.
        row_group_size: rows per Parquet row group (bounds reader memory; images are large).
        engine: ``"ray"`` (a Ray Data job: one task per shard) or ``"local"`` (in-process).
        max_pixels: images whose header claims more pixels are rejected (``image_too_large``).

    Returns:
        A ``BuildResult``.

    Raises:
        DataError: the input cannot be read at all.
        ValueError: bad arguments.
    """
    if rows_per_shard < 1 or row_group_size < 1 or max_pixels < 1 or engine not in ("ray", "local"):
        raise ValueError(
            f"need rows_per_shard >= 1, row_group_size >= 1, max_pixels >= 1, engine ray|local; "
            f"got {rows_per_shard}, {row_group_size}, {max_pixels}, {engine!r}"
        )
    start = time.perf_counter()
    specs, rejects = parse_format(fmt, input_path, images, corpus, split)
    name = corpus or CORPUS_BY_FORMAT[fmt]
    jobs = [
        {
            "out": out,
            "split": sp,
            "index": i // rows_per_shard,
            "specs": rows[i : i + rows_per_shard],
            "row_group_size": row_group_size,
            "placeholder": PLACEHOLDER,
            "max_pixels": max_pixels,
        }
        for sp, rows in sorted(specs.items())
        for i in range(0, len(rows), rows_per_shard)
    ]
    results = _run_jobs(jobs, engine) if jobs else []
    fs, base = resolve_fs(out)
    fs.create_dir(base, recursive=True)
    keep = {r["path"] for r in results}
    rebuilt = set(specs) | {r.split for r in rejects if r.split}
    for sp in sorted(rebuilt):
        _cleanup(fs, base, sp, keep)
    manifest = _manifest(read_manifest(out), fmt, name, results, rejects, rebuilt)
    _write_manifest(fs, base, manifest)
    skipped = sum(r["skipped"] for r in results)
    return BuildResult(manifest, len(results) - skipped, skipped, time.perf_counter() - start)
