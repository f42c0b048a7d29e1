"""Resumable checkpoints: the DeepSpeed engine state plus ``recipe_state.json``.

A checkpoint directory (one per report, merged by Ray Train from every worker's files) holds::

    ds/<tag>/...            DeepSpeed shards of what is trained: the trainable module tensors
                            (LoRA, codebook rows, projections, decoder, γ, φ), optimizer partitions
                            (every rank), LR scheduler, engine counters — never the frozen base
                            (``exclude_frozen_parameters``: it is rebuilt from the recipe on resume)
    ds/latest               the tag (written by rank 0)
    rng/rank-<r>.pt         python, numpy and torch RNG states of rank r (``save_rng_state``)
    recipe_state.json       RecipeState: step, epoch, seed, config hash, data position, run id,
                            and the flattened recipe it was trained with

Resuming (``load_checkpoint``) restores the engine (trained weights, optimizer moments, LR schedule)
and returns the RecipeState. The module load is non-strict only for the frozen base: a saved
checkpoint lacking a trainable tensor, or holding an unknown one, is an error; when the saved recipe differs from the current one, a warning names every
differing key and says that the current value wins.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "STATE_FILE",
    "RecipeState",
    "check_module_keys",
    "checkpoint_dir_name",
    "diff_recipes",
    "load_checkpoint",
    "load_rng_state",
    "read_recipe_state",
    "save_checkpoint",
    "save_rng_state",
]

STATE_FILE = "recipe_state.json"
DS_SUBDIR = "ds"
RNG_SUBDIR = "rng"


@dataclass
class RecipeState:
    """Where a run stands; written with every checkpoint.

    Attributes:
        step: optimizer steps completed (the next step to run is ``step + 1``).
        epoch: epoch of the last completed step (0-based).
        seed: ``train.seed`` of the run.
        config_hash: ``recipe_hash`` of the recipe that produced the checkpoint.
        micro_batches_consumed: per-rank micro-batches taken from the data stream so far (the
            data position; equal on every rank).
        mlflow_run_id: the run metrics go to (None when MLflow is disabled).
        world_size: workers that wrote the ZeRO shards (a different world size cannot resume).
        recipe: the flattened recipe (``section.key`` → value) used for the mismatch warning.
    """

    step: int
    epoch: int
    seed: int
    config_hash: str
    micro_batches_consumed: int
    mlflow_run_id: str | None
    world_size: int
    recipe: dict[str, Any] = field(default_factory=dict)


def checkpoint_dir_name(step: int) -> str:
    """Directory name of the checkpoint of ``step`` under the run's storage (sortable)."""
    return f"checkpoint_step_{step:07d}"


