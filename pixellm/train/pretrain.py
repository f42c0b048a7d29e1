"""``pixellm pretrain-tiny``: a *pretrained* tiny LLaVA for the quickstart, in the llava-hf layout.

A real user starts PixelLM from ``llava-hf/llava-1.5-7b-hf`` (``model.base: llava`` +
``model.weights_path``) with CLIP and the LLM frozen. On a CPU there is no such model, so this stage
makes a small one: the tiny LLaVA of ``model.tiny`` (random CLIP, projector and Llama) trained end to
end — CLIP, projector and LLM all trainable — with the LLaVA objective, next-token cross-entropy on
the assistant answers of the generated corpus (grounded VQA: "the small red circle and the large blue
square.", "There is no green star in this image.", "There are two circles."), with the ``[SEG]``
placeholders removed (the base model knows nothing of PixelLM's codebook; PixelLM adds it). As a
real LLaVA's LLM is a language model before it sees an image, ``text_steps`` first train the LLM
alone on the same conversations with the image tokens dropped: that is where the tiny LLM learns to
copy the shapes a question names (MUSE val, greedy answers after 150 LLaVA steps: targets of the
multi-referring questions named right 1 / 79 without it, 50 / 79 after 1,000 text steps with the
4-layer LLM; the default is 500 steps: PixelLM then scores as after 1,000, in less time). The
image goes through the same path PixelLM uses (deepest ``feature_layers[0]`` CLIP layer pooled to
``llm_image_grid``² tokens), so the pretrained CLIP learns what the questions ask about: colours,
kinds, sizes and positions of the shapes.

Saved with ``save_pretrained`` (``config.json`` + ``model.safetensors``, tokenizer files) and a
``pretrain.json`` holding the inputs' hash: a later run with the same inputs reuses the directory.

Shape notation: B = images, T = tokens, g = CLIP patch grid, G = ``llm_image_grid``, V = vocabulary.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass

from pixellm.config import DataConfig, ModelConfig
from pixellm.model.pixellm import pool_image_tokens

__all__ = ["PretrainOptions", "pretrain_tiny", "pretrain_key"]

INFO_NAME = "pretrain.json"


@dataclass(config=ConfigDict(extra="forbid"))
class PretrainOptions:
    """Knobs of the tiny LLaVA pretraining (defaults: about two and a half minutes on 2 idle CPU
    cores); validated on construction (pydantic ``ValidationError`` naming each bad field)."""

    # more LLaVA steps lower its answer loss but give PixelLM worse masks (README)
    steps: Annotated[int, Field(ge=0)] = 150
    batch_size: Annotated[int, Field(ge=1)] = 8
    lr: Annotated[float, Field(gt=0)] = 2e-3
    warmup_steps: Annotated[int, Field(ge=0)] = 20
    seed: int = 0
    # None = {muse: 2, refer_seg: 1, vqa: 1, sem_seg: 1}
    mixture: dict[str, Annotated[float, Field(ge=0)]] | None = None
    log_every: Annotated[int, Field(ge=1)] = 25
    # language pretraining of the LLM alone first (image tokens dropped). 500: quickstart test gIoU
    # as at 1,000 (0.287-0.326 over three runs vs 0.304-0.316 over two; 250: 0.294) in ~65 s less
    # pretraining (README)
    text_steps: Annotated[int, Field(ge=0)] = 500
    text_batch_size: Annotated[int, Field(ge=1)] = 32
    text_mixture: dict[str, Annotated[float, Field(ge=0)]] | None = (
        None  # None = {muse: 2, refer_seg: 1}
    )
    # CLIP in the image phase: lr x vision_lr_scale with AdamW weight decay. At the full lr and no
    # decay the deepest layer's tokens grew to norm ~50, ~99% of it the same vector for every image
    # (the LLM then reads nearly identical image tokens); at 0.1 and 0.1 they stay ~15 (see README)
    vision_lr_scale: Annotated[float, Field(ge=0)] = 0.1
    vision_weight_decay: Annotated[float, Field(ge=0)] = 0.1


def pretrain_key(
    model: ModelConfig, shards_root: str | Path, opts: PretrainOptions, data_key: str | None = None
) -> str:
    """Hash of everything the pretrained weights depend on: sizes, options and the data
    (``data_key``, e.g. a hash of the generated corpus; default: the shard manifests)."""
    manifests = sorted(Path(shards_root).glob("*/manifest.json"))
    data = data_key or [hashlib.sha256(p.read_bytes()).hexdigest() for p in manifests]
    blob = json.dumps(
        {
            "tiny": model.tiny.model_dump(mode="json"),
            "image_size": model.image_size,
            "feature_layers": model.feature_layers,
            "llm_image_grid": model.llm_image_grid,
            "image_token_pooling": model.image_token_pooling,
            "max_length": model.max_length,
            "opts": asdict(opts),
            "data": data,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _batches(
    shards_root: str,
    opts: PretrainOptions,
    processor: Any,
    steps: int,
    batch_size: int,
    seed: int,
    text_only: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """Collated (image, answer-without-[SEG]) batches from the mixed train stream.

    ``text_only`` drops the image tokens, never decodes an image, and reads and tokenises each
    distinct shard row once (the plan repeats rows over its epochs).
    """
    from pixellm.data.stream import Plan, fetch_rows, make_plan

    if text_only:
        mixture = opts.text_mixture or {"muse": 2.0, "refer_seg": 1.0}
    else:
        mixture = opts.mixture or {"muse": 2.0, "refer_seg": 1.0, "vqa": 1.0, "sem_seg": 1.0}
    data = DataConfig(shards_root=shards_root, mixture=mixture)
    plan = make_plan(data, "train", steps * batch_size, seed=seed)
    seen: dict[tuple[int, ...], dict[str, Any] | None] = {}  # text_only: row → sample
    pending: list[dict[str, Any]] = []
    for i in range(0, len(plan), 64):
        keys = [tuple(int(v) for v in r) for r in plan.rows[i : i + 64]]
        todo = [k for k in dict.fromkeys(keys) if k not in seen] if text_only else keys
        rows = fetch_rows(Plan(plan.shards, np.asarray(todo, dtype=np.int64).reshape(-1, 3)))
        fetched = [_sample(row, processor, text_only) for row in rows.to_pylist()] if todo else []
        if text_only:
            seen.update(zip(todo, fetched, strict=True))
            fetched = [seen[k] for k in keys]
        for sample in fetched:
            if sample is None:
                continue  # too long for model.max_length: not a pretraining sample
            pending.append(sample)
            if len(pending) == batch_size:
                yield _collate(pending, processor)
                pending = []


def _sample(row: dict[str, Any], processor: Any, text_only: bool) -> dict[str, Any] | None:
    """One shard row → ids, labels (and pixels unless ``text_only``); None if too long."""
    conv = [
        {"role": t["role"], "text": " ".join(t["text"].replace("[SEG]", "").split())}
        for t in row["conversation"]
    ]
    try:
        enc = processor.encode_conversation(conv)
    except ValueError:
        return None
    if text_only:
        keep = [k for k, t in enumerate(enc.input_ids) if t != processor.image_token_id]
        return {"ids": [enc.input_ids[k] for k in keep], "labels": [enc.labels[k] for k in keep]}
    with Image.open(io.BytesIO(row["image"])) as im:
        pixels, _ = processor.transform_image(im)
    return {"ids": enc.input_ids, "labels": enc.labels, "pixels": pixels}


def _collate(rows: list[dict[str, Any]], processor: Any) -> dict[str, torch.Tensor]:
    pad = processor.tokenizer.pad_token_id
    batch = {
        "input_ids": processor.pad([r["ids"] for r in rows], pad),  # (B, T)
        "labels": processor.pad([r["labels"] for r in rows], -100),  # (B, T)
        "attention_mask": processor.pad([[1] * len(r["ids"]) for r in rows], 0),  # (B, T)
    }
    if "pixels" in rows[0]:
        batch["pixel_values"] = torch.stack([r["pixels"] for r in rows])  # (B, 3, S, S)
    return batch


def _answer_loss(llava: Any, embeds: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token CE of the answer tokens (``batch["labels"]``) given input embeddings ``(B, T, H)``."""
    hidden = llava.model.language_model(
        inputs_embeds=embeds, attention_mask=batch["attention_mask"]
    ).last_hidden_state
    logits = llava.lm_head(hidden[:, :-1]).float()  # (B, T-1, V)
    return F.cross_entropy(
        logits.flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100
    )


