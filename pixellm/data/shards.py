"""Row specs → validated rows → Parquet shards with a manifest, as a Ray Data job.

Layout of one corpus directory (a local path or any pyarrow filesystem URI)::

    OUT/<split>/part-00000.parquet …   bounded row groups, schema ``SHARD_SCHEMA``
    OUT/manifest.json                  rows / bytes / sha256 per shard, schema version, rejects

Each shard is written to a temporary name and renamed, so a reader never sees half a file; a
re-run skips every shard that already exists (its row count and rejects are read back from the
Parquet footer metadata). Bad input rows are quarantined: counted by reason and named in the
manifest, never fatal.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from pixellm.data.formats import parse_format
from pixellm.data.schema import (
    SCHEMA_VERSION,
    SHARD_SCHEMA,
    BadSegmentation,
    Reject,
    bbox_of_rle,
    encode_mask,
    rle_to_mask,
    segmentation_to_rle,
)
from pixellm.model.codebook import PLACEHOLDER

__all__ = ["BuildResult", "build_shards", "materialize", "read_manifest", "resolve_fs"]

_META_REJECTS = b"pixellm.rejected"
_META_VERSION = b"pixellm.schema_version"


@dataclass
class BuildResult:
    """Outcome of ``build_shards``: the manifest written, shards written vs skipped, wall time."""

    manifest: dict[str, Any]
    written: int
    skipped: int
    seconds: float


def resolve_fs(uri: str) -> tuple[pafs.FileSystem, str]:
    """``"/local/dir"``, ``"file:///dir"``, ``"s3://bucket/x"`` … → ``(filesystem, path)``."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), str(Path(uri).resolve())


def _reject(spec: dict, reason: str, detail: str) -> Reject:
    return Reject(spec.get("source", "?"), reason, detail, spec.get("sample_id"), spec.get("split"))


def _load_image(spec: dict, cache: dict[str, Any]) -> tuple[bytes, int, int] | Reject:
    path = spec["image_path"]
    if path not in cache:
        try:
            data = Path(path).read_bytes()
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                cache[path] = (data, im.height, im.width)
        except FileNotFoundError:
            cache[path] = ("image_missing", f"image file {path} does not exist")
        except (OSError, UnidentifiedImageError, ValueError) as err:
            cache[path] = ("image_unreadable", f"image file {path} cannot be decoded: {err}")
    got = cache[path]
    if isinstance(got[0], str):
        return _reject(spec, got[0], got[1])
    _, h, w = got
    if spec.get("height") is not None and (spec["height"], spec["width"]) != (h, w):
        return _reject(
            spec,
            "image_size_mismatch",
            f"record says (h, w)=({spec['height']}, {spec['width']}), {path} is ({h}, {w})",
        )
    return got


def _merged_rle(segs: list, h: int, w: int) -> dict[str, Any]:
    rles = [segmentation_to_rle(s, h, w) for s in segs]
    if len(rles) == 1:
        return rles[0]
    mask = rle_to_mask(rles[0])
    for r in rles[1:]:
        mask |= rle_to_mask(r)
    return encode_mask(mask)


def _check_text(spec: dict) -> Reject | None:
    conv = spec["conversation"]
    for t, turn in enumerate(conv):
        if turn["role"] == "user" and not str(turn["text"]).strip():
            return _reject(spec, "empty_question", f"turn {t}: the question is empty")
    n_seg = sum(str(t["text"]).count(PLACEHOLDER) for t in conv if t["role"] == "assistant")
    if n_seg != len(spec["targets"]):
        return _reject(
            spec,
            "seg_count_mismatch",
            f"answer has {n_seg} {PLACEHOLDER} placeholders but {len(spec['targets'])} targets",
        )
    return None


def materialize(
    spec: dict[str, Any], cache: dict[str, Any] | None = None
) -> dict[str, Any] | Reject:
    """One row spec → a row of ``SHARD_SCHEMA``, or the ``Reject`` saying why it is quarantined.

    Args:
        spec: a row spec from ``pixellm.data.formats.parse_format``.
        cache: image path → decoded bytes/size, shared by the rows of one shard.
    """
    bad = _check_text(spec)
    if bad is not None:
        return bad
    got = _load_image(spec, {} if cache is None else cache)
    if isinstance(got, Reject):
        return got
    data, h, w = got
    targets = []
    try:
        for t in spec["targets"]:
            rle = _merged_rle(t["segmentations"], h, w)
            targets.append(
                {
                    "name": t["name"],
                    "description": t["description"],
                    "rle": rle,
                    "bbox": bbox_of_rle(rle),
                }
            )
        ignore = _merged_rle(spec["ignore"], h, w) if spec.get("ignore") else None
    except BadSegmentation as err:
        where = f"target {len(targets)}" if len(targets) < len(spec["targets"]) else "ignore region"
        return _reject(spec, err.reason, f"{where}: {err}")
    return {
        "sample_id": spec["sample_id"],
        "corpus": spec["corpus"],
        "split": spec["split"],
        "task": spec["task"],
        "image": data,
        "height": h,
        "width": w,
        "conversation": spec["conversation"],
        "targets": targets,
        "ignore": ignore,
        "meta": json.dumps(spec["meta"], sort_keys=True),
    }


