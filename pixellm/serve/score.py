"""Batch scoring through the served model: Ray Data → deployment handle → predictions → report.

``score_benchmark`` streams ``SHARDS_DIR/<split>/part-*.parquet`` with Ray Data; a callable class in
``map_batches`` sends every row to the ``PixelLM`` deployment's ``score`` method through
``serve.get_deployment_handle`` (so scoring goes through exactly the served model, batched by
``@serve.batch``). Results stream back to the driver and are appended to ``predictions.jsonl``
(one line per sample, the harness format) as they arrive, so an interrupted run loses at most one
batch and a rerun skips every sample already in the file. At the end the JSONL is rewritten as
``predictions.parquet``, the harness (``pixellm.eval``) scores it, ``write_report`` writes
``report.json`` / ``report.md`` / ``report.html`` / ``overlays/``, and the figures go to MLflow when a
tracking URI is configured (one run per output directory, resumed on rerun).

Output directory layout::

    OUT/predictions.jsonl   predictions.parquet   errors.jsonl (rows the service refused)
    OUT/report.json  report.md  report.html  overlays/*.png   mlflow_run.json
    OUT/scoring.json        what the predictions are of (model, split, budget, protocol, mode)

A rerun resumes only the same scoring: predictions of another model or setting are never mixed
into an existing ``OUT`` (a ``ConfigError`` names both; score into a new ``--out``).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc

from pixellm.config import ConfigError, load_recipe
from pixellm.serve.api import DEPLOYMENT_NAME
from pixellm.serve.scoring_io import (
    append_results,
    read_done_ids,
    split_sample_ids,
    write_predictions_parquet,
)

__all__ = ["ScoreOptions", "ScoreResult", "ServeScorer", "score_benchmark"]

_RESULT_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("text", pa.string()),
        ("masks_json", pa.string()),
        ("scores", pa.list_(pa.float64())),
        ("num_tokens", pa.int64()),
        ("error", pa.string()),
    ]
)


@dataclass
class ScoreOptions:
    """What to score and how.

    Attributes:
        model: exported model directory or ``models:/`` URI (ignored with ``app_name`` running).
        benchmark: SHARDS_DIR holding ``<split>/part-*.parquet``.
        split: split to score (e.g. ``val``).
        out: output directory (reused by a rerun).
        protocol: harness protocol, ``muse`` or ``referring``.
        teacher_forced: put the ground-truth answer in the prompt; masks from one forward pass.
        recipe: recipe YAML for ``serve`` knobs and the MLflow experiment (None = defaults).
        overrides: dotted recipe overrides.
        max_new_tokens: generation budget (None = ``serve.max_new_tokens``).
        batch_size: rows per Ray Data batch = requests in flight per caller (None = 2 x
            ``serve.max_batch_size``, so the deployment always has a full batch waiting).
        callers: Ray Data actors calling the deployment.
        app_name: Serve application to use; deployed (and deleted after) unless ``use_running``.
        use_running: score through an already running application ``app_name``.
        tracking_uri: MLflow tracking URI (None = recipe, then ``$MLFLOW_TRACKING_URI``; none = no
            logging).
        n_overlays: overlay pictures in the report.
        replica_cpus: CPUs per replica when deploying (None = the recipe's ``serve.num_cpus``).
        replica_gpus: GPUs per replica when deploying (None = the recipe's ``serve.num_gpus``).
        http_options: Serve's HTTP options if this run starts Serve (None = 127.0.0.1 on a free
            port). On a shared cluster pass the recipe's ``serve.host``/``serve.port``: Serve keeps
            the options of whoever started it, so a later ``pixellm serve`` finds its port.
    """

    model: str
    benchmark: str
    split: str
    out: str
    protocol: Literal["muse", "referring"] = "muse"
    teacher_forced: bool = False
    recipe: str | None = None
    overrides: list[str] = field(default_factory=list)
    max_new_tokens: int | None = None
    batch_size: int | None = None
    callers: int = 1
    app_name: str = "pixellm-score"
    use_running: bool = False
    tracking_uri: str | None = None
    n_overlays: int = 8
    replica_cpus: float | None = None
    replica_gpus: float | None = None
    http_options: dict[str, Any] | None = None


@dataclass
class ScoreResult:
    """What a scoring run did and where it wrote."""

    n_samples: int
    n_scored: int
    n_skipped: int
    n_errors: int
    seconds: float
    report: dict[str, Any]
    files: dict[str, str]
    mlflow_run_id: str | None = None


class ServeScorer:
    """Ray Data callable class: sends a batch of benchmark rows to the deployment's handle.

    Args:
        app_name: Serve application holding the ``PixelLM`` deployment.
        max_new_tokens: generation budget per row.
        teacher_forced: send the ground-truth answer (first assistant turn) with each row.
        max_retries: resubmissions of a request refused with back-pressure (exponential backoff).
    """

    def __init__(
        self, app_name: str, max_new_tokens: int, teacher_forced: bool, max_retries: int = 8
    ):
        from ray import serve

        self.handle = serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=app_name)
        self.max_new_tokens = max_new_tokens
        self.teacher_forced = teacher_forced
        self.max_retries = max_retries

    def _payload(self, row: dict[str, Any]) -> dict[str, Any]:
        conv = row["conversation"] or []
        users = [t["text"] for t in conv if t and t.get("role") in ("user", "human")]
        answers = [t["text"] for t in conv if t and t.get("role") in ("assistant", "gpt")]
        return {
            "sample_id": row["sample_id"],
            "image": row["image"],
            "question": users[0] if users else "",
            "answer": (answers[0] if answers else "") if self.teacher_forced else None,
            "max_new_tokens": self.max_new_tokens,
        }

    def _result(self, response: Any, payload: dict[str, Any]) -> dict[str, Any]:
        from ray.serve.exceptions import BackPressureError

        for attempt in range(self.max_retries + 1):
            try:
                return response.result()
            except BackPressureError:
                if attempt == self.max_retries:
                    raise
                time.sleep(min(0.1 * 2**attempt, 5.0))
                response = self.handle.score.remote(payload)
        raise RuntimeError("unreachable")  # the loop returns or raises

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Score one batch of rows; returns one result row per input row (same order)."""
        payloads = [self._payload(row) for row in batch.to_pylist()]
        responses = [self.handle.score.remote(p) for p in payloads]  # all in flight at once
        results = [self._result(r, p) for r, p in zip(responses, payloads, strict=True)]
        rows = [
            {
                "sample_id": r["sample_id"],
                "text": r["text"],
                "masks_json": json.dumps(r["masks"]),
                "scores": r["scores"],
                "num_tokens": r["num_tokens"],
                "error": r["error"],
            }
            for r in results
        ]
        return pa.Table.from_pylist(rows, schema=_RESULT_SCHEMA)


def _drop_done(batch: pa.Table, done: list[str]) -> pa.Table:
    keep = pc.invert(pc.is_in(batch["sample_id"], value_set=pa.array(done, pa.string())))
    return batch.filter(keep)


def _read_split(path: str) -> Any:
    """A benchmark split directory as a Ray Dataset of ``sample_id, image, conversation`` rows.

    Read with Ray Data's V1 Parquet datasource (``DataContext.use_datasource_v2 = False`` for this
    call only). Ray 2.60's default V2 reader starts 32 footer-reading actors per read
    (``RAY_DATA_PARQUET_FOOTER_NUM_ACTORS``), built for listing thousands of remote files: on 2 CPU
    cores a 27-row split took 10-15 s to read that way against 0.3-2.5 s with V1, and the quickstart
    reads six splits. A split is a handful of local or S3 files. ``DataContext`` losing the field
    raises ``AttributeError`` here (a Ray upgrade must revisit this).
    """
    import ray

    ctx = ray.data.DataContext.get_current()
    previous = ctx.use_datasource_v2
    ctx.use_datasource_v2 = False
    try:
        return ray.data.read_parquet(
            path,
            columns=["sample_id", "image", "conversation"],
            file_extensions=["parquet"],
            # Reading is light; a whole CPU per read task can starve the caller actor of the CPUs
            # the replicas leave (Ray Data does not count Serve's reservations).
            num_cpus=0.1,
        )
    finally:
        ctx.use_datasource_v2 = previous


def _stream(opts: ScoreOptions, done: set[str], max_new_tokens: int, batch_size: int, out: Path):
    """Run the Ray Data pipeline; append each result batch to the output files as it arrives."""
    import ray

    ds = _read_split(str(Path(opts.benchmark) / opts.split))
    if done:
        ds = ds.map_batches(
            _drop_done, fn_kwargs={"done": sorted(done)}, batch_format="pyarrow", num_cpus=0.1
        )
    ds = ds.map_batches(
        ServeScorer,
        fn_constructor_kwargs={
            "app_name": opts.app_name,
            "max_new_tokens": max_new_tokens,
            "teacher_forced": opts.teacher_forced,
        },
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=opts.callers),
        num_cpus=0.1,  # the caller only waits on the deployment
    )
    scored = errors = 0
    for result in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        ok, bad = append_results(
            out, result.to_pylist(), split=opts.split, teacher_forced=opts.teacher_forced
        )
        scored, errors = scored + ok, errors + bad
    return scored, errors


