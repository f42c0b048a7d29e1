"""The training driver: ``train(recipe) -> TrainResult``.

Validates the recipe (before Ray starts), finds or creates the MLflow run, connects to Ray
(``$RAY_ADDRESS`` or a local loopback cluster), builds one deterministic dataset per worker and runs
a ``TorchTrainer``. Same storage path + run name = Ray Train V2 restores the run and the workers
resume from ``ray.train.get_checkpoint()``.

Data: one dataset ``train`` for the run (``pixellm.data.train_stream.build_train_dataset``: every epoch's
plan, one preprocessing actor pool), split across the workers by Ray Train
(``DataConfig(datasets_to_split=["train"])`` → ``streaming_split(equal=True)``) with
``preserve_order`` set in ``DataConfig(execution_options=…)`` — Ray Train replaces the dataset's own
context options with these, so this is where determinism must be set. A resumed worker group
starts the stream at the checkpoint's block (a named actor, ``create_start_board``, carries the
position from rank 0 to the preprocessing actors), so consumed samples are not read again.
Resuming with another ``train.num_workers`` fails here, before Ray starts a worker.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pixellm.config import ConfigError, Recipe, recipe_hash
from pixellm.train.ds_config import derive_deepspeed_config, zero_stage
from pixellm.train.run_tracking import ensure_run, flatten_recipe, resolve_tracking_uri
from pixellm.train.storage import is_uri, join, resolve, storage_env

__all__ = [
    "FAULT_ENV",
    "TrainResult",
    "build_loop_config",
    "check_resume_world_size",
    "init_ray",
    "make_trainer",
    "train",
    "validate_for_training",
]

FAULT_ENV = "PIXELLM_TRAIN_FAULT"  # fault drill: "STEP:RANK:MARKER_PATH" (tests only)
DATASET_NAME = "train"


@dataclass
class TrainResult:
    """What a finished training run produced.

    Attributes:
        run_name: ``train.run_name``.
        run_dir: ``<storage_path>/<run_name>`` (an absolute Path, or the URI for remote storage).
        export_dir: the consolidated ``from_pretrained`` directory (Path, or URI when remote).
        checkpoint_path: the last reported checkpoint (None if none was reported this submission).
        mlflow_run_id: the MLflow run (None when tracking is off).
        metrics: the last metrics reported to Ray Train.
    """

    run_name: str
    run_dir: Path | str
    export_dir: Path | str
    checkpoint_path: str | None
    mlflow_run_id: str | None
    metrics: dict[str, Any]


def _check_shards(recipe: Recipe) -> None:
    from pixellm.data.formats import DataError
    from pixellm.data.stream import make_plan

    try:
        make_plan(recipe.data, recipe.data.train_split, 1, recipe.train.seed)
        if recipe.train.eval_every:
            from pixellm.train.validation import val_data

            val_data(recipe.data)
    except DataError as err:
        raise ConfigError(f"data: {err}") from None


def validate_for_training(recipe: Recipe) -> dict[str, Any]:
    """Every check that can fail before Ray starts; returns the derived DeepSpeed config.

    Raises:
        ConfigError: bad DeepSpeed JSON, precision/device mismatch, warm-up longer than the run,
            missing shards, or MLflow enabled without a tracking URI.
    """
    ds = derive_deepspeed_config(recipe)
    _check_shards(recipe)
    if recipe.mlflow.enabled and not resolve_tracking_uri(recipe):
        raise ConfigError(
            "mlflow.enabled is true but mlflow.tracking_uri is null and MLFLOW_TRACKING_URI is unset; "
            "set one (e.g. a server from pixellm.tracking.start_mlflow_server) or mlflow.enabled=false"
        )
    return ds


def _storage(recipe: Recipe) -> str:
    return resolve(recipe.train.storage_path)  # a URI stays a URI (s3://…), never Path.resolve()


def _local_or_uri(path: str) -> Path | str:
    return path if is_uri(path) else Path(path)


def check_resume_world_size(recipe: Recipe) -> None:
    """Fail before any worker starts when the run's latest checkpoint has another world size.

    Raises:
        ConfigError: ``recipe_state.json`` of the newest ``checkpoint_step_*`` under
            ``<storage_path>/<run_name>`` names a different ``world_size`` than ``train.num_workers``.
    """
    import json

    import pyarrow.fs as pafs

    from pixellm.train.checkpoint import STATE_FILE

    fs, run_dir = pafs.FileSystem.from_uri(f"{_storage(recipe)}/{recipe.train.run_name}")
    infos = fs.get_file_info(pafs.FileSelector(run_dir, allow_not_found=True))
    names = sorted(i.base_name for i in infos if i.base_name.startswith("checkpoint_step_"))
    for name in reversed(names):
        path = f"{run_dir}/{name}/{STATE_FILE}"
        if fs.get_file_info(path).type != pafs.FileType.File:
            continue
        with fs.open_input_stream(path) as f:
            saved = int(json.loads(f.read())["world_size"])
        if saved != recipe.train.num_workers:
            raise ConfigError(
                f"train.num_workers={recipe.train.num_workers} but run {recipe.train.run_name!r} "
                f"was checkpointed with {saved} workers ({run_dir}/{name}); the data partition and "
                f"ZeRO shards need the same size: resume with train.num_workers={saved} or start "
                "a new train.run_name"
            )
        return


def _parse_fault(spec: str | None) -> dict[str, Any] | None:
    if not spec:
        return None
    try:
        step, rank, marker = spec.split(":", 2)
        return {"step": int(step), "rank": int(rank), "marker": marker}
    except ValueError:
        raise ConfigError(f"{FAULT_ENV}={spec!r} must look like STEP:RANK:MARKER_PATH") from None


def build_loop_config(
    recipe: Recipe, ds_config: dict[str, Any], run_id: str | None
) -> dict[str, Any]:
    """The ``train_loop_config`` every worker receives (JSON-serialisable, nothing else shared)."""
    storage = _storage(recipe)
    run_dir = join(storage, recipe.train.run_name)
    return {
        "recipe": recipe.model_dump(mode="json"),
        "flat_recipe": flatten_recipe(recipe),
        "config_hash": recipe_hash(recipe),
        "ds_config": ds_config,
        "zero_stage": zero_stage(ds_config),
        "use_gpu": recipe.train.use_gpu,
        "dataset_name": DATASET_NAME,
        "start_board": f"pixellm-stream-start-{recipe.train.run_name}",
        "tracking_uri": resolve_tracking_uri(recipe) if recipe.mlflow.enabled else None,
        "mlflow_run_id": run_id,
        "storage": run_dir,
        "export_dir": resolve(recipe.train.export_dir or join(run_dir, "model")),
        "registered_model_name": recipe.mlflow.registered_model_name,
        "fault": _parse_fault(os.environ.get(FAULT_ENV)),
    }


def init_ray(recipe: Recipe) -> None:
    """Connect to ``$RAY_ADDRESS`` or start a local cluster on 127.0.0.1 (no-op if connected)."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"])
        return
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # keep a local cluster on 127.0.0.1
    t = recipe.train
    # Workers hold train.cpus_per_worker each; preprocessing needs its own slots next to them.
    need = t.num_workers * (t.cpus_per_worker + 2 * recipe.data.preprocess_cpus)
    ray.init(
        num_cpus=max(os.cpu_count() or 1, math.ceil(need)),
        include_dashboard=False,
        runtime_env={"env_vars": {"DS_ACCELERATOR": "cuda" if t.use_gpu else "cpu"}},
    )


