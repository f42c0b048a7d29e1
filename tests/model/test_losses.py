"""Mask losses: weight map A, L_ref, DICE and the batch reduction, on hand-made masks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pixellm.model.losses import dice_loss, mask_losses, refinement_loss, refinement_weight_map

LN3 = math.log(3.0)
# BCE(logit, target) for the logits used below:
#   logit  ln 3: σ = 3/4 -> target 1: -ln(3/4) = ln(4/3); target 0: -ln(1/4) = ln 4
#   logit -ln 3: σ = 1/4 -> target 1: ln 4;              target 0: ln(4/3)
#   logit  0   : σ = 1/2 -> either target: ln 2
B43, B4, B2 = math.log(4 / 3), math.log(4.0), math.log(2.0)


def _question() -> tuple[torch.Tensor, torch.Tensor]:
    """K=2 masks of 2x2 pixels; only pixel (0, 0) is positive in both masks."""
    logits = torch.tensor(
        [
            [[LN3, LN3], [0.0, -LN3]],
            [[LN3, -LN3], [0.0, LN3]],
        ]
    )
    targets = torch.tensor(
        [
            [[1.0, 0.0], [1.0, 0.0]],
            [[0.0, 0.0], [1.0, 1.0]],
        ]
    )
    return logits, targets


def test_weight_map_3x3_by_hand() -> None:
    p, n = 1.0, -1.0
    logits = torch.tensor(
        [
            [[p, p, n], [p, n, n], [0.0, n, n]],
            [[p, n, p], [p, p, n], [p, n, n]],
            [[p, n, n], [n, p, n], [0.0, n, p]],
        ]
    )
    # positive masks per pixel (logit exactly 0 is not positive):
    #   [[3, 1, 1], [2, 2, 0], [1, 0, 1]]  ->  A = α where the count is >= 2
    expected = torch.tensor([[2.5, 1.0, 1.0], [2.5, 2.5, 1.0], [1.0, 1.0, 1.0]])
    torch.testing.assert_close(refinement_weight_map(logits, alpha=2.5), expected)


def test_weight_map_is_detached_and_single_mask_never_overlaps() -> None:
    logits = torch.randn(3, 4, 4, requires_grad=True)
    a = refinement_weight_map(logits, alpha=2.0)
    assert not a.requires_grad and a.grad_fn is None
    torch.testing.assert_close(refinement_weight_map(torch.ones(1, 2, 2), 2.0), torch.ones(2, 2))
    torch.testing.assert_close(refinement_weight_map(torch.ones(0, 2, 3), 2.0), torch.ones(2, 3))


def test_refinement_loss_by_hand() -> None:
    logits, targets = _question()
    # A = [[2, 1], [1, 1]]: only (0, 0) has two positive masks
    # mask 0 BCE: [[ln 4/3, ln 4], [ln 2, ln 4/3]]; mask 1 BCE: [[ln 4, ln 4/3], [ln 2, ln 4/3]]
    # Σ A·BCE = (2·ln 4/3 + ln 4 + ln 2 + ln 4/3) + (2·ln 4 + ln 4/3 + ln 2 + ln 4/3)
    #         = 5·ln 4/3 + 3·ln 4 + 2·ln 2, divided by K·H·W = 2·2·2 = 8
    expected = (5 * B43 + 3 * B4 + 2 * B2) / 8
    torch.testing.assert_close(refinement_loss(logits, targets, alpha=2.0), torch.tensor(expected))
    # α = 1 is plain mean BCE: (4·ln 4/3 + 2·ln 4 + 2·ln 2) / 8
    plain = F.binary_cross_entropy_with_logits(logits, targets)
    torch.testing.assert_close(refinement_loss(logits, targets, alpha=1.0), plain)
    torch.testing.assert_close(plain, torch.tensor((4 * B43 + 2 * B4 + 2 * B2) / 8))


def test_refinement_gradient_treats_weights_as_constant() -> None:
    logits, targets = _question()
    logits.requires_grad_(True)
    refinement_loss(logits, targets, alpha=2.0).backward()
    # d/dlogit of A·BCE/(KHW) with A constant = A·(σ(logit) - target)/8
    weights = torch.tensor([[2.0, 1.0], [1.0, 1.0]])
    expected = weights * (torch.sigmoid(logits.detach()) - targets) / 8
    torch.testing.assert_close(logits.grad, expected)


def test_refinement_loss_empty_question_is_connected_zero() -> None:
    logits = torch.zeros(0, 3, 3, requires_grad=True)
    loss = refinement_loss(logits, torch.zeros(0, 3, 3), alpha=2.0)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert logits.grad is not None and logits.grad.shape == (0, 3, 3)


def test_dice_by_hand() -> None:
    big = 50.0  # σ(50) = 1 and σ(-50) ≈ 2e-22 in float32
    logits = torch.tensor(
        [
            [[big, big], [-big, -big]],  # p = [[1, 1], [0, 0]]
            [[big, big], [big, big]],  # p = all ones
            [[0.0, 0.0], [0.0, 0.0]],  # p = 1/2 everywhere
            [[-big, -big], [-big, -big]],  # p ≈ 0
        ]
    )
    targets = torch.tensor(
        [
            [[1.0, 0.0], [1.0, 0.0]],  # Σpt = 1, Σp = 2, Σt = 2 -> 1 - 2/4 = 1/2
            [[1.0, 1.0], [1.0, 1.0]],  # Σpt = 4, Σp = 4, Σt = 4 -> 1 - 8/8 = 0
            [[1.0, 0.0], [0.0, 0.0]],  # Σpt = 1/2, Σp = 2, Σt = 1 -> 1 - 1/3 = 2/3
            [[0.0, 0.0], [0.0, 0.0]],  # empty vs empty -> 1 - eps/eps = 0
        ]
    )
    per_mask = [0.5, 0.0, 2.0 / 3.0, 0.0]
    for k, value in enumerate(per_mask):
        got = dice_loss(logits[k : k + 1], targets[k : k + 1])
        torch.testing.assert_close(got, torch.tensor(value), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        dice_loss(logits, targets), torch.tensor(sum(per_mask) / 4), atol=1e-5, rtol=0
    )


def test_mask_losses_weight_questions_by_mask_count() -> None:
    q0_logits, q0_targets = _question()  # K=2, 2x2
    q1_logits = torch.tensor([[[LN3, -LN3, 0.0]]])  # K=1, 1x3
    q1_targets = torch.tensor([[[1.0, 1.0, 0.0]]])
    empty = torch.zeros(0, 5, 5)
    out = mask_losses(
        [q0_logits, empty, q1_logits], [q0_targets, empty.clone(), q1_targets], alpha=2.0
    )
    assert out.num_masks == 3
    # question 1 (one mask, A = 1): (ln 4/3 + ln 4 + ln 2) / 3
    ref1 = (B43 + B4 + B2) / 3
    ref0 = (5 * B43 + 3 * B4 + 2 * B2) / 8
    torch.testing.assert_close(out.ref, torch.tensor((2 * ref0 + 1 * ref1) / 3))
    dice0 = dice_loss(q0_logits, q0_targets)
    dice1 = dice_loss(q1_logits, q1_targets)
    torch.testing.assert_close(out.dice, (2 * dice0 + dice1) / 3)


def test_mask_losses_all_empty_is_connected_zero() -> None:
    logits = torch.zeros(0, 2, 2, requires_grad=True)
    out = mask_losses([logits], [torch.zeros(0, 2, 2)], alpha=2.0)
    assert out.num_masks == 0 and out.ref.item() == 0.0 and out.dice.item() == 0.0
    assert out.ref.requires_grad and out.dice.requires_grad
    assert mask_losses([], [], alpha=2.0).num_masks == 0


def test_mask_losses_errors_name_question_and_shapes() -> None:
    logits, targets = _question()
    with pytest.raises(
        ValueError,
        match=r"question 1: mask logits shape \(2, 2, 2\) != ground-truth shape \(3, 2, 2\)",
    ):
        mask_losses([logits, logits], [targets, torch.zeros(3, 2, 2)], alpha=2.0)
    with pytest.raises(ValueError, match=r"2 questions of mask logits but 1 of ground-truth"):
        mask_losses([logits, logits], [targets], alpha=2.0)
    with pytest.raises(ValueError, match=r"dice_loss: mask logits shape \(2, 2, 2\)"):
        dice_loss(logits, targets[0])


def test_mask_losses_are_float32_under_a_bf16_autocast() -> None:
    # bf16 logits (a DeepSpeed bf16 engine) inside a CPU bf16 autocast: the losses still come out
    # in float32 and equal the float32 computation on the same values.
    torch.manual_seed(0)
    logits = (torch.randn(3, 16, 16) * 3).to(torch.bfloat16)
    targets = (torch.rand(3, 16, 16) > 0.5).float()
    ref32 = mask_losses([logits.float()], [targets], alpha=2.0)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        got = mask_losses([logits.requires_grad_()], [targets], alpha=2.0)
    assert got.ref.dtype == torch.float32 and got.dice.dtype == torch.float32
    torch.testing.assert_close(got.ref, ref32.ref)
    torch.testing.assert_close(got.dice, ref32.dice)
    got.ref.backward()
    assert logits.grad is not None and logits.grad.dtype == torch.bfloat16


def test_mask_iou_and_score_loss_by_hand() -> None:
    from pixellm.model.losses import mask_iou, score_loss

    logits = torch.tensor([[[1.0, 1.0], [-1.0, -1.0]], [[-1.0, -1.0], [-1.0, -1.0]]])
    targets = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    ious = mask_iou(logits, targets)
    torch.testing.assert_close(ious, torch.tensor([0.5, 1.0]))  # empty vs empty = 1
    scores = torch.tensor([0.7, 0.8], requires_grad=True)
    loss = score_loss(scores, ious)
    torch.testing.assert_close(loss, torch.tensor((0.2**2 + 0.2**2) / 2))
    loss.backward()
    assert scores.grad is not None and bool((scores.grad != 0).all())


def test_alignment_loss_by_hand_and_rewards_matching_tokens() -> None:
    from pixellm.model.losses import alignment_loss

    # K=2, L=1, C=2: token k points exactly at region k -> cosine 1 on the diagonal, 0 off it
    h = torch.tensor([[[1.0, 0.0]], [[0.0, 2.0]]], requires_grad=True)
    regions = torch.tensor([[[3.0, 0.0]], [[0.0, 1.0]]])
    tau = 0.5
    got = alignment_loss(h, regions, tau)
    # each row and column: CE of logits [1/τ, 0] at the right index = log(1 + e^{-1/τ})
    want = math.log(1 + math.exp(-1 / tau))
    torch.testing.assert_close(got, torch.tensor(want))
    swapped = alignment_loss(h, regions.flip(0), tau)  # every token points at the wrong region
    assert float(swapped) > float(got) + 1.0
    got.backward()
    assert h.grad is not None and bool(h.grad.abs().sum() > 0)


def test_alignment_loss_single_target_is_connected_zero_and_shapes_are_checked() -> None:
    from pixellm.model.losses import alignment_loss

    h = torch.randn(1, 2, 4, requires_grad=True)
    zero = alignment_loss(h, torch.randn(1, 2, 4), 0.1)
    assert float(zero) == 0.0
    zero.backward()
    assert h.grad is not None
    with pytest.raises(ValueError, match=r"\(K, L, C\)"):
        alignment_loss(torch.randn(2, 2, 4), torch.randn(2, 1, 4), 0.1)
