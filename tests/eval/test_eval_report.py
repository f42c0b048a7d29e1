"""``write_report``: report.json, report.md, report.html and overlay pictures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from pixellm.eval import evaluate_predictions, load_benchmark, load_predictions, write_report
from pixellm.eval.overlay import PALETTE
from tests.eval.eval_helpers import box, pred_line, row, write_predictions, write_shards


def test_write_report_writes_every_file(tmp_path: Path) -> None:
    rows = [
        row(f"s{i}", "val", [("a red kayak", box(slice(0, 2), slice(0, 2)))], question=f"Q{i}?")
        for i in range(5)
    ]
    bench = write_shards(tmp_path / "bench", rows)
    preds = write_predictions(
        tmp_path / "p.jsonl",
        [pred_line(f"s{i}", [box(slice(0, 2), slice(0, 2))], text="Take [SEG].") for i in range(4)],
    )
    report = evaluate_predictions(bench, preds, "muse")
    samples = load_benchmark(bench, with_images=True)
    extra = {
        "training curves": "curves.png",
        "throughput": {"samples_per_s": 12.5},
        "commands to reproduce": ["pixellm evaluate --benchmark b --predictions p --protocol muse"],
    }
    paths = write_report(tmp_path / "out", report, samples, load_predictions(preds), 3, extra)

    data = json.loads(paths["json"].read_text())
    assert data["splits"]["val"]["n_missing_predictions"] == 1
    assert data["extra"] == extra
    assert len(data["overlays"]) == 3
    pngs = sorted((tmp_path / "out" / "overlays").glob("*.png"))
    assert [f"overlays/{p.name}" for p in pngs] == sorted(e["path"] for e in data["overlays"])

    md = paths["md"].read_text()
    # 4 of 5 questions answered with IoU 1: gIoU 80.0 %, cIoU 16 / 20 = 80.0 %.
    assert "| val | 80.0 | 80.0 | 5 | 5 | 4 | – | 1 |" in md
    assert "![training curves](curves.png)" in md and "## commands to reproduce" in md
    assert f"]({data['overlays'][0]['path']})" in md

    page = paths["html"].read_text()
    assert f'src="{data["overlays"][0]["path"]}"' in page and 'src="curves.png"' in page
    assert "samples_per_s" in page and "<td>80.0</td>" in page

    # The answer's [SEG] chip is drawn in the first prediction colour.
    picture = np.asarray(Image.open(pngs[0]).convert("RGB"))
    assert picture.shape[0] > 320 and picture.shape[1] > 640
    assert (picture == np.asarray(PALETTE[0], dtype=np.uint8)).all(axis=-1).sum() > 20
