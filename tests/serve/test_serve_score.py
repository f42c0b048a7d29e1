"""End-to-end batch scoring: generated corpus → MUSE shards → Ray Data → Serve handle → report.

One Ray + Serve per module. The tiny exported model scores the generated ``val`` split; the run
writes predictions (JSONL + Parquet), the harness report and overlays, logs to MLflow (SQLite), and a
rerun skips every sample. A teacher-forced run returns exactly one mask per ground-truth ``[SEG]``.
"""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from tests.serve.serve_helpers import export_tiny_model, start_ray_and_serve, stop_ray_and_serve

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from pixellm.data.corpus import generate_corpus
    from pixellm.data.shards import build_shards

    root = tmp_path_factory.mktemp("score")
    generate_corpus(root / "corpus", seed=0, images=24, image_size=64)
    build_shards("muse", root / "corpus" / "muse", str(root / "shards"), engine="local")
    model_dir = export_tiny_model(root / "model")
    start_ray_and_serve()
    try:
        yield {
            "root": root,
            "shards": root / "shards",
            "model": str(model_dir),
            "tracking": f"sqlite:///{root / 'mlflow.db'}",
        }
    finally:
        stop_ray_and_serve()


def _opts(env, out, **kw):
    from pixellm.serve.score import ScoreOptions

    base = {
        "model": env["model"],
        "benchmark": str(env["shards"]),
        "split": "val",
        "out": str(out),
        "recipe": "platform/recipes/tiny.yaml",
        "max_new_tokens": 12,
        "replica_cpus": 0.5,
        "n_overlays": 2,
    }
    return ScoreOptions(**{**base, **kw})


def _val_ids(env) -> list[str]:
    table = pq.read_table(env["shards"] / "val", columns=["sample_id"])
    return table.column("sample_id").to_pylist()


def test_score_writes_predictions_report_mlflow_and_rerun_skips(env):
    import mlflow

    from pixellm.serve.score import score_benchmark

    out = env["root"] / "out"
    ids = _val_ids(env)
    first = score_benchmark(_opts(env, out, tracking_uri=env["tracking"]))
    assert (first.n_samples, first.n_scored, first.n_skipped, first.n_errors) == (
        len(ids),
        len(ids),
        0,
        0,
    )
    lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert sorted(x["sample_id"] for x in lines) == sorted(ids)
    assert all(x["text"].count("[SEG]") == len(x["masks"]) == len(x["scores"]) for x in lines)
    assert pq.read_table(out / "predictions.parquet").num_rows == len(ids)
    for name in ("report.json", "report.md", "report.html"):
        assert (out / name).is_file()
    assert len(list((out / "overlays").glob("*.png"))) == 2
    report = json.loads((out / "report.json").read_text())
    assert report["protocol"] == "muse" and report["splits"]["val"]["n_questions"] == len(ids)
    assert report["splits"]["val"]["n_missing_predictions"] == 0
    assert report["extra"]["scoring"]["scored_now"] == len(ids)

    mlflow.set_tracking_uri(env["tracking"])
    run = mlflow.get_run(first.mlflow_run_id)
    assert run.data.metrics["val_n_questions"] == len(ids)
    if report["splits"]["val"]["giou"] is not None:
        assert run.data.metrics["val_giou"] == pytest.approx(report["splits"]["val"]["giou"])

    before = (out / "predictions.jsonl").read_bytes()
    again = score_benchmark(_opts(env, out, tracking_uri=env["tracking"]))
    assert (again.n_scored, again.n_skipped) == (0, len(ids))
    assert (out / "predictions.jsonl").read_bytes() == before
    assert again.mlflow_run_id == first.mlflow_run_id  # the same run is resumed, not duplicated
    assert again.report["splits"]["val"] == report["splits"]["val"]

    from pixellm.config import ConfigError

    # Another scoring (here another budget; likewise another model) never resumes this one's file.
    with pytest.raises(ConfigError, match=r"max_new_tokens: 12 there, 13 now.*new --out"):
        score_benchmark(_opts(env, out, max_new_tokens=13))
    assert (out / "predictions.jsonl").read_bytes() == before
    with pytest.raises(ConfigError, match=r"model: '.*' there, 'models:/other/1' now"):
        score_benchmark(_opts(env, out, model="models:/other/1"))


def test_rerun_after_a_crash_scores_only_what_is_missing(env):
    from pixellm.serve.score import score_benchmark

    ids = _val_ids(env)
    out = env["root"] / "crashed"
    out.mkdir()
    kept = [
        json.dumps({"sample_id": i, "text": "", "masks": [], "scores": []}) + "\n"
        for i in ids[: len(ids) // 2]
    ]
    # Half the samples done plus a line cut mid-way, as a killed run leaves the file.
    (out / "predictions.jsonl").write_text("".join(kept) + kept[0][:25])
    result = score_benchmark(_opts(env, out, teacher_forced=True, protocol="referring"))
    assert result.n_skipped == len(kept)
    assert result.n_scored == len(ids) - len(kept)
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert sorted(r["sample_id"] for r in rows) == sorted(ids)
    # Teacher-forced rows: the ground-truth answer, one mask per [SEG].
    forced = [r for r in rows if r.get("teacher_forced")]
    assert len(forced) == result.n_scored
    assert all(r["text"].count("[SEG]") == len(r["masks"]) for r in forced)
    assert result.report["n_placeholder_mismatch"] == 0


def test_split_is_read_by_the_v1_parquet_reader_and_the_context_is_restored(env):
    """Ray 2.60's V2 Parquet reader starts 32 footer actors per read (10-15 s per split on 2
    cores); scoring reads each split with V1 and leaves the process's ``DataContext`` as it was."""
    import ray

    from pixellm.serve.score import _read_split

    ctx = ray.data.DataContext.get_current()
    before = ctx.use_datasource_v2
    ds = _read_split(str(env["shards"] / "val")).materialize()
    assert ctx.use_datasource_v2 == before
    operators = [line for line in ds.stats().splitlines() if line.startswith("Operator")]
    assert any("ReadParquet" in line for line in operators), operators
    assert not any("ListFiles" in line or "V2" in line for line in operators), operators
    assert sorted(ds.to_pandas()["sample_id"]) == sorted(_val_ids(env))
    assert set(ds.schema().names) == {"sample_id", "image", "conversation"}
