"""The training stream: shards of several corpora → one mixed, preprocessed Ray Dataset.

Shape notation: S = model image side, T_b = tokens of sample b, K = targets of a sample,
h x w = mask size after capping the longest side at ``data.mask_max_size``.

Mixing (why not ``Dataset.mix``): with ``streaming_split`` the per-rank ratios of ``Dataset.mix``
drift (platform facts: 0.67/0.33 for a 0.75/0.25 mix), and a global random shuffle leaves each rank
a binomial draw (about ±1.6 points at 1,000 rows). Instead a small *plan* is made up front:

1. each rank's sequence gets exactly ``round(n * ratio)`` rows of each corpus (largest remainder),
   drawn by passes over the corpus's row groups in random order, rows shuffled inside a row group,
   repeated when the corpus is smaller than its share (no row twice within a pass, across ranks);
2. inside a rank's sequence the j-th of a corpus's n rows gets the key ``(j + u) / n`` with
   u ~ U(0, 1) (jittered stratification), sorted by key — every window holds each corpus in its
   ratio up to a row, in a random order;
3. the plan names shards by index into a small shard table (``Plan``: 3 integers per sample).

The training stream built from the plan lives in ``pixellm.data.train_stream``.
"""

from __future__ import annotations

import io
import logging
from collections import Counter, OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from pixellm.config import DataConfig, ModelConfig, Recipe
from pixellm.data.collate import collate_batch
from pixellm.data.formats import DataError
from pixellm.data.schema import rle_to_mask
from pixellm.data.shards import read_manifest, resolve_fs
from pixellm.model.codebook import PLACEHOLDER

__all__ = [
    "CHUNK_ROWS",
    "Plan",
    "PreprocessBatch",
    "fetch_rows",
    "iter_local_batches",
    "make_plan",
    "mixture_counts",
]

logger = logging.getLogger(__name__)

CHUNK_ROWS = 64  # plan rows per Ray Data block
_COLUMNS = ["sample_id", "corpus", "image", "height", "width", "conversation", "targets"]


# ---------------------------------------------------------------- plan
@dataclass(frozen=True, eq=False)
class Plan:
    """A sample plan: shard rows named by index into a small shard table.

    Attributes:
        shards: ``(corpus, shard path/URI)`` per shard index.
        rows: ``(N, 3)`` int64: shard index, row group, row in group — one line per sample.
    """

    shards: tuple[tuple[str, str], ...]
    rows: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: slice) -> Plan:
        return Plan(self.shards, self.rows[index])

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Plan)
            and self.shards == other.shards
            and np.array_equal(self.rows, other.rows)
        )

    def corpora(self) -> list[str]:
        """Corpus of every sample, in plan order."""
        return [self.shards[int(i)][0] for i in self.rows[:, 0]]


def mixture_counts(mixture: dict[str, float], num_samples: int) -> dict[str, int]:
    """Rows per corpus: ``num_samples`` split by ratio (largest remainder; ratio 0 → absent)."""
    live = {k: v for k, v in sorted(mixture.items()) if v > 0}
    total = sum(live.values())
    exact = {k: num_samples * v / total for k, v in live.items()}
    counts = {k: int(np.floor(x)) for k, x in exact.items()}
    for k in sorted(live, key=lambda k: (counts[k] - exact[k], k))[
        : num_samples - sum(counts.values())
    ]:
        counts[k] += 1
    return counts


def _corpus_units(shards_root: str, corpus: str, split: str) -> list[tuple[str, int, int]]:
    """``(shard path, row group, rows)`` of one corpus split, from its manifest."""
    root = f"{shards_root.rstrip('/')}/{corpus}"
    manifest = read_manifest(root)
    entry = (manifest or {}).get("splits", {}).get(split)
    if not entry or not entry.get("rows"):
        have = sorted((manifest or {}).get("splits", {}))
        raise DataError(
            f"corpus {corpus!r} has a mixture ratio > 0 but no shards for split {split!r} under {root} "
            f"(splits found: {have or 'none, no manifest.json'}); run `pixellm shards build --out {root} "
            f"...` or set data.mixture.{corpus}=0"
        )
    fs_uri = root if "://" in root else str(resolve_fs(root)[1])
    return [
        (f"{fs_uri}/{shard['path']}", g, n)
        for shard in entry["shards"]
        for g, n in enumerate(shard["row_groups"])
        if n > 0
    ]


