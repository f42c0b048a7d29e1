"""MLflow for training: one run per training, found or created by the driver, logged by rank 0.

The driver calls ``ensure_run`` BEFORE the trainer starts: it looks in the recipe's experiment for
a run tagged ``pixellm.run_name=<train.run_name>`` and reuses it, or creates it with the flattened
recipe as params and the git commit and package versions as tags. Its id travels to the workers
in ``train_loop_config``, so worker restarts and resubmissions log into the same run.

Rank 0 uses ``RunLogger`` (the thread-safe ``MlflowClient``, never the fluent API, which is
thread-local). Metrics are buffered and flushed up to the last checkpoint Ray Train has committed:
steps re-run after a failure replace buffered, never-logged values, so the metric history never
holds a step twice; it lags the live stdout progress by up to two ``train.checkpoint_every``
intervals (checkpoints upload asynchronously). Values not yet sent travel inside each checkpoint
(``mlflow_pending.json``), so a worker lost before its flush loses no step; their timestamps are
kept, so a resend writes identical rows, which MLflow's SQL store keeps once. An MLflow outage
never fails training: calls are retried with backoff, values stay buffered, and they are sent
once the server answers again.
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
    """Rank-0 MLflow logging into an existing run that never fails training (no-op without a run).

    Metrics are buffered per optimizer step and sent by ``flush``; tags are buffered too. A failed
    call is retried with exponential backoff (``retries`` tries, ``backoff_s`` doubling); if the
    server stays unreachable the values stay buffered, a warning names the error, and the next
    ``flush`` tries again (``flush(wait_s=…)`` at the end of training keeps trying that long).
    Each point keeps the wall-clock time of its step, so a call retried after the server did
    store it writes the identical row again, which MLflow's SQL store keeps once.

    Args:
        tracking_uri: the MLflow tracking server.
        run_id: the run created by ``ensure_run``.
        retries: attempts per flush before giving up until the next flush.
        backoff_s: wait after the first failed attempt (doubles each retry).
    """

    def __init__(
        self,
        tracking_uri: str | None,
        run_id: str | None,
        *,
        retries: int = 3,
        backoff_s: float = 0.5,
    ):
        self.run_id = run_id if tracking_uri else None
        self.tracking_uri = tracking_uri
        self.retries, self.backoff_s = retries, backoff_s
        self.failures = 0  # flushes that could not reach the server
        self._pending: dict[int, list[Any]] = {}
        self._tags: dict[str, str] = {}
        self._client: Any = None
        if self.run_id:
            from mlflow.tracking import MlflowClient

            # Our own bounded retry replaces MLflow's (7 retries with backoff: minutes per call).
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
            self._client = MlflowClient(tracking_uri)

    def add_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Buffer the metrics of optimizer step ``step`` (a re-run step replaces its values)."""
        if self.run_id:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self._pending[step] = [Metric(k, float(v), now, step) for k, v in metrics.items()]

    def set_tags(self, tags: dict[str, Any]) -> None:
        """Set run tags (e.g. checkpoint references); buffered until the server takes them."""
        if self.run_id:
            self._tags.update({k: str(v) for k, v in tags.items()})
            self.flush(up_to_step=-1)

    def pending_records(self) -> list[dict[str, Any]]:
        """Buffered metrics as JSON records (saved with a checkpoint, see ``restore_pending``)."""
        return [
            {"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step}
            for step in sorted(self._pending)
            for m in self._pending[step]
        ]

    def restore_pending(self, records: list[dict[str, Any]]) -> None:
        """Buffer metrics saved by ``pending_records`` (kept timestamps: a resend is idempotent)."""
        if not self.run_id:
            return
        from mlflow.entities import Metric

        for r in records:
            metric = Metric(r["key"], float(r["value"]), int(r["timestamp"]), int(r["step"]))
            self._pending.setdefault(metric.step, []).append(metric)

    def pending_steps(self) -> list[int]:
        """Steps whose metrics are still buffered."""
        return sorted(self._pending)

    def _send(self, up_to_step: int | None) -> int:
        from mlflow.entities import RunTag

        sent = 0
        if self._tags:
            tags = [RunTag(k, v) for k, v in self._tags.items()]
            self._client.log_batch(self.run_id, tags=tags)
            self._tags.clear()
        steps = [s for s in sorted(self._pending) if up_to_step is None or s <= up_to_step]
        batch: list[int] = []
        for i, step in enumerate(steps):
            batch.append(step)
            size = sum(len(self._pending[s]) for s in batch)
            nxt = len(self._pending[steps[i + 1]]) if i + 1 < len(steps) else 0
            if i + 1 == len(steps) or size + nxt > 900:  # log_batch takes ≤ 1000 metrics
                points = [m for s in batch for m in self._pending[s]]
                self._client.log_batch(self.run_id, metrics=points)
                for s in batch:  # sent: never sent again
                    del self._pending[s]
                sent += len(points)
                batch = []
        return sent

    def flush(self, up_to_step: int | None = None, wait_s: float = 0.0) -> int:
        """Send buffered tags and the metrics of steps ``<= up_to_step`` (all when None).

        Never raises: after ``retries`` failed attempts (and, with ``wait_s``, until that many
        seconds have passed) it warns with the error and keeps the rest buffered.

        Returns:
            Metric points sent by this call.
        """
        if not self.run_id:
            return 0
        sent, attempt, delay = 0, 0, self.backoff_s
        deadline = time.monotonic() + wait_s
        while True:
            try:
                return sent + self._send(up_to_step)
            except Exception as err:  # noqa: BLE001 - any tracking failure must not stop training
                attempt += 1
                if attempt >= self.retries and time.monotonic() >= deadline:
                    self.failures += 1
                    warnings.warn(
                        f"MLflow at {self.tracking_uri} unreachable ({type(err).__name__}: "
                        f"{str(err)[:200]}); training continues, {len(self._pending)} steps of "
                        "metrics stay buffered and are sent at the next flush",
                        stacklevel=2,
                    )
                    return sent
                time.sleep(delay)
                delay = min(delay * 2, 8.0)

    def drop_pending(self) -> None:
        """Forget buffered metrics (steps after the last checkpoint will be re-run)."""
        self._pending.clear()
