"""A tiny PixelLM checkpoint in the authors' release layout, rebuilt from a seed.

Used by CI (``tests/model/test_import_authors.py``) and by the hand-run golden script
(``tools/golden_authors.py``, which loads the same files into the authors' own code). Needs only
torch, safetensors and sentencepiece, so it runs under both transformers 5 (ours) and 4.31 (theirs).

Layout written (what their LoRA-merge script leaves, per authors-checkpoint-facts.md):
    <root>/checkpoint/config.json                       their LlamaConfig subclass (model_type llava)
    <root>/checkpoint/pytorch_model-0000{1,2}-of-00002.bin + pytorch_model.bin.index.json
    <root>/checkpoint/tokenizer.model, tokenizer_config.json, special_tokens_map.json, added_tokens.json
    <root>/clip/config.json, model.safetensors, preprocessor_config.json   a tiny CLIP vision tower

Sizes: LLaMA width 64 (2 layers), CLIP width 32 with 12 layers (their code reads hidden_states[-11]),
patch 14 at 336 px (24x24 table, run at 448 = 32x32 like the real model); the decoder is full size
(width 256) because their code hard-codes it.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

__all__ = [
    "SIZES",
    "authors_state_shapes",
    "build_authors_layout",
    "clip_state_shapes",
    "golden_image",
]

SIZES = {
    "hidden": 64,
    "layers": 2,
    "heads": 4,
    "intermediate": 128,
    "clip_hidden": 32,
    "clip_layers": 12,
    "clip_heads": 2,
    "clip_patch": 14,
    "clip_image": 336,
    "dim": 256,
    "mlp": 2048,
    "sp_vocab": 400,
}
ADDED = ["[SEG0]", "[SEG1]", "[SEG2]", "[SEG3]", "[SEG4]", "[SEG5]", "<im_start>", "<im_end>"]
_TEXT = """A chat between a curious human and an artificial intelligence assistant.
The assistant gives helpful, detailed, and polite answers to the human's questions.
USER: ASSISTANT: What is in this image? Please output segmentation mask.
Please respond with segmentation mask. Can you segment the cat and the dog in this image?
Sure, it is the red car on the left, and the person next to the tree. The sky is blue.
There are two people, a bicycle, a bench and a small brown dog near the water.
Where is the cup? It is on the table, next to the laptop and the phone."""


def golden_image(seed: int, hw: tuple[int, int]):
    """A seeded uint8 RGB test image ``(H, W, 3)`` (numpy), the same under any numpy version."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (*hw, 3), generator=gen, dtype=torch.uint8).numpy()