def diff_recipes(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Keys whose values differ between two flattened recipes → ``(saved, current)``."""
    keys = sorted(set(saved) | set(current))
    return {k: (saved.get(k), current.get(k)) for k in keys if saved.get(k) != current.get(k)}


def save_checkpoint(engine: Any, state: RecipeState, rank: int) -> Path:
    """Write this rank's part of a checkpoint into a fresh local directory.

    Every rank must call this (DeepSpeed's save is collective). Rank 0 also writes
    ``recipe_state.json``. Hand the directory to ``ray.train.report`` and delete it afterwards.

    Args:
        engine: the ``deepspeed.DeepSpeedEngine``.
        state: the state after ``state.step`` optimizer steps.
        rank: this worker's world rank.

    Returns:
        The local directory holding this rank's files.
    """
    local = Path(tempfile.mkdtemp(prefix=f"pixellm-ckpt-r{rank}-"))
    engine.save_checkpoint(
        str(local / DS_SUBDIR), tag=f"step{state.step}", exclude_frozen_parameters=True
    )
    save_rng_state(local, rank)
    if rank == 0:
        (local / STATE_FILE).write_text(json.dumps(asdict(state), indent=2, sort_keys=True))
    return local


def read_recipe_state(directory: str | Path) -> RecipeState:
    """Read ``recipe_state.json`` from a checkpoint directory.

    Raises:
        FileNotFoundError: the directory has no ``recipe_state.json`` (not a PixelLM checkpoint).
    """
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: {directory} is not a PixelLM training checkpoint")
    return RecipeState(**json.loads(path.read_text()))


def load_checkpoint(
    engine: Any, directory: str | Path, current_recipe: dict[str, Any], world_size: int
) -> RecipeState:
    """Restore the engine from a checkpoint directory and return its RecipeState.

    Args:
        engine: the freshly initialised ``deepspeed.DeepSpeedEngine`` (same ZeRO stage).
        directory: a local copy of the checkpoint (``Checkpoint.as_directory()``).
        current_recipe: the flattened recipe of this run (for the mismatch warning).
        world_size: workers in this run.

    Raises:
        RuntimeError: the checkpoint was written by a different number of workers, or DeepSpeed
            found no loadable state in it.
    """
    state = read_recipe_state(directory)
    if state.world_size != world_size:
        raise RuntimeError(
            f"checkpoint {directory} was written by {state.world_size} workers but this run has "
            f"{world_size} (train.num_workers); ZeRO shards cannot be re-partitioned here: resume "
            f"with train.num_workers={state.world_size} or start a new train.run_name"
        )
    changed = diff_recipes(state.recipe, current_recipe)
    for key, (old, new) in changed.items():
        warnings.warn(
            f"resuming from step {state.step}: {key} was {old!r} in the checkpoint, now {new!r}; "
            "the current recipe's value wins",
            stacklevel=2,
        )
    tag_dir = Path(directory) / DS_SUBDIR / f"step{state.step}"
    check_module_keys(tag_dir, engine.module)
    load_path, _ = engine.load_checkpoint(
        str(Path(directory) / DS_SUBDIR),
        tag=f"step{state.step}",
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
        load_module_strict=False,  # the frozen base is not in the checkpoint (checked above)
    )
    if load_path is None:
        raise RuntimeError(f"DeepSpeed found no checkpoint for step {state.step} in {directory}")
    return state


def save_rng_state(directory: Path, rank: int) -> None:
    """Write this rank's python, numpy and torch (CPU and CUDA) RNG states to ``rng/rank-<r>.pt``."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    (directory / RNG_SUBDIR).mkdir(parents=True, exist_ok=True)
    torch.save(state, directory / RNG_SUBDIR / f"rank-{rank}.pt")


def load_rng_state(directory: str | Path, rank: int) -> bool:
    """Restore the RNG states ``save_rng_state`` wrote for ``rank``.

    Returns:
        False (with a warning: the resumed run will not repeat the uninterrupted one exactly) when
        the checkpoint holds no RNG state for this rank, e.g. one written before it was saved.
    """
    path = Path(directory) / RNG_SUBDIR / f"rank-{rank}.pt"
    if not path.is_file():
        warnings.warn(
            f"{path} missing: checkpoint {directory} has no RNG state of rank {rank}; resuming "
            "with fresh RNG states (dropout draws will differ from an uninterrupted run)",
            stacklevel=2,
        )
        return False
    state = torch.load(path, weights_only=False)
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    return True


def check_module_keys(tag_dir: Path, module: Any) -> None:
    """Check that a saved DeepSpeed module state holds exactly the trainable tensors of ``module``.

    Raises:
        RuntimeError: no module state file, or trainable tensors missing / unknown tensors present.
    """
    import torch

    files = sorted(tag_dir.glob("*model_states.pt"))  # mp_rank_00_… (ZeRO-0/1/2), zero_pp_rank_…
    if not files:
        raise RuntimeError(f"{tag_dir}: no DeepSpeed *model_states.pt file in the checkpoint")
    saved = set(torch.load(files[0], map_location="cpu", weights_only=False)["module"])
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    missing, unknown = sorted(trainable - saved), sorted(saved - set(module.state_dict()))
    if missing or unknown:
        raise RuntimeError(
            f"{files[0]}: checkpoint lacks {len(missing)} trainable tensors (e.g. {missing[:3]}) "
            f"and has {len(unknown)} unknown ones (e.g. {unknown[:3]}); it was written by another "
            "model config: resume with the recipe that wrote it or start a new train.run_name"
        )


def remove_local(directory: Path) -> None:
    """Delete a local checkpoint staging directory (after Ray Train has persisted it)."""
    shutil.rmtree(directory, ignore_errors=True)
