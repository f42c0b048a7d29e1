"""PixelLM: LLaVA + segmentation codebook + lightweight pixel decoder (paper section 3).

Shape notation: B = images (= questions) in a batch, T = text tokens, S = model image side,
g = CLIP patch grid (S / patch), G = LLM image grid (``llm_image_grid``), K = targets in the batch,
L = scales, N = tokens per codebook group, H = LLM width, Cv = CLIP width.

The image is encoded once per image per step: the CLIP hidden states of the L ``feature_layers``
feed both the LLM (deepest layer, pooled to G x G, through p_V→T) and the pixel decoder (all L,
through p_V→D). The hidden state of a codebook token is the LLM's last-layer (post-norm) state *at
that token's position*, taken the same way in training (teacher-forced) and generation (KV cache).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils
from safetensors.torch import load_file, save_file
from torch import nn

from pixellm.config import ModelConfig
from pixellm.model import compat
from pixellm.model.backbone import apply_lora, build_llava
from pixellm.model.codebook import PLACEHOLDER, SegCodebook
from pixellm.model.losses import mask_losses
from pixellm.model.pixel_decoder import PixelLMPixelDecoder, build_pixel_decoder, mask_scores
from pixellm.model.processing import (
    IGNORE_INDEX,
    PixelLMProcessor,
    build_processor,
    logits_to_image_size,
)

__all__ = ["PixelLM", "PixelLMOutput", "Prediction", "build_pixellm"]

CONFIG_NAME = "pixellm_config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class PixelLMOutput:
    """Result of a teacher-forced forward pass.

    Attributes:
        loss: total loss ``L_txt + λ_ref·L_ref + λ_dice·L_dice`` (scalar), None without labels.
        loss_txt / loss_ref / loss_dice: the terms (scalars; mask terms 0 when there are no masks).
        logits: ``(B, T, V)`` next-token logits.
        mask_logits: per question ``(K_b, h_b, w_b)`` logits at the ground-truth mask size when
            ``gt_masks`` is given, else at ``4g x 4g`` over the padded square.
        num_masks: masks that entered the mask losses.
    """

    loss: torch.Tensor | None
    loss_txt: torch.Tensor | None
    loss_ref: torch.Tensor | None
    loss_dice: torch.Tensor | None
    logits: torch.Tensor
    mask_logits: list[torch.Tensor]
    num_masks: int = 0


@dataclass
class Prediction:
    """One answer: text with one ``[SEG]`` per target, one COCO RLE mask and a score per target."""

    text: str
    masks: list[dict] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    num_tokens: int = 0


class PixelLM(nn.Module):
    """PixelLM (Ren et al., "PixelLM: Pixel Reasoning with Large Multimodal Model", CVPR 2024).

    Args:
        config: the model section of the recipe.
        llm: the LoRA-wrapped ``LlavaForConditionalGeneration`` (see ``apply_lora``).
        pixel_decoder: D with p_V→D, neck, text projection, token fusion φ and γ.
        processor: image transform, chat template and codebook of this model.
    """

    def __init__(
        self,
        *,
        config: ModelConfig,
        llm: nn.Module,
        pixel_decoder: PixelLMPixelDecoder,
        processor: PixelLMProcessor,
    ):
        super().__init__()
        self.config = config
        self.llm = llm
        self.pixel_decoder = pixel_decoder
        self.processor = processor
        self.codebook: SegCodebook = processor.codebook
        self.tokenizer = processor.tokenizer

    # ------------------------------------------------------------------ parts
    @property
    def llava(self) -> nn.Module:
        """The underlying ``LlavaForConditionalGeneration`` (LoRA layers injected in place)."""
        return self.llm.get_base_model()

    @property
    def device(self) -> torch.device:
        return next(self.pixel_decoder.parameters()).device

    def encode_images(
        self, pixel_values: torch.Tensor, valid_hw: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run CLIP once and build both image streams.

        Args:
            pixel_values: ``(B, 3, S, S)``.
            valid_hw: ``(B, 2)`` un-padded sizes; used when ``compat.mask_padded_patches``.

        Returns:
            ``(image_embeds (B, G*G, H), features)`` with ``features`` the L CLIP maps ``(B, g, g, Cv)``,
            deepest first.
        """
        vision = self.llava.model.vision_tower
        dtype = next(vision.parameters()).dtype
        with torch.no_grad():  # CLIP is frozen
            if self.config.compat.mask_padded_patches and valid_hw is not None:
                hidden_states = compat.masked_vit_hidden_states(
                    vision, pixel_values.to(dtype), valid_hw
                )
            else:
                hidden_states = vision(
                    pixel_values.to(dtype), output_hidden_states=True, interpolate_pos_encoding=True
                ).hidden_states
        b = pixel_values.shape[0]
        g = pixel_values.shape[-1] // vision.config.patch_size
        features = []
        for layer in self.config.feature_layers:
            hs = hidden_states[layer][:, 1:]  # drop CLS (row 0): (B, g*g, Cv)
            features.append(hs.reshape(b, g, g, -1))  # (B, g, g, Cv)
        deepest = features[0].permute(0, 3, 1, 2)  # (B, Cv, g, g)
        grid = self.config.llm_image_grid
        pooled = F.interpolate(deepest, size=(grid, grid), mode="bilinear", align_corners=False)
        pooled = pooled.flatten(2).transpose(1, 2)  # (B, G*G, Cv)
        image_embeds = self.llava.model.multi_modal_projector(pooled)  # (B, G*G, H)
        return image_embeds, features

    def embed_inputs(self, input_ids: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        """Token embeddings ``(B, T, H)`` with the image tokens replaced by ``image_embeds``."""
        embeds = self.llava.get_input_embeddings()(input_ids)
        is_image = input_ids == self.processor.image_token_id  # (B, T)
        per_row = is_image.sum(1)
        expected = image_embeds.shape[1]
        if bool((per_row != expected).any()):
            raise ValueError(
                f"image tokens per sequence {per_row.tolist()} != image features per image {expected}; "
                "build inputs with this model's processor"
            )
        embeds = embeds.masked_scatter(is_image[..., None], image_embeds.to(embeds.dtype))
        return embeds

    def _attention_inputs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, valid_hw: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(attention_mask, position_ids)``: with ``compat.mask_padded_image_tokens`` the image
        tokens on padding are hidden while positions stay contiguous (else positions are None)."""
        if not self.config.compat.mask_padded_image_tokens:
            return attention_mask, None
        positions = (attention_mask.long().cumsum(1) - 1).clamp(min=0)  # (B, T)
        vision = self.llava.model.vision_tower.config
        valid = compat.image_token_mask(
            valid_hw.to(input_ids.device),
            self.config.image_size,
            vision.patch_size,
            self.config.llm_image_grid,
        )  # (B, G*G)
        is_image = input_ids == self.processor.image_token_id
        mask = attention_mask.clone()
        mask[is_image] = valid.flatten().to(mask.dtype)
        return mask, positions

    def _decode(
        self,
        features: list[torch.Tensor],
        image_index: torch.Tensor,
        token_states: torch.Tensor,
    ) -> torch.Tensor:
        """Mask logits ``(K, 4g, 4g)`` for targets with codebook states ``(K, L·N, H)``."""
        k = token_states.shape[0]
        states = token_states.reshape(
            k, self.config.num_scales, self.config.tokens_per_group, token_states.shape[-1]
        )  # (K, L, N, H)
        out = self.pixel_decoder(features, image_index, states.float())
        return out.mask_logits

    def _target_positions(self, input_ids: torch.Tensor) -> list[list[list[int]]]:
        return [self.codebook.find_groups(row) for row in input_ids]

    # ------------------------------------------------------------------ training
    def forward(
        self,
        pixel_values: torch.Tensor,
        valid_hw: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        gt_masks: list[torch.Tensor] | None = None,
    ) -> PixelLMOutput:
        """Teacher-forced pass with the three losses of paper section 3.2.

        Args:
            pixel_values: ``(B, 3, S, S)``; valid_hw: ``(B, 2)`` un-padded size inside S x S.
            input_ids / attention_mask / labels: ``(B, T)``; labels are ``-100`` off the answer.
            gt_masks: per question ``(K_b, h_b, w_b)`` in {0, 1}, in answer order.

        Raises:
            ValueError: a question's codebook-run count differs from its mask count (checked before
                any compute).
        """
        groups = self._target_positions(input_ids)
        if gt_masks is not None:
            for b, (grp, m) in enumerate(zip(groups, gt_masks, strict=True)):
                if len(grp) != m.shape[0]:
                    raise ValueError(
                        f"batch item {b}: {len(grp)} target groups in the text but {m.shape[0]} masks"
                    )
        image_embeds, features = self.encode_images(pixel_values, valid_hw)
        embeds = self.embed_inputs(input_ids, image_embeds)
        mask, positions = self._attention_inputs(input_ids, attention_mask, valid_hw)
        lm_out = self.llava.model.language_model(
            inputs_embeds=embeds, attention_mask=mask, position_ids=positions
        )
        hidden = lm_out.last_hidden_state  # (B, T, H), post final norm
        logits = self.llava.lm_head(hidden)  # (B, T, V)

        image_index = torch.tensor(
            [b for b, grp in enumerate(groups) for _ in grp], dtype=torch.long, device=hidden.device
        )
        shift = self.config.compat.state_offset  # -1: the state that predicts the token
        positions = [(b, [p + shift for p in pos]) for b, grp in enumerate(groups) for pos in grp]
        if positions:
            states = torch.stack([hidden[b, pos] for b, pos in positions])  # (K, L*N, H)
        else:
            states = hidden.new_zeros((0, self.codebook.group_size, hidden.shape[-1]))
        square = self._decode(features, image_index, states)  # (K, 4g, 4g)
        per_question = list(torch.split(square, [len(g) for g in groups]))

        if gt_masks is None:
            return PixelLMOutput(None, None, None, None, logits, per_question)
        side = self.config.image_size
        resized = [
            logits_to_image_size(
                m, tuple(valid_hw[b].tolist()), side, tuple(gt_masks[b].shape[-2:])
            )
            for b, m in enumerate(per_question)
        ]
        loss_cfg = self.config.loss
        losses = mask_losses(
            resized, [m.to(hidden.device).float() for m in gt_masks], loss_cfg.alpha
        )
        loss_txt = torch.zeros((), device=hidden.device)
        if labels is not None:
            shift_logits = logits[:, :-1].float()
            shift_labels = labels[:, 1:].to(logits.device)
            if bool((shift_labels != IGNORE_INDEX).any()):
                loss_txt = F.cross_entropy(
                    shift_logits.reshape(-1, shift_logits.shape[-1]),
                    shift_labels.reshape(-1),
                    ignore_index=IGNORE_INDEX,
                )
        loss = (
            loss_cfg.lambda_txt * loss_txt
            + loss_cfg.lambda_ref * losses.ref
            + loss_cfg.lambda_dice * losses.dice
        )
        return PixelLMOutput(
            loss, loss_txt, losses.ref, losses.dice, logits, resized, num_masks=losses.num_masks
        )

    # ------------------------------------------------------------------ inference
    def _answer_text(self, ids: list[int]) -> str:
        """Generated ids → text with one ``[SEG]`` per complete codebook run."""
        parts: list[str] = []
        start = 0
        for grp in self.codebook.find_groups(ids):
            parts.append(self.tokenizer.decode(ids[start : grp[0]], skip_special_tokens=True))
            parts.append(PLACEHOLDER)
            start = grp[-1] + 1
        parts.append(self.tokenizer.decode(ids[start:], skip_special_tokens=True))
        return "".join(parts).strip()

    def _to_predictions(
        self,
        features: list[torch.Tensor],
        answers: list[list[int]],
        states: list[torch.Tensor],
        valid_hw: list[tuple[int, int]],
        sizes: list[tuple[int, int]],
    ) -> list[Prediction]:
        counts = [s.shape[0] for s in states]
        image_index = torch.tensor(
            [b for b, c in enumerate(counts) for _ in range(c)],
            dtype=torch.long,
            device=self.device,
        )
        h = self.llava.config.text_config.hidden_size
        all_states = torch.cat(states) if states else torch.zeros(0, self.codebook.group_size, h)
        square = self._decode(features, image_index, all_states.to(self.device))
        preds = []
        for b, logits in enumerate(torch.split(square, counts)):
            full = logits_to_image_size(
                logits.float(), valid_hw[b], self.config.image_size, sizes[b]
            )
            binary = (full > 0).cpu().numpy().astype(np.uint8)
            rles = []
            for m in binary:
                rle = mask_utils.encode(np.asfortranarray(m))
                rles.append(
                    {"size": [int(x) for x in rle["size"]], "counts": rle["counts"].decode()}
                )
            preds.append(
                Prediction(
                    text=self._answer_text(answers[b]),
                    masks=rles,
                    scores=[float(s) for s in mask_scores(full)],
                    num_tokens=len(answers[b]),
                )
            )
        return preds

    @torch.no_grad()
    def predict(
        self,
        images: list[Image.Image | np.ndarray],
        questions: list[str],
        max_new_tokens: int = 64,
        use_cache: bool = True,
    ) -> list[Prediction]:
        """Answer one question per image: generated text, one mask and a score per target.

        Args:
            images: B RGB images of any size.
            questions: B questions (plain text, no image placeholder).
            max_new_tokens: generation budget per answer; a codebook run cut by it is dropped.
            use_cache: generate with the KV cache (``False`` recomputes every step, for benchmarks).

        Returns:
            B predictions; a prediction may hold zero targets.
        """
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions")
        if not images:
            return []
        device = self.device
        budget = self.config.compat.max_new_tokens or max_new_tokens
        encoded = [self.processor.transform_image(im) for im in images]
        sizes = [(np.asarray(im).shape[0], np.asarray(im).shape[1]) for im in images]
        pixel_values = torch.stack([e[0] for e in encoded]).to(device)
        prompts = [self.processor.prompt_ids(q) for q in questions]
        pad_id = self.tokenizer.pad_token_id
        input_ids = self.processor.pad(prompts, pad_id, left=True).to(device)
        attention_mask = self.processor.pad([[1] * len(p) for p in prompts], 0, left=True).to(
            device
        )
        valid_hw = torch.tensor([e[1] for e in encoded], device=device)
        image_embeds, features = self.encode_images(pixel_values, valid_hw)
        embeds = self.embed_inputs(input_ids, image_embeds)
        if self._own_generation():
            mask, positions = self._attention_inputs(input_ids, attention_mask, valid_hw)
            if positions is None:
                positions = (attention_mask.cumsum(1) - 1).clamp(min=0)
            sequences, step_states = compat.greedy_generate(
                self.llava,
                embeds,
                mask,
                positions,
                max_new_tokens=budget,
                eos_token_id=self.tokenizer.eos_token_id,
                suppress_ids=self.tokenizer.convert_tokens_to_ids(
                    self.config.compat.suppress_tokens
                ),
            )
            answers, states = self._collect_step_states(sequences, step_states)
            return self._to_predictions(features, answers, states, [e[1] for e in encoded], sizes)
        out = self.llava.generate(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            max_new_tokens=budget,
            do_sample=False,
            use_cache=use_cache,
            output_hidden_states=True,
            return_dict_in_generate=True,
            pad_token_id=pad_id,
            eos_token_id=self.tokenizer.eos_token_id,
        )
        answers, states = self._collect_states(out.sequences, out.hidden_states)
        return self._to_predictions(features, answers, states, [e[1] for e in encoded], sizes)

    def _collect_states(
        self, sequences: torch.Tensor, hidden_states: tuple
    ) -> tuple[list[list[int]], list[torch.Tensor]]:
        """Per answer: generated ids up to EOS, and codebook states ``(K_b, L·N, H)``.

        The state of the token generated at step j is the last-layer state of the step j+1 input
        (``hidden_states[j + 1][-1][:, -1]``, with or without cache).
        """
        eos = self.tokenizer.eos_token_id
        steps = len(hidden_states)
        answers, states = [], []
        for b, row in enumerate(sequences.tolist()):
            ids = row[: row.index(eos)] if eos in row else row
            rows = []
            for grp in self.codebook.find_groups(ids):
                if grp[-1] + 1 >= steps:  # cut by max_new_tokens before its state was computed
                    ids = ids[: grp[0]]
                    break
                rows.append(torch.stack([hidden_states[p + 1][-1][b, -1] for p in grp]))
            answers.append(ids)
            h = self.llava.config.text_config.hidden_size
            states.append(torch.stack(rows) if rows else torch.zeros(0, len(self.codebook.ids), h))
        return answers, states

    def _own_generation(self) -> bool:
        """Whether ``compat`` needs our greedy loop instead of HF ``generate``."""
        c = self.config.compat
        return c.mask_padded_image_tokens or c.state_offset != 0 or bool(c.suppress_tokens)

    def _collect_step_states(
        self, sequences: torch.Tensor, step_states: list[torch.Tensor]
    ) -> tuple[list[list[int]], list[torch.Tensor]]:
        """Like ``_collect_states`` for ``compat.greedy_generate`` output (``step_states[j]``
        predicted token j; ``state_offset`` 0 takes ``step_states[j + 1]``)."""
        eos = self.tokenizer.eos_token_id
        shift = 1 + self.config.compat.state_offset  # 0 (release) or 1
        h = self.llava.config.text_config.hidden_size
        answers, states = [], []
        for b, row in enumerate(sequences.tolist()):
            ids = row[: row.index(eos)] if eos in row else row
            rows = []
            for grp in self.codebook.find_groups(ids):
                if grp[-1] + shift >= len(step_states):  # cut by the budget before its state
                    ids = ids[: grp[0]]
                    break
                rows.append(torch.stack([step_states[p + shift][b] for p in grp]))
            answers.append(ids)
            states.append(torch.stack(rows) if rows else torch.zeros(0, len(self.codebook.ids), h))
        return answers, states

    # ------------------------------------------------------------------ persistence
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Every trainable tensor (LoRA, codebook rows, projections, decoder), detached on CPU,
        plus the decoder's persistent buffers (the release decoder's fixed Fourier matrices)."""
        out = {
            n: p.detach().cpu().contiguous() for n, p in self.named_parameters() if p.requires_grad
        }
        params = {n for n, _ in self.pixel_decoder.named_parameters()}
        for n, t in self.pixel_decoder.state_dict().items():
            if n not in params:
                out[f"pixel_decoder.{n}"] = t.detach().cpu().contiguous()
        return out

    def save_pretrained(self, directory: str | Path, state_dict: dict | None = None) -> Path:
        """Write config, tokenizer and safetensors of what was trained (tiny: the whole model).

        Args:
            directory: output directory (created).
            state_dict: weights to write instead of this module's (e.g. gathered from ZeRO-3).
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        full = self.config.base == "tiny"  # a tiny backbone is random: keep it with the model
        if state_dict is None:
            state_dict = (
                {n: p.detach().cpu().contiguous() for n, p in self.state_dict().items()}
                if full
                else self.trainable_state_dict()
            )
        elif not full:
            trainable = set(self.trainable_state_dict())
            state_dict = {k: v for k, v in state_dict.items() if k in trainable}
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(out / WEIGHTS_NAME))
        meta = {"model": self.config.model_dump(mode="json"), "full_weights": full}
        (out / CONFIG_NAME).write_text(json.dumps(meta, indent=2))
        self.tokenizer.save_pretrained(out / "tokenizer")
        return out

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> PixelLM:
        """Rebuild the model saved by ``save_pretrained`` (no download; base weights from
        ``weights_path`` for llava models) and load its weights.

        Raises:
            FileNotFoundError: the directory lacks the config or the weights.
            RuntimeError: a trained tensor is missing from the file.
        """
        path = Path(directory)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (path / name).is_file():
                raise FileNotFoundError(f"{path / name} missing: not a PixelLM model directory")
        meta = json.loads((path / CONFIG_NAME).read_text())
        cfg = ModelConfig.model_validate(meta["model"])
        if cfg.weights_path and not Path(cfg.weights_path).is_absolute():  # e.g. an import's llava/
            if (path / cfg.weights_path).exists():
                cfg = cfg.model_copy(
                    update={"weights_path": str((path / cfg.weights_path).resolve())}
                )
        model = build_pixellm(cfg)
        state = load_file(str(path / WEIGHTS_NAME))
        missing, unexpected = model.load_state_dict(state, strict=False)
        trained = set(model.trainable_state_dict())
        lost = sorted(trained & set(missing))
        if lost or unexpected:
            raise RuntimeError(
                f"{path / WEIGHTS_NAME}: missing trained tensors {lost[:5]}, unexpected {unexpected[:5]}"
            )
        return model.to(device).eval()


def build_pixellm(cfg: ModelConfig) -> PixelLM:
    """Assemble PixelLM from its config: tokenizer + codebook, LLaVA (+LoRA), pixel decoder.

    ``cfg.base == "imported"`` builds from a ``pixellm import-authors`` directory instead (see
    ``pixellm.model.import_authors.build_from_import``).
    """
    if cfg.base == "imported":
        from pixellm.model.import_authors import build_from_import

        return build_from_import(cfg)
    processor = build_processor(cfg)
    llava = build_llava(cfg, processor.tokenizer)
    factor = cfg.compat.projector_hidden_factor
    if factor != 1:  # the release's p_V→T is Cv -> 2H -> H; its weights come with the model
        llava.model.multi_modal_projector = compat.WideProjector(
            vision_hidden_size=llava.config.vision_config.hidden_size,
            text_hidden_size=llava.config.text_config.hidden_size,
            factor=factor,
        )
    for p in llava.parameters():
        p.requires_grad_(False)
    llm = apply_lora(llava, cfg, processor.codebook.ids)
    base = llm.get_base_model()
    sizes = {
        "num_scales": cfg.num_scales,
        "tokens_per_group": cfg.tokens_per_group,
        "llm_hidden_size": base.config.text_config.hidden_size,
        "vision_hidden_size": base.config.vision_config.hidden_size,
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.tiny.seed + 1)
        if cfg.compat.decoder == "authors-release":
            from pixellm.model.compat_decoder import build_authors_decoder

            decoder = build_authors_decoder(cfg.decoder, projector_hidden_factor=factor, **sizes)
        else:
            decoder = build_pixel_decoder(cfg.decoder, **sizes)
    if cfg.gradient_checkpointing:
        base.model.language_model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    return PixelLM(config=cfg, llm=llm, pixel_decoder=decoder, processor=processor)