def clip_state_shapes(s: dict = SIZES) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of an HF ``CLIPVisionModel`` (``vision_model.*``)."""
    c, p = s["clip_hidden"], s["clip_patch"]
    rows = (s["clip_image"] // p) ** 2 + 1
    out = {
        "vision_model.embeddings.class_embedding": (c,),
        "vision_model.embeddings.patch_embedding.weight": (c, 3, p, p),
        "vision_model.embeddings.position_embedding.weight": (rows, c),
        "vision_model.pre_layrnorm.weight": (c,),
        "vision_model.pre_layrnorm.bias": (c,),
        "vision_model.post_layernorm.weight": (c,),
        "vision_model.post_layernorm.bias": (c,),
    }
    for i in range(s["clip_layers"]):
        pre = f"vision_model.encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out[pre + f"self_attn.{proj}.weight"] = (c, c)
            out[pre + f"self_attn.{proj}.bias"] = (c,)
        for ln in ("layer_norm1", "layer_norm2"):
            out[pre + f"{ln}.weight"] = (c,)
            out[pre + f"{ln}.bias"] = (c,)
        out[pre + "mlp.fc1.weight"] = (4 * c, c)
        out[pre + "mlp.fc1.bias"] = (4 * c,)
        out[pre + "mlp.fc2.weight"] = (c, 4 * c)
        out[pre + "mlp.fc2.bias"] = (c,)
    return out


def _linear(out: dict, name: str, d_out: int, d_in: int, bias: bool = True) -> None:
    out[f"{name}.weight"] = (d_out, d_in)
    if bias:
        out[f"{name}.bias"] = (d_out,)


def _norm(out: dict, name: str, d: int) -> None:
    out[f"{name}.weight"] = (d,)
    out[f"{name}.bias"] = (d,)


def authors_state_shapes(vocab: int, s: dict = SIZES) -> dict[str, tuple[int, ...]]:
    """Every key of their merged checkpoint (vision tower excluded) with its shape."""
    h, i_, c, cv = s["hidden"], s["intermediate"], s["dim"], s["clip_hidden"]
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, h)}
    for n in range(s["layers"]):
        pre = f"model.layers.{n}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            _linear(out, pre + f"self_attn.{proj}", h, h, bias=False)
        out[pre + "self_attn.rotary_emb.inv_freq"] = (h // s["heads"] // 2,)
        _linear(out, pre + "mlp.gate_proj", i_, h, bias=False)
        _linear(out, pre + "mlp.up_proj", i_, h, bias=False)
        _linear(out, pre + "mlp.down_proj", h, i_, bias=False)
        out[pre + "input_layernorm.weight"] = (h,)
        out[pre + "post_attention_layernorm.weight"] = (h,)
    out["model.norm.weight"] = (h,)
    out["lm_head.weight"] = (vocab, h)
    for proj in ("mm_projector", "out_mm_projector"):
        _linear(out, f"model.{proj}.0", 2 * h, cv)
        _linear(out, f"model.{proj}.2", h, 2 * h)
    _linear(out, "model.text_hidden_fcs.0.0", h, h)
    _linear(out, "model.text_hidden_fcs.0.2", c, h)
    out["model.image_feature_neck.0.weight"] = (c, h, 1, 1)
    _norm(out, "model.image_feature_neck.1", c)
    out["model.image_feature_neck.2.weight"] = (c, c, 3, 3)
    _norm(out, "model.image_feature_neck.3", c)
    pe = "model.prompt_encoder."
    out[pe + "pe_layer.positional_encoding_gaussian_matrix"] = (2, c // 2)
    for k in range(4):
        out[pe + f"point_embeddings.{k}.weight"] = (1, c)
    out[pe + "not_a_point_embed.weight"] = (1, c)
    out[pe + "mask_downscaling.0.weight"] = (4, 1, 2, 2)
    out[pe + "mask_downscaling.0.bias"] = (4,)
    _norm(out, pe + "mask_downscaling.1", 4)
    out[pe + "mask_downscaling.3.weight"] = (16, 4, 2, 2)
    out[pe + "mask_downscaling.3.bias"] = (16,)
    _norm(out, pe + "mask_downscaling.4", 16)
    out[pe + "mask_downscaling.6.weight"] = (c, 16, 1, 1)
    out[pe + "mask_downscaling.6.bias"] = (c,)
    out[pe + "no_mask_embed.weight"] = (1, c)
    md = "model.mask_decoder."
    for lvl in range(2):
        t = f"{md}transformer.{lvl}."
        for n in range(2):
            layer = f"{t}layers.{n}."
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                d_out, d_in = (c, c) if proj == "out_proj" else (c, c)
                _linear(out, f"{layer}self_attn.{proj}", d_out, d_in)
            for attn in ("cross_attn_token_to_image", "cross_attn_image_to_token"):
                for proj in ("q_proj", "k_proj", "v_proj"):
                    _linear(out, f"{layer}{attn}.{proj}", c // 2, c)
                _linear(out, f"{layer}{attn}.out_proj", c, c // 2)
            _linear(out, f"{layer}mlp.lin1", s["mlp"], c)
            _linear(out, f"{layer}mlp.lin2", c, s["mlp"])
            for k in range(1, 5):
                _norm(out, f"{layer}norm{k}", c)
        for proj in ("q_proj", "k_proj", "v_proj"):
            _linear(out, f"{t}final_attn_token_to_image.{proj}", c // 2, c)
        _linear(out, f"{t}final_attn_token_to_image.out_proj", c, c // 2)
        _norm(out, f"{t}norm_final_attn", c)
    out[md + "iou_token.weight"] = (1, c)
    out[md + "mask_tokens.weight"] = (4, c)
    out[md + "output_upscaling.0.weight"] = (c, c // 8, 2, 2)
    out[md + "output_upscaling.0.bias"] = (c // 8,)
    _norm(out, md + "output_upscaling.1", c // 8)
    out[md + "upsample_2x.0.weight"] = (c, c, 2, 2)
    out[md + "upsample_2x.0.bias"] = (c,)
    _norm(out, md + "upsample_2x.1", c)
    out[md + "pe1.positional_encoding_gaussian_matrix"] = (2, c // 2)
    for k in range(4):
        _linear(out, f"{md}output_hypernetworks_mlps.{k}.layers.0", c, c)
        _linear(out, f"{md}output_hypernetworks_mlps.{k}.layers.1", c, c)
        _linear(out, f"{md}output_hypernetworks_mlps.{k}.layers.2", c // 8, c)
    _linear(out, md + "iou_prediction_head.layers.0", 256, c)
    _linear(out, md + "iou_prediction_head.layers.1", 256, c)
    _linear(out, md + "iou_prediction_head.layers.2", 4, 256)
    out[md + "level_embed.weight"] = (2, c)
    return out


_UNIT_SCALE = {
    "embed_tokens",
    "position_embedding",
    "iou_token",
    "mask_tokens",
    "level_embed",
    "no_mask_embed",
    "not_a_point_embed",
}


def _value(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """A seeded tensor at a scale that keeps a random network's activations O(1)."""
    if name.endswith("inv_freq"):
        dim = 2 * shape[0]
        return 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    x = torch.randn(shape, generator=gen)
    norm_like = any(k in name for k in ("norm", "layernorm", "pre_layrnorm", "neck.1", "neck.3"))
    if len(shape) == 1 and (norm_like or ".1.weight" in name or ".4.weight" in name):
        return 1.0 + 0.1 * x if name.endswith("weight") else 0.1 * x
    if len(shape) == 1:
        return 0.1 * x
    unit = name.split(".")[-2] in _UNIT_SCALE or "point_embeddings" in name
    if "gaussian" in name or unit:  # embeddings and learned tokens: N(0, 1) as nn.Embedding
        return x
    fan_in = shape[1] * (shape[2] * shape[3] if len(shape) == 4 else 1)
    if "ConvTranspose" in name or "upscaling.0" in name or "upsample_2x.0" in name:
        fan_in = shape[0]
    # the two-way transformers at a quarter of the usual scale: float32 noise (different attention
    # kernels here and in transformers 4.31) is amplified less on its way to the mask logits
    gain = 0.25 if "mask_decoder.transformer." in name else 1.0
    return gain * x / fan_in**0.5


