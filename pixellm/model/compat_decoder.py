"""The authors' released pixel decoder (``model.compat.decoder: authors-release``).

Used only to run the released PixelLM-7B/13B checkpoints (``pixellm import-authors``); our recipes
use the paper's decoder in ``pixel_decoder.py``. The math of one two-way layer, the neck, the text
projection and the hypernetwork is the same as ours (the blocks are imported from there); what
differs is listed in ``/work/shared/reference/authors-checkpoint-facts.md``:

- tokens per level: [IoU, 4 mask tokens, fused target] + a level embedding on all six (ours: 2);
- image positional encoding: SAM's random-Fourier encoding (ours: sine);
- image: neck output + a learned "no-mask" embedding; level ≥ 1 upsamples its features ×2 first;
- one ×2 upscaling stage (ours: two), so level 0 gives 2g x 2g and level 1 gives 4g x 4g;
- token fusion: fixed ``(p_0 + … + p_{N-1}) / (L·N)`` per level; scale fusion: fixed 1/L each, after
  resizing every level's logits to 4g x 4g.

Shape letters: K targets, L levels (= 2), N tokens per level, D LLM width, Cv CLIP width,
C decoder width, g CLIP patch grid.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pixellm.config import DecoderConfig
from pixellm.model.pixel_decoder import (
    MLP,
    LayerNorm2d,
    PixelDecoderOutput,
    _Attention,
    _TwoWayLayer,
    mask_scores,
)

__all__ = ["AuthorsPixelDecoder", "build_authors_decoder"]

NUM_MASK_TOKENS = 4  # SAM's 3 multimask outputs + 1; only mask 0 is used


class _RandomFourierPE(nn.Module):
    """SAM's random-Fourier position encoding of a grid's cell centres (a fixed Gaussian matrix)."""

    def __init__(self, *, dim: int) -> None:
        super().__init__()
        self.register_buffer("gaussian", torch.randn(2, dim // 2))  # (2, C/2), persistent

    def forward(self, grid: int) -> torch.Tensor:
        """Returns the ``(C, g, g)`` encoding for a ``g = grid`` patch grid."""
        centres = (
            torch.arange(grid, device=self.gaussian.device, dtype=torch.float32) + 0.5
        ) / grid
        y, x = torch.meshgrid(centres, centres, indexing="ij")  # (g, g) each
        coords = torch.stack([x, y], -1) * 2 - 1  # (g, g, 2) in [-1, 1], x first
        proj = 2 * math.pi * (coords @ self.gaussian.float())  # (g, g, C/2)
        return torch.cat([proj.sin(), proj.cos()], -1).permute(2, 0, 1)  # (C, g, g)


class _TwoWayTransformer(nn.Module):
    """SAM's two-way transformer: ``depth`` two-way layers then a final token→image attention."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        sizes = {
            "dim": cfg.dim,
            "heads": cfg.heads,
            "mlp_dim": cfg.mlp_dim,
            "downsample": cfg.attention_downsample,
        }
        self.layers = nn.ModuleList(
            [_TwoWayLayer(**sizes, skip_first_pe=i == 0) for i in range(cfg.depth)]
        )
        self.final_attn = _Attention(
            dim=cfg.dim, heads=cfg.heads, downsample=cfg.attention_downsample
        )
        self.final_norm = nn.LayerNorm(cfg.dim)

    def forward(
        self, tokens: torch.Tensor, image: torch.Tensor, image_pe: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``tokens (K, T, C)``, ``image (K, C, s, s)``, ``image_pe (C, s, s)`` -> tokens, ``(K, s*s, C)``."""
        src = image.flatten(2).transpose(1, 2)  # (K, s*s, C)
        pe = image_pe.to(src.dtype).flatten(1).transpose(0, 1)[None]  # (1, s*s, C)
        token_pe = tokens
        for layer in self.layers:
            tokens, src = layer(tokens, src, token_pe, pe)
        q, k = tokens + token_pe, src + pe
        tokens = self.final_norm(tokens + self.final_attn(q, k, src))
        return tokens, src


class AuthorsPixelDecoder(nn.Module):
    """The released PixelLM decoder with its input projections (two levels, fixed fusion).

    Same interface as ``PixelLMPixelDecoder``: CLIP maps + codebook states in, mask logits out.
    """

    def __init__(
        self,
        cfg: DecoderConfig,
        *,
        tokens_per_group: int,
        llm_hidden_size: int,
        vision_hidden_size: int,
        projector_hidden_factor: int,
    ) -> None:
        super().__init__()
        c, d = cfg.dim, llm_hidden_size
        if c % 8:
            raise ValueError(f"decoder.dim={c} must be divisible by 8 (upscaled to dim/8 channels)")
        self.num_scales = 2
        self.tokens_per_group = tokens_per_group
        wide = d * projector_hidden_factor
        self.vision_projection = MLP(dims=[vision_hidden_size, wide, d], activation=nn.GELU)
        self.neck = nn.Sequential(
            nn.Conv2d(d, c, kernel_size=1, bias=False),
            LayerNorm2d(channels=c),
            nn.Conv2d(c, c, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(channels=c),
        )
        self.text_projection = MLP(dims=[d, d, c], activation=nn.ReLU)
        self.position = _RandomFourierPE(dim=c)  # level 0 (the release's prompt encoder PE)
        self.position_up = _RandomFourierPE(dim=c)  # level 1, on the ×2 grid (``pe1``)
        self.no_mask_embed = nn.Parameter(torch.randn(1, c))
        self.iou_token = nn.Parameter(torch.randn(1, c))
        self.mask_tokens = nn.Parameter(torch.randn(NUM_MASK_TOKENS, c))
        self.level_embed = nn.Parameter(torch.randn(self.num_scales, c))
        self.transformers = nn.ModuleList([_TwoWayTransformer(cfg) for _ in range(self.num_scales)])
        self.upscale = nn.Sequential(
            nn.ConvTranspose2d(c, c // 8, kernel_size=2, stride=2),
            LayerNorm2d(channels=c // 8),
            nn.GELU(),
        )
        self.upsample_features = nn.Sequential(
            nn.ConvTranspose2d(c, c, kernel_size=2, stride=2), LayerNorm2d(channels=c), nn.GELU()
        )
        self.hyper = MLP(dims=[c, c, c, c // 8], activation=nn.ReLU)  # mask token 0's MLP

    def forward(
        self,
        image_features: list[torch.Tensor],
        image_index: torch.Tensor,
        token_states: torch.Tensor,
    ) -> PixelDecoderOutput:
        """Decode one mask per target.

        Args:
            image_features: 2 CLIP maps ``(B, g, g, Cv)``, level 0 (deep) first.
            image_index: ``(K,)`` long, the image of each target.
            token_states: ``(K, 2, N, D)`` codebook states, level-major.

        Returns:
            ``mask_logits (K, 4g, 4g)``, ``scale_logits (K, 2, 4g, 4g)`` (resized), ``gamma (2,)``,
            ``scores (K,)`` (mean foreground probability, as the release scored masks).

        Raises:
            ValueError: not two levels, or states that do not match the features.
        """
        k = token_states.shape[0]
        if len(image_features) != 2 or token_states.dim() != 4 or token_states.shape[1] != 2:
            raise ValueError(
                f"the authors' decoder needs 2 CLIP maps and states (K, 2, N, D), got "
                f"{len(image_features)} maps and states {tuple(token_states.shape)}"
            )
        dtype = self.no_mask_embed.dtype
        b, g = image_features[0].shape[:2]
        x = torch.stack(image_features).to(dtype)  # (2, B, g, g, Cv)
        x = self.vision_projection(x).reshape(2 * b, g, g, -1).permute(0, 3, 1, 2)  # (2B, D, g, g)
        feats = self.neck(x).reshape(2, b, -1, g, g)[:, image_index]  # (2, K, C, g, g)
        p = self.text_projection(token_states.to(dtype))  # (K, 2, N, C)
        h = p.sum(2) / (self.num_scales * self.tokens_per_group)  # (K, 2, C), the release's 1/(L·N)
        out_side = 4 * g
        gamma = torch.full((2,), 0.5, dtype=dtype, device=p.device)
        fixed = torch.cat([self.iou_token, self.mask_tokens]).expand(k, -1, -1)  # (K, 5, C)
        scales, prev = [], None
        for level in range(2):
            src = feats[level]  # (K, C, g, g)
            pe = self.position(g)
            if level:
                src = self.upsample_features(src)  # (K, C, 2g, 2g)
                src = src * (torch.sigmoid(prev)[:, None] + 1)
                pe = self.position_up(2 * g)
            src = src + self.no_mask_embed[0][None, :, None, None]
            tokens = torch.cat([fixed, h[:, level : level + 1]], 1) + self.level_embed[level]
            tokens, src = self.transformers[level](tokens, src, pe)  # (K, 6, C), (K, s*s, C)
            side = math.isqrt(src.shape[1])
            src = src.transpose(1, 2).reshape(k, src.shape[-1], side, side)  # (K, C, s, s)
            upscaled = self.upscale(src)  # (K, C/8, 2s, 2s)
            m = torch.einsum("kc,kchw->khw", self.hyper(tokens[:, 1]), upscaled)  # (K, 2s, 2s)
            prev = m
            scales.append(
                F.interpolate(
                    m[:, None].float(),
                    size=(out_side, out_side),
                    mode="bilinear",
                    align_corners=False,
                )[:, 0].to(m.dtype)
            )
        scale_logits = torch.stack(scales, 1)  # (K, 2, 4g, 4g)
        mask = torch.einsum("l,klhw->khw", gamma, scale_logits)
        # the release's score: mean foreground probability (no score head; detached, untrained)
        scores = mask_scores(mask).detach()
        return PixelDecoderOutput(
            mask_logits=mask, scale_logits=scale_logits, gamma=gamma, scores=scores
        )


def build_authors_decoder(
    cfg: DecoderConfig,
    *,
    num_scales: int,
    tokens_per_group: int,
    llm_hidden_size: int,
    vision_hidden_size: int,
    projector_hidden_factor: int,
) -> AuthorsPixelDecoder:
    """Build the released decoder.

    Raises:
        ValueError: ``num_scales != 2`` (the release has exactly two levels).
    """
    if num_scales != 2:
        raise ValueError(
            f"model.compat.decoder=authors-release needs 2 feature_layers, got {num_scales}"
        )
    return AuthorsPixelDecoder(
        cfg,
        tokens_per_group=tokens_per_group,
        llm_hidden_size=llm_hidden_size,
        vision_hidden_size=vision_hidden_size,
        projector_hidden_factor=projector_hidden_factor,
    )
