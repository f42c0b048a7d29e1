"""DeepSpeed configuration derived from the recipe at launch.

The JSON in ``platform/deepspeed/`` holds only what is about ZeRO (stage, buckets, overlap). Batch
sizes, optimizer, LR schedule, precision and clipping come from ``TrainConfig`` here, so a recipe
change can never disagree with a hand-written number in the JSON (STYLE convention 17):

    train_batch_size = micro_batch_size × grad_accum × num_workers
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pixellm.config import ConfigError, Recipe, TrainConfig
from pixellm.train.optim import group_lrs

__all__ = [
    "DERIVED_KEYS",
    "derive_deepspeed_config",
    "load_deepspeed_json",
    "resolve_precision",
    "zero_stage",
]

# Keys the JSON must not set: they are derived from TrainConfig.
DERIVED_KEYS: tuple[str, ...] = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "optimizer",
    "scheduler",
    "bf16",
    "fp16",
)
_REPO_ROOT = Path(__file__).resolve().parents[2]


def _resolve_path(path: str) -> Path:
    p = Path(path)
    if p.is_absolute() or p.is_file():
        return p
    return _REPO_ROOT / p  # recipes name the JSON relative to the repository root


def load_deepspeed_json(path: str) -> dict[str, Any]:
    """Read the ZeRO JSON a recipe names (absolute, relative to the cwd or to the repo root).

    Raises:
        ConfigError: the file is missing, is not a JSON object, sets a derived key or an unknown
            ZeRO stage.
    """
    p = _resolve_path(path)
    if not p.is_file():
        raise ConfigError(
            f"train.deepspeed_config={path!r}: file not found (looked at {p}); "
            "use platform/deepspeed/zero2.json or zero3.json"
        )
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"train.deepspeed_config={path!r}: invalid JSON ({err})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"train.deepspeed_config={path!r}: must be a JSON object")
    bad = [k for k in DERIVED_KEYS if k in cfg]
    if bad:
        raise ConfigError(
            f"train.deepspeed_config={path!r} sets {bad}; these are derived from the recipe's train "
            "section at launch: remove them from the JSON and set train.* instead"
        )
    stage = cfg.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(
            f"train.deepspeed_config={path!r}: zero_optimization.stage={stage!r} not in 0-3"
        )
    return cfg


def resolve_precision(train: TrainConfig) -> str:
    """``"bf16"`` or ``"fp32"`` for this run (``auto`` = bf16 on GPU, fp32 on CPU).

    Raises:
        ConfigError: bf16 was asked for without a GPU.
    """
    if train.precision == "auto":
        return "bf16" if train.use_gpu else "fp32"
    if train.precision == "bf16" and not train.use_gpu:
        raise ConfigError(
            "train.precision='bf16' needs train.use_gpu=true; on CPU use precision=auto or fp32"
        )
    return train.precision


def zero_stage(ds_config: dict[str, Any]) -> int:
    """The ZeRO stage of a (derived) DeepSpeed config."""
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def derive_deepspeed_config(recipe: Recipe) -> dict[str, Any]:
    """The full DeepSpeed config for a recipe: its ZeRO JSON plus everything derived from ``train``.

    Args:
        recipe: a validated recipe.

    Returns:
        A DeepSpeed config dict (JSON-serialisable) with batch sizes, AdamW (``torch_adam``),
        WarmupDecayLR over ``train.total_steps``, gradient clipping and bf16 on/off.

    Raises:
        ConfigError: see ``load_deepspeed_json`` and ``resolve_precision``; or the warm-up is longer
            than the run.
    """
    t = recipe.train
    if t.warmup_steps > t.total_steps:
        raise ConfigError(
            f"train.warmup_steps={t.warmup_steps} > total steps {t.total_steps} "
            f"(train.epochs={t.epochs} × train.steps_per_epoch={t.steps_per_epoch}); "
            "lower train.warmup_steps or train for longer"
        )
    cfg = load_deepspeed_json(t.deepspeed_config)
    peaks, floors = group_lrs(t)  # one per optimizer parameter group (pixellm.train.optim)
    cfg.update(
        {
            "train_micro_batch_size_per_gpu": t.micro_batch_size,
            "gradient_accumulation_steps": t.grad_accum,
            "train_batch_size": t.global_batch_size,
            "gradient_clipping": t.grad_clip,
            "optimizer": {
                "type": "AdamW",
                "params": {
                    "lr": t.lr,
                    "betas": list(t.betas),
                    "weight_decay": t.weight_decay,
                    "torch_adam": True,  # no JIT-built fused op (CPU has none; GPU needs no nvcc)
                },
            },
            "scheduler": {
                "type": "WarmupDecayLR",
                "params": {
                    "warmup_min_lr": floors,
                    "warmup_max_lr": peaks,
                    "warmup_num_steps": t.warmup_steps,
                    "total_num_steps": t.total_steps,
                    "warmup_type": "linear",
                },
            },
            "bf16": {"enabled": resolve_precision(t) == "bf16"},
        }
    )
    return cfg
