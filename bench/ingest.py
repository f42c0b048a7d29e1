"""Ingest benchmark: Ray Data over Parquet shards vs a torch DataLoader over the raw MUSE layout.

Both paths feed the same preprocessing (``PreprocessBatch``: chat template + tokenizer, image
transform, masks capped at ``data.mask_max_size``) and the same collate, with the same number of
worker processes. The raw path does what the authors' loader does per sample: index the MUSE JSON,
open the image file, rasterise polygons / RLE with pycocotools. Prints samples/s of each and the
ratio (goal >= 1.5x).

    .venv/bin/python bench/ingest.py --samples 2000 --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from pixellm.config import Recipe
from pixellm.data.collate import collate_batch
from pixellm.data.corpus import generate_corpus
from pixellm.data.schema import segmentation_to_rle
from pixellm.data.shards import build_shards
from pixellm.data.stream import PreprocessBatch, rows_to_columns
from pixellm.data.train_stream import build_train_dataset
from pixellm.model.codebook import PLACEHOLDER


class RawMuseDataset(Dataset):
    """One item per (image record, question) of ``muse_train.json``, read from the raw files."""

    def __init__(self, muse_json: Path, images: Path, recipe: Recipe):
        self.records = json.loads(muse_json.read_text())
        self.index = [
            (r, q) for r, rec in enumerate(self.records) for q in range(len(rec["questions"]))
        ]
        self.images = images
        self.pre = PreprocessBatch(recipe.model, recipe.data)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, Any]:
        r, q = self.index[i % len(self.index)]
        rec = self.records[r]
        anns = rec["answers"][q]
        h, w = rec["height"], rec["width"]
        if "text_answers" in rec:
            answer = rec["text_answers"][q].replace("{seg}", PLACEHOLDER)
        else:
            answer = (
                " and ".join(f"the {a['rephrased_name']} {PLACEHOLDER}" for a in anns) or "None."
            )
        row = {
            "sample_id": f"muse/train/{r:06d}/q{q}",
            "corpus": "muse",
            "image": (self.images / rec["file_name"]).read_bytes(),
            "height": h,
            "width": w,
            "conversation": [
                {"role": "user", "text": rec["questions"][q]},
                {"role": "assistant", "text": answer},
            ],
            "targets": [
                {
                    "name": a["category_name"],
                    "description": a["rephrased_name"],
                    "rle": segmentation_to_rle(a["segmentation"], h, w),
                }
                for a in anns
            ],
        }
        out = self.pre.process_rows([row])
        return out[0] if out else None


def _collate_rows(rows: list[dict[str, Any] | None], image_size: int = 0) -> dict[str, Any]:
    rows = [r for r in rows if r is not None]
    return collate_batch(rows_to_columns(rows, image_size))


def _time(batches: Any, batch_size: int) -> tuple[float, float, int]:
    """(seconds to the first batch, steady-state samples/s after it, samples)."""
    start = time.perf_counter()
    first = None
    n = 0
    for b in batches:
        n += len(b["sample_id"])
        if first is None:
            first = time.perf_counter()
            n_first = n
    end = time.perf_counter()
    return first - start, (n - n_first) / max(end - first, 1e-9), n


def run_raw(
    recipe: Recipe, corpus: Path, samples: int, workers: int, batch: int
) -> tuple[float, float, int]:
    ds = RawMuseDataset(corpus / "muse/muse_train.json", corpus / "images", recipe)
    sampler = torch.utils.data.RandomSampler(
        ds, replacement=True, num_samples=samples, generator=torch.Generator().manual_seed(0)
    )
    loader = DataLoader(
        ds,
        batch_size=batch,
        sampler=sampler,
        num_workers=workers,
        collate_fn=_collate_rows,
        drop_last=True,
        persistent_workers=False,
    )
    return _time(loader, batch)


def run_ray(recipe: Recipe, samples: int, batch: int) -> tuple[float, float, int]:
    one_pass = {"epochs": 1, "steps_per_epoch": samples, "micro_batch_size": 1, "grad_accum": 1}
    train = recipe.train.model_copy(update={**one_pass, "checkpoint_every": 64})
    ds = build_train_dataset(recipe.model_copy(update={"train": train}), world=1)
    return _time(
        ds.iter_torch_batches(batch_size=batch, collate_fn=collate_batch, drop_last=True), batch
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers = Ray CPUs")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--images", type=int, default=240, help="images in the generated corpus")
    parser.add_argument(
        "--work-dir", default=None, help="where corpus and shards go (default: temp)"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="pixellm-ingest-"))
    corpus = work / "corpus"
    if not (corpus / "muse/muse_train.json").exists():
        generate_corpus(corpus, seed=0, images=args.images)
    build_shards("muse", corpus / "muse", str(work / "shards/muse"), engine="local")
    recipe = Recipe.model_validate(
        {
            "data": {
                "shards_root": str(work / "shards"),
                "mixture": {"muse": 1.0},
                "preprocess_cpus": 1,
            }
        }
    )
    PreprocessBatch(
        recipe.model, recipe.data
    )  # build the processor once (forked DataLoader workers reuse it)

    raw = run_raw(recipe, corpus, args.samples, args.workers, args.batch_size)
    print(f"DataLoader raw: first batch {raw[0]:.2f} s, {raw[1]:.1f} samples/s", flush=True)
    import ray

    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
    shards = run_ray(recipe, args.samples, args.batch_size)
    ray.shutdown()
    report = {
        "samples": args.samples,
        "workers": args.workers,
        "image_size": recipe.model.image_size,
        "dataloader_raw": {
            "first_batch_s": round(raw[0], 2),
            "samples_per_s": round(raw[1], 1),
            "samples": raw[2],
        },
        "ray_data_shards": {
            "first_batch_s": round(shards[0], 2),
            "samples_per_s": round(shards[1], 1),
            "samples": shards[2],
        },
        "ratio_steady_state": round(shards[1] / raw[1], 2),
    }
    print(json.dumps(report, indent=1))
    print(f"Ray Data shards / DataLoader raw = {report['ratio_steady_state']}x (goal >= 1.5x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
