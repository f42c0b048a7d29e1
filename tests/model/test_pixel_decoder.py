"""Pixel decoder D: eq. (1) modulation, γ, φ, shapes, per-image projection, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from pixellm.config import DecoderConfig
from pixellm.model.pixel_decoder import (
    PixelLMPixelDecoder,
    build_pixel_decoder,
    mask_scores,
    modulate,
    stability_scores,
)

L, N, D, CV, G, B = 2, 3, 32, 24, 4, 2  # scales, tokens/group, LLM width, CLIP width, grid, images
CFG = DecoderConfig(dim=16, depth=2, heads=2, mlp_dim=32, attention_downsample=2)


def _decoder(seed: int = 0, tokens: int = N) -> PixelLMPixelDecoder:
    torch.manual_seed(seed)
    return build_pixel_decoder(
        CFG, num_scales=L, tokens_per_group=tokens, llm_hidden_size=D, vision_hidden_size=CV
    )


def _inputs(
    k: int, image_index: list[int]
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    feats = [torch.randn(B, G, G, CV, generator=gen) for _ in range(L)]
    states = torch.randn(k, L, N, D, generator=gen)
    return feats, torch.tensor(image_index, dtype=torch.long), states


def test_modulate_by_hand() -> None:
    feats = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])  # (K=1, C=1, 2, 2)
    ln3 = math.log(3.0)
    logits = torch.tensor([[[0.0, ln3], [-ln3, 100.0]]])  # (1, 2, 2), same grid: no resize
    # σ(0) = 1/2, σ(ln 3) = 3/4, σ(-ln 3) = 1/4, σ(100) = 1 (float32)
    # factors σ + 1 = [[1.5, 1.75], [1.25, 2.0]]  ->  [[1·1.5, 2·1.75], [3·1.25, 4·2]]
    expected = torch.tensor([[[[1.5, 3.5], [3.75, 8.0]]]])
    torch.testing.assert_close(modulate(feats, logits), expected)


def test_modulate_area_resizes_logits_before_sigmoid() -> None:
    feats = torch.ones(1, 2, 2, 2)  # (K=1, C=2, 2, 2)
    ln3 = math.log(3.0)
    # a 4x4 mask over a 2x2 grid: each cell averages its 2x2 block of logits
    logits = torch.tensor(
        [
            [
                [2.0, -2.0, ln3, ln3],
                [1.0, -1.0, ln3, ln3],
                [-ln3, -ln3, 0.0, 0.0],
                [-ln3, -ln3, 0.0, 0.0],
            ]
        ]
    )
    # block means: top-left (2-2+1-1)/4 = 0, top-right ln3, bottom-left -ln3, bottom-right 0
    # factors σ + 1: [[1.5, 1.75], [1.25, 1.5]], the same for both channels
    factor = torch.tensor([[1.5, 1.75], [1.25, 1.5]])
    torch.testing.assert_close(modulate(feats, logits), factor.expand(1, 2, 2, 2))


def test_modulate_rejects_mismatched_targets() -> None:
    with pytest.raises(ValueError, match=r"same K, got \(2, 1, 2, 2\) and \(3, 2, 2\)"):
        modulate(torch.ones(2, 1, 2, 2), torch.zeros(3, 2, 2))


def test_gamma_starts_uniform_and_sums_to_one() -> None:
    dec = _decoder()
    torch.testing.assert_close(dec.normalized_gamma(), torch.full((L,), 1.0 / L))
    with torch.no_grad():
        dec.gamma_logits.copy_(torch.tensor([math.log(3.0), 0.0]))
    # softmax([ln 3, 0]) = [3/4, 1/4]
    torch.testing.assert_close(dec.normalized_gamma(), torch.tensor([0.75, 0.25]))
    out = dec(*_inputs(3, [0, 1, 1]))
    torch.testing.assert_close(out.gamma.sum(), torch.tensor(1.0))
    combined = 0.75 * out.scale_logits[:, 0] + 0.25 * out.scale_logits[:, 1]
    torch.testing.assert_close(out.mask_logits, combined)


def test_token_fusion_starts_as_average_and_identity_for_one_token() -> None:
    dec = _decoder()
    x = torch.randn(5, N * CFG.dim)  # (K, N*C) token-major
    mean = x.view(5, N, CFG.dim).mean(1)  # (K, C)
    torch.testing.assert_close(dec.token_fusion[0](x), mean)
    single = _decoder(tokens=1).token_fusion[1]
    y = torch.randn(4, CFG.dim)
    torch.testing.assert_close(single(y), y)


@pytest.mark.parametrize("index", [[], [0, 1, 1]])
def test_shapes(index: list[int]) -> None:
    k = len(index)
    out = _decoder()(*_inputs(k, index))
    assert out.mask_logits.shape == (k, 4 * G, 4 * G)
    assert out.scale_logits.shape == (k, L, 4 * G, 4 * G)
    assert out.gamma.shape == (L,)


def test_images_projected_once_per_image_and_gathered_per_target() -> None:
    dec = _decoder().eval()
    seen: list[int] = []
    dec.neck.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[0]))
    feats, _, states = _inputs(5, [0] * 5)
    states[:] = states[0]  # every target has the same codebook states
    index = torch.tensor([0, 1, 1, 0, 1])
    out = dec(feats, index, states)
    assert seen == [L * B]  # one batched neck pass over the L*B image maps, not L*K
    masks = out.mask_logits
    torch.testing.assert_close(masks[0], masks[3])  # same image, same states -> same mask
    torch.testing.assert_close(masks[1], masks[4])
    assert not torch.allclose(masks[0], masks[1])  # different images -> different masks


def test_every_parameter_gets_a_gradient() -> None:
    dec = _decoder()
    feats, index, states = _inputs(3, [0, 1, 1])
    out = dec(feats, index, states)
    target = torch.rand(out.mask_logits.shape, generator=torch.Generator().manual_seed(2)) > 0.5
    loss = torch.nn.functional.binary_cross_entropy_with_logits(out.mask_logits, target.float())
    loss = loss + out.scores.square().sum()  # the score head is trained by its own loss
    loss.backward()
    missing = [n for n, p in dec.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
    groups = (
        "vision_projection.",
        "neck.",
        "text_projection.",
        "token_fusion.0.",
        "token_fusion.1.",
    )
    names = [n for n, _ in dec.named_parameters()]
    for prefix in (*groups, "blocks.0.", "blocks.1.", "gamma_logits"):
        assert any(n.startswith(prefix) for n in names), prefix


def test_position_encoding_does_not_depend_on_the_seed() -> None:
    a, b = _decoder(seed=0), _decoder(seed=7)
    torch.testing.assert_close(a.blocks[0].position(G), b.blocks[0].position(G))
    assert not torch.allclose(a.blocks[0].mask_token, b.blocks[0].mask_token)


def test_input_errors_name_the_shapes() -> None:
    dec = _decoder()
    feats, index, states = _inputs(3, [0, 1, 1])
    with pytest.raises(ValueError, match=r"got 1 CLIP feature maps, decoder has L=2"):
        dec(feats[:1], index, states)
    with pytest.raises(ValueError, match=r"token_states \(K, L=2, N=3, D=32\).*\(3, 2, 2, 32\)"):
        dec(feats, index, states[:, :, :2])
    with pytest.raises(ValueError, match=r"outside \[0, B=2\)"):
        dec(feats, torch.tensor([0, 2, 1]), states)
    with pytest.raises(ValueError, match=r"must be divisible by 8"):
        build_pixel_decoder(
            DecoderConfig(dim=12, heads=2, attention_downsample=1),
            num_scales=L,
            tokens_per_group=N,
            llm_hidden_size=D,
            vision_hidden_size=CV,
        )


def test_mask_scores_by_hand() -> None:
    ln3, ln9 = math.log(3.0), math.log(9.0)
    logits = torch.tensor(
        [
            [[ln3, ln9], [-1.0, 0.0]],  # foreground σ = 3/4 and 9/10 -> mean 0.825; 0 is background
            [[-2.0, -1.0], [0.0, -5.0]],  # no foreground pixel -> 0
        ]
    )
    torch.testing.assert_close(mask_scores(logits), torch.tensor([0.825, 0.0]))
    with pytest.raises(ValueError, match=r"expects \(K, H, W\) logits, got \(4, 4\)"):
        mask_scores(torch.zeros(4, 4))


def test_stability_scores_by_hand() -> None:
    logits = torch.tensor(
        [
            [[2.0, 0.5], [-0.5, -3.0]],  # above +1: 1 pixel, above -1: 3 pixels -> 1/3
            [[5.0, 4.0], [-2.0, -9.0]],  # a sharp edge: 2 / 2 -> 1
            [[-2.0, -1.0], [-5.0, -3.0]],  # nothing above -1 -> 0
        ]
    )
    torch.testing.assert_close(stability_scores(logits), torch.tensor([1 / 3, 1.0, 0.0]))
    torch.testing.assert_close(stability_scores(logits, offset=3.0)[1], torch.tensor(2 / 3))
    with pytest.raises(ValueError, match=r"expects \(K, H, W\) logits, got \(4, 4\)"):
        stability_scores(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="offset must be > 0, got 0"):
        stability_scores(torch.zeros(1, 4, 4), offset=0)


def test_region_features_average_the_features_under_each_mask() -> None:
    from pixellm.model.pixel_decoder import region_features

    feats = torch.arange(2 * 2 * 3 * 2 * 2, dtype=torch.float32).reshape(
        2, 2, 3, 2, 2
    )  # (L,B,C,g,g)
    masks = torch.zeros(2, 2, 2)
    masks[0, 0, 0] = masks[0, 1, 1] = 1.0  # target 0 (image 1): cells (0,0) and (1,1)
    masks[1, 0, 1] = 0.5  # target 1 (image 0): half of cell (0,1)
    got = region_features(feats, torch.tensor([1, 0]), masks)  # (K, L, C)
    want0 = (feats[:, 1, :, 0, 0] + feats[:, 1, :, 1, 1]) / 2  # (L, C)
    want1 = feats[:, 0, :, 0, 1]
    torch.testing.assert_close(got, torch.stack([want0, want1]))
