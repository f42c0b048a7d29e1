"""Per-sample compute of PixelLM vs a LISA-shaped model, counted at real sizes on the meta device.

Both models are built from configs on ``torch.device("meta")`` (no memory, no weights) and one
sample's forward pass is run under ``torch.utils.flop_counter.FlopCounterMode``. torch counts 2 FLOPs
per multiply-add; the paper's table (3.57 vs 7.16 TFLOPs for 7B) matches multiply-add counts, so both
are reported (``*_tflops`` = torch's count, ``*_tmacs`` = half of it). The ratio does not depend on
the convention.

PixelLM sample: CLIP ViT-L/14-336 at 448 px (interpolated), p_V→T on the deepest layer pooled to
16x16 = 256 image tokens, the LLM over prompt + answer, pixel decoder once per target.
LISA sample (same LLaVA): CLIP at 224 px (256 image tokens, no pooling), the LLM over the same text
with one [SEG] per target, SAM ViT-H image encoder at 1024² and SAM's mask decoder once per target.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    SamConfig,
    SamModel,
    SamVisionConfig,
)

from pixellm.config import ModelConfig
from pixellm.model.pixel_decoder import build_pixel_decoder

__all__ = ["FlopsAssumptions", "count_flops", "llava_shape_config"]

# Architecture hyper-parameters (not weights) of the public LLaVA-1.5 checkpoints.
_LLAMA_SHAPES = {
    "llava-1.5-7b": dict(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32
    ),
    "llava-1.5-13b": dict(
        hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40
    ),
}
_CLIP_L_336 = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
    image_size=336, patch_size=14, projection_dim=768,
)  # fmt: skip
_SAM_VIT_H = dict(
    hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, mlp_dim=5120,
    global_attn_indexes=[7, 15, 23, 31], window_size=14, image_size=1024, patch_size=16,
)  # fmt: skip


@dataclass(frozen=True)
class FlopsAssumptions:
    """Text lengths of the counted sample (tokens of the LLM's tokenizer)."""

    architecture: str
    prompt_text_tokens: int = 64  # system prompt + "USER:" + question + "ASSISTANT:"
    answer_text_tokens_per_target: int = 12  # words describing each target
    num_targets: int = 3
    pixellm_image_px: int = 448
    lisa_clip_image_px: int = 224
    sam_image_px: int = 1024


def llava_shape_config(cfg: ModelConfig, architecture: str) -> LlavaConfig:
    """The LlavaConfig of ``cfg.weights_path`` if it exists, else of the named public shape."""
    if cfg.weights_path and (Path(cfg.weights_path) / "config.json").is_file():
        return LlavaConfig.from_pretrained(cfg.weights_path, local_files_only=True)
    if architecture not in _LLAMA_SHAPES:
        raise ValueError(
            f"unknown architecture {architecture!r}; choose from {sorted(_LLAMA_SHAPES)}"
        )
    text = LlamaConfig(
        vocab_size=32064, max_position_embeddings=4096, **_LLAMA_SHAPES[architecture]
    )
    return LlavaConfig(vision_config=CLIPVisionConfig(**_CLIP_L_336), text_config=text)


def _count(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _llava_flops(
    llava, image_px: int, image_tokens: int, grid: int | None, text_tokens: int
) -> int:
    vision = llava.model.vision_tower
    h = llava.config.text_config.hidden_size

    def run() -> None:
        pixels = torch.empty(1, 3, image_px, image_px, device="meta")
        out = vision(pixels, output_hidden_states=True, interpolate_pos_encoding=True)
        feats = out.hidden_states[-2][:, 1:]  # (1, g*g, Cv)
        if grid is not None:
            g = image_px // vision.config.patch_size
            feats = feats.reshape(1, g, g, -1).permute(0, 3, 1, 2)
            feats = torch.nn.functional.interpolate(feats, size=(grid, grid), mode="bilinear")
            feats = feats.flatten(2).transpose(1, 2)  # (1, G*G, Cv)
        llava.model.multi_modal_projector(feats)
        embeds = torch.empty(1, image_tokens + text_tokens, h, device="meta")
        hidden = llava.model.language_model(inputs_embeds=embeds).last_hidden_state
        llava.lm_head(hidden)

    return _count(run)


def count_flops(cfg: ModelConfig, assumptions: FlopsAssumptions) -> dict:
    """Count one sample's forward FLOPs of PixelLM and of a LISA-shaped model.

    Returns:
        ``{"pixellm_tflops", "lisa_tflops", "ratio", "pixellm_tmacs", "lisa_tmacs", "breakdown",
        "assumptions"}``; ratio = lisa / pixellm.
    """
    a = assumptions
    shape = llava_shape_config(cfg, a.architecture)
    k, codebook = a.num_targets, cfg.num_scales * cfg.tokens_per_group
    with torch.device("meta"):
        llava = LlavaForConditionalGeneration(shape)
        decoder = build_pixel_decoder(
            cfg.decoder,
            num_scales=cfg.num_scales,
            tokens_per_group=cfg.tokens_per_group,
            llm_hidden_size=shape.text_config.hidden_size,
            vision_hidden_size=shape.vision_config.hidden_size,
        )
        sam = SamModel(SamConfig(vision_config=SamVisionConfig(**_SAM_VIT_H)))
    answer = k * (a.answer_text_tokens_per_target + codebook)
    grid = cfg.llm_image_grid
    pixellm_llava = _llava_flops(
        llava, a.pixellm_image_px, grid * grid, grid, a.prompt_text_tokens + answer
    )
    g = a.pixellm_image_px // shape.vision_config.patch_size
    cv, h = shape.vision_config.hidden_size, shape.text_config.hidden_size

    def run_decoder() -> None:
        feats = [torch.empty(1, g, g, cv, device="meta") for _ in range(cfg.num_scales)]
        states = torch.empty(k, cfg.num_scales, cfg.tokens_per_group, h, device="meta")
        decoder(feats, torch.zeros(k, dtype=torch.long, device="meta"), states)

    pixellm_decoder = _count(run_decoder)
    lisa_tokens = (a.lisa_clip_image_px // shape.vision_config.patch_size) ** 2
    lisa_llava = _llava_flops(
        llava,
        a.lisa_clip_image_px,
        lisa_tokens,
        None,
        a.prompt_text_tokens + k * (a.answer_text_tokens_per_target + 1),
    )

    def run_sam() -> None:
        pixels = torch.empty(1, 3, a.sam_image_px, a.sam_image_px, device="meta")
        emb = sam.get_image_embeddings(pixels)
        sparse = torch.empty(1, k, 1, sam.config.prompt_encoder_config.hidden_size, device="meta")
        dense = torch.empty_like(emb)
        sam.mask_decoder(
            image_embeddings=emb,
            image_positional_embeddings=sam.get_image_wide_positional_embeddings(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )

    lisa_sam = _count(run_sam)
    pixellm_total, lisa_total = pixellm_llava + pixellm_decoder, lisa_llava + lisa_sam
    return {
        "pixellm_tflops": round(pixellm_total / 1e12, 3),
        "lisa_tflops": round(lisa_total / 1e12, 3),
        "ratio": round(lisa_total / pixellm_total, 3),
        "pixellm_tmacs": round(pixellm_total / 2e12, 3),
        "lisa_tmacs": round(lisa_total / 2e12, 3),
        "breakdown_tflops": {
            "pixellm_llava": round(pixellm_llava / 1e12, 3),
            "pixellm_pixel_decoder": round(pixellm_decoder / 1e12, 4),
            "lisa_llava": round(lisa_llava / 1e12, 3),
            "lisa_sam": round(lisa_sam / 1e12, 3),
        },
        "assumptions": {**asdict(a), "convention": "torch flop_counter: 2 FLOPs per multiply-add",
                        "paper_reports": {"pixellm_7b": 3.57, "lisa_7b": 7.16}},
    }  # fmt: skip


def flops_json(cfg: ModelConfig, assumptions: FlopsAssumptions) -> str:
    """``count_flops`` as indented JSON."""
    return json.dumps(count_flops(cfg, assumptions), indent=2)
