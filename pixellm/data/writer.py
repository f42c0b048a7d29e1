"""Row specs → validated rows → one atomically written Parquet shard.

Kept free of torch/transformers imports: it runs in every Ray Data task of the shard job, where a
heavy import would dominate the run time. The ``[SEG]`` placeholder arrives in the job.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
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
    RejectReason,
    bbox_of_rle,
    encode_mask,
    rle_to_mask,
    segmentation_to_rle,
)

__all__ = [
    "MAX_IMAGE_BYTES",
    "MAX_IMAGE_PIXELS",
    "job_key",
    "materialize",
    "resolve_fs",
    "write_shard",
    "write_shard_row",
]

_META_REJECTS = b"pixellm.rejected"
_META_VERSION = b"pixellm.schema_version"
_META_KEY = b"pixellm.job_key"


def resolve_fs(uri: str) -> tuple[pafs.FileSystem, str]:
    """``"/local/dir"``, ``"file:///dir"``, ``"s3://bucket/x"`` … → ``(filesystem, path)``."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), str(Path(uri).resolve())


MAX_IMAGE_PIXELS = 8192 * 8192  # h * w from the header; larger images are decompression bombs
MAX_IMAGE_BYTES = 64 * 2**20  # encoded file size
# The allowed encodings, by magic bytes: sniffed before Pillow parses anything, and Pillow is then
# limited to that one decoder (no TIFF/PSD/… plugin ever sees corpus bytes).
_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG", "PNG"),
    (b"BM", "BMP"),
)


def _reject(spec: dict, reason: RejectReason, detail: str) -> Reject:
    return Reject(
        spec.get("file", "?"),
        spec.get("record", "?"),
        reason,
        detail,
        spec.get("sample_id"),
        spec.get("split"),
    )


def _image_format(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((fmt for magic, fmt in _MAGIC if data.startswith(magic)), None)


def _decode_image(path: str, max_pixels: int) -> tuple[bytes, int, int] | tuple[RejectReason, str]:
    """Read and fully decode one image; every failure is a (reason, detail), never an exception."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return RejectReason.IMAGE_MISSING, f"image file {path} does not exist"
    except OSError as err:
        return RejectReason.IMAGE_UNREADABLE, f"image file {path} cannot be read: {err}"
    if not stat.S_ISREG(st.st_mode):
        return RejectReason.IMAGE_UNREADABLE, f"image path {path} is not a regular file"
    if st.st_size > MAX_IMAGE_BYTES:
        return (
            RejectReason.IMAGE_TOO_LARGE,
            f"image file {path} has {st.st_size} bytes, the limit is {MAX_IMAGE_BYTES}",
        )
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        return RejectReason.IMAGE_UNREADABLE, f"image file {path} cannot be read: {err}"
    fmt = _image_format(data)
    if fmt is None:
        return (
            RejectReason.IMAGE_FORMAT,
            f"image file {path} starts with {data[:8]!r}; allowed: JPEG, PNG, WEBP, BMP",
        )
    try:
        with Image.open(io.BytesIO(data), formats=[fmt]) as im:
            h, w = im.height, im.width  # from the header: nothing decoded yet
            if h * w > max_pixels:
                return (
                    RejectReason.IMAGE_TOO_LARGE,
                    f"image file {path} header says {w}x{h} = {h * w} pixels, the limit is "
                    f"{max_pixels}",
                )
            im.load()
    except Image.DecompressionBombError as err:  # Pillow's own cap, hit inside open()
        return RejectReason.IMAGE_TOO_LARGE, f"image file {path}: {err}"
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, EOFError) as err:
        return RejectReason.IMAGE_UNREADABLE, f"image file {path} cannot be decoded: {err}"
    return data, h, w


def _load_image(
    spec: dict, cache: dict[str, Any], max_pixels: int
) -> tuple[bytes, int, int] | Reject:
    path = spec["image_path"]
    if path not in cache:
        cache[path] = _decode_image(path, max_pixels)
    got = cache[path]
    if isinstance(got[0], RejectReason):
        return _reject(spec, got[0], got[1])
    _, h, w = got
    if spec.get("height") is not None and (spec["height"], spec["width"]) != (h, w):
        return _reject(
            spec,
            RejectReason.IMAGE_SIZE_MISMATCH,
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


def _check_utf8(spec: dict) -> Reject | None:
    """The converters reject bad text naming its field; this keeps Arrow safe regardless."""
    texts = [spec[k] for k in ("sample_id", "corpus", "split", "task", "image_path")]
    texts += [t[k] for t in spec["conversation"] for k in ("role", "text")]
    texts += [t[k] for t in spec["targets"] for k in ("name", "description")]
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            return _reject(
                spec,
                RejectReason.INVALID_TEXT,
                f"{ascii(text[:60])}: not valid UTF-8: {err.reason}",
            )
    return None


def _check_text(spec: dict, placeholder: str) -> Reject | None:
    conv = spec["conversation"]
    for t, turn in enumerate(conv):
        if turn["role"] == "user" and not str(turn["text"]).strip():
            return _reject(spec, RejectReason.EMPTY_QUESTION, f"turn {t}: the question is empty")
    n_seg = sum(str(t["text"]).count(placeholder) for t in conv if t["role"] == "assistant")
    if n_seg != len(spec["targets"]):
        return _reject(
            spec,
            RejectReason.SEG_COUNT_MISMATCH,
            f"answer has {n_seg} {placeholder} placeholders but {len(spec['targets'])} targets",
        )
    return None


def materialize(
    spec: dict[str, Any],
    placeholder: str = "[SEG]",
    cache: dict[str, Any] | None = None,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> dict[str, Any] | Reject:
    """One row spec → a row of ``SHARD_SCHEMA``, or the ``Reject`` saying why it is quarantined.

    Args:
        spec: a row spec from ``pixellm.data.formats.parse_format``.
        placeholder: the per-target placeholder (``pixellm.model.codebook.PLACEHOLDER``).
        cache: image path → decoded bytes/size, shared by the rows of one shard.
        max_pixels: images whose header claims more pixels (h * w) are rejected undecoded.
    """
    bad = _check_utf8(spec) or _check_text(spec, placeholder)
    if bad is not None:
        return bad
    got = _load_image(spec, {} if cache is None else cache, max_pixels)
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


def job_key(job: dict[str, Any]) -> str:
    """sha256 of everything that decides a shard's bytes except the image files themselves."""
    keyed = {k: job[k] for k in ("specs", "placeholder", "row_group_size")}
    keyed.update(max_pixels=job.get("max_pixels", MAX_IMAGE_PIXELS), schema=SCHEMA_VERSION)
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()


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
        "key": kv.get(_META_KEY, b"").decode(),
    }


