"""Typed, validated configuration for every part of the platform.

A *recipe* (``platform/recipes/*.yaml``) is one YAML document with the sections ``model``, ``data``,
``train``, ``mlflow`` and ``serve``. Every field has a default that works on a laptop CPU; the 7B/13B
recipes change only what must change. Unknown keys and impossible values fail before any work
starts, with a message that names the key (``load_recipe`` collects every problem and raises once).

Overrides use dotted keys, ``--set train.lr=1e-4 data.mixture.muse=8``; the value is parsed as YAML.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = [
    "CompatConfig",
    "ConfigError",
    "DataConfig",
    "DecoderConfig",
    "LoraConfig",
    "LossConfig",
    "MlflowConfig",
    "ModelConfig",
    "Recipe",
    "ServeConfig",
    "TinyBackboneConfig",
    "TrainConfig",
    "answer_token_budget",
    "apply_overrides",
    "load_recipe",
    "recipe_hash",
    "target_tokens",
]


class ConfigError(ValueError):
    """A recipe or override that cannot be used; the message names every bad key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class TinyBackboneConfig(_Strict):
    """Sizes of the LLaVA built from config when ``model.base == "tiny"`` (no weights, CPU-sized)."""

    vision_hidden_size: int = Field(64, gt=0)  # CLIP width; larger = slower, richer frozen features
    vision_layers: int = Field(4, gt=0)
    vision_heads: int = Field(4, gt=0)
    patch_size: int = Field(8, gt=0)  # 224 px / 8 = 28x28 patch grid
    text_hidden_size: int = Field(64, gt=0)
    text_layers: int = Field(2, gt=0)
    text_heads: int = Field(4, gt=0)
    text_intermediate_size: int = Field(128, gt=0)
    vocab_size: int = Field(1024, ge=300)  # byte-level BPE trained offline on the corpus vocabulary
    seed: int = 0  # random init of the frozen tiny backbone


