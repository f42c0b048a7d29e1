"""Learning check: does the tiny recipe learn on the generated corpus within a fixed step budget?

    python -m pixellm.train.learning --out runs/learning [--steps 300] [--set key=value …]

Generates the corpus and shards under ``--out``, starts a local MLflow server there, trains through
the real path (``train``: Ray Train + DeepSpeed, 1 worker), then reports from MLflow's metric
history each loss term's mean over the first and last 10% of steps, and the val gIoU of the exported
model next to the untrained (same-seed) model's. gIoU here: per question, the k-th predicted mask is
paired with the k-th ground-truth mask (the training pairing), IoU summed and divided by
max(#pred, #gt), empty-vs-empty = 1; averaged over questions of the val splits of ``muse`` and
``refer_seg``.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from pixellm.config import DataConfig, Recipe, load_recipe

__all__ = ["loss_drop", "main", "question_giou", "teacher_forced_giou", "val_giou"]

_FORMATS = [
    ("muse", "muse", "muse"),
    ("coco", "coco/instances.json", "sem_seg"),
    ("refer", "refer", "refer_seg"),
    ("llava", "llava/llava_instruct.json", "vqa"),
]
_REPO = Path(__file__).resolve().parents[2]


def question_giou(pred: list[np.ndarray], gt: list[np.ndarray]) -> float:
    """Σ IoU(pred_k, gt_k) / max(#pred, #gt); 1.0 when both are empty."""
    n = max(len(pred), len(gt))
    if n == 0:
        return 1.0
    total = 0.0
    for p, g in zip(pred, gt, strict=False):
        union = np.logical_or(p, g).sum()
        total += 1.0 if union == 0 else np.logical_and(p, g).sum() / union
    return float(total / n)


def val_giou(
    model: Any, recipe: Recipe, num_questions: int, max_new_tokens: int | None = None
) -> float:
    """Mean per-question gIoU of ``model.predict`` on the val splits (see the module docstring).

    ``max_new_tokens`` None = the recipe's ``serve.max_new_tokens`` (derived: no answer is cut)."""
    max_new_tokens = max_new_tokens or recipe.serve.max_new_tokens
    from PIL import Image

    from pixellm.data.schema import rle_to_mask
    from pixellm.data.stream import fetch_rows, make_plan

    data = DataConfig(shards_root=recipe.data.shards_root, mixture={"muse": 1.0, "refer_seg": 1.0})
    rows = fetch_rows(make_plan(data, recipe.data.val_split, num_questions, seed=0)).to_pylist()
    scores = []
    for i in range(0, len(rows), 4):
        chunk = rows[i : i + 4]
        images = [Image.open(io.BytesIO(r["image"])).convert("RGB") for r in chunk]
        questions = [
            next(t["text"] for t in r["conversation"] if t["role"] == "user") for r in chunk
        ]
        preds = model.predict(images, questions, max_new_tokens=max_new_tokens)
        for r, p in zip(chunk, preds, strict=True):
            gt = [rle_to_mask(t["rle"]).astype(bool) for t in r["targets"] or []]
            pm = [rle_to_mask(m).astype(bool) for m in p.masks]
            scores.append(question_giou(pm, gt))
    return float(np.mean(scores))


def teacher_forced_giou(model: Any, recipe: Recipe, num_questions: int) -> float:
    """Mean per-question gIoU of the masks decoded from the ground-truth answer (teacher-forced,
    as refCOCO/ReasonSeg were scored by the authors): isolates mask quality from generation."""
    import torch

    from pixellm.data.stream import iter_local_batches

    data = recipe.data.model_copy(update={"mixture": {"muse": 1.0, "refer_seg": 1.0}})
    val = recipe.model_copy(update={"data": data})
    scores = []
    with torch.no_grad():
        for batch in iter_local_batches(val, recipe.data.val_split, 4, num_questions, seed=0):
            batch.pop("sample_id")
            out = model(**batch)
            for logits, gt in zip(out.mask_logits, batch["gt_masks"], strict=True):
                scores.append(question_giou(list((logits > 0).numpy()), list(gt.numpy() > 0.5)))
    return float(np.mean(scores))


def loss_drop(tracking_uri: str, run_id: str, keys: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """Per metric: mean of the first and last 10% of logged steps."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    out = {}
    for key in keys:
        hist = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        k = max(1, len(hist) // 10)
        first = float(np.mean([m.value for m in hist[:k]]))
        last = float(np.mean([m.value for m in hist[-k:]]))
        out[key] = {"first_10pct": first, "last_10pct": last, "steps": len(hist)}
    return out


def _shards(out: Path) -> Path:
    from pixellm.data.corpus import generate_corpus
    from pixellm.data.shards import build_shards

    corpus = out / "corpus"
    if not (out / "shards" / "vqa" / "manifest.json").exists():
        generate_corpus(corpus, seed=0)
        for fmt, rel, name in _FORMATS:
            build_shards(
                fmt,
                corpus / rel,
                str(out / "shards" / name),
                images=corpus / "images",
                engine="local",
            )
    return out / "shards"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the check and print/return the JSON report."""
    import torch

    from pixellm.model import PixelLM, build_pixellm
    from pixellm.tracking import start_mlflow_server
    from pixellm.train import train
    from pixellm.train.loop import LOSS_KEYS

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--val-questions", type=int, default=48)
    ap.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[])
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    shards = _shards(out)
    with start_mlflow_server(out / "mlflow") as server:
        recipe = load_recipe(
            _REPO / "platform/recipes/tiny.yaml",
            overrides=[
                f"data.shards_root={shards}",
                f"train.steps_per_epoch={args.steps}",
                f"train.checkpoint_every={args.steps}",
                f"train.storage_path={out / 'ray_results'}",
                f"mlflow.tracking_uri={server.uri}",
                "mlflow.experiment=pixellm-learning",
                *args.overrides,
            ],
        )
        result = train(recipe)
        losses = loss_drop(server.uri, result.mlflow_run_id, LOSS_KEYS)
    torch.manual_seed(recipe.train.seed)
    untrained = build_pixellm(recipe.model).eval()
    trained = PixelLM.from_pretrained(result.export_dir)
    report = {
        "steps": recipe.train.total_steps,
        "global_batch": recipe.train.global_batch_size,
        "losses": losses,
        "val_giou_untrained": val_giou(untrained, recipe, args.val_questions),
        "val_giou_trained": val_giou(trained, recipe, args.val_questions),
        "val_teacher_forced_giou_untrained": teacher_forced_giou(
            untrained, recipe, args.val_questions
        ),
        "val_teacher_forced_giou_trained": teacher_forced_giou(trained, recipe, args.val_questions),
        "val_questions": args.val_questions,
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