def _datasets(recipe: Recipe, start_board: str | None) -> dict[str, Any]:
    from pixellm.data.train_stream import build_train_dataset

    return {DATASET_NAME: build_train_dataset(recipe, recipe.train.num_workers, start_board)}


def _data_config() -> Any:
    """Split ``train`` across workers, deterministically (Ray Train applies *these* options)."""
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = True  # fixed block order = fixed rank of every sample (StreamLayout)
    return DataConfig(datasets_to_split=[DATASET_NAME], execution_options=options)


def make_trainer(recipe: Recipe, loop_config: dict[str, Any], datasets: dict[str, Any]) -> Any:
    """The ``TorchTrainer`` for a recipe (``datasets``: ``{"train": the run's Ray Dataset}``)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pixellm.train.loop import train_loop_per_worker

    t = recipe.train
    resources = {"CPU": t.cpus_per_worker, **({"GPU": t.gpus_per_worker} if t.use_gpu else {})}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=t.run_name,
            storage_path=_storage(recipe),
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
            failure_config=FailureConfig(max_failures=t.max_failures),
            worker_runtime_env={
                "env_vars": {
                    **storage_env(),  # remote storage endpoint / region (s3://… storage_path)
                    "DS_ACCELERATOR": "cuda" if t.use_gpu else "cpu",
                }
            },
        ),
        datasets=datasets,
        dataset_config=_data_config(),
    )


def train(recipe: Recipe) -> TrainResult:
    """Train PixelLM with Ray Train + DeepSpeed and export it; resumes a run of the same name.

    Args:
        recipe: a validated recipe.

    Returns:
        The run's ``TrainResult``.

    Raises:
        ConfigError: the recipe cannot be trained (raised before Ray starts).
        ray.train.TrainingFailedError: training failed more than ``train.max_failures`` times.
    """
    ds_config = validate_for_training(recipe)
    check_resume_world_size(recipe)
    tracking_uri = resolve_tracking_uri(recipe) if recipe.mlflow.enabled else None
    run_id = ensure_run(recipe, tracking_uri) if tracking_uri else None
    loop_config = build_loop_config(recipe, ds_config, run_id)
    init_ray(recipe)
    from pixellm.data.train_stream import create_start_board

    board = create_start_board(loop_config["start_board"])  # held until fit() returns
    result = make_trainer(recipe, loop_config, _datasets(recipe, loop_config["start_board"])).fit()
    del board
    if result.error is not None:
        raise result.error
    return TrainResult(
        run_name=recipe.train.run_name,
        run_dir=_local_or_uri(loop_config["storage"]),
        export_dir=_local_or_uri(loop_config["export_dir"]),
        checkpoint_path=result.checkpoint.path if result.checkpoint else None,
        mlflow_run_id=run_id,
        metrics=dict(result.metrics or {}),
    )