def _seeded(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: _value(k, shapes[k], gen).contiguous() for k in sorted(shapes)}


def _train_sentencepiece(path: Path, vocab_size: int) -> None:
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_TEXT.splitlines() * 20),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        add_dummy_prefix=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        num_threads=1,
        minloglevel=2,
    )
    path.write_bytes(model.getvalue())


def _write_tokenizer(ckpt: Path, sp_vocab: int) -> int:
    """Their slow LlamaTokenizer files; returns the vocabulary size with the added tokens."""
    _train_sentencepiece(ckpt / "tokenizer.model", sp_vocab)
    added = {tok: sp_vocab + i for i, tok in enumerate(ADDED)}
    (ckpt / "added_tokens.json").write_text(json.dumps(added, indent=2))
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}
    (ckpt / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "legacy": True,
        "model_max_length": 2048,
        "padding_side": "right",
        "sp_model_kwargs": {},
        **specials,
    }
    (ckpt / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return sp_vocab + len(ADDED)


def _write_clip(clip: Path, seed: int, s: dict) -> None:
    from safetensors.torch import save_file

    clip.mkdir(parents=True, exist_ok=True)
    save_file(
        _seeded(clip_state_shapes(s), seed), str(clip / "model.safetensors"), {"format": "pt"}
    )
    config = {
        "model_type": "clip_vision_model",
        "architectures": ["CLIPVisionModel"],
        "hidden_size": s["clip_hidden"],
        "intermediate_size": 4 * s["clip_hidden"],
        "num_hidden_layers": s["clip_layers"],
        "num_attention_heads": s["clip_heads"],
        "image_size": s["clip_image"],
        "patch_size": s["clip_patch"],
        "projection_dim": s["clip_hidden"],
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "num_channels": 3,
        "torch_dtype": "float32",
    }
    (clip / "config.json").write_text(json.dumps(config, indent=2))
    side = s["clip_image"]
    processor = {
        "crop_size": {"height": side, "width": side},
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "CLIPImageProcessor",
        "resample": 3,
        "size": {"shortest_edge": side},
    }
    (clip / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))


def build_authors_layout(root: str | Path, seed: int = 0, sizes: dict | None = None) -> Path:
    """Write the tiny checkpoint and CLIP under ``root`` (see the module docstring); returns root."""
    s = {**SIZES, **(sizes or {})}
    root = Path(root)
    ckpt, clip = root / "checkpoint", root / "clip"
    ckpt.mkdir(parents=True, exist_ok=True)
    vocab = _write_tokenizer(ckpt, s["sp_vocab"])
    _write_clip(clip, seed + 1, s)
    state = _seeded(authors_state_shapes(vocab, s), seed)
    names = sorted(state)
    half = len(names) // 2
    index = {
        "metadata": {"total_size": sum(t.numel() * 4 for t in state.values())},
        "weight_map": {},
    }
    for n, part in enumerate((names[:half], names[half:]), start=1):
        fname = f"pytorch_model-0000{n}-of-00002.bin"
        torch.save({k: state[k] for k in part}, ckpt / fname)
        index["weight_map"].update({k: fname for k in part})
    (ckpt / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))
    config = {
        "model_type": "llava",
        "architectures": ["PixelLMForCausalLM"],
        "hidden_size": s["hidden"],
        "intermediate_size": s["intermediate"],
        "num_hidden_layers": s["layers"],
        "num_attention_heads": s["heads"],
        "num_key_value_heads": s["heads"],
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "vocab_size": vocab,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": False,
        "mm_hidden_size": s["clip_hidden"],
        "mm_vision_select_layer": -2,
        "mm_vision_tower": str(clip),
        "vision_tower": str(clip),
        "mm_use_im_start_end": True,
        "mm_use_im_patch_token": False,
        "out_dim": s["dim"],
        "train_mask_decoder": True,
        "image_feature_scale_num": 2,
        "resize_vision_tower": True,
        "resize_vision_tower_size": 448,
        "separate_mm_projector": True,
        "vision_tower_for_mask": True,
        "pad_train_clip_images": True,
    }
    (ckpt / "config.json").write_text(json.dumps(config, indent=2))
    return root
