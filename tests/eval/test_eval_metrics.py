"""Metric values on hand-made 4x4 masks, worked out by hand in the comments."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from pixellm.eval import PLACEHOLDER, evaluate_predictions
from pixellm.eval.matching import match_masks
from tests.eval.eval_helpers import box, pred_line, row, write_predictions, write_shards

TOP_LEFT = box(slice(0, 2), slice(0, 2))  # area 4
BOTTOM_RIGHT = box(slice(2, 4), slice(2, 4))  # area 4
TOP_LEFT_PLUS = box(slice(0, 2), slice(0, 2)) | box(slice(0, 1), slice(2, 3))  # area 5, ⊃ TOP_LEFT


def _swapped(tmp_path: Path) -> tuple[Path, Path]:
    # GT: [kayak = TOP_LEFT, paddle = BOTTOM_RIGHT]; predictions in the other order:
    # p0 = BOTTOM_RIGHT (IoU 1 with gt1), p1 = TOP_LEFT_PLUS (I 4, U 5: IoU 0.8 with gt0).
    bench = write_shards(
        tmp_path / "bench",
        [row("s1", "val", [("a red kayak", TOP_LEFT), ("a double-bladed paddle", BOTTOM_RIGHT)])],
    )
    preds = write_predictions(
        tmp_path / "p.jsonl", [pred_line("s1", [BOTTOM_RIGHT, TOP_LEFT_PLUS])]
    )
    return bench, preds


def test_muse_matches_swapped_order(tmp_path: Path) -> None:
    bench, preds = _swapped(tmp_path)
    val = evaluate_predictions(str(bench), str(preds), "muse").to_dict()["splits"]["val"]
    # gIoU = (1 + 0.8) / max(2, 2) = 0.9; cIoU = (4 + 4) / (4 + 5) = 8/9.
    assert val["giou"] == pytest.approx(0.9)
    assert val["ciou"] == pytest.approx(8 / 9)
    assert (val["n_questions"], val["n_targets"], val["n_pred_masks"]) == (1, 2, 2)


def test_referring_pairs_in_order(tmp_path: Path) -> None:
    bench, preds = _swapped(tmp_path)
    val = evaluate_predictions(bench, preds, "referring").to_dict()["splits"]["val"]
    # p0 vs gt0: I 0, U 8; p1 vs gt1: I 0, U 9 -> gIoU 0, cIoU 0 / 17 = 0.
    assert val["giou"] == 0.0
    assert val["ciou"] == 0.0


def test_bce_dice_matching_is_seeded_and_finds_the_swap() -> None:
    pred = np.stack([BOTTOM_RIGHT, TOP_LEFT_PLUS])
    gt = np.stack([TOP_LEFT, BOTTOM_RIGHT])
    first = match_masks(pred, gt, method="bce_dice", seed=3)
    assert first == [(0, 1), (1, 0)]
    assert match_masks(pred, gt, method="bce_dice", seed=3) == first
    assert match_masks(pred, gt, method="iou") == first
    with pytest.raises(ValueError, match="matching method 'dice'"):
        match_masks(pred, gt, method="dice")  # type: ignore[arg-type]


def test_muse_unmatched_on_both_sides_and_no_target_accuracy(tmp_path: Path) -> None:
    col0, col3 = box(slice(0, 4), slice(0, 1)), box(slice(0, 4), slice(3, 4))
    bench = write_shards(
        tmp_path / "bench",
        [
            row("q1", "val", [("the kayak", TOP_LEFT)]),
            row("q2", "val", [("left pole", col0), ("right pole", col3)]),
            row("q3", "val", []),
            row("q4", "val", []),
        ],
    )
    preds = write_predictions(
        tmp_path / "p.jsonl",
        [
            # q1: p0 = TOP_LEFT (IoU 1, I 4, U 4); p1 = row 3 cols 0-1 unmatched (area 2).
            pred_line("q1", [TOP_LEFT, box(slice(3, 4), slice(0, 2))]),
            # q2: p0 = col 3 rows 0-2 vs right pole: I 3, U 4 (IoU 0.75); left pole unmatched (4).
            pred_line("q2", [box(slice(0, 3), slice(3, 4))]),
            # q3: no target, no mask -> correct. q4: no target, one mask (area 1) -> wrong.
            pred_line("q3", [], text="Nothing here."),
            pred_line("q4", [box(slice(0, 1), slice(0, 1))]),
        ],
    )
    val = evaluate_predictions(bench, preds, "muse").to_dict()["splits"]["val"]
    # gIoU = (1 + 0.75 + 0) / (max(2,1) + max(1,2) + 0 + max(1,0)) = 1.75 / 5
    assert val["giou"] == pytest.approx(1.75 / 5)
    # cIoU = (4 + 3) / ((4 + 2) + (4 + 4) + 0 + 1) = 7 / 15
    assert val["ciou"] == pytest.approx(7 / 15)
    assert val["no_target_accuracy"] == pytest.approx(0.5)
    assert val["n_no_target_questions"] == 2
    assert val["n_missing_predictions"] == 0


def test_referring_ignore_empty_vs_empty_and_missing(tmp_path: Path) -> None:
    right_half = box(slice(0, 4), slice(2, 4))
    bench = write_shards(
        tmp_path / "bench",
        [
            # r1: GT TOP_LEFT; pred = rows 0-1 all columns (area 8, IoU 0.5 without ignore);
            # ignoring the right half leaves pred = GT: I 4, U 4, IoU 1.
            row("r1", "val", [("a box", TOP_LEFT)], ignore=right_half),
            # r2: GT lies wholly in the ignored half; no prediction line -> empty vs empty = 1.
            row("r2", "val", [("a stick", box(slice(0, 2), slice(3, 4)))], ignore=right_half),
            # r3: pred 0 = column 0 of TOP_LEFT (I 2, U 4: 0.5); target 2 has no mask: I 0, U 4.
            row("r3", "val", [("first", TOP_LEFT), ("second", BOTTOM_RIGHT)]),
        ],
    )
    preds = write_predictions(
        tmp_path / "p.jsonl",
        [
            pred_line("r1", [box(slice(0, 2), slice(0, 4))]),
            pred_line("r3", [box(slice(0, 2), slice(0, 1))]),
        ],
    )
    val = evaluate_predictions(bench, preds, "referring").to_dict()["splits"]["val"]
    # gIoU = (1 + 1 + 0.5 + 0) / 4 = 0.625; cIoU = (4 + 0 + 2 + 0) / (4 + 0 + 4 + 4) = 0.5
    assert val["giou"] == pytest.approx(0.625)
    assert val["ciou"] == pytest.approx(0.5)
    assert (val["n_targets"], val["n_pred_masks"], val["n_missing_predictions"]) == (4, 2, 1)


def test_placeholder_matches_model_codebook() -> None:
    # Read the constant without importing torch: the scorer must agree with the model's text.
    source = (Path(__file__).parents[2] / "pixellm/model/codebook.py").read_text()
    values = [
        node.value.value
        for node in ast.parse(source).body
        if isinstance(node, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == "PLACEHOLDER" for t in node.targets)
    ]
    assert values == [PLACEHOLDER]


def test_empty_benchmark_split_has_no_figures(tmp_path: Path) -> None:
    # Only no-target questions answered correctly: gIoU and cIoU are undefined (None), not 0.
    bench = write_shards(tmp_path / "bench", [row("n1", "val", [])])
    preds = write_predictions(tmp_path / "p.jsonl", [pred_line("n1", [], text="None.")])
    val = evaluate_predictions(bench, preds, "muse").to_dict()["splits"]["val"]
    assert val["giou"] is None and val["ciou"] is None
    assert val["no_target_accuracy"] == 1.0