def _deploy(opts: ScoreOptions) -> None:
    from ray import serve

    from pixellm.serve.app import build_app  # torch + the model: only where it is deployed
    from pixellm.tracking import free_port

    serve.start(http_options=opts.http_options or {"host": "127.0.0.1", "port": free_port()})
    app = build_app(
        {
            "model": opts.model,
            "recipe": opts.recipe,
            "set": opts.overrides,
            "tracking_uri": opts.tracking_uri,
            "num_cpus": opts.replica_cpus,
            "num_gpus": opts.replica_gpus,
        }
    )
    serve.run(app, name=opts.app_name, route_prefix=f"/{opts.app_name}")


def _tracking_uri(opts: ScoreOptions, recipe_uri: str | None) -> str | None:
    return opts.tracking_uri or recipe_uri or os.environ.get("MLFLOW_TRACKING_URI") or None


def _log_mlflow(uri: str, experiment: str, out: Path, opts: ScoreOptions, report: dict) -> str:
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment)
    state_path = out / "mlflow_run.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    run_id = state.get("run_id") if state.get("tracking_uri") == uri else None
    mode = "teacher_forced" if opts.teacher_forced else "generate"
    with mlflow.start_run(run_id=run_id, run_name=f"score-{opts.split}-{mode}") as run:
        if run_id is None:
            mlflow.log_params(
                {
                    "model": opts.model,
                    "benchmark": opts.benchmark,
                    "split": opts.split,
                    "protocol": opts.protocol,
                    "mode": mode,
                }
            )
        metrics = {
            f"{name}_{key}": float(value)
            for name, figures in report["splits"].items()
            for key, value in figures.items()
            if value is not None and key in ("giou", "ciou", "no_target_accuracy", "n_questions")
        }
        mlflow.log_metrics(metrics)
        for name in ("report.json", "report.md", "report.html", "predictions.parquet"):
            mlflow.log_artifact(str(out / name), artifact_path="score")
        if (out / "overlays").is_dir():
            mlflow.log_artifacts(str(out / "overlays"), artifact_path="score/overlays")
        state_path.write_text(json.dumps({"tracking_uri": uri, "run_id": run.info.run_id}))
        return run.info.run_id


