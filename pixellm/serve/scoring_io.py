"""Files of a scoring run: the predictions JSONL (append log), its Parquet copy, refused rows.

``predictions.jsonl`` is the harness format, one line per sample
``{"sample_id", "text", "masks": [RLE], "scores": [...], "num_tokens", "split", "teacher_forced"}``
(extra keys are ignored by the harness). It is appended batch by batch and fsynced, so it is the
record of what is done: a rerun reads its sample ids and skips them. A last line cut by a crash is
dropped (and the file truncated to the last complete line) instead of failing the rerun.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

__all__ = [
    "PREDICTION_SCHEMA",
    "append_results",
    "read_done_ids",
    "split_sample_ids",
    "write_predictions_parquet",
]

_RLE = pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.string())])
PREDICTION_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("split", pa.string()),
        ("text", pa.string()),
        ("masks", pa.list_(_RLE)),
        ("scores", pa.list_(pa.float64())),
        ("num_tokens", pa.int64()),
        ("teacher_forced", pa.bool_()),
    ]
)


def split_sample_ids(benchmark: str | Path, split: str) -> list[str]:
    """Sample ids of one split, read from the ``sample_id`` column only.

    Raises:
        FileNotFoundError: the split has no ``part-*.parquet`` files.
    """
    parts = sorted((Path(benchmark) / split).glob("part-*.parquet"))
    if not parts:
        present = sorted(p.parent.name for p in Path(benchmark).glob("*/part-*.parquet"))
        raise FileNotFoundError(
            f"{benchmark}/{split}: no part-*.parquet files; splits present: "
            f"{sorted(set(present)) or 'none'} (build shards with `pixellm shards build`)"
        )
    ids: list[str] = []
    for path in parts:
        ids += pq.read_table(path, columns=["sample_id"]).column("sample_id").to_pylist()
    return ids


def read_done_ids(path: Path) -> set[str]:
    """Sample ids already in a predictions JSONL; truncates a cut-off last line."""
    if not path.is_file():
        return set()
    done: set[str] = set()
    good_bytes = 0
    with path.open("rb") as fh:
        for raw in fh:
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError:
                break  # a line cut by a crash: everything after it is dropped
            if not raw.endswith(b"\n"):
                break
            done.add(str(obj["sample_id"]))
            good_bytes += len(raw)
    if good_bytes != path.stat().st_size:
        with path.open("rb+") as fh:
            fh.truncate(good_bytes)
    return done


def _append_lines(path: Path, objs: list[dict[str, Any]]) -> None:
    if not objs:
        return
    with path.open("a", encoding="utf-8") as fh:
        fh.write("".join(json.dumps(o) + "\n" for o in objs))
        fh.flush()
        os.fsync(fh.fileno())


def append_results(
    out: Path, rows: list[dict[str, Any]], split: str, teacher_forced: bool
) -> tuple[int, int]:
    """Append scored rows to ``predictions.jsonl`` and refused rows to ``errors.jsonl``.

    Args:
        out: the run's output directory.
        rows: ``{"sample_id", "text", "masks_json", "scores", "num_tokens", "error"}`` rows.
        split: split name stored with each prediction.
        teacher_forced: stored with each prediction.

    Returns:
        ``(predictions written, errors written)``.
    """
    preds, errors = [], []
    for r in rows:
        if r["error"]:
            errors.append({"sample_id": r["sample_id"], "split": split, "error": r["error"]})
            continue
        preds.append(
            {
                "sample_id": r["sample_id"],
                "text": r["text"],
                "masks": json.loads(r["masks_json"]),
                "scores": list(r["scores"]),
                "num_tokens": r["num_tokens"],
                "split": split,
                "teacher_forced": teacher_forced,
            }
        )
    _append_lines(out / "predictions.jsonl", preds)
    _append_lines(out / "errors.jsonl", errors)
    return len(preds), len(errors)


def write_predictions_parquet(jsonl: Path, parquet: Path) -> int:
    """Rewrite the whole JSONL as one Parquet file (``PREDICTION_SCHEMA``); returns its rows."""
    rows = []
    if jsonl.is_file():
        with jsonl.open(encoding="utf-8") as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
    table = pa.Table.from_pylist(
        [{name: r.get(name) for name in PREDICTION_SCHEMA.names} for r in rows],
        schema=PREDICTION_SCHEMA,
    )
    pq.write_table(table, parquet)
    return table.num_rows
