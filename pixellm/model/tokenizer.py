"""An offline byte-level BPE tokenizer for the tiny models (no download, deterministic).

Real models use the tokenizer stored in their local HF llava directory. The tiny tokenizer is trained
at build time on a fixed English text that covers the generated corpus vocabulary; being byte-level
it can encode any text.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from pixellm.config import ModelConfig
from pixellm.model.codebook import SegCodebook

__all__ = ["IMAGE_TOKEN", "build_tiny_tokenizer", "build_tokenizer"]

IMAGE_TOKEN = "<image>"
_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN]

_WORDS = """
a an the this that these those is are be it its there here of in on at to from with and or but not no
none nothing yes what which who where how many much can could would should please segment output mask
masks show find point out highlight image picture scene shape shapes object objects target targets
sure they them their it's separately answer question user assistant
red orange yellow green blue purple pink brown black white gray grey cyan magenta warm cool colour
color coloured colored dark light bright
circle circles square squares triangle triangles rectangle rectangles ellipse ellipses star stars
diamond diamonds hexagon hexagons ring rings cross crosses disc discs oval ovals
small large big tiny huge medium largest smallest biggest left right top bottom above below middle
center centre corner near far next beside behind front over under between overlapping covered
upper lower one two three four five six seven eight nine ten zero number count counting
roll could rolled round rounded pointy corners sharp edges flat sides side
all every each other another same different more most fewer least only also than
describe description located position positioned found lies sits placed
""".split()


def _training_text() -> list[str]:
    words = sorted(set(_WORDS))
    lines = [" ".join(words)]
    lines += [f"{w} {w.capitalize()} {w}s {w}." for w in words]
    lines += [str(i) for i in range(1000)]
    lines += ["USER: ASSISTANT: What is in this image? Please output segmentation mask."]
    return lines * 4


def build_tiny_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a deterministic byte-level BPE of ``vocab_size`` entries (incl. specials).

    Returns:
        A ``PreTrainedTokenizerFast`` with ``<s>``/``</s>``/``<pad>``/``<unk>`` and ``<image>``.
    """
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_text(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    fast.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return fast


def build_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer of a recipe's model, with the codebook tokens added (offline only).

    ``base == "tiny"`` trains the deterministic tiny BPE; ``base == "llava"`` reads the tokenizer of
    the local HF llava directory ``cfg.weights_path`` (``local_files_only``; nothing is downloaded).
    """
    if cfg.base == "tiny":
        tok = build_tiny_tokenizer(cfg.tiny.vocab_size)
    else:
        tok = AutoTokenizer.from_pretrained(cfg.weights_path, local_files_only=True)
        if IMAGE_TOKEN not in tok.get_vocab():
            tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
        if tok.pad_token_id is None:
            tok.pad_token = tok.unk_token or tok.eos_token
    SegCodebook.add_to(tok, cfg.num_scales, cfg.tokens_per_group, cfg.compat.codebook_tokens)
    return tok
