"""Overhead of the real training path (Ray Train + DeepSpeed + the streaming dataset) vs a bare loop.

The Ray path is what a user runs: ``pixellm.train.train`` with 1 worker, the run's one streaming
dataset (plan → fetch + preprocess in a Ray Data actor pool → ``streaming_split`` → the worker's
``iter_torch_batches`` with prefetching), nothing materialised. The bare loop is single-process
PyTorch over the *same* samples, preprocessed and collated before timing (same model, micro-batch,
AdamW, warm-up + linear decay, grad clipping, one intra-op thread like the worker with
``train.cpus_per_worker=1``). Timed: the ``--steps`` steps after ``--warmup`` (wall time per step,
data wait included; the Ray path's times come from the worker's own per-step clock). The bare loop
runs before and after the Ray run and is averaged, since the machine may be shared.

Data CPU: ``data_cpu_s`` is the worker's CPU seconds off the training thread per step (Ray Data's
iterator/prefetch threads, Ray's own threads), from the run's MLflow metrics; ``coordinator_cpu_s``
is the CPU of Ray Data's split coordinator (it runs the streaming executor) per step over the whole
run, sampled from /proc by psutil. Preprocessing actors do real work and are not counted.

    .venv/bin/python bench/train_overhead.py [--steps 30 --warmup 5 --micro 2]

Prints one JSON object; ``overhead`` = bare steps/s ÷ Ray steps/s (goal ≤ 1.10).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
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


def stream_batches(recipe: Any) -> list[dict[str, Any]]:
    """The micro-batches the 1-worker stream yields, preprocessed and collated up front."""
    from pixellm.data.collate import collate_batch
    from pixellm.data.stream import PreprocessBatch, fetch_rows, rows_to_columns
    from pixellm.data.train_stream import train_plan

    plan = train_plan(recipe, world=1)
    rows = PreprocessBatch(recipe.model, recipe.data).process_rows(fetch_rows(plan).to_pylist())
    if len(rows) < len(plan):
        raise RuntimeError(f"{len(plan) - len(rows)} plan rows dropped; the paths would differ")
    micro = recipe.train.micro_batch_size
    return [
        collate_batch(rows_to_columns(rows[i : i + micro], recipe.model.image_size))
        for i in range(0, len(rows), micro)
    ]


def bare_loop(recipe: Any, batches: list[dict[str, Any]], warmup: int) -> list[float]:
    """Single-process PyTorch: per-step wall seconds of the steps after ``warmup``."""
    from pixellm.model import build_pixellm

    t = recipe.train
    torch.manual_seed(t.seed)
    model = build_pixellm(recipe.model).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
    total = len(batches)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, s / max(1, t.warmup_steps)) * max(0.0, (total - s) / total)
    )
    keys = ("pixel_values", "valid_hw", "input_ids", "attention_mask", "labels", "gt_masks")
    times = []
    for step, batch in enumerate(batches):
        start = time.perf_counter()
        out = model(**{k: batch[k] for k in keys})
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
        opt.step()
        sched.step()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return times


class CoordinatorCpu:
    """Samples the CPU seconds of this process tree's Ray Data ``SplitCoordinator`` actor."""

    def __init__(self) -> None:
        self.cpu, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.wait(0.25):
            for proc in me.children(recursive=True):
                try:
                    if "SplitCoordinator" in " ".join(proc.cmdline()):
                        times = proc.cpu_times()
                        self.cpu = max(self.cpu, times.user + times.system)
                except psutil.Error:
                    continue

    def __enter__(self) -> CoordinatorCpu:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def ray_run(recipe: Any, warmup: int) -> tuple[list[float], list[float], float]:
    """``pixellm.train.train`` → (step seconds after warm-up, data_cpu_s per step, coordinator s)."""
    from mlflow.tracking import MlflowClient

    from pixellm.train import train

    with CoordinatorCpu() as coord:
        result = train(recipe)
    hist = MlflowClient(recipe.mlflow.tracking_uri).get_metric_history(
        result.mlflow_run_id, "data_cpu_s"
    )
    data_cpu = [m.value for m in sorted(hist, key=lambda m: m.step)][warmup:]
    return list(result.metrics["step_seconds"])[warmup:], data_cpu, coord.cpu


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
    from pixellm.tracking import start_mlflow_server

    total = args.warmup + args.steps
    torch.set_num_threads(1)  # the worker gets OMP_NUM_THREADS = train.cpus_per_worker = 1
    with tempfile.TemporaryDirectory() as tmp, start_mlflow_server(Path(tmp) / "mlflow") as server:
        shards = make_shards(Path(tmp))
        recipe = load_recipe(
            REPO / "platform/recipes/tiny.yaml",
            overrides=[
                f"data.shards_root={shards}",
                "data.preprocess_actors=1",
                f"train.steps_per_epoch={total}",
                f"train.micro_batch_size={args.micro}",
                "train.grad_accum=1",
                "train.num_workers=1",
                "train.cpus_per_worker=1",
                f"train.checkpoint_every={total}",
                f"train.storage_path={tmp}/runs",
                "train.run_name=bench",
                f"mlflow.tracking_uri={server.uri}",
                "mlflow.experiment=bench-train-overhead",
                "mlflow.registered_model_name=bench-train-overhead",
            ],
        )
        batches = stream_batches(recipe)
        # bare, Ray, bare again: the machine is shared, so bracket the Ray run and average
        bare = bare_loop(recipe, batches, args.warmup)
        ray_times, data_cpu, coord_cpu = ray_run(recipe, args.warmup)
        bare += bare_loop(recipe, batches, args.warmup)
    bare_sps = 1 / statistics.mean(bare)
    ray_sps = 1 / statistics.mean(ray_times)
    print(
        json.dumps(
            {
                "steps_timed": args.steps,
                "micro_batch": args.micro,
                "bare_steps_per_s": round(bare_sps, 3),
                "ray_streaming_steps_per_s": round(ray_sps, 3),
                "bare_median_step_s": round(statistics.median(bare), 4),
                "ray_median_step_s": round(statistics.median(ray_times), 4),
                "overhead": round(bare_sps / ray_sps, 3),
                "goal": 1.10,
                "data_cpu_s_per_step": round(statistics.mean(data_cpu), 4),
                "data_cpu_fraction_of_step": round(
                    statistics.mean(data_cpu) / statistics.mean(ray_times), 3
                ),
                "coordinator_cpu_s_per_step": round(coord_cpu / total, 4),
                "torch_threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