def _report(opts: ScoreOptions, out: Path, extra: dict[str, Any]) -> dict[str, Any]:
    from pixellm.eval import evaluate_predictions, load_benchmark, write_report

    jsonl = out / "predictions.jsonl"
    report = evaluate_predictions(opts.benchmark, jsonl, opts.protocol, splits=[opts.split])
    samples = load_benchmark(opts.benchmark, [opts.split], with_images=True)
    write_report(out, report, samples, jsonl, n_overlays=opts.n_overlays, extra=extra)
    return report.to_dict()


SCORING_FILE = "scoring.json"


def _claim_output(out: Path, opts: ScoreOptions, max_new: int) -> None:
    """Record what ``out`` holds predictions of; refuse an ``out`` holding another scoring's.

    An ``out`` without ``scoring.json`` (new, or written before the file existed) is claimed.

    Raises:
        ConfigError: ``out/scoring.json`` names another model, benchmark, split, budget, protocol
            or mode (a resume would mix two models' predictions in one report).
    """
    identity = {
        "model": opts.model,
        "benchmark": str(Path(opts.benchmark).expanduser().resolve()),
        "split": opts.split,
        "max_new_tokens": max_new,
        "protocol": opts.protocol,
        "teacher_forced": opts.teacher_forced,
    }
    path = out / SCORING_FILE
    if path.is_file():
        saved = json.loads(path.read_text())
        diff = {k: (saved.get(k), v) for k, v in identity.items() if saved.get(k) != v}
        if diff:
            changes = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
            raise ConfigError(
                f"{out} holds predictions of another scoring ({changes}); a rerun resumes only "
                "the same scoring: pass a new --out (or delete that directory)"
            )
        return
    path.write_text(json.dumps(identity, indent=2) + "\n")