def _corpus_order(units: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` rows ``(shard index, group, row)`` from ``units`` ``(U, 3)`` = (shard, group, n)."""
    out: list[np.ndarray] = []
    got = 0
    while got < count:  # one pass = every row once; repeat when the corpus is small
        for u in rng.permutation(len(units)):
            shard, group, n = (int(v) for v in units[int(u)])
            rows = rng.permutation(n)
            out.append(np.stack([np.full(n, shard), np.full(n, group), rows], axis=1))
            got += n
            if got >= count:
                break
    return np.concatenate(out)[:count].astype(np.int64) if out else np.zeros((0, 3), np.int64)


def make_plan(data: DataConfig, split: str, num_samples: int, seed: int, ranks: int = 1) -> Plan:
    """The mixed, shuffled sample plan (see the module docstring).

    Args:
        data: ``mixture`` and ``shards_root``.
        split: shard split to read.
        num_samples: samples per rank.
        seed: sampling seed (with ``data.shuffle_seed``).
        ranks: number of rank sequences; rank r's samples are
            ``plan[r * num_samples : (r + 1) * num_samples]``, each sequence mixed in ratio on its own
            (exact counts per corpus, stratified order), and no row appears twice within a pass over
            a corpus, across ranks included.

    Raises:
        DataError: a corpus with ratio > 0 has no shards for ``split``.
    """
    rng = np.random.default_rng([seed, data.shuffle_seed])
    shards: list[tuple[str, str]] = []
    parts: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(ranks)]
    for corpus, n in mixture_counts(data.mixture, num_samples).items():
        units = _corpus_units(data.shards_root, corpus, split)
        table = {p: i for i, p in enumerate(dict.fromkeys(p for p, _, _ in units))}
        base = len(shards)
        shards += [(corpus, p) for p in table]
        arr = np.asarray([(base + table[p], g, k) for p, g, k in units], dtype=np.int64)
        order = _corpus_order(arr, n * ranks, rng)
        for r in range(ranks):
            keys = (np.arange(n) + rng.random(n)) / max(n, 1)
            parts[r].append((order[r * n : (r + 1) * n], keys))
    seqs = []
    for rank_parts in parts:
        rows = np.concatenate([p for p, _ in rank_parts]) if rank_parts else np.zeros((0, 3))
        keys = np.concatenate([k for _, k in rank_parts]) if rank_parts else np.zeros(0)
        seqs.append(rows[np.argsort(keys, kind="stable")])
    return Plan(tuple(shards), np.concatenate(seqs).astype(np.int64).reshape(-1, 3))


# ---------------------------------------------------------------- fetch
_GROUP_CACHE: OrderedDict[tuple[str, int], pa.Table] = OrderedDict()
_GROUP_CACHE_SIZE = 16  # row groups kept per process (consecutive chunks reuse them)


def _row_group(path: str, group: int) -> pa.Table:
    key = (path, group)
    if key in _GROUP_CACHE:
        _GROUP_CACHE.move_to_end(key)
        return _GROUP_CACHE[key]
    fs, p = resolve_fs(path)
    with fs.open_input_file(p) as f:
        table = pq.ParquetFile(f).read_row_group(group, columns=_COLUMNS)
    _GROUP_CACHE[key] = table
    if len(_GROUP_CACHE) > _GROUP_CACHE_SIZE:
        _GROUP_CACHE.popitem(last=False)
    return table


def fetch_rows(plan: Plan) -> pa.Table:
    """Read the shard rows a plan (or a slice of one) names, in plan order."""
    parts = [_row_group(plan.shards[int(s)][1], int(g)).slice(int(r), 1) for s, g, r in plan.rows]
    if not parts:
        return pa.table({})
    return pa.concat_tables(parts)


# ---------------------------------------------------------------- preprocess
_PROCESSORS: dict[str, Any] = {}


def _processor(model: ModelConfig) -> Any:
    """One processor per process and model config (building the tiny tokenizer takes seconds)."""
    key = model.model_dump_json()
    if key not in _PROCESSORS:
        from pixellm.model import build_processor

        _PROCESSORS[key] = build_processor(model)
    return _PROCESSORS[key]


def _resize_masks(masks: np.ndarray, cap: int) -> np.ndarray:
    """``(K, h, w)`` → nearest-neighbour ``(K, h', w')`` with ``max(h', w') <= cap``."""
    _, h, w = masks.shape
    if max(h, w) <= cap:
        return masks
    scale = cap / max(h, w)
    nh, nw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
    rows = np.minimum(((np.arange(nh) + 0.5) * h / nh).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(nw) + 0.5) * w / nw).astype(np.int64), w - 1)
    return masks[:, rows][:, :, cols]


@contextmanager
def _one_torch_thread() -> Iterator[None]:
    """Per-sample image ops are tiny: intra-op threads only add contention (25x slower measured)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


class PreprocessBatch:
    """Shard rows → model-ready rows; a callable class for ``Dataset.map_batches``.

    Output columns per row: ``input_ids``/``labels`` int64 ``(T_b,)`` (labels -100 except assistant
    tokens), ``pixel_values`` float32 ``(3, S, S)``, ``valid_hw`` int64 ``(2,)``, ``gt_masks``
    (``np.packbits`` of the ``(K, h, w)`` {0,1} masks, see ``collate.unpack_masks``), ``mask_shape``
    int32 ``(3,)``, ``num_targets``, ``sample_id``, ``corpus``, ``pad_id``.

    A row is dropped, counted in ``self.dropped`` and logged with its sample_id when its ``[SEG]``
    count differs from its targets, it has more than ``data.max_targets`` targets, its image cannot
    be decoded, or it is longer than ``model.max_length`` tokens. Nothing raises mid-stream.

    Args:
        model: the recipe's model section (builds the processor with ``build_processor``).
        data: the recipe's data section (``mask_max_size``, ``max_targets``).
    """

    def __init__(self, model: ModelConfig, data: DataConfig):
        self.model = model
        self.data = data
        self.processor = _processor(model)
        self.pad_id = int(self.processor.tokenizer.pad_token_id)
        self.dropped: Counter[str] = Counter()

    def _drop(self, sample_id: str, reason: str, detail: str) -> None:
        self.dropped[reason] += 1
        logger.warning(
            "dropped sample %s (%s): %s [%d dropped by this worker so far]",
            sample_id,
            reason,
            detail,
            sum(self.dropped.values()),
        )

    def _row(self, row: dict[str, Any]) -> dict[str, Any] | None:
        sid, targets, conv = str(row["sample_id"]), row["targets"] or [], row["conversation"]
        n_seg = sum(t["text"].count(PLACEHOLDER) for t in conv if t["role"] == "assistant")
        if n_seg != len(targets):
            return self._drop(
                sid, "seg_count_mismatch", f"{n_seg} {PLACEHOLDER} vs {len(targets)} targets"
            )
        if len(targets) > self.data.max_targets:
            return self._drop(
                sid,
                "too_many_targets",
                f"{len(targets)} > data.max_targets={self.data.max_targets}",
            )
        try:
            enc = self.processor.encode_conversation(conv)
            with Image.open(io.BytesIO(row["image"])) as im:
                pixels, valid_hw = self.processor.transform_image(im)
        except (ValueError, OSError) as err:
            return self._drop(sid, "unusable_sample", str(err))
        h, w = int(row["height"]), int(row["width"])
        masks = (
            np.stack([rle_to_mask(t["rle"]) for t in targets])
            if targets
            else np.zeros((0, h, w), np.uint8)
        )
        masks = _resize_masks(masks, self.data.mask_max_size)
        return {
            "input_ids": np.asarray(enc.input_ids, dtype=np.int64),
            "labels": np.asarray(enc.labels, dtype=np.int64),
            "pixel_values": pixels.numpy(),
            "valid_hw": np.asarray(valid_hw, dtype=np.int64),
            "gt_masks": np.packbits(masks.reshape(-1)).tobytes(),
            "mask_shape": np.asarray(masks.shape, dtype=np.int32),
            "num_targets": len(targets),
            "sample_id": sid,
            "corpus": str(row["corpus"]),
            "pad_id": self.pad_id,
        }

    def __call__(self, batch: pa.Table | dict[str, Any]) -> dict[str, np.ndarray]:
        """Process a batch (a pyarrow Table or a column dict); returns a column dict of arrays."""
        if isinstance(batch, pa.Table):
            rows = batch.to_pylist()
        else:
            keys = list(batch)
            rows = [
                dict(zip(keys, vals, strict=True))
                for vals in zip(*(batch[k] for k in keys), strict=True)
            ]
        return rows_to_columns(self.process_rows(rows), self.model.image_size)

    def process_rows(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Shard rows (dicts) → preprocessed rows; dropped rows are counted and left out."""
        with _one_torch_thread():
            return [r for r in (self._row(row) for row in rows) if r is not None]


def rows_to_columns(rows: list[dict[str, Any]], image_size: int) -> dict[str, np.ndarray]:
    """Preprocessed rows → the column dict ``map_batches`` emits (ragged columns as object arrays)."""

    def obj(key: str) -> np.ndarray:
        arr = np.empty(len(rows), dtype=object)
        arr[:] = [r[key] for r in rows]
        return arr

    return {
        "input_ids": obj("input_ids"),
        "labels": obj("labels"),
        "pixel_values": np.stack([r["pixel_values"] for r in rows])
        if rows
        else np.zeros((0, 3, image_size, image_size), np.float32),
        "valid_hw": np.stack([r["valid_hw"] for r in rows]) if rows else np.zeros((0, 2), np.int64),
        "gt_masks": obj("gt_masks"),
        "mask_shape": np.stack([r["mask_shape"] for r in rows])
        if rows
        else np.zeros((0, 3), np.int32),
        "num_targets": np.asarray([r["num_targets"] for r in rows], dtype=np.int64),
        "sample_id": np.asarray([r["sample_id"] for r in rows], dtype=object),
        "corpus": np.asarray([r["corpus"] for r in rows], dtype=object),
        "pad_id": np.asarray([r["pad_id"] for r in rows], dtype=np.int64),
    }


def _plan_length(num_samples: int) -> int:
    """Plan rows: a margin over ``num_samples`` so rows dropped by preprocessing are replaced."""
    return num_samples + max(CHUNK_ROWS, num_samples // 10)


def iter_local_batches(
    recipe: Recipe, split: str, batch_size: int, num_samples: int, seed: int
) -> Iterator[dict[str, Any]]:
    """The same kind of plan and preprocessing without Ray: collated batches of ``batch_size``.

    Yields ``num_samples // batch_size`` batches (``collate_batch`` output) unless preprocessing drops
    more rows than the plan margin.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    plan = make_plan(recipe.data, split, _plan_length(num_samples), seed)
    pre = PreprocessBatch(recipe.model, recipe.data)
    wanted = (num_samples // batch_size) * batch_size
    done, pending = 0, []
    for i in range(0, len(plan), CHUNK_ROWS):
        pending += pre.process_rows(fetch_rows(plan[i : i + CHUNK_ROWS]).to_pylist())
        while len(pending) >= batch_size and done < wanted:
            batch, pending = pending[:batch_size], pending[batch_size:]
            done += batch_size
            yield collate_batch(rows_to_columns(batch, recipe.model.image_size))
        if done >= wanted:
            return
    logger.warning(
        "plan exhausted after %d of %d samples (%s dropped)", done, wanted, dict(pre.dropped)
    )
