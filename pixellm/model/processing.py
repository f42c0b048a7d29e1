"""Turning (image, conversation) into model inputs, and model outputs back into image-sized masks.

Shape notation: S = model image side (e.g. 448), K = targets, T = text tokens, h x w = original image.

Image transform (DESIGN section 2): resize the longest side to S (aspect kept), normalise with CLIP's
mean/std, pad bottom/right with zeros to S x S. ``valid_hw`` is the un-padded size used to crop masks
back before resizing them to the original image size.

Conversation: the LLaVA v1 chat template ``"<s>USER: <image>…\n{q} ASSISTANT: {a}</s>"``; the image
placeholder is repeated once per LLM image token; labels are set only on assistant tokens (and the
closing ``</s>``); one ``[SEG]`` in an assistant turn becomes one codebook token run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import PreTrainedTokenizerBase

from pixellm.config import CompatConfig, ModelConfig
from pixellm.model.codebook import SegCodebook

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "IGNORE_INDEX",
    "EncodedConversation",
    "PixelLMProcessor",
    "build_processor",
    "logits_to_image_size",
    "masks_to_grid",
    "resize_longest_side",
]

IGNORE_INDEX = -100
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (123.675 / 255, 116.28 / 255, 103.53 / 255)  # authors' release, 0-255 scale / 255
IMAGENET_STD = (58.395 / 255, 57.12 / 255, 57.375 / 255)
IM_START, IM_END = "<im_start>", "<im_end>"  # the release's image wrap tokens


def resize_longest_side(h: int, w: int, side: int, rounding: str = "round") -> tuple[int, int]:
    """Size ``(h', w')`` of an ``h x w`` image whose longest side is scaled to ``side``.

    ``rounding="half_up"`` is the release's ``int(x + 0.5)`` (Python's ``round`` rounds half to even).
    """
    scale = side / max(h, w)
    if rounding == "half_up":
        return max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))
    return max(1, int(round(h * scale))), max(1, int(round(w * scale)))


def logits_to_image_size(
    logits: torch.Tensor, valid_hw: tuple[int, int], image_side: int, out_hw: tuple[int, int]
) -> torch.Tensor:
    """Crop the padding off square mask logits and resize them to an image size.

    Args:
        logits: ``(K, s, s)`` logits over the padded ``image_side`` square (any s).
        valid_hw: un-padded size of the image inside the ``image_side`` square, in pixels.
        image_side: S.
        out_hw: target ``(h, w)``, e.g. the original image size.

    Returns:
        ``(K, h, w)`` logits.
    """
    k, s, _ = logits.shape
    if k == 0:  # a reshape, not new_zeros: the empty result stays on the decoder's graph
        return logits.reshape(0, *out_hw)
    # (K, s, s) -> (K, S, S) -> crop valid -> (K, h, w)
    x = F.interpolate(
        logits[:, None], size=(image_side, image_side), mode="bilinear", align_corners=False
    )
    x = x[:, :, : valid_hw[0], : valid_hw[1]]
    x = F.interpolate(x, size=out_hw, mode="bilinear", align_corners=False)
    return x[:, 0]


def masks_to_grid(
    masks: torch.Tensor, valid_hw: tuple[int, int], image_side: int, grid: int
) -> torch.Tensor:
    """The inverse direction of ``logits_to_image_size`` for ground truth: masks at image size →
    area fractions on the ``grid x grid`` feature grid over the padded ``image_side`` square.

    Args:
        masks: ``(K, h, w)`` in [0, 1] at any size covering the un-padded image.
        valid_hw: un-padded size of the image inside the ``image_side`` square, in pixels.

    Returns:
        ``(K, grid, grid)`` float, 0 over the padding.
    """
    k = masks.shape[0]
    gh = max(1, min(grid, round(valid_hw[0] * grid / image_side)))
    gw = max(1, min(grid, round(valid_hw[1] * grid / image_side)))
    if k == 0:
        return masks.new_zeros((0, grid, grid), dtype=torch.float32)
    x = F.interpolate(masks[:, None].float(), size=(gh, gw), mode="area")[:, 0]  # (K, gh, gw)
    return F.pad(x, (0, grid - gw, 0, grid - gh))


@dataclass
class EncodedConversation:
    """Token ids of one conversation. ``input_ids``/``labels``: ``(T,)``; ``num_targets`` = K."""

    input_ids: list[int]
    labels: list[int]
    num_targets: int


class PixelLMProcessor:
    """Image transform + chat template + codebook expansion for one PixelLM.

    Args:
        tokenizer: the model's tokenizer (holds ``<image>`` and the codebook tokens).
        codebook: the model's codebook.
        image_size: S.
        num_image_tokens: LLM image tokens per image (``llm_image_grid ** 2``).
        max_length: longest allowed token sequence; longer samples are rejected, never truncated
            (truncation cut target runs in the authors' code and broke the mask count).
        system_prompt: text before the first ``USER:`` (LLaVA v1's by default; may be empty).
        compat: ``model.compat`` (normalisation, rounding, image wrap tokens); None = the paper.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        codebook: SegCodebook,
        image_size: int,
        num_image_tokens: int,
        max_length: int,
        system_prompt: str = "",
        image_token: str = "<image>",
        compat: CompatConfig | None = None,
    ):
        self.compat = compat if compat is not None else CompatConfig()
        self.tokenizer = tokenizer
        self.codebook = codebook
        self.image_size = image_size
        self.num_image_tokens = num_image_tokens
        self.max_length = max_length
        self.system_prompt = system_prompt.strip()
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        imagenet = self.compat.normalization == "imagenet"
        self.mean = torch.tensor(IMAGENET_MEAN if imagenet else CLIP_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD if imagenet else CLIP_STD).view(3, 1, 1)

    # ---------------------------------------------------------------- images
    def transform_image(
        self, image: Image.Image | np.ndarray
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        """RGB image → ``((3, S, S) float tensor, valid (h', w'))``."""
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        image = image.convert("RGB")
        w, h = image.size
        nh, nw = resize_longest_side(h, w, self.image_size, self.compat.resize_rounding)
        resized = image.resize((nw, nh), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(resized, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
        x = (x - self.mean) / self.std  # (3, h', w')
        out = torch.zeros(3, self.image_size, self.image_size)
        out[:, :nh, :nw] = x
        return out, (nh, nw)

    # ---------------------------------------------------------------- text
    def _ids(self, text: str) -> list[int]:
        if not self.compat.split_added_tokens:
            return self.tokenizer(text, add_special_tokens=False).input_ids
        added = self.tokenizer.get_added_vocab()  # token -> id
        pattern = "(" + "|".join(re.escape(t) for t in sorted(added, key=len, reverse=True)) + ")"
        pieces = re.split(pattern, text)  # odd indices are added tokens
        ids: list[int] = []
        for i, piece in enumerate(pieces):
            if i % 2:
                ids.append(added[piece])
                continue
            if i > 0:
                piece = piece.lstrip()
            if i < len(pieces) - 1:
                piece = piece.rstrip()
            if piece:
                ids += self.tokenizer(piece, add_special_tokens=False).input_ids
        return ids

    def _turn_ids(self, prompt: str, answer: str) -> tuple[list[int], list[int]]:
        """Prompt and answer ids of one turn, tokenised together as ``prompt + " " + answer``.

        Tokenising the answer on its own (``" " + answer``) differs on sentencepiece tokenizers
        (Llama: a lone ``"▁"`` that generation after ``ASSISTANT:`` never produces); the joint ids
        are split where the prompt's own ids end, which is what generation continues from.

        Raises:
            ValueError: the prompt's ids are not a prefix of the joint ids (a token would straddle
                the prompt/answer boundary).
        """
        prompt_ids = self._ids(prompt)
        joint = self._ids(f"{prompt} {answer}")
        if joint[: len(prompt_ids)] != prompt_ids:
            raise ValueError(
                f"tokenizer merges the prompt's end with the answer ({prompt[-20:]!r} + "
                f"{answer[:20]!r}); the prompt ids are not a prefix of the joint ids"
            )
        return prompt_ids, joint[len(prompt_ids) :]

    def _user_prefix(self, first: bool) -> str:
        image = self.tokenizer.convert_ids_to_tokens(self.image_token_id) * self.num_image_tokens
        if self.compat.image_wrap_tokens:
            image = f"{IM_START}{image}{IM_END}"
        system = f"{self.system_prompt} " if self.system_prompt else ""
        return f"{system}USER: {image}\n" if first else " USER: "

    def prompt_ids(self, question: str) -> list[int]:
        """Token ids of a one-turn prompt ending in ``ASSISTANT:`` (for generation)."""
        ids = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        return ids + self._ids(self._user_prefix(True) + question.strip() + " ASSISTANT:")

    def encode_conversation(self, conversation: list[dict]) -> EncodedConversation:
        """Encode ``[{role: user|assistant, text}, …]`` with labels on assistant tokens only.

        Raises:
            ValueError: roles do not alternate user/assistant, or the sequence is too long.
        """
        if not conversation or len(conversation) % 2:
            raise ValueError(
                f"conversation must be user/assistant pairs, got {len(conversation)} turns"
            )
        ids = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        labels = [IGNORE_INDEX] * len(ids)
        num_targets = 0
        eos = self.tokenizer.eos_token_id
        for turn, (user, assistant) in enumerate(
            zip(conversation[::2], conversation[1::2], strict=True)
        ):
            if user.get("role") != "user" or assistant.get("role") != "assistant":
                raise ValueError(
                    f"turn {turn}: expected roles user, assistant; got {user.get('role')}, {assistant.get('role')}"
                )
            prompt, answer = self._turn_ids(
                self._user_prefix(turn == 0) + user["text"].strip() + " ASSISTANT:",
                self.codebook.expand(assistant["text"].strip()),
            )
            num_targets += self.codebook.count_placeholders(assistant["text"])
            answer = answer + [eos]
            ids += prompt + answer
            labels += [IGNORE_INDEX] * len(prompt) + answer
        if len(ids) > self.max_length:
            raise ValueError(
                f"conversation is {len(ids)} tokens, over model.max_length={self.max_length}"
            )
        return EncodedConversation(ids, labels, num_targets)

    def pad(self, sequences: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
        """Pad id lists to ``(B, T_max)``."""
        t = max(len(s) for s in sequences)
        rows = [
            ([value] * (t - len(s)) + s) if left else (s + [value] * (t - len(s)))
            for s in sequences
        ]
        return torch.tensor(rows, dtype=torch.long)


def build_processor(
    cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase | None = None
) -> PixelLMProcessor:
    """The processor of a recipe's model (builds the tokenizer unless one is given)."""
    from pixellm.model.tokenizer import build_tokenizer

    if cfg.base == "imported" and tokenizer is None:  # the import's tokenizer and settings
        from pixellm.model.import_authors import imported_processor

        return imported_processor(cfg)
    tok = tokenizer if tokenizer is not None else build_tokenizer(cfg)
    release = cfg.compat.codebook_tokens == "authors"
    codebook = SegCodebook(
        tok,
        cfg.num_scales,
        cfg.tokens_per_group,
        names=cfg.compat.codebook_tokens,
        separator=" " if release else "",
        grouping="count" if cfg.compat.broken_run == "drop_all" else "run",
    )
    return PixelLMProcessor(
        tok,
        codebook,
        cfg.image_size,
        cfg.llm_image_grid**2,
        cfg.max_length,
        cfg.system_prompt,
        compat=cfg.compat,
    )
