"""``pixellm evaluate`` on fixture shards, and the errors for bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pixellm.cli import main
from pixellm.eval import EvalInputError, evaluate_predictions, load_benchmark, load_predictions
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
TOP_ROW = box(slice(0, 1), slice(0, 4))  # area 4


def _three_splits(tmp_path: Path) -> tuple[Path, Path]:
    bench = write_shards(
        tmp_path / "bench",
        [
            row("v1", "val", [("a box", TOP_LEFT)]),
            row("l1", "test_less", [("a box", TOP_LEFT), ("a tile", BOTTOM_RIGHT)]),
            row("m1", "test_many", [("a bar", TOP_ROW)]),
        ],
    )
    preds = write_predictions(
        tmp_path / "p.jsonl",
        [
            pred_line("v1", [TOP_LEFT]),  # IoU 1 (I 4, U 4)
            pred_line("l1", [TOP_LEFT]),  # 1 + (tile unmatched) over 2; I 4, U 4 + 4
            pred_line("m1", [box(slice(0, 1), slice(0, 2))]),  # I 2, U 4: IoU 0.5
        ],
    )
    return bench, preds


def test_cli_json_reports_val_less_many_and_test(tmp_path: Path, capsys) -> None:
    bench, preds = _three_splits(tmp_path)
    code = main(
        ["evaluate", "--benchmark", str(bench), "--predictions", str(preds), "--protocol", "muse"]
        + ["--json"]
    )
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["protocol"] == "muse" and out["judge"] == {"name": "none"}
    splits = out["splits"]
    assert list(splits) == ["val", "test_less", "test_many", "test"]
    assert splits["val"]["giou"] == pytest.approx(1.0)
    assert splits["test_less"]["giou"] == pytest.approx(0.5)
    assert splits["test_less"]["ciou"] == pytest.approx(4 / 8)
    # test = less ∪ many: gIoU (1 + 0.5) / (2 + 1) = 0.5; cIoU (4 + 2) / (8 + 4) = 0.5.
    assert splits["test"]["giou"] == pytest.approx(1.5 / 3)
    assert splits["test"]["ciou"] == pytest.approx(6 / 12)
    assert splits["test"]["n_questions"] == 2 and splits["test"]["n_targets"] == 3


def test_cli_split_table_and_report(tmp_path: Path, capsys) -> None:
    bench, preds = _three_splits(tmp_path)
    argv = ["evaluate", "--benchmark", str(bench), "--predictions", str(preds)]
    argv += ["--protocol", "referring", "--split", "val", "--report", str(tmp_path / "r")]
    with pytest.warns(UserWarning, match="2 prediction"):
        assert main(argv) == 0
    out = capsys.readouterr().out
    assert "gIoU (%)" in out and "val" in out and "test_many" not in out
    assert (tmp_path / "r" / "report.html").is_file()


def test_cli_unreachable_judge_exit_code_names_url(tmp_path: Path, capsys) -> None:
    bench, preds = _three_splits(tmp_path)
    url = f"http://127.0.0.1:{free_port()}"
    argv = ["evaluate", "--benchmark", str(bench), "--predictions", str(preds)]
    argv += ["--protocol", "muse", "--judge", "openai", "--judge-url", url, "--judge-model", "m"]
    argv += ["--judge-timeout", "0.5", "--judge-retries", "0", "--judge-cache", str(tmp_path)]
    assert main(argv) == 3
    assert f"{url}/v1/chat/completions unreachable" in capsys.readouterr().err


def test_cli_judge_from_env(tmp_path: Path, capsys, monkeypatch) -> None:
    bench, preds = _three_splits(tmp_path)
    with judge_server() as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.url + "/v1")
        monkeypatch.setenv("PIXELLM_JUDGE_MODEL", "env-model")
        argv = ["evaluate", "--benchmark", str(bench), "--predictions", str(preds), "--json"]
        argv += ["--protocol", "muse", "--judge", "openai", "--judge-cache", str(tmp_path / "c")]
        assert main(argv) == 0
        judge = json.loads(capsys.readouterr().out)["judge"]
        # val, test_less and test_many each have one matched pair with IoU > 0, but v1 and l1 ask
        # the same prompt ("Which objects?" / "[1: a box]"): 2 requests and 1 cache hit.
        assert judge["model"] == "env-model"
        assert judge["n_requests"] == server.n_requests == 2 and judge["n_cache_hits"] == 1


def test_cli_missing_judge_model(tmp_path: Path, capsys, monkeypatch) -> None:
    bench, preds = _three_splits(tmp_path)
    monkeypatch.delenv("PIXELLM_JUDGE_MODEL", raising=False)
    argv = ["evaluate", "--benchmark", str(bench), "--predictions", str(preds)]
    argv += ["--protocol", "muse", "--judge", "openai", "--judge-url", "http://127.0.0.1:9"]
    assert main(argv) == 3
    assert "--judge-model or set PIXELLM_JUDGE_MODEL" in capsys.readouterr().err


def test_malformed_prediction_line(tmp_path: Path, capsys) -> None:
    bench, _ = _three_splits(tmp_path)
    bad = write_predictions(tmp_path / "bad.jsonl", [pred_line("v1", [TOP_LEFT]), "{not json"])
    with pytest.raises(EvalInputError, match=r"bad\.jsonl:2: not valid JSON"):
        load_predictions(bad)
    argv = ["evaluate", "--benchmark", str(bench), "--predictions", str(bad), "--protocol", "muse"]
    assert main(argv) == 2
    assert "bad.jsonl:2: not valid JSON" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"sample_id": 3, "text": ""}', r"p\.jsonl:1: 'sample_id' must be a non-empty string"),
        ('{"sample_id": "a", "masks": {}}', r"p\.jsonl:1: 'masks' must be a list"),
        ('{"sample_id": "a", "masks": [], "scores": [1]}', r"'scores' must be a list of 0"),
        ("[1, 2]", r"p\.jsonl:1: expected a JSON object, got list"),
    ],
)
def test_bad_prediction_fields(tmp_path: Path, line: str, message: str) -> None:
    with pytest.raises(EvalInputError, match=message):
        load_predictions(write_predictions(tmp_path / "p.jsonl", [line]))


def test_duplicate_and_unknown_and_mis_sized_predictions(tmp_path: Path) -> None:
    bench, _ = _three_splits(tmp_path)
    dup = write_predictions(tmp_path / "d.jsonl", [pred_line("v1", []), "", pred_line("v1", [])])
    with pytest.raises(
        EvalInputError, match=r"d\.jsonl:3: sample_id 'v1' already predicted on line 1"
    ):
        load_predictions(dup)
    alien = write_predictions(tmp_path / "a.jsonl", [pred_line("zz", [])])
    with pytest.raises(EvalInputError, match="none of the 1 predictions \\(e.g. 'zz'\\)"):
        evaluate_predictions(bench, alien, "muse")
    big = write_predictions(
        tmp_path / "b.jsonl",
        ['{"sample_id": "v1", "text": "[SEG]", "masks": [{"size": [8, 8], "counts": "0"}]}'],
    )
    with pytest.raises(EvalInputError, match=r"'v1': mask 0: RLE size \[8, 8\] != image"):
        evaluate_predictions(bench, big, "muse")
    junk = write_predictions(
        tmp_path / "j.jsonl",
        ['{"sample_id": "v1", "text": "[SEG]", "masks": [{"size": [4, 4], "counts": "zzzz"}]}'],
    )
    with pytest.raises(EvalInputError, match="mask 0: cannot decode RLE counts"):
        evaluate_predictions(bench, junk, "muse")


def test_bad_benchmark(tmp_path: Path) -> None:
    bench, preds = _three_splits(tmp_path)
    with pytest.raises(EvalInputError, match=r"split\(s\) \['train'\] not found; splits present"):
        evaluate_predictions(bench, preds, "muse", splits=["train"])
    with pytest.raises(EvalInputError, match="benchmark directory not found"):
        load_benchmark(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="protocol 'coco' is not one of"):
        evaluate_predictions(bench, preds, "coco")
    no_user = write_shards(tmp_path / "b2", [row("x", "val", [], user_role="system")])
    with pytest.raises(EvalInputError, match=r"val/part-00000\.parquet: row 0: .*no user turn"):
        load_benchmark(no_user)


def test_load_benchmark_decodes_masks(tmp_path: Path) -> None:
    bench, _ = _three_splits(tmp_path)
    samples = {s.sample_id: s for s in load_benchmark(bench, ["test_less"])}
    s = samples["l1"]
    assert s.masks.shape == (2, 4, 4) and s.masks.dtype.name == "uint8"
    assert (s.masks[0] == TOP_LEFT).all() and (s.masks[1] == BOTTOM_RIGHT).all()
    assert s.descriptions == ["a box", "a tile"] and s.question == "Which objects?"
    assert s.image is not None and s.image.startswith(b"\x89PNG") and s.ignore is None