class DecoderConfig(_Strict):
    """Pixel decoder D (paper eq. 1): one two-way attention block per scale."""

    dim: int = Field(256, gt=0)
    depth: int = Field(2, gt=0)
    heads: int = Field(8, gt=0)
    mlp_dim: int = Field(2048, gt=0)
    attention_downsample: int = Field(2, ge=1)

    @model_validator(mode="after")
    def _heads_divide(self) -> DecoderConfig:
        if self.dim % self.heads or (self.dim // self.attention_downsample) % self.heads:
            raise ValueError(
                f"decoder.dim={self.dim} (and dim/attention_downsample) must be divisible by "
                f"decoder.heads={self.heads}"
            )
        return self


class LoraConfig(_Strict):
    """LoRA on the LLM (peft). Higher r = more capacity and memory."""

    r: int = Field(8, gt=0)
    alpha: int = Field(16, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1)


class LossConfig(_Strict):
    """L = L_txt + lambda_ref * L_ref + lambda_dice * L_dice (paper section 3.2)."""

    lambda_txt: float = Field(1.0, ge=0.0)
    lambda_ref: float = Field(2.0, ge=0.0)
    lambda_dice: float = Field(0.5, ge=0.0)
    alpha: float = Field(2.0, ge=1.0)  # weight of pixels where >=2 predicted masks are positive
    lambda_score: float = Field(1.0, ge=0.0)  # MSE of the predicted mask IoU (score head)
    # Not in the paper: InfoNCE between each target token h and the decoder features under its
    # mask (losses.alignment_loss). 0 = the paper's loss. A small LLM trained briefly needs it: its
    # target tokens barely differ, and the decoder settles on one class-agnostic mask (measured).
    lambda_align: float = Field(0.0, ge=0.0)
    tau_align: float = Field(0.1, gt=0.0)  # temperature of the alignment's cosine similarities


_AUTHORS_RELEASE: dict[str, Any] = {
    "normalization": "imagenet",
    "resize_rounding": "half_up",
    "mask_padded_patches": True,
    "mask_padded_image_tokens": True,
    "projector_hidden_factor": 2,
    "image_wrap_tokens": True,
    "split_added_tokens": True,
    "codebook_tokens": "authors",
    "state_offset": -1,
    "decoder": "authors-release",
    "max_new_tokens": 512,
    "suppress_tokens": ["<image>"],
    "broken_run": "drop_all",
}


class CompatConfig(_Strict):
    """Behaviours where the authors' released PixelLM departs from the paper (default: the paper).

    ``preset: authors-release`` fills every field not given explicitly with the value that
    reproduces the released checkpoints (``pixellm import-authors`` writes it); ``preset: paper``
    keeps our paper-faithful defaults. Each field is one behaviour, see
    ``/work/shared/reference/authors-checkpoint-facts.md``.
    """

    preset: Literal["paper", "authors-release"] = "paper"
    normalization: Literal["clip", "imagenet"] = "clip"  # CLIP mean/std vs ImageNet 0-255 scale
    resize_rounding: Literal["round", "half_up"] = "round"  # round() vs int(x + 0.5)
    mask_padded_patches: bool = False  # padded CLIP patches masked as attention keys in the ViT
    mask_padded_image_tokens: bool = False  # padded LLM image tokens masked, positions contiguous
    projector_hidden_factor: int = Field(1, ge=1)  # p_V→T and p_V→D hidden width = factor x H
    image_wrap_tokens: bool = False  # <im_start> <image>… <im_end> around the image tokens
    # the release's slow tokenizer (transformers 4.31): text split at added tokens, whitespace
    # next to them dropped, each piece encoded on its own
    split_added_tokens: bool = False
    codebook_tokens: Literal["ours", "authors"] = "ours"  # <seg_l_n> vs [SEG0]…[SEG{L*N-1}]
    state_offset: Literal[0, -1] = 0  # 0: state at the codebook token; -1: the state predicting it
    decoder: Literal["paper", "authors-release"] = "paper"  # pixellm/model/compat_decoder.py
    max_new_tokens: int | None = Field(None, gt=0)  # fixed generation budget (None: the caller's)
    suppress_tokens: list[str] = Field(default_factory=list)  # never generated
    broken_run: Literal["drop_run", "drop_all"] = "drop_run"  # drop_all: codebook tokens not a
    # multiple of L*N drop every mask of that answer (release); drop_run: only the broken run

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") == "authors-release":
            return {**_AUTHORS_RELEASE, **data}
        return data


class ModelConfig(_Strict):
    """PixelLM architecture. ``feature_layers`` fixes L; ``tokens_per_group`` is N."""

    base: Literal["tiny", "llava", "imported"] = "tiny"
    # llava: a local HF llava directory; imported: a ``pixellm import-authors`` output directory
    weights_path: str | None = None
    image_size: int = Field(224, ge=32)  # 448 for the real models (CLIP pos-emb interpolated)
    feature_layers: list[int] = Field(default_factory=lambda: [-1, -3], min_length=1)
    llm_image_grid: int = Field(7, gt=0)  # deepest layer pooled to grid x grid image tokens
    # how the g x g CLIP map becomes G x G image tokens: bilinear (LLaVA-style resample, the
    # authors' code) or area (mean of each block). The same at an exact 2x ratio (448: 32 -> 16);
    # at the tiny 28 -> 7, bilinear reads 4 of every 16 patches and area all of them
    image_token_pooling: Literal["bilinear", "area"] = "bilinear"
    tokens_per_group: int = Field(3, gt=0)  # N
    max_length: int = Field(256, ge=32)  # text tokens; a sample that does not fit is rejected
    system_prompt: str = (  # LLaVA v1 system prompt; the tiny recipe drops it (pure overhead there)
        "A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's questions."
    )
    gradient_checkpointing: bool = False
    tiny: TinyBackboneConfig = TinyBackboneConfig()
    decoder: DecoderConfig = DecoderConfig(dim=64, depth=2, heads=4, mlp_dim=256)
    lora: LoraConfig = LoraConfig()
    loss: LossConfig = LossConfig()
    compat: CompatConfig = CompatConfig()

    @property
    def num_scales(self) -> int:
        """L, the number of visual scales and codebook groups."""
        return len(self.feature_layers)

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.base in ("llava", "imported") and not self.weights_path:
            raise ValueError(f"model.weights_path is required when model.base is {self.base!r}")
        if len(set(self.feature_layers)) != len(self.feature_layers):
            raise ValueError(f"model.feature_layers has duplicates: {self.feature_layers}")
        if self.base == "tiny":
            n = self.tiny.vision_layers
            bad = [f for f in self.feature_layers if not -n - 1 <= f <= n]
            if bad:
                raise ValueError(
                    f"model.feature_layers {bad} out of range for tiny.vision_layers={n} "
                    f"(hidden_states has {n + 1} entries)"
                )
            if self.image_size % self.tiny.patch_size:
                raise ValueError(
                    f"model.image_size={self.image_size} must be a multiple of "
                    f"model.tiny.patch_size={self.tiny.patch_size}"
                )
        return self


class DataConfig(_Strict):
    """Where shards live and how corpora are mixed into the training stream."""

    shards_root: str = "runs/quickstart/shards"  # one sub-directory per corpus name
    mixture: dict[str, float] = Field(
        default_factory=lambda: {"sem_seg": 2.0, "refer_seg": 9.0, "vqa": 2.0, "muse": 4.0}
    )
    train_split: str = "train"
    val_split: str = "val"
    mask_max_size: int = Field(128, ge=8)  # ground-truth masks are downsized to this longest side
    max_targets: int = Field(9, ge=1)  # a sample with more targets is rejected by preprocessing
    shuffle_seed: int = 0
    preprocess_cpus: float = Field(0.5, gt=0)  # CPUs per Ray Data preprocessing task
    preprocess_actors: int | None = Field(None, ge=1)  # one pool per run; None = CPUs left / cpus
    prefetch_batches: int = Field(2, ge=0)  # micro-batches prefetched per worker

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        bad = {k: v for k, v in self.mixture.items() if v < 0}
        if bad or not any(v > 0 for v in self.mixture.values()):
            raise ValueError(
                f"data.mixture needs non-negative ratios with one > 0, got {self.mixture}"
            )
        return self


class TrainConfig(_Strict):
    """Optimisation, scale-out, checkpoints. Batch sizes are derived, never written in DS JSON."""

    epochs: int = Field(1, gt=0)
    steps_per_epoch: int = Field(20, gt=0)  # optimizer steps per epoch (fixed: equal on every rank)
    micro_batch_size: int = Field(2, gt=0)  # per worker
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(3e-4, gt=0)
    # per-group peak rates (pixellm.train.optim); null = train.lr
    lr_decoder: float | None = Field(None, gt=0)  # pixel decoder, its projections, p_V→T
    lr_lora: float | None = Field(None, gt=0)
    lr_codebook: float | None = Field(None, gt=0)  # codebook rows of embeddings and lm_head
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)  # schedule floor = ratio × each group's peak
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(5, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    seed: int = 0
    deepspeed_config: str = "platform/deepspeed/zero2.json"  # zero2.json | zero3.json
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto = bf16 on GPU, fp32 on CPU
    num_workers: int = Field(1, gt=0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(0, ge=0)
    checkpoint_every: int = Field(10, gt=0)  # optimizer steps
    keep_checkpoints: int = Field(2, gt=0)
    max_failures: int = Field(1, ge=-1)  # worker failures tolerated (-1 = unlimited)
    storage_path: str = "runs/ray_results"  # shared storage (NFS or cloud URI) on a cluster
    run_name: str = "pixellm-tiny"  # resubmitting with the same name resumes
    export_dir: str | None = None  # default: <storage_path>/<run_name>/model
    log_every: int = Field(1, gt=0)
    sample_log: bool = False  # audit log <storage_path>/<run_name>/samples/rank-<r>.jsonl
    eval_every: int = Field(0, ge=0)  # steps between val/giou evaluations (0 = off)
    eval_samples: int = Field(8, gt=0)  # fixed val subset (data.val_split), sharded across ranks

    @property
    def global_batch_size(self) -> int:
        """Samples per optimizer step across all workers."""
        return self.micro_batch_size * self.grad_accum * self.num_workers

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch


class MlflowConfig(_Strict):
    """Experiment tracking. ``tracking_uri`` null = ``$MLFLOW_TRACKING_URI`` (or MLflow's default)."""

    tracking_uri: str | None = None
    experiment: str = "pixellm"
    registered_model_name: str = "pixellm-tiny"
    enabled: bool = True


class ServeConfig(_Strict):
    """Ray Serve deployment knobs (applied via ``user_config`` / deployment options)."""

    host: str = "127.0.0.1"  # loopback unless configured
    port: int = Field(8000, gt=0, lt=65536)
    max_batch_size: int = Field(8, gt=0)
    batch_wait_timeout_s: float = Field(0.05, ge=0)
    max_ongoing_requests: int = Field(16, gt=0)
    max_queued_requests: int = Field(64, ge=-1)
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, gt=0)
    max_image_pixels: int = Field(4096 * 4096, gt=0)
    max_question_chars: int = Field(2000, gt=0)
    # generation budget per answer; null = derived from data.max_targets and the codebook
    # (``answer_token_budget``) so that no valid answer is cut
    max_new_tokens: int | None = Field(None, gt=0)
    num_cpus: float = Field(1.0, gt=0)  # Ray CPUs per replica (torch threads follow it)
    num_gpus: float = Field(0.0, ge=0)  # Ray GPUs per replica; > 0 puts the model on CUDA
    # Auth token: $PIXELLM_SERVE_TOKEN or the first line of this file (never the config itself).
    bearer_token_file: str | None = None
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto = bf16 on GPU, fp32 on CPU
    retry_after_s: int = Field(1, ge=1)  # Retry-After of a 503 when the replica is full

    @model_validator(mode="before")
    @classmethod
    def _no_inline_token(cls, data: Any) -> Any:
        if isinstance(data, dict) and "bearer_token" in data:
            raise ValueError(
                "serve.bearer_token is not accepted (a token in the config or on the command line "
                "is visible in `ps` and in the deployment config): set $PIXELLM_SERVE_TOKEN or "
                "serve.bearer_token_file"
            )
        return data

    @model_validator(mode="after")
    def _check(self) -> ServeConfig:
        if self.max_queued_requests == 0:
            raise ValueError("serve.max_queued_requests must be -1 (unbounded) or >= 1 (Ray Serve)")
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"serve.min_replicas={self.min_replicas} > serve.max_replicas={self.max_replicas}"
            )
        return self


