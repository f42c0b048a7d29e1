"""``pixellm flops`` (per-sample compute of PixelLM vs a LISA-shaped model at real sizes) and
``pixellm import-authors`` (the released PixelLM checkpoints as a model directory of ours)."""

from __future__ import annotations

import argparse

from pixellm.config import load_recipe

__all__ = ["register"]


def _flops(args: argparse.Namespace) -> int:
    from pixellm.model.flops import FlopsAssumptions, count_flops, flops_json

    recipe = load_recipe(args.recipe, args.set)
    architecture = args.architecture or (
        "llava-1.5-13b" if "13b" in recipe.name else "llava-1.5-7b"
    )
    assumptions = FlopsAssumptions(
        architecture=architecture,
        prompt_text_tokens=args.prompt_tokens,
        answer_text_tokens_per_target=args.answer_tokens_per_target,
        num_targets=args.targets,
        pixellm_image_px=recipe.model.image_size,
    )
    if args.json:
        print(flops_json(recipe.model, assumptions))
        return 0
    result = count_flops(recipe.model, assumptions)
    print(
        f"PixelLM   {result['pixellm_tflops']:8.3f} TFLOPs  ({result['pixellm_tmacs']:.3f} TMACs)"
    )
    print(f"LISA      {result['lisa_tflops']:8.3f} TFLOPs  ({result['lisa_tmacs']:.3f} TMACs)")
    print(f"ratio     {result['ratio']:8.3f}  (paper: 7.16 / 3.57 = 2.006 for 7B)")
    return 0


def _import_authors(args: argparse.Namespace) -> int:
    import sys

    from pixellm.model.import_authors import ImportError_, import_authors

    try:
        out = import_authors(args.checkpoint, args.clip, args.out)
    except (ImportError_, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"imported {args.checkpoint} -> {out} (load with PixelLM.from_pretrained, score with pixellm score)"
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``flops`` and ``import-authors``."""
    imp = subparsers.add_parser(
        "import-authors",
        help="import the authors' released PixelLM-7B/13B checkpoint (local files only)",
    )
    imp.add_argument("--checkpoint", required=True, help="their merged checkpoint directory")
    imp.add_argument("--clip", required=True, help="local CLIP ViT-L/14-336 directory")
    imp.add_argument(
        "--out", required=True, help="new model directory (must not exist or be empty)"
    )
    imp.set_defaults(func=_import_authors)
    p = subparsers.add_parser("flops", help="per-sample FLOPs of PixelLM vs a LISA-shaped model")
    p.add_argument(
        "--recipe", required=True, help="recipe YAML, e.g. platform/recipes/pixellm-7b.yaml"
    )
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="recipe overrides")
    p.add_argument(
        "--architecture",
        choices=["llava-1.5-7b", "llava-1.5-13b"],
        default=None,
        help="LLaVA shape when model.weights_path has no config.json (default: from the recipe name)",
    )
    p.add_argument("--prompt-tokens", type=int, default=64, help="system prompt + question tokens")
    p.add_argument("--answer-tokens-per-target", type=int, default=12)
    p.add_argument("--targets", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_flops)
