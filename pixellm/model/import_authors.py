"""Import the authors' released PixelLM-7B/13B checkpoints as a model directory of ours.

``pixellm import-authors --checkpoint DIR --clip DIR --out DIR`` reads their merged checkpoint
(sharded ``.bin`` through ``torch.load(weights_only=True)``, or safetensors) and a local CLIP
ViT-L/14-336, checks everything before writing anything, then writes:

    1. a staging HF llava directory (removed at the end): their LLaMA (+1 ``<image>`` row), the
       CLIP tower (position table rebuilt at 448 px the way their code does), the tokenizer;
    2. our ``PixelLM`` built from it with ``model.compat.preset: authors-release``, their
       projector and decoder weights loaded, written by ``PixelLM.save_pretrained``: a
       self-contained model directory (``pixellm_config.json``, ``model.safetensors``,
       ``tokenizer/``) like every export of ours.

Every checkpoint key is mapped (``_map_key``) or on ``DROPPED`` (unused by their inference);
anything else is an error naming the key. ``model.base: imported`` with ``weights_path: OUT``
fine-tunes from the result (``build_from_import``).
"""

from __future__ import annotations

import json
import re
import struct
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from pixellm.config import DecoderConfig, ModelConfig

__all__ = [
    "DROPPED",
    "ImportError_",
    "authors_position_table",
    "build_from_import",
    "import_authors",
    "resolve_imported",
]

IMAGE_SIDE = 448  # their resize_vision_tower_size
FEATURE_LAYERS = [-2, -11]  # mm_vision_select_layer and their hard-coded second level
LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

# Keys their inference never reads (authors-checkpoint-facts.md): IoU head, hypernetworks 1-3,
# SAM prompt-encoder parts other than the no-mask embedding and the PE, rotary caches.
DROPPED = [
    r"model\.mask_decoder\.iou_prediction_head\..+",
    r"model\.mask_decoder\.output_hypernetworks_mlps\.[1-9]\d*\..+",
    r"model\.prompt_encoder\.(point_embeddings|not_a_point_embed|mask_downscaling)\..+",
    r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",
]

_TWO_WAY = {
    "cross_attn_token_to_image": "token_to_image",
    "cross_attn_image_to_token": "image_to_token",
    "mlp.lin1": "mlp.layers.0",
    "mlp.lin2": "mlp.layers.2",
    "norm1": "norms.0",
    "norm2": "norms.1",
    "norm3": "norms.2",
    "norm4": "norms.3",
    "self_attn": "self_attn",
}
_DECODER = [  # (their regex, our pixel_decoder name template)
    (r"model\.out_mm_projector\.(0|2)\.(weight|bias)", "vision_projection.layers.{0}.{1}"),
    (r"model\.text_hidden_fcs\.0\.(0|2)\.(weight|bias)", "text_projection.layers.{0}.{1}"),
    (r"model\.image_feature_neck\.([0-3])\.(weight|bias)", "neck.{0}.{1}"),
    (r"model\.prompt_encoder\.pe_layer\.positional_encoding_gaussian_matrix", "position.gaussian"),
    (r"model\.prompt_encoder\.no_mask_embed\.weight", "no_mask_embed"),
    (r"model\.mask_decoder\.iou_token\.weight", "iou_token"),
    (r"model\.mask_decoder\.mask_tokens\.weight", "mask_tokens"),
    (r"model\.mask_decoder\.level_embed\.weight", "level_embed"),
    (r"model\.mask_decoder\.pe1\.positional_encoding_gaussian_matrix", "position_up.gaussian"),
    (r"model\.mask_decoder\.output_upscaling\.([01])\.(weight|bias)", "upscale.{0}.{1}"),
    (r"model\.mask_decoder\.upsample_2x\.([01])\.(weight|bias)", "upsample_features.{0}.{1}"),
    (
        r"model\.mask_decoder\.output_hypernetworks_mlps\.0\.layers\.([0-2])\.(weight|bias)",
        "hyper.layers.{2x}.{1}",
    ),
    (
        r"model\.mask_decoder\.transformer\.(\d+)\.final_attn_token_to_image\.(.+)",
        "transformers.{0}.final_attn.{1}",
    ),
    (
        r"model\.mask_decoder\.transformer\.(\d+)\.norm_final_attn\.(weight|bias)",
        "transformers.{0}.final_norm.{1}",
    ),
    (
        r"model\.mask_decoder\.transformer\.(\d+)\.layers\.(\d+)\.("
        + "|".join(re.escape(k) for k in _TWO_WAY)
        + r")\.(.+)",
        "transformers.{0}.layers.{1}.{2t}.{3}",
    ),
]


