"""Sample audit log: which sample each rank consumed in each optimizer step (``train.sample_log``).

One JSON line per sample, ``{"step": <optimizer step>, "rank": <r>, "sample_id": "<id>"}``, in
``<storage_path>/<run_name>/samples/rank-<r>.jsonl``, written through ``pyarrow.fs`` (local paths
and any pyarrow URI, e.g. ``s3://``). Lines are buffered and appended right before each checkpoint
is reported, so every step a checkpoint covers is in the file. A resumed rank first drops the lines
of steps after its checkpoint (steps that will be re-run), so the file holds each step once.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.fs as pafs

__all__ = ["SampleLog", "sample_log_path"]


def sample_log_path(run_dir: str, rank: int) -> str:
    """``<run_dir>/samples/rank-<rank>.jsonl``."""
    return f"{run_dir.rstrip('/')}/samples/rank-{rank}.jsonl"


class SampleLog:
    """Per-rank writer of the audit log.

    Args:
        run_dir: ``<storage_path>/<run_name>`` (absolute local path or a pyarrow URI).
        rank: this worker's world rank.
        resume_step: steps already done (0 for a fresh run); later lines are dropped.
    """

    def __init__(self, run_dir: str, rank: int, resume_step: int):
        self.rank = rank
        self.fs, self.path = pafs.FileSystem.from_uri(sample_log_path(run_dir, rank))
        self.fs.create_dir(self.path.rsplit("/", 1)[0], recursive=True)
        self.pending: list[str] = []
        kept = [line for line in self._read() if json.loads(line)["step"] <= resume_step]
        self._write(kept)

    def _read(self) -> list[str]:
        if self.fs.get_file_info(self.path).type == pafs.FileType.NotFound:
            return []
        with self.fs.open_input_stream(self.path) as f:
            return [line for line in f.read().decode().splitlines() if line.strip()]

    def _write(self, lines: list[str]) -> None:
        with self.fs.open_output_stream(self.path) as f:
            f.write("".join(f"{line}\n" for line in lines).encode())

    def add(self, step: int, sample_ids: list[str]) -> None:
        """Record the samples consumed in optimizer step ``step`` (all its micro-batches)."""
        self.pending += [
            json.dumps({"step": step, "rank": self.rank, "sample_id": sid}) for sid in sample_ids
        ]

    def flush(self) -> None:
        """Append the buffered lines (rewrite where the filesystem cannot append, e.g. S3)."""
        if not self.pending:
            return
        blob = "".join(f"{line}\n" for line in self.pending).encode()
        try:
            with self.fs.open_append_stream(self.path) as f:
                f.write(blob)
        except (pa.ArrowNotImplementedError, NotImplementedError):
            self._write(self._read() + self.pending)
        self.pending.clear()
