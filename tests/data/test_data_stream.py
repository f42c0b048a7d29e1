"""The training stream: mixing plan, preprocessing, collate, Ray streaming_split across 2 workers."""

from __future__ import annotations

import logging
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from pixellm.config import Recipe
from pixellm.data.collate import collate_batch, make_collate
from pixellm.data.formats import DataError
from pixellm.data.stream import (
    PreprocessBatch,
    iter_local_batches,
    make_plan,
    mixture_counts,
)
from pixellm.model.codebook import PLACEHOLDER


def test_mixture_counts_are_exact() -> None:
    counts = mixture_counts({"sem_seg": 2, "refer_seg": 9, "vqa": 2, "muse": 4, "off": 0}, 2000)
    assert counts == {"muse": 471, "refer_seg": 1059, "sem_seg": 235, "vqa": 235}
    assert sum(mixture_counts({"a": 1, "b": 1, "c": 1}, 100).values()) == 100


def test_plan_mixes_every_window_in_ratio(small_recipe: Recipe) -> None:
    plan = make_plan(small_recipe.data, "train", 2000, seed=0)
    assert len(plan) == 2000 and plan.rows.shape == (2000, 3)
    assert len(plan.shards) < 20  # shards by index: a small table, not a path per sample
    assert plan == make_plan(small_recipe.data, "train", 2000, seed=0)
    assert plan != make_plan(small_recipe.data, "train", 2000, seed=1)
    for start in range(0, 2000, 64):
        window = Counter(plan[start : start + 64].corpora())
        assert abs(window["refer_seg"] - min(64, 2000 - start) * 9 / 17) <= 2, window


def test_rank_plans_are_each_in_ratio_and_disjoint(small_recipe: Recipe) -> None:
    from pixellm.data.stream import fetch_rows

    plan = make_plan(small_recipe.data, "train", 60, seed=0, ranks=2)
    counts = mixture_counts(small_recipe.data.mixture, 60)
    ids = []
    for r in range(2):
        part = plan[r * 60 : (r + 1) * 60]
        assert Counter(part.corpora()) == counts
        ids.append(fetch_rows(part).column("sample_id").to_pylist())
    assert not set(ids[0]) & set(ids[1])  # 60 per rank fits in one pass over every corpus


def test_stream_layout_deals_blocks_round_robin() -> None:
    from pixellm.config import TrainConfig
    from pixellm.data.train_stream import StreamLayout

    t = TrainConfig(
        steps_per_epoch=6, epochs=2, micro_batch_size=2, grad_accum=3, checkpoint_every=4
    )
    lay = StreamLayout.for_train(t, world=2)
    assert lay.steps_per_block == 2 and lay.rows_per_block == 12 and lay.num_blocks == 12
    assert [lay.block(g) for g in (0, 1, 2, 5, 6)] == [
        (0, 0, 1),
        (1, 0, 1),
        (0, 12, 3),
        (1, 24, 5),
        (0, 0, 7),  # epoch 2: the same plan again
    ]
    assert lay.start_block(4) == 4 and lay.start_block(5) == 4  # 5: skip one step inside a block


def test_missing_corpus_is_a_clear_error(small_recipe: Recipe, tmp_path: Path) -> None:
    data = small_recipe.data.model_copy(update={"mixture": {"muse": 1.0, "ade20k": 2.0}})
    with pytest.raises(
        DataError, match=r"corpus 'ade20k' has a mixture ratio > 0 but no shards for split 'train'"
    ):
        make_plan(data, "train", 10, seed=0)


def test_local_batches_have_the_collate_contract(small_recipe: Recipe) -> None:
    batches = list(iter_local_batches(small_recipe, "train", batch_size=4, num_samples=10, seed=0))
    assert len(batches) == 2
    b = batches[0]
    assert set(b) == {
        "pixel_values",
        "valid_hw",
        "input_ids",
        "attention_mask",
        "labels",
        "gt_masks",
        "sample_id",
    }
    assert b["pixel_values"].shape == (4, 3, 32, 32) and b["pixel_values"].dtype == torch.float32
    assert b["valid_hw"].shape == (4, 2) and b["valid_hw"].dtype == torch.long
    t = b["input_ids"].shape[1]
    assert b["attention_mask"].shape == b["labels"].shape == (4, t)
    pad = b["input_ids"][b["attention_mask"] == 0]
    assert pad.numel() == 0 or bool((pad == 3).all())  # tiny tokenizer pad id
    assert bool((b["labels"][b["attention_mask"] == 0] == -100).all())
    assert len(b["gt_masks"]) == 4 and len(b["sample_id"]) == 4
    for m in b["gt_masks"]:
        assert m.dim() == 3 and m.dtype == torch.float32 and max(m.shape[1:]) <= 32
        assert set(torch.unique(m).tolist()) <= {0.0, 1.0}


