"""``pixellm quickstart``: the whole platform end to end on the generated corpus; and
``pixellm pretrain-tiny``: its first training stage, a pretrained tiny LLaVA (llava-hf layout)."""

from __future__ import annotations

import argparse

__all__ = ["register"]


def _run(args: argparse.Namespace) -> int:
    from pixellm.quickstart import options_from_args, run_quickstart

    try:
        run_quickstart(options_from_args(args))
    except KeyboardInterrupt:
        print("\ninterrupted: everything the quickstart started has been stopped")
        return 130
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    from pixellm.config import ConfigError, command_options, load_recipe
    from pixellm.data.formats import DataError
    from pixellm.train.pretrain import PretrainOptions, pretrain_tiny

    opts = command_options(
        "pixellm pretrain-tiny",
        PretrainOptions,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        text_steps=args.text_steps,
        text_batch_size=args.text_batch_size,
        vision_lr_scale=args.vision_lr_scale,
        vision_weight_decay=args.vision_weight_decay,
    )
    recipe = load_recipe(args.recipe, overrides=args.overrides)
    try:
        out = pretrain_tiny(recipe.model, args.shards, args.out, opts)
    except DataError as err:  # missing or unreadable shards: one line, no traceback
        raise ConfigError(f"--shards: {err}") from None
    print(
        f"pretrained tiny LLaVA: {out}  (train with --set model.base=llava model.weights_path={out})"
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``quickstart`` and ``pretrain-tiny``."""
    from pixellm.quickstart import register_arguments
    from pixellm.train.pretrain import PretrainOptions

    p = subparsers.add_parser("quickstart", help="corpus → shards → train → serve → score → report")
    register_arguments(p, _run)
    d = PretrainOptions()
    p = subparsers.add_parser(
        "pretrain-tiny",
        help="pretrain the tiny LLaVA of a recipe on shards; save it in the llava-hf layout",
        description="Reused when the output directory holds a run with the same inputs.",
    )
    p.add_argument("--recipe", default="platform/recipes/tiny.yaml")
    p.add_argument(
        "--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE"
    )
    p.add_argument("--shards", required=True, help="shards root (one directory per corpus)")
    p.add_argument("--out", required=True, help="output llava-hf directory")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--text-steps",
        type=int,
        default=d.text_steps,
        help="language pretraining steps of the LLM alone before the LLaVA steps (0 = none)",
    )
    p.add_argument("--text-batch-size", type=int, default=d.text_batch_size)
    p.add_argument(
        "--vision-lr-scale",
        type=float,
        default=d.vision_lr_scale,
        help="CLIP's learning rate as a fraction of --lr (image phase)",
    )
    p.add_argument(
        "--vision-weight-decay",
        type=float,
        default=d.vision_weight_decay,
        help="AdamW weight decay of CLIP (image phase)",
    )
    p.set_defaults(func=_pretrain)
