"""PixelLM data: generated corpus, format converters, Parquet shards and the mixed training stream.

Names are imported lazily (PEP 562): Ray workers that only write shards import
``pixellm.data.writer`` without paying for torch / transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "collate_batch": "collate",
    "make_collate": "collate",
    "unpack_masks": "collate",
    "CorpusSummary": "corpus",
    "generate_corpus": "corpus",
    "DataError": "formats",
    "RestrictedUnpickler": "formats",
    "load_refs": "formats",
    "parse_format": "formats",
    "CORPUS_BY_FORMAT": "schema",
    "FORMATS": "schema",
    "SCHEMA_VERSION": "schema",
    "SHARD_SCHEMA": "schema",
    "Reject": "schema",
    "rle_to_mask": "schema",
    "segmentation_to_rle": "schema",
    "BuildResult": "shards",
    "build_shards": "shards",
    "read_manifest": "shards",
    "materialize": "writer",
    "write_shard": "writer",
    "Plan": "stream",
    "PreprocessBatch": "stream",
    "fetch_rows": "stream",
    "iter_local_batches": "stream",
    "make_plan": "stream",
    "mixture_counts": "stream",
    "PlanBlockPreprocess": "train_stream",
    "StreamLayout": "train_stream",
    "build_train_dataset": "train_stream",
    "train_plan": "train_stream",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pixellm.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"pixellm.data.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return __all__