def _row(sample_id: str, answer: str, n_targets: int, image: bytes) -> dict:
    rle = {"size": [24, 32], "counts": "0"}
    from pixellm.data.schema import encode_mask

    mask = np.zeros((24, 32), np.uint8)
    mask[2:10, 3:12] = 1
    rle = encode_mask(mask)
    target = {"name": "circle", "description": "circle", "rle": rle, "bbox": [3.0, 2.0, 9.0, 8.0]}
    return {
        "sample_id": sample_id,
        "corpus": "muse",
        "image": image,
        "height": 24,
        "width": 32,
        "conversation": [
            {"role": "user", "text": "Which shapes could roll?"},
            {"role": "assistant", "text": answer},
        ],
        "targets": [target] * n_targets,
    }


def test_preprocess_drops_and_counts_bad_rows(
    small_recipe: Recipe, caplog: pytest.LogCaptureFixture
) -> None:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (9, 9, 9)).save(buf, format="PNG")
    png = buf.getvalue()
    rows = [
        _row("ok", f"the circle {PLACEHOLDER}.", 1, png),
        _row("mismatch", f"the circle {PLACEHOLDER}.", 2, png),
        _row("many", " ".join([PLACEHOLDER] * 10), 10, png),
        _row("long", "circle " * 400 + PLACEHOLDER, 1, png),
        _row("corrupt", f"the circle {PLACEHOLDER}.", 1, b"not an image"),
    ]
    pre = PreprocessBatch(small_recipe.model, small_recipe.data)
    with caplog.at_level(logging.WARNING, logger="pixellm.data.stream"):
        out = pre({k: [r[k] for r in rows] for k in rows[0]})
    assert list(out["sample_id"]) == ["ok"]
    assert pre.dropped == {"seg_count_mismatch": 1, "too_many_targets": 1, "unusable_sample": 2}
    assert "dropped sample long (unusable_sample)" in caplog.text
    batch = make_collate(pad_id=0)(out)
    assert batch["gt_masks"][0].shape == (1, 24, 32) and batch["gt_masks"][0].sum() == 72
    assert batch["valid_hw"].tolist() == [[24, 32]]
    labels = batch["labels"][0]
    assert (labels != -100).sum() < labels.numel() and labels[-1] != -100  # assistant tokens only


@pytest.mark.integration
def test_two_workers_get_equal_batches_and_ratios(small_recipe: Recipe, ray_cluster) -> None:
    """1,000 samples per rank through ``streaming_split(2, equal=True)``: ratios within 1 point,
    disjoint ranks, each rank exactly its plan sequence in order (what exact resume relies on)."""
    from pixellm.data.stream import fetch_rows
    from pixellm.data.train_stream import build_train_dataset, train_plan

    train = small_recipe.train.model_copy(
        update={"steps_per_epoch": 250, "micro_batch_size": 4, "grad_accum": 1}
    )
    recipe = small_recipe.model_copy(update={"train": train})
    ds = build_train_dataset(recipe, world=2)
    ds.context.execution_options.preserve_order = True  # Ray Train sets it via its DataConfig
    shards = ds.streaming_split(2, equal=True)
    results: dict[int, tuple[int, Counter]] = {}
    seen: dict[int, list[str]] = {}

    def consume(rank: int) -> None:
        shares: Counter = Counter()
        batches = 0
        seen[rank] = []
        for batch in shards[rank].iter_torch_batches(
            batch_size=4, collate_fn=collate_batch, prefetch_batches=2
        ):
            batches += 1
            seen[rank] += batch["sample_id"]
            shares.update(s.split("/")[0] for s in batch["sample_id"])
        results[rank] = (batches, shares)

    threads = [threading.Thread(target=consume, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert results[0][0] == results[1][0] == 250
    total = sum(small_recipe.data.mixture.values())
    for rank, (_, shares) in results.items():
        n = sum(shares.values())
        for corpus, ratio in small_recipe.data.mixture.items():
            share = shares[corpus] / n
            assert abs(share - ratio / total) <= 0.01, (
                f"rank {rank} {corpus}: {share:.3f} vs {ratio / total:.3f}"
            )
    plan = train_plan(recipe, world=2)
    for rank in range(2):
        expected = fetch_rows(plan[rank * 1000 : (rank + 1) * 1000]).column("sample_id")
        assert seen[rank] == expected.to_pylist(), rank
