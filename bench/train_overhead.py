"""Overhead of the Ray Train + DeepSpeed path vs a bare PyTorch loop (same model, same batches).

Both paths train the tiny PixelLM for ``--warmup`` + ``--steps`` optimizer steps on the same
pre-materialised micro-batches (preprocessed once, held in memory: a materialised Ray Dataset for
the Ray path, a Python list for the bare loop), same micro-batch, AdamW, warm-up + linear decay and
grad clipping. Timed: the ``--steps`` steps after warm-up (bare loop run before and after the Ray run and
averaged, since the machine may be shared; the Ray worker gets every core, like the bare loop) (wall time per step, data fetch included;
the Ray path's times come from the worker's own per-step clock and exclude the final checkpoint).

    .venv/bin/python bench/train_overhead.py [--steps 30 --warmup 5 --micro 2]

Prints one JSON object; ``overhead`` = bare steps/s ÷ Ray steps/s (goal ≤ 1.15).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
FORMATS = [
    ("muse", "muse", "muse"),
    ("coco", "coco/instances.json", "sem_seg"),
    ("refer", "refer", "refer_seg"),
    ("llava", "llava/llava_instruct.json", "vqa"),
]


def make_shards(root: Path) -> Path:
    """A small generated corpus, sharded (local engine, no Ray)."""
    from pixellm.data.corpus import generate_corpus
    from pixellm.data.shards import build_shards

    generate_corpus(root / "corpus", seed=0, images=40, image_size=128)
    for fmt, rel, name in FORMATS:
        corpus = root / "corpus"
        build_shards(
            fmt, corpus / rel, str(root / "shards" / name), images=corpus / "images", engine="local"
        )
    return root / "shards"


def materialise_rows(recipe: Any, n: int) -> list[dict[str, Any]]:
    """``n`` preprocessed rows (``PreprocessBatch`` output, one dict per row)."""
    from pixellm.data.stream import PreprocessBatch, fetch_rows, make_plan

    plan = make_plan(recipe.data, recipe.data.train_split, n + 64, recipe.train.seed)
    pre = PreprocessBatch(recipe.model, recipe.data)
    rows = [r for r in (pre._row(x) for x in fetch_rows(plan).to_pylist()) if r is not None]
    if len(rows) < n:
        raise RuntimeError(f"only {len(rows)} usable rows for {n}")
    return rows[:n]


def bare_loop(recipe: Any, rows: list[dict[str, Any]], warmup: int, steps: int) -> list[float]:
    """Single-process PyTorch: per-step wall seconds of the timed steps."""
    from pixellm.data.collate import collate_batch
    from pixellm.data.stream import rows_to_columns
    from pixellm.model import build_pixellm

    t = recipe.train
    torch.manual_seed(t.seed)
    model = build_pixellm(recipe.model).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
    total = warmup + steps
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, s / max(1, t.warmup_steps)) * max(0.0, (total - s) / total)
    )
    micro = t.micro_batch_size
    batches = [rows[i * micro : (i + 1) * micro] for i in range(total)]
    times = []
    for step, chunk in enumerate(batches):
        start = time.perf_counter()
        batch = collate_batch(rows_to_columns(chunk, recipe.model.image_size))
        out = model(**{k: v for k, v in batch.items() if k != "sample_id"})
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
        opt.step()
        sched.step()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return times


def ray_loop(recipe: Any, rows: list[dict[str, Any]], warmup: int) -> list[float]:
    """Ray Train V2 + DeepSpeed, 1 worker, dataset = the same rows materialised in the object store."""
    import ray

    from pixellm.train.driver import build_loop_config, init_ray, make_trainer
    from pixellm.train.ds_config import derive_deepspeed_config

    init_ray(recipe)
    ds = ray.data.from_items(rows).materialize()
    loop_config = build_loop_config(recipe, derive_deepspeed_config(recipe), None)
    result = make_trainer(recipe, loop_config, {"train_rank0": ds}).fit()
    if result.error is not None:
        raise result.error
    return list(result.metrics["step_seconds"])[warmup:]


def main() -> None:
    """Run both loops and print the JSON summary."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--micro", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    from pixellm.config import load_recipe

    total = args.warmup + args.steps
    with tempfile.TemporaryDirectory() as tmp:
        shards = make_shards(Path(tmp))
        recipe = load_recipe(
            REPO / "platform/recipes/tiny.yaml",
            overrides=[
                f"data.shards_root={shards}",
                f"train.steps_per_epoch={total}",
                f"train.micro_batch_size={args.micro}",
                "train.grad_accum=1",
                "train.num_workers=1",
                f"train.cpus_per_worker={os.cpu_count()}",  # Ray sets OMP threads = worker CPUs
                f"train.checkpoint_every={total}",
                f"train.storage_path={tmp}/runs",
                "train.run_name=bench",
                "mlflow.enabled=false",
            ],
        )
        rows = materialise_rows(recipe, total * args.micro)
        # bare, Ray, bare again: the machine is shared, so bracket the Ray run and average
        bare = bare_loop(recipe, rows, args.warmup, args.steps)
        ray_times = ray_loop(recipe, rows, args.warmup)
        bare += bare_loop(recipe, rows, args.warmup, args.steps)
    bare_sps = 1 / statistics.mean(bare)
    ray_sps = 1 / statistics.mean(ray_times)
    print(
        json.dumps(
            {
                "steps_timed": args.steps,
                "micro_batch": args.micro,
                "bare_steps_per_s": round(bare_sps, 3),
                "ray_deepspeed_steps_per_s": round(ray_sps, 3),
                "bare_median_step_s": round(statistics.median(bare), 4),
                "ray_median_step_s": round(statistics.median(ray_times), 4),
                "overhead": round(bare_sps / ray_sps, 3),
                "goal": 1.15,
                "torch_threads_bare": torch.get_num_threads(),
                "cpus_per_worker": os.cpu_count(),
            }
        )
    )


if __name__ == "__main__":
    main()
