"""`pixellm quickstart` end to end with a very small budget: every report artifact, and the
registered model reloads from MLflow."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.integration
def test_quickstart_end_to_end_small_budget(tmp_path):
    out = tmp_path / "qs"
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "DS_ACCELERATOR": "cpu"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    cmd = [
        sys.executable, "-m", "pixellm.cli", "quickstart", "--out", str(out),
        "--images", "30", "--steps", "4", "--micro-batch-size", "2", "--max-new-tokens", "16",
        "--n-overlays", "2", "--pretrain-steps", "2", "--pretrain-text-steps", "2",
        "--held-out-pool", "24",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    terminal = proc.stdout  # what the user saw
    stages = ("corpus", "shards", "pretrain", "mlflow", "train", "score", "report")
    for i, stage in enumerate(stages, 1):
        assert f"[{i}/7] {stage} done in" in proc.stdout, stage
    # the terminal holds the quickstart's own lines only; Ray's output went to the log file
    assert "\x1b[" not in proc.stdout and "Running Dataset" not in proc.stdout
    assert "core_worker" not in proc.stdout + proc.stderr  # Ray's C++ warnings (fd 2) → the log
    assert "[pixellm.train] step 4/4" in proc.stdout  # worker progress lines are kept
    progress = [ln for ln in terminal.splitlines() if "[pixellm." in ln]
    assert len(progress) == len(set(progress)), "a progress line shown twice"
    assert "pretrain text step 2/2" in proc.stdout and "pretrain step 2/2" in proc.stdout
    assert (out / "logs" / "quickstart.log").stat().st_size > 0
    assert (out / "pretrained" / "tiny-llava" / "config.json").is_file()
    report_dir = out / "report"
    for name in (
        "report.md", "report.json", "report.html", "training_curves.png", "score_vs_iou.png",
        "summary.json",
    ):  # fmt: skip
        assert (report_dir / name).is_file(), name
    html_text = (report_dir / "report.html").read_text()
    assert "score_vs_iou.png" in html_text
    overlays = list((report_dir / "overlays").glob("*.png"))
    assert overlays, "no overlay pictures"
    report = json.loads((report_dir / "report.json").read_text())
    splits = report["splits"]
    for split in ("val", "test_less", "test_many", "test"):
        assert split in splits, split
        assert 0.0 <= splits[split]["giou"] <= 1.0 and splits[split]["n_questions"] > 0
    md = (report_dir / "report.md").read_text()
    assert "Commands to reproduce" in md and "pixellm train --recipe" in md
    assert "training_curves.png" in (report_dir / "report.html").read_text()

    # The registered model reloads from the MLflow registry (SQLite store of this run) and predicts.
    summary = json.loads((report_dir / "summary.json").read_text())
    from pixellm.cli import build_parser

    printed = [c for c in summary["Commands to reproduce"] if c.startswith("pixellm ")]
    assert any(c.startswith("pixellm pretrain-tiny") for c in printed)
    for command in printed:  # every printed command is one the CLI accepts as written
        build_parser().parse_args(shlex.split(command)[1:])
    run_name = summary["Run"]["run_name"]
    check = f"""
import mlflow, sys
from pixellm.serve.loading import resolve_model_dir
from pixellm.tracking import start_mlflow_server
from pixellm.model import PixelLM
import numpy as np
with start_mlflow_server({str(out / "mlflow")!r}) as server:
    path = resolve_model_dir("models:/{run_name}/latest", server.uri, {str(tmp_path / "dl")!r})
    model = PixelLM.from_pretrained(path)
    pred = model.predict([np.zeros((32, 48, 3), np.uint8)], ["Please segment the red shapes."], max_new_tokens=8)
    print("RELOADED", len(pred))
"""
    proc = subprocess.run(
        [sys.executable, "-c", check],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "RELOADED 1" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert summary["Throughput"]["train_samples_per_s"] > 0
    assert "val Spearman(score, IoU)" in summary["Confidence (per-mask score vs IoU)"]
    # teacher-forced figures beside the generated ones: on the terminal and in the report
    forced = summary["Teacher-forced (ground-truth answer in the prompt: mask quality alone)"]
    for split in ("val", "test_less", "test_many", "test"):
        giou, ciou = (float(x) for x in forced[f"{split} gIoU / cIoU"].split(" / "))
        assert 0.0 <= giou <= 1.0 and 0.0 <= ciou <= 1.0, split
    assert terminal.count("(teacher-forced ") == 3 + 4  # a line per scored split, one per final row
    assert "Teacher-forced" in md

    # The printed MLflow command shows the artifacts of the training run and of the registered model.
    line = next(ln for ln in terminal.splitlines() if "MLflow UI" in ln)
    ui = line.split("MLflow UI", 1)[1].split()
    assert "--artifacts-destination" in ui
    from pixellm.tracking import free_port

    port = free_port()
    ui[ui.index("--port") + 1] = str(port)
    ui[0] = str(Path(sys.executable).with_name("mlflow"))
    server = subprocess.Popen(
        ui, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        listing = f"""
