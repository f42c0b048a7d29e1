"""Partitioned data and exact resume through real Ray Train + DeepSpeed + MLflow (CPU, 2 workers).

All tests compare with the session's one uninterrupted ``reference_run`` (2 epochs x 3 steps):

- within each epoch the ranks' sample ids are disjoint and together equal the epoch's plan, each
  rank's corpus counts are exactly the mixture's, and both epochs are passes over the same plan;
- the driver is SIGKILLed mid-run, once Ray Train has committed a checkpoint, and the job resubmitted: the resumed run's sample log equals the
  reference step by step and rank by rank, and every step's loss matches to 1e-5;
- resuming with another ``train.num_workers`` fails on the driver before Ray starts a worker.
(The worker-kill drill is ``test_train_integration.test_zero2_two_workers_fault_drill_…``.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest

from tests.train.resume_helpers import (
    REPO,
    RESUME_RUN,
    TINY,
    metric_history,
    read_sample_log,
    tiny_recipe_overrides,
)

pytestmark = pytest.mark.integration


def test_ranks_partition_each_epoch_of_the_plan(reference_run) -> None:
    from pixellm.data.stream import fetch_rows, mixture_counts
    from pixellm.data.train_stream import train_plan

    recipe = reference_run["recipe"]
    t = recipe.train
    plan = train_plan(recipe, world=2)
    per_rank = t.steps_per_epoch * t.grad_accum * t.micro_batch_size
    expected = [
        fetch_rows(plan[r * per_rank : (r + 1) * per_rank]).column("sample_id").to_pylist()
        for r in range(2)
    ]
    for epoch in range(t.epochs):
        steps = range(epoch * t.steps_per_epoch + 1, (epoch + 1) * t.steps_per_epoch + 1)
        got = {r: [s for step, s in reference_run["samples"][r] if step in steps] for r in range(2)}
        assert not set(got[0]) & set(got[1]), f"epoch {epoch}: a sample went to both ranks"
        assert sorted(got[0] + got[1]) == sorted(expected[0] + expected[1]), epoch
        for r in range(2):
            assert got[r] == expected[r], (epoch, r)  # rank r's plan sequence, in order
            counts = Counter(s.split("/")[0] for s in got[r])
            assert counts == mixture_counts(recipe.data.mixture, per_rank), (epoch, r, counts)
    for r in range(2):
        steps = [step for step, _ in reference_run["samples"][r]]
        assert steps == sorted(steps) and Counter(steps) == {s: per_rank // 3 for s in range(1, 7)}


def _ray_address() -> str:
    import ray

    if not ray.is_initialized():  # the suite guard shuts Ray down between modules
        ray.init(num_cpus=4, include_dashboard=False)
    return ray.get_runtime_context().gcs_address


def _committed_checkpoint_step(run_dir) -> int | None:
    """Step of the newest checkpoint Ray Train has committed under ``run_dir`` (None if none)."""
    import ray.train

    try:
        result = ray.train.Result.from_path(str(run_dir))
    except RuntimeError:  # no checkpoint manager snapshot yet
        return None
    return result.metrics["step"] if result.checkpoint is not None else None


def test_driver_killed_and_resubmitted_resumes_exactly(
    train_env, reference_run, make_recipe
) -> None:
    from pixellm.train import train

    overrides = [*RESUME_RUN]
    recipe = make_recipe(train_env, "resubmit", *overrides)
    sets = [f"--set={o}" for o in [*tiny_recipe_overrides(train_env, "resubmit"), *overrides]]
    env = {**os.environ, "RAY_ADDRESS": _ray_address(), "PYTHONUNBUFFERED": "1"}
    driver = subprocess.Popen(
        [sys.executable, "-m", "pixellm.cli", "train", "--recipe", str(TINY), *sets],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen: list[str] = []

    def drain() -> None:
        for line in driver.stdout:
            seen.append(line)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    run_dir = train_env["root"] / "ray_results" / "resubmit"
    deadline = time.monotonic() + 600
    committed = None
    try:  # kill the driver once step 3 is done and Ray Train has committed a checkpoint
        while time.monotonic() < deadline and driver.poll() is None:
            if any("step 3/6" in line for line in seen):
                committed = _committed_checkpoint_step(run_dir)
                if committed:
                    break
            time.sleep(0.2)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=60)
        reader.join(timeout=30)
    assert committed in {2, 4}, "".join(seen[-40:])

    result = train(recipe)  # the resubmission: same run name, same storage
    assert result.metrics["step"] == 6
    from mlflow.tracking import MlflowClient

    tags = MlflowClient(train_env["mlflow_uri"]).get_run(result.mlflow_run_id).data.tags
    assert tags["resumed_from_step"] in {"2", "4"}, tags.get("resumed_from_step")
    for rank in range(2):
        assert read_sample_log(result.run_dir, rank) == reference_run["samples"][rank], rank
    loss = metric_history(train_env, result.mlflow_run_id, "loss")
    assert loss.keys() == reference_run["loss"].keys()
    for step, value in loss.items():
        assert abs(value - reference_run["loss"][step]) <= 1e-5, (step, value)


def test_resume_with_another_world_size_fails_on_the_driver(
    train_env, reference_run, make_recipe
) -> None:
    from pixellm.config import ConfigError
    from pixellm.train.driver import check_resume_world_size

    recipe = make_recipe(train_env, "reference", *RESUME_RUN, "train.num_workers=1")
    with pytest.raises(
        ConfigError,
        match=r"train.num_workers=1 but run 'reference' was "
        r"checkpointed with 2 workers",
    ):
        check_resume_world_size(recipe)
    from pixellm.train import train

    started = time.monotonic()
    with pytest.raises(ConfigError, match="checkpointed with 2 workers"):
        train(recipe)
    assert time.monotonic() - started < 30  # raised by the driver, no worker group was started
