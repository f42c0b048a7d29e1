"""The LLaVA backbone of PixelLM (vision encoder I, projection p_V→T, LLM F) and its LoRA wrapping.

Built either from a local HF llava directory (``model.base == "llava"``, nothing is downloaded) or
from config (``model.base == "tiny"``: a small random LLaVA for tests and the quickstart).
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerBase,
)

from pixellm.config import ModelConfig
from pixellm.model.tokenizer import IMAGE_TOKEN

__all__ = ["EMBED_MULTIPLE", "apply_lora", "build_llava", "fit_embeddings", "tiny_llava_config"]

EMBED_MULTIPLE = 64  # embedding rows are padded to a multiple of this (tensor-core friendly)


def tiny_llava_config(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> LlavaConfig:
    """A small ``LlavaConfig`` from ``cfg.tiny``.

    The tiny CLIP is built for 3/4 of ``cfg.image_size`` and always run at ``cfg.image_size`` with
    interpolated position embeddings, so the tiny model exercises the same path as CLIP-336 at 448.
    """
    t = cfg.tiny
    native = (cfg.image_size * 3 // 4) // t.patch_size * t.patch_size
    vision = CLIPVisionConfig(
        hidden_size=t.vision_hidden_size,
        intermediate_size=t.vision_hidden_size * 4,
        num_hidden_layers=t.vision_layers,
        num_attention_heads=t.vision_heads,
        image_size=native,
        patch_size=t.patch_size,
        projection_dim=t.vision_hidden_size,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=t.text_hidden_size,
        intermediate_size=t.text_intermediate_size,
        num_hidden_layers=t.text_layers,
        num_attention_heads=t.text_heads,
        num_key_value_heads=t.text_heads,
        max_position_embeddings=max(512, cfg.max_length * 2),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        # A random LLM's base weights (lm_head, final norm) stay frozen: with Llama's default
        # std 0.02 every logit is ~0.02·sqrt(d) and no answer token can ever be confident, so the
        # tiny LLM is initialised at the standard 1/sqrt(d) scale instead.
        initializer_range=t.text_hidden_size**-0.5,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        projector_hidden_act="gelu",
        vision_feature_layer=cfg.feature_layers[0],
        tie_word_embeddings=False,
    )


def build_llava(
    cfg: ModelConfig,
    tokenizer: PreTrainedTokenizerBase,
    new_token_ids: list[int] | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> LlavaForConditionalGeneration:
    """Build (tiny) or load (local directory) the LLaVA and size its vocabulary to ``tokenizer``.

    ``new_token_ids`` (the codebook ids) get the mean-embedding initialisation of
    ``fit_embeddings`` on a loaded checkpoint (the tiny model is random anyway).

    A local llava is loaded straight in ``dtype`` onto ``device`` (safetensors are read tensor by
    tensor, so host memory holds about one ``dtype`` copy, never an fp32 one). Under ZeRO-3 pass
    ``device=None`` with a live ``transformers.integrations.HfDeepSpeedConfig``: ``from_pretrained``
    then partitions every parameter across ranks as it is created (``deepspeed.zero.Init``).

    Args:
        cfg: the model section of the recipe.
        tokenizer: the model's tokenizer (codebook tokens included).
        new_token_ids: the codebook token ids (mean-initialised rows).
        dtype: parameter dtype (the run's compute dtype: bf16 on GPU, fp32 on CPU).
        device: where the weights are loaded (None: CPU, or partitioned under ZeRO-3).

    Raises:
        FileNotFoundError: ``cfg.weights_path`` is not a local HF llava directory.
    """
    if cfg.base == "tiny":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.tiny.seed)
            tiny = LlavaForConditionalGeneration(tiny_llava_config(cfg, tokenizer)).float()
        return tiny.to(device=device, dtype=dtype)
    path = Path(cfg.weights_path or "")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model.weights_path={cfg.weights_path!r} is not a local HF llava directory "
            "(config.json missing); download e.g. llava-hf/llava-1.5-7b-hf there first"
        )
    llava = LlavaForConditionalGeneration.from_pretrained(
        path,
        local_files_only=True,
        dtype=dtype,
        device_map=None if device is None else {"": str(device)},
    )
    fit_embeddings(llava, len(tokenizer), new_token_ids or [])
    llava.config.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    return llava


def fit_embeddings(llava: LlavaForConditionalGeneration, n_tokens: int, new_ids: list[int]) -> int:
    """Size the embedding and output layer for ``n_tokens`` and initialise the ``new_ids`` rows.

    Never shrinks: the row count becomes the next multiple of ``EMBED_MULTIPLE`` at or above
    ``max(rows, n_tokens)`` (llava-1.5's 32,064 stays; its 32,008 tokens fit in it). The rows of
    ``new_ids`` (the codebook tokens, which otherwise inherit the checkpoint's padding rows) are set
    to the mean of the other real token rows ``[0, n_tokens)``, in the input embedding and in
    ``lm_head``. Rows ``>= n_tokens`` are padding and never generated (``PixelLM`` masks them).

    Returns:
        The row count.
    """
    rows = llava.get_input_embeddings().num_embeddings
    target = -(-max(rows, n_tokens) // EMBED_MULTIPLE) * EMBED_MULTIPLE
    if target != rows:
        llava.resize_token_embeddings(target, mean_resizing=False)
    new = sorted(set(new_ids))
    keep = torch.ones(n_tokens, dtype=torch.bool)
    keep[new] = False
    with torch.no_grad():
        for weight in (llava.get_input_embeddings().weight, llava.get_output_embeddings().weight):
            mean = weight[:n_tokens][keep].float().mean(0)
            weight[new] = mean.to(weight.dtype)
    return target


def apply_lora(
    llava: LlavaForConditionalGeneration, cfg: ModelConfig, codebook_ids: list[int]
) -> PeftModel:
    """Wrap the LLM in LoRA (peft) and make exactly the PixelLM-trainable LLaVA parts trainable.

    Trainable after this call: LoRA on the LLM's ``cfg.lora.target_modules`` (never CLIP's), the
    codebook rows of the input embedding and of the output layer (peft trainable tokens, not the
    whole vocabulary), and the vision-to-language projection p_V→T. Frozen: CLIP and LLM base weights.
    """
    targets = "|".join(cfg.lora.target_modules)
    peft_cfg = PeftLoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=rf".*language_model.*\.({targets})$",
        trainable_token_indices={"embed_tokens": codebook_ids, "lm_head": codebook_ids},
        bias="none",
    )
    model = get_peft_model(llava, peft_cfg)
    for p in model.get_base_model().model.multi_modal_projector.parameters():
        p.requires_grad_(True)
    return model