class ImportError_(ValueError):  # noqa: N801 - "ImportError" is a builtin
    """The checkpoint or CLIP directory cannot be imported; the message names the file or key."""


@dataclass
class _Tensor:
    shape: tuple[int, ...]
    shard: Path


# ------------------------------------------------------------------------------- reading files
def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ImportError_(f"{path} missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ImportError_(f"{path}: not valid JSON ({err})") from None


def _check_intact(shard: Path) -> None:
    """Fail on a truncated shard before loading anything (zip directory / safetensors header)."""
    if not shard.is_file():
        raise ImportError_(f"shard {shard} missing (listed by the checkpoint index)")
    if shard.suffix == ".safetensors":
        size = shard.stat().st_size
        with shard.open("rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else size
            if 8 + n > size:
                raise ImportError_(f"shard {shard} is truncated (header of {n} bytes, file {size})")
            header = json.loads(f.read(n))
        end = max(
            (v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0
        )
        if 8 + n + end > size:
            raise ImportError_(f"shard {shard} is truncated ({size} bytes, needs {8 + n + end})")
        return
    try:
        with zipfile.ZipFile(shard) as z:
            bad = z.testzip()
    except zipfile.BadZipFile as err:
        raise ImportError_(
            f"shard {shard} is truncated or not a torch checkpoint ({err})"
        ) from None
    if bad is not None:
        raise ImportError_(f"shard {shard}: entry {bad} is corrupt")


def _shards(checkpoint: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (checkpoint / index_name).is_file():
            index = _read_json(checkpoint / index_name)
            names = sorted(set(index.get("weight_map", {}).values()))
            if not names:
                raise ImportError_(f"{checkpoint / index_name}: empty weight_map")
            return [checkpoint / n for n in names]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (checkpoint / single).is_file():
            return [checkpoint / single]
    raise ImportError_(
        f"{checkpoint}: no pytorch_model*.bin / model*.safetensors (with index) found; "
        "point --checkpoint at the merged PixelLM directory"
    )


def _load_shard(shard: Path) -> dict[str, torch.Tensor]:
    if shard.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(shard))
    return torch.load(shard, map_location="cpu", weights_only=True, mmap=True)


def _inventory(shards: list[Path]) -> dict[str, _Tensor]:
    out: dict[str, _Tensor] = {}
    for shard in shards:
        for k, v in _load_shard(shard).items():
            out[k] = _Tensor(tuple(v.shape), shard)
    return out


# ------------------------------------------------------------------------------- key mapping
def _map_key(key: str) -> tuple[str, str] | None:
    """Their key -> ``(part, our name)`` with part ``llm`` (HF llava), ``projector`` or ``decoder``;
    None when the key is on ``DROPPED``.

    Raises:
        ImportError_: a key that is neither mapped nor dropped.
    """
    if any(re.fullmatch(p, key) for p in DROPPED):
        return None
    m = re.fullmatch(r"model\.(embed_tokens\.weight|norm\.weight|layers\.\d+\..+)", key)
    if m:
        return "llm", f"model.language_model.{m.group(1)}"
    if key == "lm_head.weight":
        return "llm", key
    m = re.fullmatch(r"model\.mm_projector\.(0|2)\.(weight|bias)", key)
    if m:
        return "projector", f"linear_{1 if m.group(1) == '0' else 2}.{m.group(2)}"
    for pattern, template in _DECODER:
        m = re.fullmatch(pattern, key)
        if m:
            g = m.groups()
            name = template
            name = name.replace("{2x}", str(2 * int(g[0])) if "{2x}" in name else "")
            name = name.replace("{2t}", _TWO_WAY.get(g[2], "") if len(g) > 2 else "")
            return "decoder", name.format(*g)
    raise ImportError_(
        f"checkpoint key {key!r} is neither mapped nor on the drop list: not a released PixelLM "
        "checkpoint, or a variant this importer does not know (see pixellm/model/import_authors.py)"
    )


# ------------------------------------------------------------------------------- validation
@dataclass
class _Plan:
    config: dict
    clip_config: dict
    clip_weights: Path
    shards: list[Path]
    keys: dict[str, _Tensor]
    tokenizer: object
    model_cfg: ModelConfig


def _clip_vision_config(clip: Path) -> tuple[dict, Path]:
    cfg = _read_json(clip / "config.json")
    vision = cfg.get("vision_config", cfg) if cfg.get("model_type") == "clip" else cfg
    if vision.get("model_type", "clip_vision_model") not in ("clip_vision_model", "clip"):
        raise ImportError_(
            f"{clip / 'config.json'}: model_type {vision.get('model_type')!r} is not CLIP"
        )
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (clip / name).is_file():
            _check_intact(clip / name)
            return vision, clip / name
    raise ImportError_(
        f"{clip}: no model.safetensors or pytorch_model.bin (download CLIP ViT-L/14-336 there)"
    )


def _expect(errors: list[str], what: str, seen: object, want: object) -> None:
    if seen != want:
        errors.append(f"{what}: {seen} != expected {want}")


def _plan(checkpoint: Path, clip: Path) -> _Plan:
    """Read and check everything; nothing is written. Collects every problem, raises once."""
    from transformers import AutoTokenizer

    if not checkpoint.is_dir():
        raise ImportError_(f"--checkpoint {checkpoint} is not a directory")
    if not clip.is_dir():
        raise ImportError_(f"--clip {clip} is not a directory (a local CLIP ViT-L/14-336)")
    config = _read_json(checkpoint / "config.json")  # their LlamaConfig subclass: plain JSON
    need = (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "vocab_size",
    )
    missing = [k for k in need if k not in config]
    if missing:
        raise ImportError_(
            f"{checkpoint / 'config.json'}: missing {missing}; not a PixelLM checkpoint"
        )
    clip_cfg, clip_weights = _clip_vision_config(clip)
    shards = _shards(checkpoint)
    for shard in shards:
        _check_intact(shard)
    keys = _inventory(shards)
    for k in keys:
        _map_key(k)  # raises on an unknown key
    h, vocab = config["hidden_size"], config["vocab_size"]
    errors: list[str] = []
    want = {
        "model.embed_tokens.weight": (vocab, h),
        "lm_head.weight": (vocab, h),
        "model.layers.0.self_attn.q_proj.weight": (h, h),
        "model.layers.0.mlp.gate_proj.weight": (config["intermediate_size"], h),
        "model.mm_projector.0.weight": (2 * h, clip_cfg.get("hidden_size")),
        "model.mm_projector.2.weight": (h, 2 * h),
        "model.out_mm_projector.0.weight": (2 * h, clip_cfg.get("hidden_size")),
        "model.text_hidden_fcs.0.0.weight": (h, h),
        "model.mask_decoder.level_embed.weight": (2, None),
    }
    for k, shape in want.items():
        if k not in keys:
            errors.append(f"key {k} missing from the checkpoint")
        elif any(w is not None and s != w for s, w in zip(keys[k].shape, shape, strict=True)):
            errors.append(
                f"key {k}: shape {keys[k].shape} != expected {shape} (config.json / CLIP)"
            )
    layers = {int(m.group(1)) for k in keys if (m := re.match(r"model\.layers\.(\d+)\.", k))}
    _expect(errors, "LLaMA layers in the checkpoint", len(layers), config["num_hidden_layers"])
    patch, side = clip_cfg.get("patch_size", 0), clip_cfg.get("image_size", 0)
    if not patch or IMAGE_SIDE % patch or side % patch:
        errors.append(
            f"{clip}: CLIP patch_size {patch} / image_size {side} cannot run at {IMAGE_SIDE} px"
        )
    if clip_cfg.get("num_hidden_layers", 0) < -min(FEATURE_LAYERS):
        errors.append(f"{clip}: CLIP has {clip_cfg.get('num_hidden_layers')} layers, needs >= 11")
    tok = None
    try:
        tok = AutoTokenizer.from_pretrained(str(checkpoint), local_files_only=True)
    except Exception as err:  # noqa: BLE001 - any tokenizer failure is reported with the path
        errors.append(f"{checkpoint}: cannot load the tokenizer ({type(err).__name__}: {err})")
    seg = []
    if tok is not None:
        vocab_tok = tok.get_vocab()
        seg = sorted(t for t in vocab_tok if re.fullmatch(r"\[SEG\d+\]", t))
        _expect(errors, "tokenizer size", len(tok), vocab)
        for t in ("<im_start>", "<im_end>"):
            if t not in vocab_tok:
                errors.append(f"tokenizer lacks {t}")
        if len(seg) != 6:
            errors.append(f"tokenizer codebook tokens {seg}: expected [SEG0] … [SEG5]")
    if errors:
        raise ImportError_(f"{checkpoint}: cannot import:\n  - " + "\n  - ".join(errors))
    dim = keys["model.mask_decoder.iou_token.weight"].shape[1]
    depth = len(
        {k.split(".")[5] for k in keys if k.startswith("model.mask_decoder.transformer.0.layers.")}
    )
    cross = keys[
        "model.mask_decoder.transformer.0.layers.0.cross_attn_token_to_image.q_proj.weight"
    ]
    model_cfg = ModelConfig(
        base="llava",
        weights_path=str(checkpoint),  # provenance only: the export is self-contained
        image_size=IMAGE_SIDE,
        feature_layers=FEATURE_LAYERS,
        llm_image_grid=16,
        tokens_per_group=len(seg) // 2,
        max_length=config.get("max_position_embeddings", 2048),
        system_prompt=LLAVA_V1_SYSTEM,
        decoder=DecoderConfig(
            dim=dim,
            depth=depth,
            heads=8,  # hard-coded in their code (not recoverable from the weights)
            mlp_dim=keys["model.mask_decoder.transformer.0.layers.0.mlp.lin1.weight"].shape[0],
            attention_downsample=dim // cross.shape[0],
        ),
        compat={"preset": "authors-release"},
    )
    return _Plan(config, clip_cfg, clip_weights, shards, keys, tok, model_cfg)


# ------------------------------------------------------------------------------- writing
def authors_position_table(table: torch.Tensor, side: int, patch: int) -> torch.Tensor:
    """Their 448-px CLIP position table (reproduced exactly, including the one-row shift).

    Their code treats rows ``[:-1]`` (CLS + the first g²-1 patch rows) as the native g x g grid,
    resizes it bilinearly to the new grid and appends the native table's last row.

    Args:
        table: ``(1 + g0², Cv)`` native table; side: new image side; patch: patch size.

    Returns:
        ``(1 + g², Cv)`` with ``g = side / patch``.
    """
    g0 = int((table.shape[0] - 1) ** 0.5)
    g = side // patch
    grid = table[:-1].T.reshape(1, -1, g0, g0).float()  # (1, Cv, g0, g0)
    new = F.interpolate(grid, size=(g, g), mode="bilinear", align_corners=False)[0]
    return torch.cat([new.flatten(1).T, table[-1:].float()]).to(table.dtype)  # (1 + g², Cv)


def _llava_config(plan: _Plan, image_token_id: int, vocab: int):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    c = plan.config
    vision = {k: v for k, v in plan.clip_config.items() if k not in ("model_type", "architectures")}
    vision["image_size"] = IMAGE_SIDE
    text = LlamaConfig(
        vocab_size=vocab,
        hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"],
        num_hidden_layers=c["num_hidden_layers"],
        num_attention_heads=c["num_attention_heads"],
        num_key_value_heads=c.get("num_key_value_heads", c["num_attention_heads"]),
        max_position_embeddings=c.get("max_position_embeddings", 2048),
        rms_norm_eps=c.get("rms_norm_eps", 1e-6),
        bos_token_id=c.get("bos_token_id", 1),
        eos_token_id=c.get("eos_token_id", 2),
        pad_token_id=c.get("pad_token_id", 0),
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=CLIPVisionConfig(**vision),
        text_config=text,
        image_token_id=image_token_id,
        projector_hidden_act="gelu",
        vision_feature_layer=FEATURE_LAYERS[0],
        tie_word_embeddings=False,
    )


def _llm_tensors(plan: _Plan) -> Iterator[tuple[str, torch.Tensor]]:
    """HF llava tensors, one of their shards at a time, plus the CLIP tower."""
    for shard in plan.shards:
        for k, v in _load_shard(shard).items():
            mapped = _map_key(k)
            if mapped is None or mapped[0] != "llm":
                continue
            if k in ("model.embed_tokens.weight", "lm_head.weight"):
                # one row for our <image> placeholder: never generated (compat.suppress_tokens),
                # its embedding always replaced by image features
                extra = v.float().mean(0, keepdim=True) if "embed" in k else torch.zeros_like(v[:1])
                v = torch.cat([v, extra.to(v.dtype)])
            yield mapped[1], v
    clip = _load_shard(plan.clip_weights)
    patch = plan.clip_config["patch_size"]
    for k, v in clip.items():
        if not k.startswith("vision_model.") or k.endswith("position_ids"):
            continue  # a full CLIPModel also holds the text tower
        if k.endswith("position_embedding.weight"):
            v = authors_position_table(v, IMAGE_SIDE, patch)
        yield f"model.vision_tower.{k}", v


def _write_llava(plan: _Plan, out: Path, shard_bytes: int = 4 << 30) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    tok = plan.tokenizer
    tok.add_special_tokens(
        {"additional_special_tokens": ["<image>"]}, replace_extra_special_tokens=False
    )
    if tok.pad_token_id is None:
        tok.pad_token = tok.unk_token
    _llava_config(plan, tok.convert_tokens_to_ids("<image>"), len(tok)).save_pretrained(out)
    tok.save_pretrained(out)
    weight_map, part, size, n = {}, {}, 0, 0

    def flush() -> None:
        nonlocal part, size, n
        if part:
            n += 1
            name = f"model-{n:05d}.safetensors"
            save_file(
                {k: t.contiguous() for k, t in part.items()}, str(out / name), {"format": "pt"}
            )
            weight_map.update({k: name for k in part})
            part, size = {}, 0

    for k, v in _llm_tensors(plan):
        part[k] = v
        size += v.numel() * v.element_size()
        if size >= shard_bytes:
            flush()
    flush()
    index = {"metadata": {}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _pixellm_parts(plan: _Plan) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    projector, decoder = {}, {}
    for shard in plan.shards:
        for k, v in _load_shard(shard).items():
            mapped = _map_key(k)
            if mapped is None or mapped[0] == "llm":
                continue
            target = projector if mapped[0] == "projector" else decoder
            if mapped[1] in ("no_mask_embed", "iou_token", "mask_tokens", "level_embed"):
                v = v.reshape(-1, v.shape[-1])
            target[mapped[1]] = v.float()
    return projector, decoder


def import_authors(checkpoint: str | Path, clip: str | Path, out: str | Path) -> Path:
    """Import a released PixelLM checkpoint; see the module docstring.

    Raises:
        ImportError_: a missing or truncated file, an unknown key, a shape that does not match
            the config or the CLIP, a wrong tokenizer (all checked before anything is written).
        FileExistsError: ``out`` exists and is not empty.
    """
    import shutil
    import tempfile

    from pixellm.model.pixellm import PixelLM, build_pixellm

    checkpoint, clip, out = Path(checkpoint), Path(clip), Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"--out {out} exists and is not empty")
    plan = _plan(checkpoint, clip)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".import-llava-", dir=out.parent))
    try:
        _write_llava(plan, staging)
        cfg = plan.model_cfg.model_copy(update={"weights_path": str(staging)})
        model: PixelLM = build_pixellm(cfg)
        projector, decoder = _pixellm_parts(plan)
        model.llava.model.multi_modal_projector.load_state_dict(projector, strict=True)
        model.pixel_decoder.load_state_dict(decoder, strict=True)
        # weights_path is provenance only in a self-contained export
        model.config = plan.model_cfg.model_copy(update={"weights_path": str(checkpoint)})
        model.save_pretrained(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _import_dir(cfg: ModelConfig) -> tuple[Path, dict]:
    from pixellm.model.pixellm import CONFIG_NAME, WEIGHTS_NAME

    root = Path(cfg.weights_path or "")
    if not (root / CONFIG_NAME).is_file() or not (root / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(
            f"model.weights_path={cfg.weights_path!r} is not a `pixellm import-authors` directory "
            f"({CONFIG_NAME} or {WEIGHTS_NAME} missing)"
        )
    return root, json.loads((root / CONFIG_NAME).read_text())


def resolve_imported(cfg: ModelConfig) -> ModelConfig:
    """``model.base: imported`` -> the import's own model config, ready to build.

    The architecture (sizes, feature layers, decoder, ``compat``, system prompt) comes from the
    import; ``lora``, ``loss``, ``max_length`` and ``gradient_checkpointing`` from ``cfg``.

    Raises:
        FileNotFoundError: ``cfg.weights_path`` is not an import directory.
    """
    _, meta = _import_dir(cfg)
    imported = ModelConfig.model_validate(meta["model"])
    keep = ("lora", "loss", "max_length", "gradient_checkpointing")
    return imported.model_copy(update={k: getattr(cfg, k) for k in keep})


def imported_processor(cfg: ModelConfig):
    """The processor of an import (its tokenizer, its image transform and prompt format)."""
    from transformers import AutoTokenizer

    from pixellm.model.pixellm import TOKENIZER_DIR
    from pixellm.model.processing import build_processor

    root, _ = _import_dir(cfg)
    tok = AutoTokenizer.from_pretrained(root / TOKENIZER_DIR, local_files_only=True)
    return build_processor(resolve_imported(cfg), tokenizer=tok)


def build_from_import(cfg: ModelConfig):
    """``model.base: imported``: our model from an import directory, ready to fine-tune.

    Every tensor of the import is loaded except its (zero-effect) LoRA, which is replaced by a
    fresh one of ``cfg.lora``; the trainable set is the usual one. The model's config is the
    resolved one, so its exports are ordinary self-contained model directories.

    Raises:
        FileNotFoundError: ``cfg.weights_path`` is not an import directory.
        RuntimeError: the import's weights do not fit the model.
    """
    from safetensors.torch import load_file
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from pixellm.model.pixellm import WEIGHTS_NAME, build_pixellm

    root, meta = _import_dir(cfg)
    processor = imported_processor(cfg)
    # built for real (not on meta): the fresh LoRA of cfg.lora must be initialised normally
    llava = LlavaForConditionalGeneration(LlavaConfig.from_dict(meta["llava_config"])).float()
    model = build_pixellm(resolve_imported(cfg), processor=processor, llava=llava)
    # LoRA-wrapped layers keep their weight under ".base_layer": map between the import's and
    # this model's LoRA targets by the name without it
    names = {k.replace(".base_layer", ""): k for k in model.state_dict()}
    state = {
        names.get(k.replace(".base_layer", ""), k): v
        for k, v in load_file(str(root / WEIGHTS_NAME)).items()
        if ".lora_" not in k
    }
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if ".lora_" not in k]
    if missing or unexpected:
        raise RuntimeError(
            f"{root / WEIGHTS_NAME}: missing tensors {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model
