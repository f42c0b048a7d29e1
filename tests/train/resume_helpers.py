"""Helpers of the resume drills: the reference run's overrides, sample-log and metric readers."""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "platform" / "recipes" / "tiny.yaml"

# The resume drills (worker killed, driver killed) replay this run and must match it exactly:
# 2 workers, 2 epochs x 3 steps, 2 micro-batches per step, checkpoints at 2/4/6, val/giou at 3/6.
# The recipe's whole mixture (VQA and no-target MUSE samples too): a rank whose micro-batch has
# no mask still sends every gradient, so a mask-less batch on one rank cannot stall the all-reduce.
RESUME_RUN = (
    "train.steps_per_epoch=3",
    "train.epochs=2",
    "train.grad_accum=2",
    "train.sample_log=true",
    "train.max_failures=1",
    "train.eval_every=3",
    "train.eval_samples=2",
)


def read_sample_log(run_dir: Path, rank: int) -> list[tuple[int, str]]:
    """``(step, sample_id)`` lines of a rank's sample log, in file order."""
    lines = (run_dir / "samples" / f"rank-{rank}.jsonl").read_text().splitlines()
    out = []
    for line in lines:
        row = json.loads(line)
        assert row["rank"] == rank
        out.append((row["step"], row["sample_id"]))
    return out


def metric_history(env: dict, run_id: str, key: str) -> dict[int, float]:
    """``step -> value`` of one metric; fails if a step was logged twice."""
    from mlflow.tracking import MlflowClient

    hist = MlflowClient(env["mlflow_uri"]).get_metric_history(run_id, key)
    steps = [m.step for m in hist]
    assert len(steps) == len(set(steps)), f"{key}: a step was logged twice: {sorted(steps)}"
    return {m.step: m.value for m in hist}


def tiny_recipe_overrides(env: dict, run_name: str) -> list[str]:
    """The ``--set`` overrides of ``tiny_recipe`` (for a driver run as a subprocess)."""
    return [
        f"data.shards_root={env['shards']}",
        f"train.storage_path={env['root'] / 'ray_results'}",
        f"train.run_name={run_name}",
        f"mlflow.tracking_uri={env['mlflow_uri']}",
        "mlflow.experiment=pixellm-tests",
        f"mlflow.registered_model_name={run_name}-model",
        "train.num_workers=2",
        "train.cpus_per_worker=0.5",
        "train.micro_batch_size=1",
        "train.warmup_steps=1",
        "train.checkpoint_every=2",
    ]