class Recipe(_Strict):
    """One training/evaluation recipe: everything a run needs."""

    name: str = "tiny"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    mlflow: MlflowConfig = MlflowConfig()
    serve: ServeConfig = ServeConfig()

    @model_validator(mode="before")
    @classmethod
    def _derive_max_new_tokens(cls, data: Any) -> Any:
        """``serve.max_new_tokens: null`` (or absent) → ``answer_token_budget`` of the recipe."""
        if not isinstance(data, dict):
            return data
        serve = data.get("serve") or {}
        if not isinstance(serve, dict) or serve.get("max_new_tokens") is not None:
            return data
        try:  # invalid sections are reported by the main validation, not here
            model = ModelConfig.model_validate(data.get("model") or {})
            max_targets = DataConfig.model_validate(data.get("data") or {}).max_targets
        except (ValidationError, TypeError):
            return data
        budget = answer_token_budget(model, max_targets)
        return {**data, "serve": {**serve, "max_new_tokens": budget}}

    @model_validator(mode="after")
    def _check(self) -> Recipe:
        if self.train.use_gpu and self.train.gpus_per_worker <= 0:
            raise ValueError("train.gpus_per_worker must be > 0 when train.use_gpu is true")
        one_target = target_tokens(self.model) + 1  # one codebook run + EOS
        if self.serve.max_new_tokens is not None and self.serve.max_new_tokens < one_target:
            raise ValueError(
                f"serve.max_new_tokens={self.serve.max_new_tokens} cannot hold one target: a target "
                f"is {target_tokens(self.model)} codebook tokens (L={self.model.num_scales} x "
                f"N={self.model.tokens_per_group}) + EOS = {one_target}; set at least {one_target} "
                f"or null (derived: {answer_token_budget(self.model, self.data.max_targets)})"
            )
        return self


