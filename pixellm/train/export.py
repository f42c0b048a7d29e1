"""Export the trained model as a ``from_pretrained`` directory (safetensors), also from ZeRO-3.

Under ZeRO-0/1/2 every rank holds the full weights, so rank 0 saves its module. Under ZeRO-3 the
parameters are partitioned: every rank must take part in DeepSpeed's consolidation
(``engine._zero3_consolidated_16bit_state_dict``, which gathers one layer at a time with
``deepspeed.zero.GatheredParameters``) and rank 0 receives the full state dict. No user-run
``zero_to_fp32`` conversion is involved.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from pixellm.train.storage import is_uri, upload_dir

__all__ = ["export_model", "gather_full_state_dict"]


def gather_full_state_dict(engine: Any, stage: int) -> dict[str, torch.Tensor] | None:
    """The full model state dict on rank 0 (None elsewhere). Collective under ZeRO-3.

    Args:
        engine: the ``deepspeed.DeepSpeedEngine`` wrapping PixelLM.
        stage: the ZeRO stage of the run.

    Returns:
        ``model.state_dict()``-keyed CPU tensors on rank 0, in the run's dtype (bf16 for a bf16
        run: the export is written in the run's precision), else None.
    """
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    if stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()
    else:
        state = engine.module.state_dict() if rank == 0 else None
    if state is None:
        return None
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def export_model(engine: Any, stage: int, out_dir: str | Path) -> Path | None:
    """Write the consolidated model with ``PixelLM.save_pretrained`` (rank 0); all ranks call this.

    The directory is self-contained (base LLaVA, LoRA unmerged, PixelLM parts, tokenizer, config;
    see ``PixelLM.save_pretrained``): ``PixelLM.from_pretrained`` needs nothing else.

    Args:
        engine: the DeepSpeed engine (``engine.module`` is the PixelLM).
        stage: the ZeRO stage.
        out_dir: destination directory (created, overwritten), or a remote URI (``s3://…``):
            then the model is written to a local staging directory and uploaded there.

    Returns:
        On rank 0 the local directory holding the export (``out_dir`` itself, or the staging
        directory for a URI, which the caller deletes when done); None on other ranks.
    """
    state = gather_full_state_dict(engine, stage)
    if state is None:
        return None
    model = engine.module
    expected = set(model.state_dict())
    missing = sorted(expected - set(state))
    if missing:
        raise RuntimeError(
            f"consolidated state dict lacks {len(missing)} tensors, e.g. {missing[:3]}"
        )
    remote = is_uri(str(out_dir))
    local = Path(tempfile.mkdtemp(prefix="pixellm-export-")) if remote else Path(out_dir)
    out = model.save_pretrained(local, state_dict=state)
    if remote:
        upload_dir(out, str(out_dir))
    return out
