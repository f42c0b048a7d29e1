"""Segmentation codebook C_seg (paper section 3.1).

The codebook has L groups (one per visual scale) of N tokens each. One target in an answer is one
run of ``L * N`` consecutive codebook tokens, scale-major: ``<seg_0_0> … <seg_0_{N-1}> <seg_1_0> …``.
Scale 0 is the deepest CLIP layer (``feature_layers[0]``). User-facing text shows one
``PLACEHOLDER`` per target instead of the run.

Token ids are always looked up with ``convert_tokens_to_ids`` (never ``tokenizer(tok).input_ids[0]``,
which collapses all ids to one on some tokenizer versions).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

__all__ = ["PLACEHOLDER", "SegCodebook", "codebook_tokens"]

PLACEHOLDER = "[SEG]"


def codebook_tokens(num_scales: int, tokens_per_group: int, names: str = "ours") -> list[str]:
    """The ``L * N`` codebook token strings, scale-major.

    ``names="authors"`` gives the released checkpoints' ``[SEG0]`` … ``[SEG{L*N-1}]``
    (``model.compat.codebook_tokens``).
    """
    if names == "authors":
        return [f"[SEG{i}]" for i in range(num_scales * tokens_per_group)]
    return [f"<seg_{s}_{n}>" for s in range(num_scales) for n in range(tokens_per_group)]


class SegCodebook:
    """Maps between user-facing placeholders, codebook token text and codebook token ids.

    Args:
        tokenizer: a tokenizer that already holds the codebook tokens (see ``add_to``).
        num_scales: L.
        tokens_per_group: N.
        names: token naming, ``"ours"`` or ``"authors"`` (see ``codebook_tokens``).
        separator: text between the tokens of one run (the release space-joins them).
        grouping: ``"run"``: a target is L*N codebook ids in codebook order; ``"count"`` (the
            release): every codebook token counts, consecutive L*N of them form a target, and a
            count that is not a multiple of L*N gives no target at all.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        num_scales: int,
        tokens_per_group: int,
        names: str = "ours",
        separator: str = "",
        grouping: str = "run",
    ):
        self.num_scales = num_scales
        self.tokens_per_group = tokens_per_group
        self.separator = separator
        self.grouping = grouping
        self.tokens = codebook_tokens(num_scales, tokens_per_group, names)
        ids = tokenizer.convert_tokens_to_ids(self.tokens)
        unk = tokenizer.unk_token_id
        if any(i is None or i == unk for i in ids) or len(set(ids)) != len(ids):
            raise ValueError(
                f"codebook tokens {self.tokens} are not all distinct tokens of the tokenizer "
                f"(ids {ids}); call SegCodebook.add_to(tokenizer, ...) first"
            )
        self.ids: list[int] = list(ids)
        self.first_id = self.ids[0]
        self._id_set = set(self.ids)

    @staticmethod
    def add_to(
        tokenizer: PreTrainedTokenizerBase,
        num_scales: int,
        tokens_per_group: int,
        names: str = "ours",
    ) -> int:
        """Add the codebook tokens as special tokens; returns how many were new."""
        tokens = codebook_tokens(num_scales, tokens_per_group, names)
        vocab = tokenizer.get_vocab()
        if all(t in vocab for t in tokens):  # e.g. an imported tokenizer: keep its ids as they are
            return 0
        return tokenizer.add_special_tokens(
            {"additional_special_tokens": tokens}, replace_extra_special_tokens=False
        )

    @property
    def group_size(self) -> int:
        """Tokens per target, ``L * N``."""
        return self.num_scales * self.tokens_per_group

    @property
    def group_text(self) -> str:
        """The text of one target's token run."""
        return self.separator.join(self.tokens)

    def expand(self, text: str) -> str:
        """User-facing text (one ``[SEG]`` per target) → text holding one token run per target."""
        return text.replace(PLACEHOLDER, self.group_text)

    def render(self, text: str) -> str:
        """Text holding codebook token runs (possibly incomplete) → one ``[SEG]`` per complete run."""
        out = text.replace(self.group_text, PLACEHOLDER)
        for tok in self.tokens:  # drop stray codebook tokens of an incomplete run
            out = out.replace(tok, "")
        return out

    def is_codebook(self, token_id: int) -> bool:
        return token_id in self._id_set

    def find_groups(self, input_ids: Sequence[int] | torch.Tensor) -> list[list[int]]:
        """Positions of each complete target run in a sequence.

        Args:
            input_ids: ``(T,)`` token ids.

        Returns:
            One list of ``L * N`` positions per complete run, in order. A run is complete when the
            ``L * N`` codebook ids appear consecutively in codebook order; anything else is ignored.
        """
        ids = input_ids.tolist() if isinstance(input_ids, torch.Tensor) else list(input_ids)
        groups: list[list[int]] = []
        g = self.group_size
        if self.grouping == "count":
            found = [t for t, i in enumerate(ids) if i in self._id_set]
            if len(found) % g:
                return []
            return [found[k : k + g] for k in range(0, len(found), g)]
        t = 0
        while t <= len(ids) - g:
            if ids[t] == self.first_id and ids[t : t + g] == self.ids:
                groups.append(list(range(t, t + g)))
                t += g
            else:
                t += 1
        return groups

    def count_placeholders(self, text: str) -> int:
        """Number of targets in user-facing text."""
        return text.count(PLACEHOLDER)
