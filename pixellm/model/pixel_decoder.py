"""Pixel decoder D of PixelLM (paper section 3.1, eq. 1) and every trainable part between the
LLM / CLIP and the masks: ``p_V→D`` + neck, the text→decoder projection, token fusion φ, one
two-way attention block per scale and the scale weights γ.

Shape letters used throughout this module:
    B: images in the batch.         K: targets (one codebook run each) over the whole batch.
    L: visual scales (= codebook groups). Index 0 is the deepest CLIP layer (``feature_layers[0]``),
       index L-1 the shallowest.
    N: codebook tokens per group.   D: LLM hidden size.     Cv: CLIP hidden size.
    C: decoder width (``DecoderConfig.dim``).   g: side of the CLIP patch grid.
    S: side of a predicted mask, ``S = 4 * g``.  T: tokens in a block (mask token + target token).

Data flow of one batch:
    CLIP maps L x (B, g, g, Cv) --p_V→D + neck, once per image--> (L, B, C, g, g)
        --gather by image_index--> (L, K, C, g, g)
    codebook states (K, L, N, D) --text projection--> (K, L, N, C) --φ per scale--> h (K, L, C)
    deepest first: f'^0 = f^0, f'^ℓ = f^ℓ ⊙ (σ(m^{ℓ-1}) + 1) for ℓ ≥ 1, m^ℓ = Attn^ℓ(h^ℓ, f'^ℓ)
    M̂ = Σ_ℓ γ^ℓ m^ℓ with γ = softmax(learnable vector) (non-negative, sums to 1).

The paper numbers scales the other way (ℓ = L deepest, modulation by m^{ℓ+1}); the order of
computation is the same. Where the authors' release departs from the paper we follow the paper:
φ is learned (the release averaged with fixed Python floats), γ is learned (the release used the
constants 0.5 / 0.5) and the neck is trainable (left frozen at random init in the release). All
scales share the CLIP grid g, so every m^ℓ is (S, S) and no feature upsampling between scales is
needed (the release upsampled its second level ×2 instead).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pixellm.config import DecoderConfig

__all__ = [
    "MLP",
    "LayerNorm2d",
    "MaskScoreHead",
    "PixelDecoderOutput",
    "PixelLMMaskBlock",
    "PixelLMPixelDecoder",
    "build_pixel_decoder",
    "mask_scores",
    "modulate",
    "region_features",
    "stability_scores",
]


@dataclass
class PixelDecoderOutput:
    """What the pixel decoder returns.

    Attributes:
        mask_logits: ``(K, S, S)`` final mask logits M̂ = Σ_ℓ γ^ℓ m^ℓ.
        scale_logits: ``(K, L, S, S)`` the per-scale logits m^ℓ, deepest first.
        gamma: ``(L,)`` the normalised scale weights γ used for ``mask_logits``.
        scores: ``(K,)`` predicted IoU of each mask ``mask_logits > 0`` with its target, in [0, 1]
            (the score head; trained with MSE against the measured IoU).
        target_tokens: ``(K, L, C)`` fused target tokens h (None where a decoder does not expose
            them); input of the alignment loss.
        image_features: ``(L, B, C, g, g)`` decoder features f^ℓ of each image, before modulation
            (None where a decoder does not expose them).
    """

    mask_logits: torch.Tensor
    scale_logits: torch.Tensor
    gamma: torch.Tensor
    scores: torch.Tensor
    target_tokens: torch.Tensor | None = None
    image_features: torch.Tensor | None = None


# ---------------------------------------------------------------------------------------- blocks
class LayerNorm2d(nn.Module):
    """LayerNorm over the channel dimension of a ``(B, C, H, W)`` map (per pixel)."""

    def __init__(self, *, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> ``(B, C, H, W)``."""
        mean = x.mean(1, keepdim=True)  # (B, 1, H, W)
        var = (x - mean).pow(2).mean(1, keepdim=True)  # (B, 1, H, W)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return x * self.weight[:, None, None] + self.bias[:, None, None]


