"""MLflow for training: one run per training, found or created by the driver, logged by rank 0.

The driver calls ``ensure_run`` BEFORE the trainer starts: it looks in the recipe's experiment for
a run tagged ``pixellm.run_name=<train.run_name>`` and reuses it, or creates it with the flattened
recipe as params and the git commit and package versions as tags. Its id travels to the workers
in ``train_loop_config``, so worker restarts and resubmissions log into the same run.

Rank 0 uses ``RunLogger`` (the thread-safe ``MlflowClient``, never the fluent API, which is
thread-local). Metrics are buffered and flushed right after each checkpoint is reported: steps
re-run after a failure replace buffered, never-logged values, so the metric history never holds a
step twice; it lags the live stdout progress by at most ``train.checkpoint_every`` steps.
"""

from __future__ import annotations

import os
import subprocess
import time
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

from pixellm.config import Recipe

__all__ = [
    "RUN_NAME_TAG",
    "RunLogger",
    "ensure_run",
    "flatten_recipe",
    "package_versions",
    "resolve_tracking_uri",
]

RUN_NAME_TAG = "pixellm.run_name"
_PACKAGES = ("torch", "ray", "deepspeed", "transformers", "peft", "mlflow", "pixellm")
_REPO_ROOT = Path(__file__).resolve().parents[2]


def flatten_recipe(recipe: Recipe) -> dict[str, Any]:
    """The resolved recipe as ``section.key`` → JSON scalar (lists/dicts as their JSON text)."""
    import json

    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(node, list):
            out[prefix] = json.dumps(node)
        else:
            out[prefix] = node

    walk("", recipe.model_dump(mode="json"))
    return out


def resolve_tracking_uri(recipe: Recipe) -> str | None:
    """``mlflow.tracking_uri`` of the recipe, else ``$MLFLOW_TRACKING_URI``, else None (disabled)."""
    return recipe.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None


def package_versions() -> dict[str, str]:
    """Installed versions of the packages a run depends on."""
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=_REPO_ROOT, capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain"],
            cwd=_REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if out.returncode:
        return "unknown"
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _param_value(v: Any) -> str:
    return str(v)[:6000]  # MLflow's param value limit


def ensure_run(recipe: Recipe, tracking_uri: str) -> str:
    """Find the run of ``train.run_name`` in the recipe's experiment, or create it.

    New runs get the flattened recipe as params and ``git.commit`` / ``version.<pkg>`` tags. A
    reused run keeps its params (MLflow params are immutable); a changed value is recorded as the
    tag ``changed.<key>`` and warned about.

    Args:
        recipe: the validated recipe.
        tracking_uri: the MLflow tracking server.

    Returns:
        The run id.
    """
    from mlflow.entities import Param, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(recipe.mlflow.experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(recipe.mlflow.experiment)
    name = recipe.train.run_name
    found = client.search_runs(
        [exp_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{name}'", max_results=1
    )
    params = {k: _param_value(v) for k, v in flatten_recipe(recipe).items()}
    tags = {f"version.{k}": v for k, v in package_versions().items()}
    tags["git.commit"] = _git_commit()
    if found:
        run = found[0]
        old = run.data.params
        changed = {k: v for k, v in params.items() if k in old and old[k] != v}
        for k, v in changed.items():
            warnings.warn(
                f"MLflow run {run.info.run_id} ({name}) was started with {k}={old[k]!r}; "
                f"this submission uses {v!r} (recorded as tag changed.{k})",
                stacklevel=2,
            )
        tags.update({f"changed.{k}": v for k, v in changed.items()})
        new = [Param(k, v) for k, v in params.items() if k not in old]
        client.log_batch(run.info.run_id, params=new, tags=[RunTag(k, v) for k, v in tags.items()])
        client.update_run(run.info.run_id, status="RUNNING")
        return run.info.run_id
    run = client.create_run(exp_id, run_name=name, tags={RUN_NAME_TAG: name, **tags})
    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), 90):  # log_batch takes at most 100 params per call
        client.log_batch(run.info.run_id, params=items[i : i + 90])
    return run.info.run_id


class RunLogger:
    """Rank-0 MLflow logging into an existing run (no-op when ``run_id`` is None).

    Args:
        tracking_uri: the MLflow tracking server.
        run_id: the run created by ``ensure_run``.
    """

    def __init__(self, tracking_uri: str | None, run_id: str | None):
        self.run_id = run_id if tracking_uri else None
        self.tracking_uri = tracking_uri
        self._pending: dict[int, dict[str, float]] = {}
        self._client: Any = None
        if self.run_id:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri)

    def add_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Buffer the metrics of optimizer step ``step`` (a re-run step replaces its values)."""
        if self.run_id:
            self._pending[step] = dict(metrics)

    def flush(self) -> int:
        """Send every buffered step to MLflow; returns how many metric points were sent."""
        if not self.run_id or not self._pending:
            return 0
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        points = [
            Metric(k, float(v), now, step)
            for step, values in sorted(self._pending.items())
            for k, v in values.items()
        ]
        for i in range(0, len(points), 900):  # log_batch takes at most 1000 metrics per call
            self._client.log_batch(self.run_id, metrics=points[i : i + 900])
        self._pending.clear()
        return len(points)

    def set_tags(self, tags: dict[str, str]) -> None:
        """Set run tags (e.g. checkpoint references)."""
        if self.run_id:
            from mlflow.entities import RunTag

            self._client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def drop_pending(self) -> None:
        """Forget buffered metrics (steps after the last checkpoint will be re-run)."""
        self._pending.clear()
