"""Size of a training checkpoint: light (trained tensors only) vs with the frozen base.

1. Tiny recipe, measured: one DeepSpeed ZeRO-2 step in this process (gloo, world 1, CPU), then
   ``pixellm.train.checkpoint.save_checkpoint`` (light, what training writes) and DeepSpeed's
   default save (whole module) side by side; prints the bytes on disk of each.
2. 7B recipe, computed: the LLaVA-1.5-7B-shaped PixelLM of ``bench/train_step_7b.py`` is built on
   the meta device (no memory) with the 7B recipe's LoRA / decoder; trainable and frozen parameter
   counts give the checkpoint size under bf16 + ZeRO: 2 B/param bf16 module copy + 12 B/param fp32
   master and two Adam moments for each trainable parameter, + 2 B/param for a frozen base.

    python bench/checkpoint_size.py
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))  # train_step_7b.llava_7b_config


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def one_batch(model) -> dict:  # noqa: ANN001
    """One segmentation question on a drawn square (model kwargs)."""
    import numpy as np
    import torch

    proc = model.processor
    img = np.full((64, 80, 3), 128, np.uint8)
    img[10:30, 20:40] = (220, 30, 30)
    mask = torch.zeros(1, 64, 80)
    mask[0, 10:30, 20:40] = 1
    pixels, valid = proc.transform_image(img)
    enc = proc.encode_conversation(
        [
            {"role": "user", "text": "Please segment the red square."},
            {"role": "assistant", "text": "It is [SEG]."},
        ]
    )
    return {
        "pixel_values": pixels[None],
        "valid_hw": torch.tensor([valid]),
        "input_ids": torch.tensor([enc.input_ids]),
        "attention_mask": torch.ones(1, len(enc.input_ids), dtype=torch.long),
        "labels": torch.tensor([enc.labels]),
        "gt_masks": [mask],
    }


def tiny_measured() -> dict:
    """One ZeRO-2 step of the tiny recipe, then a light and a full save."""
    import torch.distributed as dist

    os.environ.update(
        {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    )
    os.environ.setdefault("MASTER_PORT", "29517")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    dist.init_process_group("gloo")
    from pixellm.config import load_recipe
    from pixellm.train.checkpoint import RecipeState, save_checkpoint
    from pixellm.train.ds_config import derive_deepspeed_config
    from pixellm.train.loop import setup_model_and_optimizer

    recipe = load_recipe(REPO / "platform/recipes/tiny.yaml", overrides=["train.warmup_steps=1"])
    engine, model = setup_model_and_optimizer(recipe, derive_deepspeed_config(recipe))
    out = engine(**one_batch(model))
    engine.backward(out.loss)
    engine.step()
    light = save_checkpoint(engine, RecipeState(1, 0, 0, "", 1, None, 1), rank=0)
    full = Path(tempfile.mkdtemp(prefix="pixellm-full-ckpt-"))
    engine.save_checkpoint(str(full), tag="step1")  # DeepSpeed's default: the whole module
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return {
        "trainable_params": trainable,
        "frozen_params": frozen,
        "light_bytes": _dir_bytes(light),
        "with_frozen_base_bytes": _dir_bytes(full),
    }


def seven_b_computed() -> dict:
    """Trainable / frozen parameter counts of the 7B recipe on the meta device → checkpoint bytes."""
    import torch
    from train_step_7b import llava_7b_config
    from transformers import LlavaForConditionalGeneration

    from pixellm.config import load_recipe
    from pixellm.model.backbone import apply_lora
    from pixellm.model.codebook import SegCodebook
    from pixellm.model.pixel_decoder import build_pixel_decoder
    from pixellm.model.processing import build_processor
    from pixellm.model.tokenizer import build_tiny_tokenizer

    recipe = load_recipe(
        REPO / "platform/recipes/pixellm-7b.yaml", overrides=["model.weights_path=/unused"]
    )
    cfg = recipe.model
    tokenizer = build_tiny_tokenizer(1024)
    SegCodebook.add_to(tokenizer, cfg.num_scales, cfg.tokens_per_group)
    processor = build_processor(cfg, tokenizer=tokenizer)
    with torch.device("meta"):
        llava = LlavaForConditionalGeneration(llava_7b_config(processor.tokenizer))
        for p in llava.parameters():
            p.requires_grad_(False)
        llm = apply_lora(llava, cfg, processor.codebook.ids)
        decoder = build_pixel_decoder(
            cfg.decoder,
            num_scales=cfg.num_scales,
            tokens_per_group=cfg.tokens_per_group,
            llm_hidden_size=4096,
            vision_hidden_size=1024,
        )
    params = [*llm.parameters(), *decoder.parameters()]
    trainable = sum(p.numel() for p in params if p.requires_grad)
    frozen = sum(p.numel() for p in params if not p.requires_grad)
    light = 14 * trainable  # bf16 module copy + fp32 master + 2 fp32 Adam moments
    return {
        "trainable_params": trainable,
        "frozen_params": frozen,
        "light_bytes": light,
        "with_frozen_base_bytes": light + 2 * frozen,
    }


def main() -> None:
    gib = 1024**3
    tiny, big = tiny_measured(), seven_b_computed()
    for row in (tiny, big):
        row["light_gib"] = round(row["light_bytes"] / gib, 4)
        row["with_frozen_base_gib"] = round(row["with_frozen_base_bytes"] / gib, 4)
        row["ratio"] = round(row["light_bytes"] / row["with_frozen_base_bytes"], 4)
    print(json.dumps({"tiny_measured": tiny, "7b_computed": big}, indent=1))


if __name__ == "__main__":
    main()