def _text_lm_loss(llava: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token CE of the answers from the LLM alone (no image tokens)."""
    return _answer_loss(llava, llava.get_input_embeddings()(batch["input_ids"]), batch)


def _lm_loss(llava: Any, cfg: ModelConfig, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token CE of the answers, the image fed exactly as PixelLM feeds it (with gradients)."""
    vision = llava.model.vision_tower
    out = vision(batch["pixel_values"], output_hidden_states=True, interpolate_pos_encoding=True)
    hs = out.hidden_states[cfg.feature_layers[0]][:, 1:]  # (B, g*g, Cv), CLS dropped
    b, n, c = hs.shape
    g = int(math.isqrt(n))
    pooled = pool_image_tokens(hs.reshape(b, g, g, c), cfg.llm_image_grid, cfg.image_token_pooling)
    image_embeds = llava.model.multi_modal_projector(pooled)  # (B, G*G, H)
    ids = batch["input_ids"]
    embeds = llava.get_input_embeddings()(ids)  # (B, T, H)
    is_image = ids == llava.config.image_token_id
    embeds = embeds.masked_scatter(is_image[..., None], image_embeds.to(embeds.dtype))
    return _answer_loss(llava, embeds, batch)


def _fit(
    llava: Any,
    batches: Iterator[dict[str, torch.Tensor]],
    loss_fn: Any,
    opts: PretrainOptions,
    steps: int,
    batch_size: int,
    name: str,
    log: Any,
) -> list[float]:
    """AdamW with linear warm-up and decay to 10% over ``steps``; returns the per-step losses.

    The vision tower gets ``opts.vision_lr_scale`` of the rate and ``opts.vision_weight_decay``
    (it has gradients only in the image phase); the projector and the LLM get ``opts.lr``, no decay.
    """
    named = list(llava.named_parameters())
    vision = [p for n, p in named if ".vision_tower." in f".{n}"]
    rest = [p for n, p in named if ".vision_tower." not in f".{n}"]
    groups = [
        {
            "params": vision,
            "lr": opts.lr * opts.vision_lr_scale,
            "weight_decay": opts.vision_weight_decay,
        },
        {"params": rest, "lr": opts.lr, "weight_decay": 0.0},
    ]
    optim = torch.optim.AdamW(groups, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        optim,
        lambda s: min(1.0, (s + 1) / max(1, opts.warmup_steps)) * max(0.1, 1 - s / max(1, steps)),
    )
    t0 = time.perf_counter()
    losses: list[float] = []
    every = max(opts.log_every, steps // 10)
    for step, batch in enumerate(batches, 1):
        loss = loss_fn(batch)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(llava.parameters(), 1.0)
        optim.step()
        sched.step()
        losses.append(float(loss.detach()))
        if step % every == 0 or step == steps:
            elapsed = time.perf_counter() - t0
            recent = sum(losses[-every:]) / len(losses[-every:])
            log(
                f"    {name} step {step}/{steps} loss_lm={recent:.4f} "
                f"samples/s={step * batch_size / elapsed:.1f} "
                f"ETA {elapsed / step * (steps - step):.0f}s"
            )
    return losses


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def pretrain_tiny(
    model: ModelConfig,
    shards_root: str | Path,
    out: str | Path,
    opts: PretrainOptions | None = None,
    log: Any = print,
    data_key: str | None = None,
) -> Path:
    """Pretrain the tiny LLaVA of ``model.tiny`` on ``shards_root`` and save it to ``out``.

    Reuses ``out`` when its ``pretrain.json`` holds the same ``pretrain_key``.

    Returns:
        ``out``: a local llava-hf directory for ``model.base: llava`` + ``model.weights_path``.
    """
    from pixellm.model.backbone import build_llava
    from pixellm.model.codebook import SegCodebook
    from pixellm.model.processing import PixelLMProcessor
    from pixellm.model.tokenizer import build_tiny_tokenizer

    opts = opts or PretrainOptions()
    out = Path(out)
    tiny = model.model_copy(update={"base": "tiny", "weights_path": None})
    key = pretrain_key(tiny, shards_root, opts, data_key)
    info_path = out / INFO_NAME
    if info_path.is_file() and json.loads(info_path.read_text()).get("key") == key:
        log(f"    reusing pretrained tiny LLaVA {out} (inputs unchanged, key {key})")
        return out
    base_tok = build_tiny_tokenizer(tiny.tiny.vocab_size)  # what is saved: no codebook tokens
    proc_tok = build_tiny_tokenizer(tiny.tiny.vocab_size)  # same ids + codebook (never emitted)
    SegCodebook.add_to(proc_tok, tiny.num_scales, tiny.tokens_per_group)
    processor = PixelLMProcessor(
        proc_tok,
        SegCodebook(proc_tok, tiny.num_scales, tiny.tokens_per_group),
        tiny.image_size,
        tiny.llm_image_grid**2,
        tiny.max_length,
        tiny.system_prompt,
    )
    torch.manual_seed(opts.seed)
    llava = build_llava(tiny, base_tok).train()
    t0 = time.perf_counter()
    text_losses: list[float] = []
    if opts.text_steps:
        text = _batches(
            str(shards_root),
            opts,
            processor,
            opts.text_steps,
            opts.text_batch_size,
            opts.seed + 1,
            text_only=True,
        )
        text_losses = _fit(
            llava,
            text,
            lambda b: _text_lm_loss(llava, b),
            opts,
            opts.text_steps,
            opts.text_batch_size,
            "pretrain text",
            log,
        )
    images = _batches(str(shards_root), opts, processor, opts.steps, opts.batch_size, opts.seed)
    losses = _fit(
        llava,
        images,
        lambda b: _lm_loss(llava, tiny, b),
        opts,
        opts.steps,
        opts.batch_size,
        "pretrain",
        log,
    )
    step = len(losses)
    if not losses:
        raise RuntimeError(f"pretraining found no usable train rows under {shards_root}")
    out.mkdir(parents=True, exist_ok=True)
    llava.eval().save_pretrained(out)
    base_tok.save_pretrained(out)
    first = sum(losses[:25]) / len(losses[:25])
    last = sum(losses[-25:]) / len(losses[-25:])
    info = {
        "key": key,
        "steps": step,
        "loss_lm_first": first,
        "loss_lm_last": last,
        "text_steps": len(text_losses),
        "text_loss_lm_first": _mean(text_losses[:25]),
        "text_loss_lm_last": _mean(text_losses[-25:]),
        "seconds": round(time.perf_counter() - t0, 1),
        "options": asdict(opts),
    }
    info_path.write_text(json.dumps(info, indent=2))
    log(f"    saved pretrained tiny LLaVA to {out} (loss_lm {first:.3f} → {last:.3f})")
    return out
