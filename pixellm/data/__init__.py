"""PixelLM data: generated corpus, format converters, Parquet shards and the mixed training stream."""

from pixellm.data.collate import collate_batch, make_collate, unpack_masks
from pixellm.data.corpus import CorpusSummary, generate_corpus
from pixellm.data.formats import DataError, RestrictedUnpickler, load_refs, parse_format
from pixellm.data.schema import (
    CORPUS_BY_FORMAT,
    FORMATS,
    SCHEMA_VERSION,
    SHARD_SCHEMA,
    Reject,
    rle_to_mask,
    segmentation_to_rle,
)
from pixellm.data.shards import BuildResult, build_shards, materialize, read_manifest
from pixellm.data.stream import (
    PlanChunkPreprocess,
    PreprocessBatch,
    build_train_dataset,
    iter_local_batches,
    make_plan,
    mixture_counts,
)

__all__ = [
    "CORPUS_BY_FORMAT",
    "FORMATS",
    "SCHEMA_VERSION",
    "SHARD_SCHEMA",
    "BuildResult",
    "CorpusSummary",
    "DataError",
    "PlanChunkPreprocess",
    "PreprocessBatch",
    "Reject",
    "RestrictedUnpickler",
    "build_shards",
    "build_train_dataset",
    "collate_batch",
    "generate_corpus",
    "iter_local_batches",
    "load_refs",
    "make_collate",
    "make_plan",
    "materialize",
    "mixture_counts",
    "parse_format",
    "read_manifest",
    "rle_to_mask",
    "segmentation_to_rle",
    "unpack_masks",
]
