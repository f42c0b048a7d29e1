"""PixelLM model library (torch / transformers / peft only; importable without Ray)."""

from pixellm.model.codebook import PLACEHOLDER, SegCodebook
from pixellm.model.processing import PixelLMProcessor, build_processor
from pixellm.model.tokenizer import build_tokenizer

__all__ = ["PLACEHOLDER", "PixelLMProcessor", "SegCodebook", "build_processor", "build_tokenizer"]
