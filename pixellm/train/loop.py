"""The per-worker training function run by Ray Train's ``TorchTrainer`` on every worker.

Everything comes from ``train_loop_config`` (built by ``pixellm.train.driver.build_loop_config``):
the serialised recipe, the derived DeepSpeed config, the MLflow run id and tracking URI, the export
directory and an optional fault-drill spec. Nothing is read from driver globals.

Step accounting: ``step`` counts optimizer steps (1-based once done); one step = ``grad_accum``
micro-batches on every rank, and every rank runs exactly ``train.total_steps`` steps, so DeepSpeed's
collectives always line up.

Throughput metrics (``samples_per_s``, ``tokens_per_s``) are rank 0's step figures times the world
size (ranks run in lock-step, so this is the global rate without an extra collective per step).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pixellm.config import Recipe
from pixellm.train.checkpoint import (
    RecipeState,
    checkpoint_dir_name,
    load_checkpoint,
    load_rng_state,
    save_checkpoint,
)
from pixellm.train.optim import param_groups
from pixellm.train.run_tracking import RunLogger
from pixellm.train.sample_log import SampleLog
from pixellm.train.storage import is_uri
from pixellm.train.validation import load_val_subset

__all__ = ["LOSS_KEYS", "StepStats", "build_training_model", "train_loop_per_worker"]

LOSS_KEYS = ("loss", "loss_txt", "loss_ref", "loss_dice", "loss_score", "loss_align")
PENDING_METRICS = "mlflow_pending.json"  # rank 0's metrics not yet in MLflow, per checkpoint
_FINAL_FLUSH_WAIT_S = 120.0  # at the end, keep retrying MLflow this long before giving up
_MODEL_KEYS = ("pixel_values", "valid_hw", "input_ids", "attention_mask", "labels", "gt_masks")


@dataclass
class StepStats:
    """What one optimizer step produced on this rank (losses averaged over micro-batches)."""

    losses: dict[str, float]
    samples: int
    tokens: int
    seconds: float


def log_rank0(rank: int, message: str) -> None:
    """Print a progress line from rank 0 only (Ray forwards worker stdout to the driver)."""
    if rank == 0:
        print(f"[pixellm.train] {message}", flush=True)


_HF_DS_CONFIG: Any = None  # transformers reads the ZeRO-3 config through a weak reference


def build_training_model(recipe: Recipe, ds_config: dict[str, Any]) -> Any:
    """Build PixelLM the way a training worker does, before DeepSpeed wraps it.

    The base LLaVA is loaded directly in the run's compute dtype (bf16 when ``ds_config`` enables
    it) onto this worker's device, never as an fp32 copy; DeepSpeed later keeps fp32 master
    weights of the trainable parts in its optimizer. Under ZeRO-3 an ``HfDeepSpeedConfig`` is
    alive while the model is built, so ``from_pretrained`` partitions the parameters as it creates
    them (``deepspeed.zero.Init``) instead of materialising the full model on every rank.
    The seed is the same on every rank so LoRA initialisation agrees.
    """
    global _HF_DS_CONFIG
    from transformers.integrations import HfDeepSpeedConfig

    from pixellm.model import build_pixellm
    from pixellm.train.ds_config import zero_stage

    dtype = torch.bfloat16 if ds_config.get("bf16", {}).get("enabled") else torch.float32
    use_gpu = recipe.train.use_gpu
    device = torch.device("cuda", torch.cuda.current_device()) if use_gpu else torch.device("cpu")
    # zero.Init only where weights are loaded (``from_pretrained``); the tiny model is built from
    # config and small, and DeepSpeed partitions it at ``initialize``.
    zero_init = zero_stage(ds_config) == 3 and recipe.model.base == "llava"
    # Without train_batch_size: DeepSpeed derives it; checked against a world size of 1 here
    # (deepspeed.comm is not set up yet), the recipe's global batch would be rejected.
    init_cfg = {k: v for k, v in ds_config.items() if k != "train_batch_size"}
    _HF_DS_CONFIG = HfDeepSpeedConfig(init_cfg) if zero_init else None
    torch.manual_seed(recipe.train.seed)
    return build_pixellm(recipe.model, dtype=dtype, device=None if zero_init else device)


def setup_model_and_optimizer(recipe: Recipe, ds_config: dict[str, Any]) -> tuple[Any, Any]:
    """Build PixelLM (``build_training_model``) and wrap it in a DeepSpeed engine (AdamW +
    WarmupDecayLR from ``ds_config``). Only parameters with ``requires_grad`` reach the optimizer.

    Returns:
        ``(engine, model)``.
    """
    import deepspeed  # imported here: import-time problems on CPU nodes (platform facts)

    model = build_training_model(recipe, ds_config)
    groups = param_groups(model, recipe.train)  # per-group lr (pixellm.train.optim)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=groups, config=ds_config, dist_init_required=False
    )
    return engine, model


class _Recorder:
    """Wraps the micro-batch stream; ``take()`` returns the sample ids taken since the last call
    and the CPU seconds this process spent off the training thread meanwhile (``data_cpu_s``:
    Ray Data's iterator/prefetch threads and Ray's own; also intra-op threads when
    ``train.cpus_per_worker`` > 1 and collective threads when there are several workers)."""

    def __init__(self, batches: Iterator[dict[str, Any]]):
        self.batches, self.ids = batches, []
        self.cpu = time.process_time() - time.thread_time()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        batch = next(self.batches)
        self.ids += batch["sample_id"]
        return batch

    def take(self) -> tuple[list[str], float]:
        ids, self.ids = self.ids, []
        cpu, self.cpu = self.cpu, time.process_time() - time.thread_time()
        return ids, self.cpu - cpu


def data_stream(
    recipe: Recipe, dataset_name: str, start_board: str | None, steps_done: int, rank: int
) -> Iterator[dict[str, Any]]:
    """This rank's collated micro-batches of the split training stream, from step ``steps_done + 1``.

    Rank 0 tells the stream where to start (``StreamLayout.start_block``: blocks before it are
    neither read nor preprocessed), then every rank waits at a barrier before iterating, so the
    stream's execution starts after the position is set. Ray Data prefetches and collates
    (``iter_torch_batches``). Rows of a block that lie before ``steps_done`` (only when a checkpoint
    falls inside a block, e.g. after ``train.checkpoint_every`` changed) are skipped.

    Raises:
        RuntimeError: the stream does not continue at step ``steps_done + 1``.
    """
    import ray.train
    import torch.distributed as dist

    from pixellm.data.collate import collate_batch
    from pixellm.data.train_stream import StreamLayout, set_stream_start

    world = ray.train.get_context().get_world_size()
    if rank == 0 and start_board is not None:
        set_stream_start(
            start_board, StreamLayout.for_train(recipe.train, world).start_block(steps_done)
        )
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    shard = ray.train.get_dataset_shard(dataset_name)
    batches = shard.iter_torch_batches(
        batch_size=recipe.train.micro_batch_size,
        collate_fn=collate_batch,
        prefetch_batches=recipe.data.prefetch_batches,
    )
    first = True
    for batch in batches:
        if max(batch["step"]) <= steps_done:
            continue
        if first and min(batch["step"]) != steps_done + 1:
            raise RuntimeError(
                f"rank {rank}: the data stream continues at step {min(batch['step'])}, expected "
                f"{steps_done + 1} (checkpoint at step {steps_done})"
            )
        first = False
        yield batch


def _maybe_validate(engine: Any, val: Any, every: int, step: int, rank: int) -> dict[str, float]:
    """``{"val/giou": …}`` every ``every`` steps (collective: every rank calls it), else ``{}``."""
    if not val or step % every:
        return {}
    from pixellm.train.validation import validate_giou

    giou = validate_giou(engine, val)
    log_rank0(rank, f"step {step} val/giou={giou:.4f}")
    return {"val/giou": giou}


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    out = {}
    for k in _MODEL_KEYS:
        v = batch[k]
        out[k] = [t.to(device) for t in v] if isinstance(v, list) else v.to(device)
    return out


def train_step(engine: Any, batches: Iterator[dict[str, Any]], grad_accum: int) -> StepStats:
    """One optimizer step: ``grad_accum`` forward/backward passes, then ``engine.step()``."""
    start = time.perf_counter()
    totals = {k: torch.zeros(()) for k in LOSS_KEYS}
    samples = tokens = 0
    for _ in range(grad_accum):
        batch = _to_device(next(batches), engine.device)
        out = engine(**batch)
        engine.backward(out.loss)
        engine.step()
        for k in LOSS_KEYS:
            totals[k] += getattr(out, k).detach().float().cpu()
        samples += batch["input_ids"].shape[0]
        tokens += int(batch["attention_mask"].sum())
    losses = {k: float(v) / grad_accum for k, v in totals.items()}
    return StepStats(losses, samples, tokens, time.perf_counter() - start)


def _lr(engine: Any) -> float:
    return float(engine.get_lr()[0])


def _committed_step() -> int:
    """Step of the newest checkpoint Ray Train has committed to storage (0 if none).

    Blocks until every in-flight ``ray.train.report`` has been processed; with asynchronous
    uploads that is the previous checkpoint, usually long done.
    """
    import ray.train
    from ray.train import CheckpointConsistencyMode

    reported = ray.train.get_all_reported_checkpoints(
        consistency_mode=CheckpointConsistencyMode.COMMITTED
    )
    return max((int(r.metrics.get("step", 0)) for r in reported), default=0)


def _report_checkpoint(
    engine: Any,
    state: RecipeState,
    rank: int,
    logger: RunLogger | None,
    storage: str,
    step_seconds: list[float],
) -> None:
    """Save this rank's shards and report them to Ray Train (a barrier), uploaded asynchronously.

    Ray Train uploads the merged checkpoint in a background thread and deletes the local files
    afterwards, so training goes on while a large checkpoint travels to remote storage. Rank 0
    sends MLflow only the metrics of steps a committed checkpoint covers: a step re-run after a
    failure was never logged (``RunLogger.add_metrics`` replaces its buffered values).
    """
    import ray.train
    from ray.train import CheckpointUploadMode

    local = save_checkpoint(engine, state, rank)
    name = checkpoint_dir_name(state.step)
    if logger is not None:
        logger.flush(up_to_step=_committed_step())
        (local / PENDING_METRICS).write_text(json.dumps(logger.pending_records()))
    ray.train.report(
        {"step": state.step, "epoch": state.epoch, "step_seconds": list(step_seconds)},
        checkpoint=ray.train.Checkpoint.from_directory(str(local)),
        checkpoint_dir_name=name,
        checkpoint_upload_mode=CheckpointUploadMode.ASYNC,
    )
    step_seconds.clear()
    if logger is not None:
        logger.set_tags(
            {"checkpoint.latest": f"{storage}/{name}", "checkpoint.latest_step": state.step}
        )


def _maybe_fault(fault: dict[str, Any] | None, step: int, rank: int) -> None:
    """Fault drill: the chosen rank really dies (SIGKILL) once, after ``fault['step']``."""
    if not fault or fault["step"] != step or fault["rank"] != rank:
        return
    marker = Path(fault["marker"])
    if marker.exists():
        return
    committed = _committed_step()  # waits until the controller has processed every report
    marker.write_text(f"killed pid {os.getpid()} at step {step} (committed step {committed})\n")
    os.kill(os.getpid(), signal.SIGKILL)


def _restore(
    engine: Any, cfg: dict[str, Any], world: int
) -> tuple[RecipeState | None, list[dict[str, Any]]]:
    """The checkpoint's RecipeState (engine restored) and its not-yet-logged metrics."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None, []
    with checkpoint.as_directory() as directory:
        state = load_checkpoint(engine, directory, cfg["flat_recipe"], world)
        load_rng_state(directory, ray.train.get_context().get_world_rank())
        pending = Path(directory) / PENDING_METRICS
        return state, json.loads(pending.read_text()) if pending.is_file() else []


