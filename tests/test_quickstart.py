"""`pixellm quickstart` end to end with a very small budget: every report artifact, and the
registered model reloads from MLflow."""

from __future__ import annotations

import json
import os
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
        "--images", "24", "--steps", "4", "--micro-batch-size", "2", "--max-new-tokens", "16",
        "--n-overlays", "2",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage in ("[1/6] corpus", "[2/6] shards", "[3/6] mlflow", "[4/6] train", "[5/6] score", "[6/6] report"):
        assert f"{stage} done in" in proc.stdout, stage
    report_dir = out / "report"
    for name in ("report.md", "report.json", "report.html", "training_curves.png", "summary.json"):
        assert (report_dir / name).is_file(), name
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
    run_name = summary["Run"]["run_name"]
    check = f"""
import mlflow, sys
from pixellm.serve.loading import resolve_model_dir
from pixellm.tracking import start_mlflow_server
from pixellm.model import PixelLM
import numpy as np
with start_mlflow_server({str(out / 'mlflow')!r}) as server:
    path = resolve_model_dir("models:/{run_name}/latest", server.uri, {str(tmp_path / 'dl')!r})
    model = PixelLM.from_pretrained(path)
    pred = model.predict([np.zeros((32, 48, 3), np.uint8)], ["Please segment the red shapes."], max_new_tokens=8)
    print("RELOADED", len(pred))
"""
    proc = subprocess.run([sys.executable, "-c", check], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert "RELOADED 1" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    # Nothing left running: no MLflow server or Ray started by the run survives it.
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(out / "mlflow") not in ps
