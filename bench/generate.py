"""Benchmark: tokens/s of ``PixelLM.predict`` with the KV cache vs ``use_cache=False``.

The authors' release generated with ``use_cache=False``: every step recomputes the whole sequence.
``PixelLM.generate_greedy(use_cache=False)`` is that loop (a plain greedy loop over full forwards;
transformers' ``generate`` would silently use the cache from ``inputs_embeds``), and this script
checks it with a forward hook on the LLM: the baseline's inputs grow by one token per step, the
cached path's are one token long after the prompt. Same model, prompts and images for both; greedy
decoding; the untrained model rarely stops early, so both generate ``--max-new-tokens`` tokens per
answer (the count actually generated is what is timed).
By default the tiny recipe's LLM is widened (512 wide, 8 layers) so that the LLM's compute, not
Python overhead, dominates a step, as it does for the real 7B/13B models; ``--set`` replaces that.

    .venv/bin/python bench/generate.py [--recipe platform/recipes/tiny.yaml] [--set k=v ...]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from pixellm.config import load_recipe
from pixellm.model import build_pixellm


def _time(model, images, questions, max_new_tokens: int, use_cache: bool, repeats: int) -> float:
    model.predict(images[:1], questions[:1], max_new_tokens=4, use_cache=use_cache)  # warm-up
    tokens, elapsed = 0, 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        preds = model.predict(images, questions, max_new_tokens=max_new_tokens, use_cache=use_cache)
        elapsed += time.perf_counter() - start
        tokens += sum(max(p.num_tokens, 1) for p in preds)
    return tokens / elapsed


def _input_lengths(model, image, question: str, use_cache: bool, steps: int = 4) -> list[int]:
    """Sequence length of every LLM forward of one short generation."""
    lengths: list[int] = []
    hook = model.llava.model.language_model.register_forward_pre_hook(
        lambda _m, _a, kw: lengths.append(kw["inputs_embeds"].shape[1]), with_kwargs=True
    )
    try:
        model.predict([image], [question], max_new_tokens=steps, use_cache=use_cache)
    finally:
        hook.remove()
    return lengths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="platform/recipes/tiny.yaml")
    parser.add_argument(
        "--set",
        nargs="*",
        default=[
            "model.tiny.text_hidden_size=512",
            "model.tiny.text_layers=8",
            "model.tiny.text_intermediate_size=1376",
            "model.tiny.text_heads=8",
        ],
    )
    parser.add_argument(
        "--batch", type=int, default=4, help="images (= questions) per predict call"
    )
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_pixellm(load_recipe(args.recipe, args.set).model).eval()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (128, 160, 3), dtype=np.uint8) for _ in range(args.batch)]
    questions = [f"Please segment the shapes number {i} in this image." for i in range(args.batch)]
    cached_len = _input_lengths(model, images[0], questions[0], use_cache=True)
    full_len = _input_lengths(model, images[0], questions[0], use_cache=False)
    recomputes = all(b - a == 1 for a, b in zip(full_len, full_len[1:], strict=False))
    one_token = all(n == 1 for n in cached_len[1:])
    if not (recomputes and one_token and len(full_len) > 1):
        raise SystemExit(f"baseline is not a full recompute: {full_len} vs cached {cached_len}")
    cached = _time(model, images, questions, args.max_new_tokens, True, args.repeats)
    uncached = _time(model, images, questions, args.max_new_tokens, False, args.repeats)
    result = {
        "benchmark": "generate",
        "kv_cache_tokens_per_s": round(cached, 1),
        "no_cache_tokens_per_s": round(uncached, 1),
        "ratio": round(cached / uncached, 2),
        "batch": args.batch,
        "max_new_tokens": args.max_new_tokens,
        "threads": torch.get_num_threads(),
        "forward_lengths": {"no_cache": full_len, "kv_cache": cached_len},
    }
    print(f"KV cache   {cached:8.1f} tokens/s")
    print(f"no cache   {uncached:8.1f} tokens/s   (authors' setting: full recompute per step)")
    print(f"forward input lengths: no cache {full_len}, KV cache {cached_len}")
    print(f"ratio      {cached / uncached:8.2f}x")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
