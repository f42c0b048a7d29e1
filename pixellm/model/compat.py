"""Model-side pieces of ``model.compat`` (the authors' release behaviours), kept out of ``pixellm.py``.

Shape notation: B images, T tokens, S image side, p CLIP patch size, g = S / p, G LLM image grid,
H LLM width, Cv CLIP width.

- ``WideProjector``: p_V→T with hidden width ``factor x H`` (the release: 2H; HF llava: H).
- ``patch_key_mask`` / ``masked_vit_hidden_states``: padded CLIP patches masked as attention keys.
- ``image_token_mask``: which of the G x G LLM image tokens lie on padding.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "WideProjector",
    "image_token_mask",
    "masked_vit_hidden_states",
    "patch_key_mask",
]


class WideProjector(nn.Module):
    """``Cv -> factor*H -> H`` with GELU; HF llava's parameter names (``linear_1``, ``linear_2``)."""

    def __init__(self, *, vision_hidden_size: int, text_hidden_size: int, factor: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(vision_hidden_size, factor * text_hidden_size)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(factor * text_hidden_size, text_hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., Cv)`` -> ``(..., H)``."""
        return self.linear_2(self.act(self.linear_1(x)))


def patch_key_mask(valid_hw: torch.Tensor, side: int, patch: int) -> torch.Tensor:
    """``(B, g, g)`` bool: a patch is valid when its top-left pixel lies in the un-padded image.

    This is nearest-neighbour downsampling of the pixel validity map, as the release does.
    """
    g = side // patch
    start = torch.arange(g, device=valid_hw.device) * patch  # (g,) first pixel of each patch
    rows = start[None, :] < valid_hw[:, :1]  # (B, g)
    cols = start[None, :] < valid_hw[:, 1:2]  # (B, g)
    return rows[:, :, None] & cols[:, None, :]


def image_token_mask(valid_hw: torch.Tensor, side: int, patch: int, grid: int) -> torch.Tensor:
    """``(B, G*G)`` bool validity of the LLM image tokens (nearest-downsampled patch mask)."""
    patches = patch_key_mask(valid_hw, side, patch)  # (B, g, g)
    g = patches.shape[-1]
    idx = (torch.arange(grid, device=valid_hw.device) * g) // grid  # nearest source cell
    return patches[:, idx][:, :, idx].flatten(1)


def masked_vit_hidden_states(
    vision: nn.Module, pixel_values: torch.Tensor, valid_hw: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """CLIP hidden states with padded patches masked as attention keys (CLS always visible).

    Args:
        vision: an HF ``CLIPVisionModel``.
        pixel_values: ``(B, 3, S, S)``; valid_hw: ``(B, 2)`` un-padded size.

    Returns:
        ``num_layers + 1`` tensors ``(B, 1 + g*g, Cv)``, like ``output_hidden_states``.
    """
    vm = getattr(vision, "vision_model", vision)  # transformers 5 flattened CLIPVisionModel
    side, patch = pixel_values.shape[-1], vision.config.patch_size
    keys = patch_key_mask(valid_hw.to(pixel_values.device), side, patch).flatten(1)  # (B, g*g)
    keys = torch.cat([torch.ones_like(keys[:, :1]), keys], 1)  # (B, 1 + g*g), CLS visible
    h = vm.pre_layrnorm(vm.embeddings(pixel_values, interpolate_pos_encoding=True))
    additive = torch.zeros(keys.shape, dtype=h.dtype, device=h.device)
    additive = additive.masked_fill(~keys, torch.finfo(h.dtype).min)[:, None, None, :]
    states = [h]
    for layer in vm.encoder.layers:
        h = layer(h, additive)
        states.append(h)
    return tuple(states)
