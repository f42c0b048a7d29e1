"""The OpenAI-compatible judge over loopback HTTP: product with IoU, cache, retries, failures."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pixellm.eval import JudgeError, JudgeUnreachableError, OpenAIJudge, evaluate_predictions
from pixellm.eval.judge import build_rating_prompt, chat_completions_url, parse_ratings
from tests.eval.eval_helpers import (
    box,
    free_port,
    judge_server,
    pred_line,
    row,
    write_predictions,
    write_shards,
)

TOP_LEFT = box(slice(0, 2), slice(0, 2))  # area 4
BOTTOM_RIGHT = box(slice(2, 4), slice(2, 4))  # area 4
TOP_LEFT_PLUS = box(slice(0, 2), slice(0, 2)) | box(slice(0, 1), slice(2, 3))  # area 5


def _bench(tmp_path: Path) -> tuple[Path, Path]:
    bench = write_shards(
        tmp_path / "bench",
        [
            row("s1", "val", [("a red kayak", TOP_LEFT), ("a double-bladed paddle", BOTTOM_RIGHT)]),
            row("s2", "val", [("a blue kayak", TOP_LEFT)]),
        ],
    )
    preds = write_predictions(
        tmp_path / "p.jsonl",
        [
            # s1: p0 ↔ paddle (IoU 1), p1 ↔ red kayak (I 4, U 5: IoU 0.8).
            pred_line("s1", [BOTTOM_RIGHT, TOP_LEFT_PLUS], text="Paddle [SEG] in kayak [SEG]."),
            # s2: the only pair does not overlap (IoU 0, U 8): nothing to ask the judge.
            pred_line("s2", [BOTTOM_RIGHT], text="This [SEG]."),
        ],
    )
    return bench, preds


def test_judge_multiplies_iou_and_cache_makes_rerun_free(tmp_path: Path) -> None:
    bench, preds = _bench(tmp_path)
    cache = tmp_path / "cache"
    with judge_server() as server:
        judge = OpenAIJudge(server.url, "judge-m", cache_dir=cache, timeout_s=5, max_retries=0)
        report = evaluate_predictions(bench, preds, "muse", judge=judge).to_dict()
        assert server.n_requests == 1
        request = server.requests[0]
        assert request["path"] == "/v1/chat/completions"
        assert request["body"]["model"] == "judge-m"
        prompt = request["body"]["messages"][-1]["content"]
        assert "Paddle [1: a double-bladed paddle] in kayak [2: a red kayak]." in prompt
        # Server rates kayak 8, paddle 5: s1 scores 1 × 0.5 + 0.8 × 0.8 = 1.14 over max(2, 2);
        # s2 scores 0 over 1 -> gIoU 1.14 / 3. cIoU = (4 × 0.5 + 4 × 0.8) / (9 + 8) = 5.2 / 17.
        val = report["splits"]["val"]
        assert val["giou"] == pytest.approx(1.14 / 3)
        assert val["ciou"] == pytest.approx(5.2 / 17)
        assert report["judge"] | {"n_requests": 1, "n_cache_hits": 0} == report["judge"]

        rerun = OpenAIJudge(server.url, "judge-m", cache_dir=cache, timeout_s=5, max_retries=0)
        again = evaluate_predictions(bench, preds, "muse", judge=rerun).to_dict()
        assert server.n_requests == 1  # zero new requests
        assert again["splits"] == report["splits"]
        assert again["judge"]["n_cache_hits"] == 1 and again["judge"]["n_requests"] == 0

        other_model = OpenAIJudge(server.url, "judge-n", cache_dir=cache, max_retries=0)
        evaluate_predictions(bench, preds, "muse", judge=other_model)
        assert server.n_requests == 2  # the model is part of the cache key


def test_judge_retries_server_errors(tmp_path: Path) -> None:
    bench, preds = _bench(tmp_path)
    with judge_server(fail_first=2) as server:
        judge = OpenAIJudge(
            server.url, "m", cache_dir=tmp_path / "c", timeout_s=5, max_retries=2, backoff_s=0.01
        )
        val = evaluate_predictions(bench, preds, "muse", judge=judge).to_dict()["splits"]["val"]
        assert server.n_requests == 3
        assert val["giou"] == pytest.approx(1.14 / 3)


def test_unreachable_endpoint_fails_fast_naming_url(tmp_path: Path) -> None:
    bench, preds = _bench(tmp_path)
    url = f"http://127.0.0.1:{free_port()}"
    judge = OpenAIJudge(
        url, "m", cache_dir=tmp_path / "c", timeout_s=0.5, backoff_s=0.01, max_retries=1
    )
    start = time.monotonic()
    with pytest.raises(
        JudgeUnreachableError, match=f"{url}/v1/chat/completions unreachable after 2"
    ):
        evaluate_predictions(bench, preds, "muse", judge=judge)
    assert time.monotonic() - start < 5
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())


def test_slow_endpoint_times_out(tmp_path: Path) -> None:
    bench, preds = _bench(tmp_path)
    with judge_server(delay_s=0.5) as server:
        judge = OpenAIJudge(server.url, "m", cache_dir=tmp_path / "c", timeout_s=0.1, max_retries=0)
        with pytest.raises(JudgeUnreachableError, match="timeout 0.1s"):
            evaluate_predictions(bench, preds, "muse", judge=judge)


def test_parse_ratings_formats() -> None:
    assert parse_ratings('{"ratings": {"1": 7, "2": 10}}', 2) == [7, 10]
    assert parse_ratings('Here: ```json\n{"ratings": [3, 4]}\n```', 2) == [3, 4]
    assert parse_ratings("1: 6\n2 = 9", 2) == [6, 9]
    assert parse_ratings('{"1": 7.6}', 1) == [8]
    with pytest.raises(JudgeError, match="no 2 ratings in 1..10"):
        parse_ratings('{"ratings": {"1": 7}}', 2)
    with pytest.raises(JudgeError, match="no 1 ratings in 1..10"):
        parse_ratings('{"ratings": [11]}', 1)
    with pytest.raises(JudgeError, match="no 1 ratings"):
        parse_ratings("I cannot rate this.", 1)


def test_prompt_and_url() -> None:
    prompt = build_rating_prompt("Q?", "A [SEG] B [SEG]", [(1, "a cup"), (2, "a mat")])
    assert "Answer: A [unmatched] B [1: a cup]" in prompt
    assert "without a place in the text: [2: a mat]" in prompt
    assert chat_completions_url("http://h:1/") == "http://h:1/v1/chat/completions"
    assert chat_completions_url("http://h:1/v1") == "http://h:1/v1/chat/completions"
    assert chat_completions_url("http://h/x/chat/completions") == "http://h/x/chat/completions"


def test_judge_rejected_for_referring(tmp_path: Path) -> None:
    bench, preds = _bench(tmp_path)
    judge = OpenAIJudge("http://127.0.0.1:9", "m", cache_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="'muse' protocol only"):
        evaluate_predictions(bench, preds, "referring", judge=judge)
