"""Peak memory of loading a LLaVA for training: the training code path vs the old fp32 way.

Writes a random LLaVA in the llava-hf layout (``config.json``, bf16 ``*.safetensors`` shards with
an index, tokenizer) into a temp directory, then loads it in a fresh subprocess per way, so each
peak RSS is measured on its own:

- ``new``: ``pixellm.train.loop.build_training_model`` — what a worker runs: LLaVA straight in the
  compute dtype (bf16) onto the worker device (CUDA when present, else CPU), decoder + LoRA added.
- ``old``: the previous path — ``build_pixellm`` in fp32 on the host, then cast to bf16 (what
  DeepSpeed did at ``initialize``) and moved to the GPU when present.

Printed per way: peak host RSS (VmHWM) right after loading and after reading every weight once
(safetensors are memory-mapped: untouched bf16 weights are not resident yet), and the RSS the load
added over the process after its imports, each as a ratio to the bf16 size of the written weights
(target ≤ 1.3× for ``new``), and peak CUDA memory when a GPU is present. Default size ≈ 1.0 B parameters (2.0 GB bf16; the old way
peaks around 3× that on the host).

    python bench/load_memory.py [--layers 18 --hidden 2048 --keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GIB = 1024**3


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def write_llava(out: Path, hidden: int, layers: int, intermediate: int) -> int:
    """Write a random bf16 LLaVA (CLIP ViT-B/16-shaped tower + Llama-shaped LLM); returns bytes."""
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    from transformers import LlavaForConditionalGeneration as Llava

    from pixellm.model.tokenizer import IMAGE_TOKEN, build_tiny_tokenizer

    tok = build_tiny_tokenizer(512)
    tok.save_pretrained(out)
    vision = CLIPVisionConfig(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        image_size=224,
        patch_size=16,
    )
    text = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 128,
        num_key_value_heads=hidden // 128,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    config.save_pretrained(out)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Llava(config).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    shard: dict[str, torch.Tensor] = {}
    index: dict[str, str] = {}
    total = shard_bytes = 0
    names = list(shapes)

    def flush() -> None:
        nonlocal shard, shard_bytes
        name = f"model-{len(set(index.values())) + 1:05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        index.update({k: name for k in shard})
        shard, shard_bytes = {}, 0

    for k in names:
        t = (torch.randn(shapes[k], generator=gen) * 0.02).to(torch.bfloat16)
        shard[k] = t
        shard_bytes += t.numel() * 2
        total += t.numel() * 2
        if shard_bytes >= 512 * 1024**2:
            flush()
    if shard:
        flush()
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=1)
    )
    return total


def _load(way: str, weights: Path) -> dict:
    """Runs in the subprocess: load one way, return the memory figures."""
    import torch

    from pixellm.config import load_recipe
    from pixellm.model import build_pixellm
    from pixellm.train.loop import build_training_model

    gpu = torch.cuda.is_available()
    recipe = load_recipe(
        REPO / "platform" / "recipes" / "pixellm-7b.yaml",
        overrides=[
            f"model.weights_path={weights}",
            "model.image_size=224",
            "model.llm_image_grid=14",
            f"train.use_gpu={str(gpu).lower()}",
        ],
    )
    base_kib = _rss_kib("VmRSS")
    if way == "new":
        ds_config = {"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}}
        model = build_training_model(recipe, ds_config)
    else:
        model = build_pixellm(recipe.model).to(torch.bfloat16)  # fp32 load, DeepSpeed's cast
        if gpu:
            model = model.to("cuda")
    params = sum(p.numel() for p in model.parameters())
    loaded_kib = _rss_kib("VmHWM")
    with torch.no_grad():  # read every weight once, as the first step will (mmap'd pages load)
        for p in model.parameters():
            p.sum()
    return {
        "way": way,
        "params": params,
        "dtype": str(next(model.llava.parameters()).dtype),
        "device": str(next(model.llava.parameters()).device),
        "baseline_rss_gib": base_kib / 1024**2,
        "peak_rss_after_load_gib": loaded_kib / 1024**2,
        "peak_rss_gib": _rss_kib("VmHWM") / 1024**2,
        "peak_cuda_gib": torch.cuda.max_memory_allocated() / GIB if gpu else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=18)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--keep", type=Path, default=None, help="write/reuse weights here")
    parser.add_argument("--child", nargs=2, metavar=("WAY", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_load(args.child[0], Path(args.child[1]))))
        return
    with tempfile.TemporaryDirectory(prefix="pixellm-load-bench-") as tmp:
        weights = args.keep or Path(tmp) / "llava"
        weights.mkdir(parents=True, exist_ok=True)
        index = weights / "model.safetensors.index.json"
        if index.is_file():
            size = json.loads(index.read_text())["metadata"]["total_size"]
        else:
            size = write_llava(weights, args.hidden, args.layers, args.intermediate)
        env = {**os.environ, "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}"}
        rows = []
        for way in ("new", "old"):
            out = subprocess.run(
                [sys.executable, __file__, "--child", way, str(weights)],
                capture_output=True,
                text=True,
                env=env,
                check=False,
            )
            if out.returncode:
                raise SystemExit(f"{way} load failed:\n{out.stderr[-3000:]}")
            row = json.loads(out.stdout.strip().splitlines()[-1])
            row["load_rss_gib"] = row["peak_rss_gib"] - row["baseline_rss_gib"]
            for k in ("peak_rss_after_load", "peak_rss", "load_rss", "peak_cuda"):
                v = row[f"{k}_gib"]
                row[f"{k}_ratio"] = None if v is None else round(v * GIB / size, 3)
            rows.append(row)
        new, old = rows
        print(
            json.dumps(
                {
                    "weights_bf16_gib": round(size / GIB, 3),
                    "new": new,
                    "old": old,
                    "target_load_rss_ratio": 1.3,
                    "new_vs_old_peak_rss": round(new["peak_rss_gib"] / old["peak_rss_gib"], 3),
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