def score_benchmark(opts: ScoreOptions) -> ScoreResult:
    """Score one split of a benchmark through the PixelLM Serve deployment.

    Ray must be initialised by the caller (``ray.init``); the deployment is started here unless
    ``opts.use_running``, and deleted afterwards.

    Args:
        opts: see ``ScoreOptions``.

    Returns:
        A ``ScoreResult`` (counts, harness figures, written files, MLflow run id).

    Raises:
        ConfigError: bad options or recipe, or ``opts.out`` holds another scoring's predictions.
        EvalInputError: the benchmark or split cannot be read.
    """
    start = time.perf_counter()
    recipe = load_recipe(opts.recipe, opts.overrides)
    if opts.protocol not in ("muse", "referring"):
        raise ConfigError(f"protocol {opts.protocol!r} is not one of 'muse', 'referring'")
    max_new = opts.max_new_tokens or recipe.serve.max_new_tokens
    batch_size = opts.batch_size or 2 * recipe.serve.max_batch_size
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    _claim_output(out, opts, max_new)
    all_ids = split_sample_ids(opts.benchmark, opts.split)
    done = read_done_ids(out / "predictions.jsonl") & set(all_ids)
    scored = errors = 0
    if len(done) < len(all_ids):
        deployed = not opts.use_running
        if deployed:
            _deploy(opts)
        try:
            scored, errors = _stream(opts, done, max_new, batch_size, out)
        finally:
            if deployed:
                from ray import serve

                serve.delete(opts.app_name)
    write_predictions_parquet(out / "predictions.jsonl", out / "predictions.parquet")
    seconds = time.perf_counter() - start
    extra = {
        "scoring": {
            "model": opts.model,
            "split": opts.split,
            "scored_now": scored,
            "skipped": len(done),
            "errors": errors,
            "max_new_tokens": max_new,
            "teacher_forced": opts.teacher_forced,
            "seconds": round(seconds, 2),
        }
    }
    report = _report(opts, out, extra)
    uri = _tracking_uri(opts, recipe.mlflow.tracking_uri)
    run_id = None
    if uri and recipe.mlflow.enabled:
        run_id = _log_mlflow(uri, recipe.mlflow.experiment, out, opts, report)
    files = {
        n: str(out / n)
        for n in (
            "predictions.jsonl",
            "predictions.parquet",
            "report.json",
            "report.md",
            "report.html",
            "overlays",
        )
    }
    return ScoreResult(
        len(all_ids), scored, len(done), errors, time.perf_counter() - start, report, files, run_id
    )