def _footer_info(fs: pafs.FileSystem, path: str) -> dict[str, Any]:
    with fs.open_input_file(path) as f:
        data = f.read()
    md = pq.ParquetFile(pa.BufferReader(data)).metadata
    kv = md.metadata or {}
    return {
        "rows": md.num_rows,
        "row_groups": [md.row_group(i).num_rows for i in range(md.num_row_groups)],
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "rejected": json.loads(kv.get(_META_REJECTS, b"[]")),
    }


def write_shard(job: dict[str, Any]) -> dict[str, Any]:
    """Materialise and atomically write one shard (skipped when the final file exists).

    Args:
        job: ``{out, split, index, specs, row_group_size}``.

    Returns:
        ``{path, split, rows, row_groups, bytes, sha256, rejected, skipped}``.
    """
    fs, base = resolve_fs(job["out"])
    rel = f"{job['split']}/part-{job['index']:05d}.parquet"
    final = f"{base}/{rel}"
    if fs.get_file_info(final).type == pafs.FileType.File:
        return {"path": rel, "split": job["split"], "skipped": True, **_footer_info(fs, final)}
    cache: dict[str, Any] = {}
    rows, rejected = [], []
    for spec in job["specs"]:
        got = materialize(spec, cache)
        (rejected.append(got.to_dict()) if isinstance(got, Reject) else rows.append(got))
    meta = {
        _META_VERSION: str(SCHEMA_VERSION).encode(),
        _META_REJECTS: json.dumps(rejected).encode(),
    }
    table = pa.Table.from_pylist(rows, schema=SHARD_SCHEMA).replace_schema_metadata(meta)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=job["row_group_size"], compression="zstd")
    data = sink.getvalue().to_pybytes()
    fs.create_dir(f"{base}/{job['split']}", recursive=True)
    tmp = f"{base}/{job['split']}/.part-{job['index']:05d}.parquet.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(
        tmp, final
    )  # atomic rename on local and POSIX filesystems; readers never see a partial file
    groups = [
        min(job["row_group_size"], len(rows) - i)
        for i in range(0, len(rows), job["row_group_size"])
    ]
    return {
        "path": rel,
        "split": job["split"],
        "skipped": False,
        "rows": len(rows),
        "row_groups": groups,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "rejected": rejected,
    }


def _run_jobs(jobs: list[dict], engine: str) -> list[dict]:
    if engine == "local":
        return [write_shard(j) for j in jobs]
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    items = [{"job": json.dumps(j)} for j in jobs]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    ds = ds.map(lambda row: {"result": json.dumps(write_shard(json.loads(row["job"])))})
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


def _manifest(
    old: dict | None, fmt: str, corpus: str, results: list[dict], rejects: list[Reject]
) -> dict:
    rebuilt = {r["split"] for r in results} | {r.split for r in rejects if r.split}
    splits = {k: v for k, v in ((old or {}).get("splits") or {}).items() if k not in rebuilt}
    kept_rejects = [
        r
        for r in ((old or {}).get("rejected") or {}).get("rows", [])
        if r.get("split") not in rebuilt
    ]
    for r in results:
        entry = splits.setdefault(r["split"], {"rows": 0, "shards": []})
        entry["rows"] += r["rows"]
        entry["shards"].append({k: r[k] for k in ("path", "rows", "row_groups", "bytes", "sha256")})
    rows = (
        kept_rejects + [x.to_dict() for x in rejects] + [x for r in results for x in r["rejected"]]
    )
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

    Returns:
        A ``BuildResult``.

    Raises:
        DataError: the input cannot be read at all.
        ValueError: bad arguments.
    """
    if rows_per_shard < 1 or row_group_size < 1 or engine not in ("ray", "local"):
        raise ValueError(
            f"need rows_per_shard >= 1, row_group_size >= 1, engine ray|local; got {rows_per_shard}, "
            f"{row_group_size}, {engine!r}"
        )
    start = time.perf_counter()
    specs, rejects = parse_format(fmt, input_path, images, corpus, split)
    from pixellm.data.schema import CORPUS_BY_FORMAT

    name = corpus or CORPUS_BY_FORMAT[fmt]
    jobs = [
        {
            "out": out,
            "split": sp,
            "index": i // rows_per_shard,
            "specs": rows[i : i + rows_per_shard],
            "row_group_size": row_group_size,
        }
        for sp, rows in sorted(specs.items())
        for i in range(0, len(rows), rows_per_shard)
    ]
    results = _run_jobs(jobs, engine) if jobs else []
    fs, base = resolve_fs(out)
    fs.create_dir(base, recursive=True)
    keep = {r["path"] for r in results}
    for sp in specs:
        _cleanup(fs, base, sp, keep)
    manifest = _manifest(read_manifest(out), fmt, name, results, rejects)
    _write_manifest(fs, base, manifest)
    skipped = sum(r["skipped"] for r in results)
    return BuildResult(manifest, len(results) - skipped, skipped, time.perf_counter() - start)