import time, mlflow
from mlflow.tracking import MlflowClient
uri = "http://127.0.0.1:{port}"
for _ in range(600):  # a loaded machine can take minutes to start the UI
    try:
        c = MlflowClient(uri); c.search_experiments(); break
    except Exception:
        time.sleep(1)
mlflow.set_tracking_uri(uri)
print("RUN_ARTIFACTS", sorted(a.path for a in c.list_artifacts({summary["Run"]["mlflow_run_id"]!r}, "report")))
mv = c.search_model_versions("name = '{run_name}'")[0]
found = mlflow.artifacts.list_artifacts(artifact_uri=f"models:/{run_name}/{{mv.version}}")
print("MODEL_ARTIFACTS", sorted(a.path for a in found))
"""
        got = subprocess.run(
            [sys.executable, "-c", listing],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
    finally:
        server.terminate()
        server.wait(timeout=60)
    runs = next(ln for ln in got.stdout.splitlines() if ln.startswith("RUN_ARTIFACTS"))
    models = next(ln for ln in got.stdout.splitlines() if ln.startswith("MODEL_ARTIFACTS"))
    assert runs != "RUN_ARTIFACTS []" and models != "MODEL_ARTIFACTS []", (
        got.stdout + got.stderr[-2000:]
    )

    # Nothing left running: no MLflow server or Ray started by the run survives it.
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(out / "mlflow") not in ps


def test_training_overrides_give_every_core_to_training_unless_set(tmp_path, monkeypatch):
    from pixellm.config import load_recipe
    from pixellm.quickstart import QuickstartOptions, _training_overrides

    monkeypatch.setattr(os, "cpu_count", lambda: 4)

    def resolved(overrides: list[str]) -> tuple[float, int]:
        opts = QuickstartOptions(out=str(tmp_path), overrides=overrides, pretrain_steps=0)
        train = load_recipe(opts.recipe, _training_overrides(opts, tmp_path, "run"))
        return train.train.cpus_per_worker, train.data.preprocess_actors

    assert resolved([]) == (4, 1)  # all 4 cores to the worker, one preprocessing actor
    # the user's value wins, and the cores it leaves free become actors (0.5 CPU each)
    assert resolved(["train.cpus_per_worker=2"]) == (2, 4)


def test_terminal_shows_each_forwarded_worker_line_once():
    """Ray forwarded the val line and the step line of an eval step twice, as A B A B."""
    import io

    from pixellm.quickstart import _FilteredStream

    log, terminal = io.StringIO(), io.StringIO()
    stream = _FilteredStream(log, terminal)
    a = "(RayTrainWorker pid=1) [pixellm.train] step 87 val/giou=0.1526"
    b = "(RayTrainWorker pid=1) [pixellm.train] step 87/700 loss=4.3423"
    stream.write(f"{a}\n{b}\nRunning Dataset: 3%\r{a}\n{b}\n")
    stream.write("[pixellm.train] step 88/700 loss=4.40")
    stream.write("58\n")
    assert terminal.getvalue().splitlines() == [
        "    [pixellm.train] step 87 val/giou=0.1526",
        "    [pixellm.train] step 87/700 loss=4.3423",
        "    [pixellm.train] step 88/700 loss=4.4058",
    ]
    assert log.getvalue().count("step 87/700") == 2  # the log file keeps everything


def test_bad_quickstart_and_pretrain_flags_fail_before_any_work(tmp_path, capsys):
    from pixellm.cli import main

    out = tmp_path / "qs"
    argv = ["quickstart", "--out", str(out), "--images", "2", "--steps", "0"]
    assert main([*argv, "--pretrain-steps", "-2", "--max-new-tokens", "0"]) == 2
    err = capsys.readouterr().err
    assert "pixellm quickstart: 4 bad option(s)" in err
    for flag, got in (("images", 2), ("steps", 0), ("pretrain-steps", -2), ("max-new-tokens", 0)):
        assert f"--{flag}: Input should be greater than" in err and f"(got {got})" in err, flag
    assert not out.exists()  # nothing was started or written

    pretrained = tmp_path / "tiny-llava"
    argv = ["pretrain-tiny", "--shards", str(tmp_path / "none"), "--out", str(pretrained)]
    assert main([*argv, "--text-steps", "-1", "--batch-size", "0", "--lr", "0"]) == 2
    err = capsys.readouterr().err
    assert "pixellm pretrain-tiny: 3 bad option(s)" in err
    assert (
        "--text-steps:" in err
        and "--batch-size:" in err
        and "--lr: Input should be greater than 0" in err
    )
    assert main(argv) == 2  # good flags, no shards: one line naming the flag and the directory
    err = capsys.readouterr().err
    assert err.startswith("error: --shards: corpus 'muse'") and "Traceback" not in err
    assert str(tmp_path / "none" / "muse") in err and not pretrained.exists()
