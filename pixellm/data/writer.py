"""Row specs → validated rows → one atomically written Parquet shard.

Kept free of torch/transformers imports: it runs in every Ray Data task of the shard job, where a
heavy import would dominate the run time. The ``[SEG]`` placeholder arrives in the job.
"""

from __future__ import annotations

import hashlib
import io
import json
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

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

__all__ = ["materialize", "resolve_fs", "write_shard", "write_shard_row"]

_META_REJECTS = b"pixellm.rejected"
_META_VERSION = b"pixellm.schema_version"


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


def _check_text(spec: dict, placeholder: str) -> Reject | None:
    conv = spec["conversation"]
    for t, turn in enumerate(conv):
        if turn["role"] == "user" and not str(turn["text"]).strip():
            return _reject(spec, "empty_question", f"turn {t}: the question is empty")
    n_seg = sum(str(t["text"]).count(placeholder) for t in conv if t["role"] == "assistant")
    if n_seg != len(spec["targets"]):
        return _reject(
            spec,
            "seg_count_mismatch",
            f"answer has {n_seg} {placeholder} placeholders but {len(spec['targets'])} targets",
        )
    return None


def materialize(
    spec: dict[str, Any], placeholder: str = "[SEG]", cache: dict[str, Any] | None = None
) -> dict[str, Any] | Reject:
    """One row spec → a row of ``SHARD_SCHEMA``, or the ``Reject`` saying why it is quarantined.

    Args:
        spec: a row spec from ``pixellm.data.formats.parse_format``.
        placeholder: the per-target placeholder (``pixellm.model.codebook.PLACEHOLDER``).
        cache: image path → decoded bytes/size, shared by the rows of one shard.
    """
    bad = _check_text(spec, placeholder)
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
        job: ``{out, split, index, specs, row_group_size, placeholder}``.

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
        got = materialize(spec, job["placeholder"], cache)
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


def write_shard_row(row: dict[str, str]) -> dict[str, str]:
    """``Dataset.map`` form of ``write_shard``: ``{"job": json}`` → ``{"result": json}``."""
    return {"result": json.dumps(write_shard(json.loads(row["job"])))}