class MLP(nn.Module):
    """Linear layers of widths ``dims`` with ``activation`` between them (none after the last)."""

    def __init__(self, *, dims: Sequence[int], activation: type[nn.Module]) -> None:
        super().__init__()
        if len(dims) < 2:
            raise ValueError(f"MLP needs at least input and output widths, got dims={list(dims)}")
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            if i:
                layers.append(activation())
            layers.append(nn.Linear(d_in, d_out))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., dims[0])`` -> ``(..., dims[-1])``."""
        return self.layers(x)


class _Attention(nn.Module):
    """Multi-head attention with inner width ``dim // downsample`` (SAM's cheap cross-attention)."""

    def __init__(self, *, dim: int, heads: int, downsample: int = 1) -> None:
        super().__init__()
        inner = dim // downsample
        if inner % heads:
            raise ValueError(
                f"attention width {dim}/{downsample}={inner} not divisible by {heads=}"
            )
        self.heads = heads
        self.q_proj = nn.Linear(dim, inner)
        self.k_proj = nn.Linear(dim, inner)
        self.v_proj = nn.Linear(dim, inner)
        self.out_proj = nn.Linear(inner, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        k, t, inner = x.shape
        x = x.view(k, t, self.heads, inner // self.heads)  # (K, T, heads, inner/heads)
        return x.transpose(1, 2)  # (K, heads, T, inner/heads)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``q (K, Tq, C)``, ``k`` and ``v`` ``(K, Tk, C)`` -> ``(K, Tq, C)``."""
        out = F.scaled_dot_product_attention(
            self._split(self.q_proj(q)), self._split(self.k_proj(k)), self._split(self.v_proj(v))
        )  # (K, heads, Tq, inner/heads)
        out = out.transpose(1, 2).flatten(2)  # (K, Tq, inner)
        return self.out_proj(out)


class _TwoWayLayer(nn.Module):
    """Token self-attention, token→image attention, token MLP, image→token attention (SAM)."""

    def __init__(
        self, *, dim: int, heads: int, mlp_dim: int, downsample: int, skip_first_pe: bool
    ) -> None:
        super().__init__()
        self.skip_first_pe = skip_first_pe
        self.self_attn = _Attention(dim=dim, heads=heads)
        self.token_to_image = _Attention(dim=dim, heads=heads, downsample=downsample)
        self.mlp = MLP(dims=[dim, mlp_dim, dim], activation=nn.ReLU)
        self.image_to_token = _Attention(dim=dim, heads=heads, downsample=downsample)
        self.norms = nn.ModuleList([nn.LayerNorm(dim) for _ in range(4)])

    def forward(
        self,
        tokens: torch.Tensor,
        image: torch.Tensor,
        token_pe: torch.Tensor,
        image_pe: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``tokens (K, T, C)``, ``image (K, g*g, C)``, PEs broadcastable -> updated both."""
        if self.skip_first_pe:  # first layer: the tokens are their own PE, no residual (SAM)
            tokens = self.self_attn(tokens, tokens, tokens)
        else:
            q = tokens + token_pe
            tokens = tokens + self.self_attn(q, q, tokens)
        tokens = self.norms[0](tokens)
        q, k = tokens + token_pe, image + image_pe
        tokens = self.norms[1](tokens + self.token_to_image(q, k, image))
        tokens = self.norms[2](tokens + self.mlp(tokens))
        q, k = tokens + token_pe, image + image_pe
        image = self.norms[3](image + self.image_to_token(k, q, tokens))
        return tokens, image


class _SinePositionEncoding(nn.Module):
    """Deterministic 2-D sine/cosine encoding of a g×g grid's cell centres.

    Each axis gets ``C/4`` frequencies spaced geometrically from 1 cycle per image side up to the
    grid's Nyquist rate (g/2 cycles), so every grid size is covered without aliasing. Nothing is
    random: every build and every rank has the same encoding, and it also builds on ``meta``.
    """

    def __init__(self, *, dim: int) -> None:
        super().__init__()
        if dim % 4:
            raise ValueError(f"sine position encoding needs dim divisible by 4, got {dim}")
        bands = torch.linspace(0.0, 1.0, dim // 4) if dim > 4 else torch.zeros(1)
        self.register_buffer("bands", bands, persistent=False)  # (C/4,) exponents in [0, 1]

    def forward(self, grid: int) -> torch.Tensor:
        """Returns the ``(C, g, g)`` encoding for a ``g = grid`` patch grid."""
        # float32 even in a bf16 model: bf16 phases of up to 2π·g/2 would be off by ~0.1 rad
        cycles = max(grid / 2.0, 1.0) ** self.bands.float()  # (C/4,) 1 to g/2 cycles per side
        centres = (torch.arange(grid, device=cycles.device, dtype=cycles.dtype) + 0.5) / grid
        phase = 2 * math.pi * centres[:, None] * cycles[None]  # (g, C/4)
        enc = torch.cat([phase.sin(), phase.cos()], -1)  # (g, C/2)
        y = enc[:, None, :].expand(grid, grid, -1)  # (g, g, C/2), varies along rows
        x = enc[None, :, :].expand(grid, grid, -1)  # (g, g, C/2), varies along columns
        return torch.cat([x, y], -1).permute(2, 0, 1)  # (C, g, g)


class PixelLMMaskBlock(nn.Module):
    """Attn^ℓ of paper eq. (1): a SAM-style two-way token↔image transformer with a mask head.

    Tokens are a learned mask token and the fused target token h^ℓ; the image tokens carry a sine
    position encoding. The image is upscaled ×4 (two stride-2 transposed convs to C/8 channels) and
    a hypernetwork MLP turns the output mask token into per-channel weights: m = hyper · upscaled.
    """

    def __init__(
        self, *, dim: int, depth: int, heads: int, mlp_dim: int, attention_downsample: int
    ) -> None:
        super().__init__()
        if dim % 8:
            raise ValueError(
                f"decoder.dim={dim} must be divisible by 8 (upscaled to dim/8 channels)"
            )
        self.mask_token = nn.Parameter(torch.randn(1, dim))  # N(0, 1) like SAM's nn.Embedding
        self.position = _SinePositionEncoding(dim=dim)
        sizes = {"dim": dim, "heads": heads, "mlp_dim": mlp_dim, "downsample": attention_downsample}
        layers = [_TwoWayLayer(**sizes, skip_first_pe=i == 0) for i in range(depth)]
        self.layers = nn.ModuleList(layers)
        self.final_attn = _Attention(dim=dim, heads=heads, downsample=attention_downsample)
        self.final_norm = nn.LayerNorm(dim)
        self.upscale = nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(channels=dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(dim // 4, dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.hyper = MLP(dims=[dim, dim, dim, dim // 8], activation=nn.ReLU)

    def forward(
        self, target: torch.Tensor, image: torch.Tensor, return_token: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Mask logits for each target.

        Args:
            target: ``(K, C)`` fused codebook state h^ℓ.
            image: ``(K, C, g, g)`` (modulated) decoder features f'^ℓ of each target's image.
            return_token: also return the output mask token ``(K, C)`` (input of the score head).

        Returns:
            ``(K, 4g, 4g)`` mask logits m^ℓ (and the mask token when ``return_token``).
        """
        k, c, g, _ = image.shape
        tokens = torch.stack([self.mask_token.expand(k, -1), target], 1)  # (K, T=2, C)
        token_pe = tokens
        image_pe = self.position(g).to(image.dtype).flatten(1).transpose(0, 1)[None]  # (1, g*g, C)
        src = image.flatten(2).transpose(1, 2)  # (K, g*g, C)
        for layer in self.layers:
            tokens, src = layer(tokens, src, token_pe, image_pe)
        q, key = tokens + token_pe, src + image_pe
        tokens = self.final_norm(tokens + self.final_attn(q, key, src))  # (K, T, C)
        src = src.transpose(1, 2).reshape(k, c, g, g)  # (K, C, g, g)
        upscaled = self.upscale(src)  # (K, C/8, 4g, 4g)
        weights = self.hyper(tokens[:, 0])  # (K, C/8), from the mask token
        logits = torch.einsum("kc,kchw->khw", weights, upscaled)  # (K, 4g, 4g)
        return (logits, tokens[:, 0]) if return_token else logits


# ------------------------------------------------------------------------------------- functions
def modulate(features: torch.Tensor, prev_logits: torch.Tensor) -> torch.Tensor:
    """Paper eq. (1): ``f ⊙ (σ(m) + 1)`` with m resized to the feature grid.

    The logits are resized before the sigmoid: area-averaged when shrinking (each feature cell
    sees the mean logit of the mask pixels it covers), bilinear when growing.

    Args:
        features: ``(K, C, g, g)`` decoder features of scale ℓ.
        prev_logits: ``(K, s, s)`` mask logits m^{ℓ-1} of the previous (deeper) scale.

    Returns:
        ``(K, C, g, g)`` modulated features; each cell is scaled by a factor in (1, 2).

    Raises:
        ValueError: ranks or the number of targets do not match.
    """
    if features.dim() != 4 or prev_logits.dim() != 3 or features.shape[0] != prev_logits.shape[0]:
        raise ValueError(
            f"modulate expects features (K, C, g, g) and logits (K, s, s) with the same K, got "
            f"{tuple(features.shape)} and {tuple(prev_logits.shape)}"
        )
    size = tuple(features.shape[-2:])
    m = prev_logits[:, None]  # (K, 1, s, s)
    if tuple(m.shape[-2:]) != size:
        shrink = m.shape[-1] >= size[-1] and m.shape[-2] >= size[-2]
        mode = "area" if shrink else "bilinear"
        m = F.interpolate(m, size=size, mode=mode, **({} if shrink else {"align_corners": False}))
    return features * (torch.sigmoid(m) + 1)  # (K, C, g, g), factor broadcast over C


def region_features(
    image_features: torch.Tensor, image_index: torch.Tensor, masks: torch.Tensor
) -> torch.Tensor:
    """Mean decoder feature under each target's ground-truth mask, per scale.

    Args:
        image_features: ``(L, B, C, g, g)`` decoder features f^ℓ.
        image_index: ``(K,)`` long, the batch image of each target.
        masks: ``(K, g, g)`` target masks on the feature grid, in [0, 1] (area fractions).

    Returns:
        ``(K, L, C)``; a zero vector for an empty mask.
    """
    feats = image_features[:, image_index]  # (L, K, C, g, g)
    weight = masks.to(feats.dtype)
    area = weight.flatten(1).sum(1).clamp(min=1e-6)  # (K,)
    return torch.einsum("kxy,lkcxy->klc", weight, feats) / area[:, None, None]


def mask_scores(mask_logits: torch.Tensor) -> torch.Tensor:
    """Confidence per target: mean sigmoid probability over the pixels predicted foreground.

    Args:
        mask_logits: ``(K, H, W)`` mask logits; foreground is ``logit > 0``.

    Returns:
        ``(K,)`` scores in [0.5, 1]; 0 for a mask with no foreground pixel.

    Raises:
        ValueError: ``mask_logits`` is not 3-D.
    """
    if mask_logits.dim() != 3:
        raise ValueError(f"mask_scores expects (K, H, W) logits, got {tuple(mask_logits.shape)}")
    probs = torch.sigmoid(mask_logits)
    fg = (mask_logits > 0).to(probs.dtype)
    area = fg.flatten(1).sum(1)  # (K,)
    total = (probs * fg).flatten(1).sum(1)  # (K,)
    return torch.where(area > 0, total / area.clamp(min=1), torch.zeros_like(total))


def stability_scores(mask_logits: torch.Tensor, offset: float = 1.0) -> torch.Tensor:
    """SAM's stability score: IoU of the mask thresholded at ``+offset`` with the one at
    ``-offset`` logits, i.e. ``|logit > offset| / |logit > -offset|``; a mask that a small shift of
    the threshold grows or shrinks scores low.

    Args:
        mask_logits: ``(K, H, W)`` mask logits; foreground is ``logit > 0``.
        offset: threshold shift in logits (SAM's default 1.0).

    Returns:
        ``(K,)`` scores in [0, 1]; 0 for a mask with no pixel above ``-offset``.

    Raises:
        ValueError: ``mask_logits`` is not 3-D or ``offset`` is not positive.
    """
    if mask_logits.dim() != 3:
        raise ValueError(
            f"stability_scores expects (K, H, W) logits, got {tuple(mask_logits.shape)}"
        )
    if offset <= 0:
        raise ValueError(f"stability_scores offset must be > 0, got {offset}")
    inner = (mask_logits > offset).flatten(1).sum(1).float()  # (K,)
    outer = (mask_logits > -offset).flatten(1).sum(1).float()  # (K,)
    return torch.where(outer > 0, inner / outer.clamp(min=1), torch.zeros_like(inner))


class MaskScoreHead(nn.Module):
    """Predicted IoU of each final mask with its target (SAM's IoU head, one output per target).

    Input: the L output mask tokens of the target (``(K, L, C)``, concatenated) and two detached
    statistics of the final logits — the mean sigmoid over the predicted foreground
    (``mask_scores``) and the foreground fraction. Output: ``(K,)`` in [0, 1].
    """

    def __init__(self, *, dim: int, num_scales: int) -> None:
        super().__init__()
        self.mlp = MLP(dims=[num_scales * dim + 2, dim, dim, 1], activation=nn.ReLU)

    def forward(self, mask_tokens: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
        """``mask_tokens (K, L, C)``, ``mask_logits (K, S, S)`` -> ``(K,)`` predicted IoU."""
        with torch.no_grad():
            stats = torch.stack(
                [mask_scores(mask_logits), (mask_logits > 0).flatten(1).float().mean(1)], 1
            ).to(mask_tokens.dtype)  # (K, 2)
        x = torch.cat([mask_tokens.flatten(1), stats], 1)  # (K, L*C + 2)
        return torch.sigmoid(self.mlp(x)[:, 0])  # (K,)


# ------------------------------------------------------------------------------- composite model
class PixelLMPixelDecoder(nn.Module):
    """PixelLM's pixel decoder D (paper section 3.1, eq. 1) with its input projections.

    Args:
        vision_projection: ``p_V→D`` MLP ``Cv -> D -> D``, shared across scales.
        neck: ``(·, D, g, g) -> (·, C, g, g)`` convolutions, shared across scales.
        text_projection: MLP ``D -> D -> C`` applied to every codebook token state.
        token_fusion: L linear maps φ^ℓ ``N*C -> C``.
        blocks: L ``PixelLMMaskBlock`` (Attn^ℓ), deepest scale first.
        score_head: ``MaskScoreHead`` predicting each final mask's IoU.
    """

    def __init__(
        self,
        *,
        vision_projection: MLP,
        neck: nn.Module,
        text_projection: MLP,
        token_fusion: nn.ModuleList,
        blocks: nn.ModuleList,
        score_head: MaskScoreHead,
    ) -> None:
        super().__init__()
        if len(token_fusion) != len(blocks) or not len(blocks):
            raise ValueError(
                f"need one token fusion per block and at least one block, got "
                f"{len(token_fusion)} fusions and {len(blocks)} blocks"
            )
        self.vision_projection = vision_projection
        self.neck = neck
        self.text_projection = text_projection
        self.token_fusion = token_fusion
        self.blocks = blocks
        self.score_head = score_head
        # softmax of zeros = uniform 1/L; softmax keeps γ ≥ 0 with Σγ = 1 (paper: |γ| = 1)
        self.gamma_logits = nn.Parameter(torch.zeros(len(blocks)))

    @property
    def num_scales(self) -> int:
        """L."""
        return len(self.blocks)

    def normalized_gamma(self) -> torch.Tensor:
        """``(L,)`` scale weights γ = softmax(gamma_logits): non-negative, summing to 1."""
        return torch.softmax(self.gamma_logits, dim=0)

    def project_images(self, image_features: list[torch.Tensor]) -> torch.Tensor:
        """``p_V→D`` + neck on all L maps of all B images in one batched pass.

        Args:
            image_features: L maps ``(B, g, g, Cv)``, deepest first.

        Returns:
            ``(L, B, C, g, g)`` decoder features f^ℓ per image.
        """
        dtype = self.gamma_logits.dtype
        x = torch.stack(image_features).to(dtype)  # (L, B, g, g, Cv)
        num_scales, b, g = x.shape[:3]
        x = self.vision_projection(x)  # (L, B, g, g, D)
        x = x.reshape(num_scales * b, g, g, -1).permute(0, 3, 1, 2)  # (L*B, D, g, g)
        x = self.neck(x)  # (L*B, C, g, g)
        return x.reshape(num_scales, b, *x.shape[1:])  # (L, B, C, g, g)

    def fuse_tokens(self, token_states: torch.Tensor) -> torch.Tensor:
        """Text projection then φ^ℓ per scale: ``(K, L, N, D)`` -> h ``(K, L, C)``."""
        x = self.text_projection(token_states.to(self.gamma_logits.dtype))  # (K, L, N, C)
        x = x.flatten(2)  # (K, L, N*C), token-major within a scale
        fused = [phi(x[:, level]) for level, phi in enumerate(self.token_fusion)]  # L x (K, C)
        return torch.stack(fused, 1)  # (K, L, C)

    def forward(
        self,
        image_features: list[torch.Tensor],
        image_index: torch.Tensor,
        token_states: torch.Tensor,
    ) -> PixelDecoderOutput:
        """Decode one mask per target (paper eq. 1).

        Args:
            image_features: L raw CLIP maps ``(B, g, g, Cv)`` (patch tokens only), deepest first.
            image_index: ``(K,)`` long, the batch image of each target.
            token_states: ``(K, L, N, D)`` last-layer LLM states of each target's codebook tokens,
                scale-major.

        Returns:
            ``PixelDecoderOutput`` with ``mask_logits (K, 4g, 4g)``; K = 0 gives empty tensors.

        Raises:
            ValueError: inconsistent shapes, or an image index outside ``[0, B)``.
        """
        self._check_inputs(image_features, image_index, token_states)
        per_image = self.project_images(image_features)  # (L, B, C, g, g), once per image
        feats = per_image[:, image_index]  # (L, K, C, g, g)
        h = self.fuse_tokens(token_states)  # (K, L, C)
        scale_logits: list[torch.Tensor] = []
        mask_tokens: list[torch.Tensor] = []
        for level, block in enumerate(self.blocks):
            f = feats[level] if level == 0 else modulate(feats[level], scale_logits[-1])
            logits, token = block(h[:, level], f, return_token=True)  # (K, 4g, 4g), (K, C)
            scale_logits.append(logits)
            mask_tokens.append(token)
        scales = torch.stack(scale_logits, 1)  # (K, L, 4g, 4g)
        gamma = self.normalized_gamma()
        mask = torch.einsum("l,klhw->khw", gamma, scales)  # (K, 4g, 4g)
        scores = self.score_head(torch.stack(mask_tokens, 1), mask)  # (K,)
        return PixelDecoderOutput(
            mask_logits=mask,
            scale_logits=scales,
            gamma=gamma,
            scores=scores,
            target_tokens=h,
            image_features=per_image,
        )

    def _check_inputs(
        self, image_features: list[torch.Tensor], image_index: torch.Tensor, states: torch.Tensor
    ) -> None:
        n_scales = self.num_scales
        if len(image_features) != n_scales:
            raise ValueError(
                f"got {len(image_features)} CLIP feature maps, decoder has L={n_scales}"
            )
        shapes = {tuple(f.shape) for f in image_features}
        first = tuple(image_features[0].shape)
        cv = self.vision_projection.layers[0].in_features
        if len(shapes) != 1 or len(first) != 4 or first[1] != first[2] or first[3] != cv:
            raise ValueError(
                f"CLIP feature maps must all be (B, g, g, Cv={cv}), got {sorted(shapes)}"
            )
        d = self.text_projection.layers[0].in_features
        n = self.token_fusion[0].in_features // self.token_fusion[0].out_features
        k = image_index.shape[0] if image_index.dim() == 1 else -1
        if image_index.dtype != torch.long or tuple(states.shape) != (k, n_scales, n, d):
            raise ValueError(
                f"expected image_index (K,) long and token_states (K, L={n_scales}, N={n}, D={d}); "
                f"got image_index {tuple(image_index.shape)} {image_index.dtype} and token_states "
                f"{tuple(states.shape)}"
            )
        if k and image_index.device.type != "meta":  # meta (flop counting) holds no values
            if int(image_index.min()) < 0 or int(image_index.max()) >= first[0]:
                raise ValueError(
                    f"image_index values {image_index.tolist()} outside [0, B={first[0]}) images"
                )


def _average_fusion(*, dim: int, tokens: int) -> nn.Linear:
    """φ^ℓ: Linear(N*C -> C) initialised to the mean of the N token vectors.

    Weight = [I/N, …, I/N] and bias 0, so at step 0 h^ℓ is the plain average the authors' release
    used (a known-good start; with N = 1 it is the identity), while training is free to learn a
    different mix per token and channel as the paper specifies. A random init would instead start
    the decoder from a scrambled target vector.
    """
    phi = nn.Linear(tokens * dim, dim)
    with torch.no_grad():
        phi.weight.copy_(torch.eye(dim).repeat(1, tokens) / tokens)  # (C, N*C)
        phi.bias.zero_()
    return phi


def build_pixel_decoder(
    cfg: DecoderConfig,
    *,
    num_scales: int,
    tokens_per_group: int,
    llm_hidden_size: int,
    vision_hidden_size: int,
) -> PixelLMPixelDecoder:
    """Build the pixel decoder and its projections from the decoder config.

    Args:
        cfg: decoder width, depth, heads, MLP width and attention downsample.
        num_scales: L. tokens_per_group: N. llm_hidden_size: D. vision_hidden_size: Cv.

    Raises:
        ValueError: a size is not positive, or ``cfg.dim`` is not divisible by 8.
    """
    sizes = {
        "num_scales": num_scales,
        "tokens_per_group": tokens_per_group,
        "llm_hidden_size": llm_hidden_size,
        "vision_hidden_size": vision_hidden_size,
    }
    bad = {k: v for k, v in sizes.items() if v <= 0}
    if bad:
        raise ValueError(f"build_pixel_decoder needs positive sizes, got {bad}")
    dim, hidden = cfg.dim, llm_hidden_size
    neck = nn.Sequential(
        nn.Conv2d(hidden, dim, kernel_size=1, bias=False),
        LayerNorm2d(channels=dim),
        nn.Conv2d(dim, dim, kernel_size=3, padding=1, bias=False),
        LayerNorm2d(channels=dim),
    )
    blocks = [
        PixelLMMaskBlock(
            dim=dim,
            depth=cfg.depth,
            heads=cfg.heads,
            mlp_dim=cfg.mlp_dim,
            attention_downsample=cfg.attention_downsample,
        )
        for _ in range(num_scales)
    ]
    return PixelLMPixelDecoder(
        vision_projection=MLP(dims=[vision_hidden_size, hidden, hidden], activation=nn.GELU),
        neck=neck,
        text_projection=MLP(dims=[hidden, hidden, dim], activation=nn.ReLU),
        token_fusion=nn.ModuleList(
            [_average_fusion(dim=dim, tokens=tokens_per_group) for _ in range(num_scales)]
        ),
        blocks=nn.ModuleList(blocks),
        score_head=MaskScoreHead(dim=dim, num_scales=num_scales),
    )