def _progress(
    rank: int, step: int, total: int, stats: StepStats, lr: float, t0: float, first: int, world: int
) -> dict[str, float]:
    sps = stats.samples * world / max(stats.seconds, 1e-9)
    metrics = {
        **stats.losses,
        "lr": lr,
        "samples_per_s": sps,
        "tokens_per_s": stats.tokens * world / max(stats.seconds, 1e-9),
    }
    done = step - first
    eta = (time.perf_counter() - t0) / max(done, 1) * (total - step)
    losses = " ".join(f"{k}={v:.4f}" for k, v in stats.losses.items())
    log_rank0(rank, f"step {step}/{total} {losses} lr={lr:.2e} samples/s={sps:.2f} ETA {eta:.0f}s")
    return metrics


def _finish(
    engine: Any, cfg: dict[str, Any], stage: int, rank: int, logger: RunLogger | None
) -> None:
    from pixellm.train.export import export_model

    out = export_model(engine, stage, cfg["export_dir"])
    if rank != 0 or out is None:
        return
    log_rank0(rank, f"exported model to {cfg['export_dir']}")
    try:
        _log_export(cfg, out, logger)
    finally:
        if is_uri(cfg["export_dir"]):
            shutil.rmtree(out, ignore_errors=True)  # the local staging copy of the upload


