"""Benchmark: the paper's ablations (tables 3-5 in form) on the quickstart configuration.

Four variants trained from the same pretrained tiny LLaVA with the same steps and seed, through the
real path (Ray Train + DeepSpeed, ``pixellm.train.train``), then scored on MUSE test_less and
test_many by the MUSE protocol (Hungarian matching, gIoU / cIoU):

    (a) full          — the quickstart recipe (L = 2 scales, N = 3 tokens per scale, fusion φ, L_ref)
    (b) λ_ref = 0     — no target refinement loss
    (c) N = 1         — one token per scale (φ is then the identity: no fusion)
    (d) L = 1         — one scale (the deepest CLIP layer only)

    .venv/bin/python bench/ablations.py --out runs/ablations [--steps 700] [--pretrain-steps 150]
        [--only "(a) full"] [--set KEY=VALUE ...]

``--set`` overrides apply to every variant (e.g. to try a recipe change against its ablations);
runs with other overrides or steps get their own run names, so they never resume each other.

The corpus, shards and pretrained tiny LLaVA are made under ``--out`` (reused when present: the
pretrained model is cached by its inputs). Prints the table with deltas to (a) and writes
``OUT/ablations.json``. The paper's direction: each component helps, most on test_many.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path
from typing import Any

VARIANTS: dict[str, list[str]] = {
    "(a) full": [],
    "(b) λ_ref=0": ["model.loss.lambda_ref=0"],
    "(c) N=1 (no fusion)": ["model.tokens_per_group=1"],
    "(d) L=1": ["model.feature_layers=[-1]"],
}
SPLITS = ("test_less", "test_many")
FORMATS = {"muse": "muse", "coco": "sem_seg", "refer": "refer_seg", "llava": "vqa"}
REPO = Path(__file__).resolve().parents[1]


def _data(
    out: Path, images: int, held_out_pool: int, pretrain_steps: int, text_steps: int, recipe: str
) -> tuple[Path, Path]:
    from pixellm.config import load_recipe
    from pixellm.data.corpus import generate_corpus
    from pixellm.data.shards import build_shards
    from pixellm.train.pretrain import PretrainOptions, pretrain_tiny

    shards = out / "shards"
    if not (shards / "vqa" / "manifest.json").is_file():
        generate_corpus(out / "corpus", seed=0, images=images, held_out_pool=held_out_pool)
        for fmt, name in FORMATS.items():
            src = out / "corpus" / fmt
            build_shards(fmt, src, str(shards / name), engine="local")
    model = load_recipe(recipe).model
    weights = pretrain_tiny(
        model,
        shards,
        out / "pretrained",
        PretrainOptions(steps=pretrain_steps, text_steps=text_steps),
    )
    return shards, weights


def _score(export: Path, shards: Path, out: Path, max_new_tokens: int) -> dict[str, Any]:
    """Predict every test question with the exported model; MUSE-protocol gIoU/cIoU per split."""
    from PIL import Image

    from pixellm.eval import evaluate_predictions, load_benchmark
    from pixellm.eval.data import PLACEHOLDER
    from pixellm.model import PixelLM

    model = PixelLM.from_pretrained(export)
    samples = load_benchmark(str(shards / "muse"), list(SPLITS), with_images=True)
    lines = []
    for i in range(0, len(samples), 8):
        chunk = samples[i : i + 8]
        images = [Image.open(io.BytesIO(s.image or b"")).convert("RGB") for s in chunk]
        preds = model.predict(images, [s.question for s in chunk], max_new_tokens=max_new_tokens)
        for s, p in zip(chunk, preds, strict=True):
            text = p.text if p.text.count(PLACEHOLDER) == len(p.masks) else ""
            lines.append({"sample_id": s.sample_id, "text": text, "masks": p.masks})
    out.mkdir(parents=True, exist_ok=True)
    path = out / "predictions.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    report = evaluate_predictions(str(shards / "muse"), path, "muse", splits=list(SPLITS))
    return {k: v for k, v in report.to_dict()["splits"].items() if k in SPLITS}


def _digest(parts: list[str]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:8]


def _table(results: dict[str, dict[str, Any]]) -> str:
    base = results["(a) full"]
    head = "| variant | " + " | ".join(f"{s} gIoU | {s} cIoU" for s in SPLITS) + " |"
    rows = [head, "|---|" + "---|---|" * len(SPLITS)]
    for name, res in results.items():
        cells = []
        for s in SPLITS:
            for m in ("giou", "ciou"):
                v, d = 100 * res[s][m], 100 * (res[s][m] - base[s][m])
                cells.append(f"{v:.1f}" if name == "(a) full" else f"{v:.1f} ({d:+.1f})")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    from pixellm.config import load_recipe
    from pixellm.tracking import start_mlflow_server
    from pixellm.train import train

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/ablations")
    ap.add_argument("--recipe", default=str(REPO / "platform/recipes/tiny.yaml"))
    from pixellm.quickstart import QuickstartOptions, cpu_overrides

    qs = QuickstartOptions(out="")  # the quickstart's budget: the same steps and pretraining
    ap.add_argument("--steps", type=int, default=qs.steps)
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--images", type=int, default=qs.images)
    ap.add_argument("--held-out-pool", type=int, default=qs.held_out_pool)
    ap.add_argument("--pretrain-steps", type=int, default=qs.pretrain_steps)
    ap.add_argument("--pretrain-text-steps", type=int, default=qs.pretrain_text_steps)
    ap.add_argument("--only", nargs="*", default=None, help="variant names to run (default all)")
    ap.add_argument("--set", nargs="*", default=[], help="recipe overrides for every variant")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    shards, weights = _data(
        out,
        args.images,
        args.held_out_pool,
        args.pretrain_steps,
        args.pretrain_text_steps,
        args.recipe,
    )
    results: dict[str, dict[str, Any]] = {}
    # the quickstart's workers and CPU split (2 cores: one worker with both, one preprocessing actor)
    cpus = cpu_overrides(load_recipe(args.recipe, args.set), qs.workers, args.set)
    tag = (
        ""
        if not args.set and args.steps == qs.steps
        else "-" + _digest([str(args.steps), *args.set])
    )
    with start_mlflow_server(out / "mlflow") as server:
        for i, (name, sets) in enumerate(VARIANTS.items()):
            if args.only and name not in args.only:
                continue
            recipe = load_recipe(
                args.recipe,
                [
                    "model.base=llava",
                    f"model.weights_path={weights}",
                    f"data.shards_root={shards}",
                    f"train.steps_per_epoch={args.steps}",
                    f"train.checkpoint_every={args.steps}",
                    f"train.micro_batch_size={args.micro_batch_size}",
                    f"train.num_workers={qs.workers}",
                    *cpus,
                    f"train.storage_path={out / 'ray_results'}",
                    f"train.run_name=ablation-{i}{tag}",
                    f"mlflow.tracking_uri={server.uri}",
                    "mlflow.experiment=pixellm-ablations",
                    f"mlflow.registered_model_name=pixellm-ablation-{i}",
                    *sets,
                    *args.set,
                ],
            )
            result = train(recipe)
            results[name] = _score(
                Path(result.export_dir),
                shards,
                out / f"variant-{i}{tag}",
                recipe.serve.max_new_tokens,
            )
            print(name, json.dumps(results[name]), flush=True)
    (out / f"ablations{tag}.json").write_text(json.dumps(results, indent=2))
    if "(a) full" in results:
        print(_table(results))


if __name__ == "__main__":
    main()