def write_shard(job: dict[str, Any]) -> dict[str, Any]:
    """Materialise and atomically write one shard; skipped when it exists from the same job.

    A shard left by an earlier build of *different* specs (the input changed, or
    ``rows_per_shard``) has another ``job_key`` in its footer and is rewritten, never reused.

    Args:
        job: ``{out, split, index, specs, row_group_size, placeholder, max_pixels}``.

    Returns:
        ``{path, split, rows, row_groups, bytes, sha256, rejected, skipped}``.
    """
    fs, base = resolve_fs(job["out"])
    rel = f"{job['split']}/part-{job['index']:05d}.parquet"
    final = f"{base}/{rel}"
    key = job_key(job)
    if fs.get_file_info(final).type == pafs.FileType.File:
        info = _footer_info(fs, final)
        if info.pop("key") == key:
            return {"path": rel, "split": job["split"], "skipped": True, **info}
    cache: dict[str, Any] = {}
    rows, rejected = [], []
    max_pixels = job.get("max_pixels", MAX_IMAGE_PIXELS)
    for spec in job["specs"]:
        got = materialize(spec, job["placeholder"], cache, max_pixels)
        (rejected.append(got.to_dict()) if isinstance(got, Reject) else rows.append(got))
    meta = {
        _META_VERSION: str(SCHEMA_VERSION).encode(),
        _META_REJECTS: json.dumps(rejected).encode(),
        _META_KEY: key.encode(),
    }
    table = pa.Table.from_pylist(rows, schema=SHARD_SCHEMA).replace_schema_metadata(meta)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=job["row_group_size"], compression="zstd")
    data = sink.getvalue().to_pybytes()
    fs.create_dir(f"{base}/{job['split']}", recursive=True)
    tmp = f"{base}/{job['split']}/.part-{job['index']:05d}.parquet.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    # atomic rename on local and POSIX filesystems; readers never see a partial file
    fs.move(tmp, final)
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
