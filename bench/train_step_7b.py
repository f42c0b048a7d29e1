"""Time a 7B-shaped PixelLM training step on one GPU (random weights, bf16, LoRA, ZeRO-2, 1 GPU).

Builds LLaVA-1.5-7B-shaped modules from config (CLIP ViT-L/14-336: hidden 1024, 24 layers, 16 heads,
MLP 4096, patch 14; Llama-7B: hidden 4096, 32 layers, 32 heads, MLP 11008, vocab 32064) directly
in bf16 on the GPU, with LoRA, the paper-sized pixel decoder and gradient checkpointing, wraps it in
DeepSpeed ZeRO-2 (config derived from platform/recipes/pixellm-7b.yaml with one worker) and times
``--steps`` optimizer steps on synthetic batches of the real shapes (448 px, 256 image tokens,
~100 text tokens, 3 targets). FLOPs per step come from ``torch.utils.flop_counter`` on one step.

    python bench/train_step_7b.py [--steps 10 --warmup 3 --micro 2]

Prints one JSON object: tokens/s, peak memory, MFU. Exits 2 with a message when CUDA is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}


def peak_flops(name: str) -> float | None:
    """Dense bf16 peak FLOP/s of a GPU by name (None if unknown)."""
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def llava_7b_config(tokenizer):  # noqa: ANN001, ANN201
    """LLaVA-1.5-7B-shaped ``LlavaConfig`` (no weights)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
    )
    text = LlamaConfig(
        vocab_size=32064,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        tie_word_embeddings=False,
    )


def build_model(recipe):  # noqa: ANN001, ANN201
    """PixelLM from parts: 7B-shaped LLaVA (bf16, on GPU) + LoRA + paper pixel decoder."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from pixellm.model.backbone import apply_lora
    from pixellm.model.pixel_decoder import build_pixel_decoder
    from pixellm.model.pixellm import PixelLM
    from pixellm.model.processing import build_processor
    from pixellm.model.tokenizer import build_tiny_tokenizer

    cfg = recipe.model
    processor = build_processor(cfg, tokenizer=build_tiny_tokenizer(1024))
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
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
    torch.set_default_dtype(torch.float32)
    llm.get_base_model().model.language_model.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    return PixelLM(config=cfg, llm=llm, pixel_decoder=decoder, processor=processor)


def synthetic_batch(model, micro: int, device):  # noqa: ANN001, ANN201
    """Real shapes: 448 px image, 256 image tokens, ~100 text tokens, 3 targets (448² masks)."""
    import torch

    proc = model.processor
    question = "Please segment the dog, the red frisbee and the person throwing it."
    conv = [
        {"role": "user", "text": question.strip()},
        {"role": "assistant", "text": "Sure, they are [SEG], [SEG] and [SEG], separately."},
    ]
    enc = proc.encode_conversation(conv)
    ids = torch.tensor([enc.input_ids] * micro, device=device)
    g = torch.Generator().manual_seed(0)
    masks = [(torch.rand(3, 448, 448, generator=g) > 0.5).float().to(device) for _ in range(micro)]
    return {
        "pixel_values": torch.randn(micro, 3, 448, 448, generator=g).to(device),
        "valid_hw": torch.tensor([[448, 448]] * micro, device=device),
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": torch.tensor([enc.labels] * micro, device=device),
        "gt_masks": masks,
    }, ids.numel()


def setup_engine(micro: int):  # noqa: ANN201
    """DeepSpeed ZeRO-2 engine (config derived from the 7B recipe, 1 worker) around the model."""
    import deepspeed

    from pixellm.config import load_recipe
    from pixellm.train.ds_config import derive_deepspeed_config

    os.environ.update(
        {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    )
    os.environ.setdefault("MASTER_PORT", "29511")
    recipe = load_recipe(
        REPO / "platform/recipes/pixellm-7b.yaml",
        overrides=[
            "model.weights_path=/unused",  # shapes only: no weights are read
            "train.num_workers=1",
            "train.grad_accum=1",
            f"train.micro_batch_size={micro}",
            "train.warmup_steps=1",
        ],
    )
    deepspeed.init_distributed(dist_backend="nccl")
    model = build_model(recipe)
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=derive_deepspeed_config(recipe),
    )
    return engine, model


def time_steps(engine, batch: dict, warmup: int, steps: int) -> tuple[float, int]:  # noqa: ANN001
    """``(seconds per step, FLOPs of one step)``; FLOPs counted by ``FlopCounterMode`` (they
    include the forward recomputed by gradient checkpointing)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    def step() -> None:
        out = engine(**batch)
        engine.backward(out.loss)
        engine.step()

    for _ in range(warmup):
        step()
    with FlopCounterMode(display=False) as counter:
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps, counter.get_total_flops()


def main() -> int:
    """Build, time, print JSON; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--micro", type=int, default=2)
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print(
            "bench/train_step_7b.py needs a CUDA GPU (torch.cuda.is_available() is False); "
            "run it on a GPU machine",
            file=sys.stderr,
        )
        return 2
    engine, model = setup_engine(args.micro)
    batch, tokens = synthetic_batch(model, args.micro, engine.device)
    per_step, flops = time_steps(engine, batch, args.warmup, args.steps)
    name = torch.cuda.get_device_name()
    peak = peak_flops(name)
    result = {
        "gpu": name,
        "micro_batch": args.micro,
        "tokens_per_step": tokens,
        "step_s": round(per_step, 4),
        "tokens_per_s": round(tokens / per_step, 1),
        "samples_per_s": round(args.micro / per_step, 3),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "flops_per_step": flops,
        "mfu": round(flops / per_step / peak, 4) if peak else None,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