TEXT_TOKENS_PER_TARGET = 10  # "the large magenta hexagon" + separator, tokens (tiny BPE ≈ 6)
TEXT_TOKENS_FIXED = 8  # closing period, EOS and slack


def target_tokens(model: ModelConfig) -> int:
    """Codebook tokens of one target, L × N."""
    return model.num_scales * model.tokens_per_group


def answer_token_budget(model: ModelConfig, max_targets: int) -> int:
    """Generation budget that holds an answer with ``max_targets`` targets (the derived default
    of ``serve.max_new_tokens``): ``max_targets × (L·N + 10) + 8`` tokens."""
    per_target = target_tokens(model) + TEXT_TOKENS_PER_TARGET
    return max_targets * per_target + TEXT_TOKENS_FIXED


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def apply_overrides(tree: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (value parsed as YAML) to a raw recipe tree."""
    tree = json.loads(json.dumps(tree))
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw))
    return tree


def _format_errors(source: str, err: ValidationError) -> str:
    lines = [f"{source}: {err.error_count()} problem(s) in the recipe:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check spelling; see pixellm/config.py for the fields)"
        lines.append(f"  - {key}: {msg} (got {e.get('input')!r})")
    return "\n".join(lines)


T = TypeVar("T")


def command_options(command: str, options_type: type[T], **values: Any) -> T:
    """``options_type(**values)`` for a command whose options are a validated (pydantic) dataclass
    (``pixellm quickstart``, ``pixellm pretrain-tiny``).

    Raises:
        ConfigError: one line per bad flag, named as the user typed it (``--pretrain-steps``).
    """
    try:
        return options_type(**values)
    except ValidationError as err:
        lines = [f"{command}: {err.error_count()} bad option(s):"]
        for e in err.errors():
            name = str(e["loc"][0]) if e["loc"] else "(options)"
            lines.append(f"  - --{name.replace('_', '-')}: {e['msg']} (got {e.get('input')!r})")
        raise ConfigError("\n".join(lines)) from None


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None) -> Recipe:
    """Load and validate a recipe YAML (``None`` = all defaults) plus dotted overrides.

    Raises:
        ConfigError: the file is missing or not a mapping, or any key is unknown or invalid.
    """
    tree: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"recipe {source} does not exist")
        loaded = yaml.safe_load(p.read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(
                f"recipe {source} must be a YAML mapping, got {type(loaded).__name__}"
            )
        tree = loaded or {}
    tree = apply_overrides(tree, overrides)
    try:
        return Recipe.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_errors(source, err)) from None


def recipe_hash(recipe: Recipe) -> str:
    """Short stable hash of a resolved recipe (stored with checkpoints)."""
    blob = json.dumps(recipe.model_dump(mode="json"), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
