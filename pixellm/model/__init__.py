"""PixelLM model library (torch / transformers / peft only; importable without Ray).

Public names are imported lazily (PEP 562) so that light users of the package, such as the
``pixellm`` command line building its parser, do not pay for importing torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "PLACEHOLDER": "pixellm.model.codebook",
    "SegCodebook": "pixellm.model.codebook",
    "PixelLM": "pixellm.model.pixellm",
    "PixelLMOutput": "pixellm.model.pixellm",
    "Prediction": "pixellm.model.pixellm",
    "build_pixellm": "pixellm.model.pixellm",
    "PixelLMProcessor": "pixellm.model.processing",
    "build_processor": "pixellm.model.processing",
    "build_tokenizer": "pixellm.model.tokenizer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pixellm.model' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
