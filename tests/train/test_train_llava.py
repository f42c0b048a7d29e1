"""The path a real user takes, on CPU: a llava-hf checkpoint (tiny, random, hub layout) →
``model.base: llava`` + ``weights_path`` → Ray Train + DeepSpeed → self-contained export →
registered MLflow model. The export is moved and the base checkpoint deleted before reloading,
from the moved directory and from ``models:/``; a fresh process loads the pyfunc with only
MLflow and the logged code."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.fixtures.llava_hf import write_llava_hf

pytestmark = pytest.mark.integration

QUESTIONS = ["Please segment the circle.", "Where is the red square?"]


def _images() -> list[np.ndarray]:
    rng = np.random.default_rng(5)
    return [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in QUESTIONS]


def _predict(model) -> list[tuple]:  # noqa: ANN001
    preds = model.predict(_images(), QUESTIONS, max_new_tokens=10)
    return [(p.text, p.masks, p.scores, p.num_tokens) for p in preds]


_FRESH = r"""
import base64, io, json, sys
import mlflow, numpy as np
from PIL import Image
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pyfunc.load_model(sys.argv[2])
import pandas as pd
buf = io.BytesIO()
Image.fromarray(np.random.default_rng(5).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(
    buf, format="PNG")
frame = pd.DataFrame({"image": [base64.b64encode(buf.getvalue()).decode()],
                      "question": ["Please segment the circle."]})
out = model.predict(frame, params={"max_new_tokens": 10})
import pixellm
mods = sorted(m for m in sys.modules if m == "pixellm" or m.startswith("pixellm."))
print(json.dumps({"text": out["text"][0], "masks": json.loads(out["masks"][0]),
                  "pixellm": pixellm.__file__, "modules": mods,
                  "files": {m: getattr(sys.modules[m], "__file__", None) for m in mods},
                  "loaded": sorted({m.split(".")[0] for m in sys.modules})}))
"""


def _third_party_imports(files: list[str]) -> set[str]:
    names: set[str] = set()
    for f in files:
        for node in ast.walk(ast.parse(Path(f).read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n != "pixellm"}


def test_llava_base_trains_exports_moves_and_reloads(
    train_env, ray_cluster, make_recipe, tmp_path
) -> None:
    from importlib.metadata import packages_distributions

    from pixellm.model import PixelLM
    from pixellm.serve.loading import resolve_model_dir
    from pixellm.train import train
    from pixellm.train.pyfunc import PIP_PACKAGES

    base = write_llava_hf(tmp_path / "checkpoints" / "llava-hf").path
    recipe = make_recipe(
        train_env,
        "llava",
        "model.base=llava",
        f"model.weights_path={base}",
        "train.num_workers=1",
        "train.cpus_per_worker=1",
        "train.steps_per_epoch=2",
    )
    result = train(recipe)
    assert result.metrics["step"] == 2
    first = PixelLM.from_pretrained(result.export_dir)
    rows = first.llava.get_input_embeddings().weight.shape[0]
    assert rows % 64 == 0 and rows >= len(first.tokenizer)
    expected = _predict(first)
    alone = first.predict(_images()[:1], QUESTIONS[:1], max_new_tokens=10)[0]

    moved = tmp_path / "another-machine" / "pixellm"
    shutil.move(str(result.export_dir), moved)
    shutil.rmtree(base)
    assert _predict(PixelLM.from_pretrained(moved)) == expected

    name = f"{recipe.mlflow.registered_model_name}"
    local = resolve_model_dir(f"models:/{name}/1", train_env["mlflow_uri"], tmp_path / "dl")
    assert _predict(PixelLM.from_pretrained(local)) == expected

    # A fresh process, the repository off the path: pixellm comes from the logged code.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", _FRESH, train_env["mlflow_uri"], f"models:/{name}/1"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not out["pixellm"].startswith(str(Path(__file__).resolve().parents[2]))
    assert out["text"] == alone.text and out["masks"] == alone.masks
    # Third-party packages the logged code imports (statically) and that were really loaded.
    files = [f for f in out["files"].values() if f]
    used = _third_party_imports(files) & set(out["loaded"])
    dists = packages_distributions()
    allowed = {p.lower() for p in PIP_PACKAGES} | {"mlflow"}
    missing = {n for n in used if not {d.lower() for d in dists.get(n, [n])} & allowed}
    assert not missing, f"imported by the model but not in its requirements: {missing}"
    assert {"torch", "transformers", "numpy"} <= used