def _log_export(cfg: dict[str, Any], out: Path, logger: RunLogger | None) -> None:
    """Rank 0: flush the last metrics and log the export (from its local copy) as a pyfunc."""
    if logger is not None and logger.run_id:
        from pixellm.train.pyfunc import log_pyfunc_model

        logger.flush(up_to_step=_committed_step(), wait_s=_FINAL_FLUSH_WAIT_S)
        logger.set_tags(
            {"export_dir": cfg["export_dir"], "tracking.failed_flushes": logger.failures}
        )
        try:
            uri = log_pyfunc_model(
                logger.tracking_uri,
                logger.run_id,
                out,
                cfg["registered_model_name"],
                max_new_tokens=int(cfg["flat_recipe"]["serve.max_new_tokens"]),
            )
        except Exception as err:  # noqa: BLE001 - an MLflow outage must not fail a finished run
            warnings.warn(
                f"could not log the pyfunc model of {cfg['export_dir']} to MLflow ({type(err).__name__}: "
                f"{str(err)[:200]}); the export is complete, register it later with "
                "pixellm.train.pyfunc.log_pyfunc_model",
                stacklevel=2,
            )
            return
        log_rank0(0, f"logged pyfunc model {uri} as {cfg['registered_model_name']}")


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Your training function that Ray Train launches on each worker.

    Args:
        config: ``train_loop_config`` from the driver: ``recipe`` (JSON dump), ``flat_recipe``,
            ``config_hash``, ``ds_config``, ``zero_stage``, ``dataset_name``, ``start_board``,
            ``tracking_uri``,
            ``mlflow_run_id``, ``storage``, ``export_dir``, ``registered_model_name``, ``fault``.
    """
    import ray.train

    os.environ.setdefault("DS_ACCELERATOR", "cuda" if config["use_gpu"] else "cpu")
    recipe = Recipe.model_validate(config["recipe"])
    t = recipe.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    engine, _ = setup_model_and_optimizer(recipe, config["ds_config"])
    restored, pending = _restore(engine, config, world)
    state = restored or RecipeState(
        0,
        0,
        t.seed,
        config["config_hash"],
        0,
        config["mlflow_run_id"],
        world,
        config["flat_recipe"],
    )
    state.config_hash, state.recipe = config["config_hash"], config["flat_recipe"]
    total = t.total_steps
    log_rank0(
        rank,
        f"{'resuming at' if state.step else 'starting'} step {state.step}/{total}, "
        f"{world} workers, ZeRO-{config['zero_stage']}, run {config['mlflow_run_id']}",
    )
    logger = RunLogger(config["tracking_uri"], config["mlflow_run_id"]) if rank == 0 else None
    if logger is not None and state.step:
        logger.restore_pending(pending)
        logger.set_tags({"resumed_from_step": state.step})
    batches = _Recorder(
        data_stream(recipe, config["dataset_name"], config["start_board"], state.step, rank)
    )
    samples = SampleLog(config["storage"], rank, state.step) if t.sample_log else None
    val = load_val_subset(recipe, rank, world) if t.eval_every else None
    first, t0 = state.step, time.perf_counter()
    step_seconds: list[float] = []  # wall time of each step since the last report
    engine.train()
    while state.step < total:
        stats = train_step(engine, batches, t.grad_accum)
        step_seconds.append(stats.seconds)
        state.step += 1
        state.epoch = (state.step - 1) // t.steps_per_epoch
        state.micro_batches_consumed += t.grad_accum
        ids, data_cpu = batches.take()
        if samples is not None:
            samples.add(state.step, ids)
        extra = {
            "data_cpu_s": data_cpu,
            **_maybe_validate(engine, val, t.eval_every, state.step, rank),
        }
        if state.step % t.log_every == 0 or state.step == total or "val/giou" in extra:
            metrics = _progress(rank, state.step, total, stats, _lr(engine), t0, first, world)
            if logger is not None:
                logger.add_metrics(state.step, {**metrics, **extra, "epoch": state.epoch})
        if state.step % t.checkpoint_every == 0 or state.step == total:
            if samples is not None:
                samples.flush()  # before the checkpoint exists: a resume never loses a step
            _report_checkpoint(engine, state, rank, logger, config["storage"], step_seconds)
        _maybe_fault(config["fault"], state.step, rank)
    _finish(engine, config, config["zero_stage"], rank, logger)
