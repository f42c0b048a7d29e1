"""``pixellm train --recipe platform/recipes/<name>.yaml [--set key=value …]``."""

from __future__ import annotations

import argparse

__all__ = ["add_train_arguments", "register", "run_train"]


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments shared by ``pixellm train`` and ``jobs/train.py``."""
    parser.add_argument(
        "--recipe", required=True, help="recipe YAML, e.g. platform/recipes/tiny.yaml"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override recipe keys, e.g. --set train.steps_per_epoch=50 train.lr=1e-3 (repeatable)",
    )


def run_train(args: argparse.Namespace) -> int:
    """Validate the recipe (before Ray starts), train, and print where the results are."""
    from pixellm.config import load_recipe
    from pixellm.train.driver import train, validate_for_training

    recipe = load_recipe(args.recipe, overrides=args.overrides)
    validate_for_training(recipe)
    result = train(recipe)
    print(f"run {result.run_name}: model exported to {result.export_dir}")
    print(f"  last checkpoint: {result.checkpoint_path}")
    print(f"  MLflow run: {result.mlflow_run_id}  metrics: {result.metrics}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``train`` to the ``pixellm`` command line."""
    p = subparsers.add_parser(
        "train",
        help="train PixelLM with Ray Train + DeepSpeed (resumes a run of the same name)",
        description="Train on $RAY_ADDRESS or a local loopback Ray cluster; logs to MLflow.",
    )
    add_train_arguments(p)
    p.set_defaults(func=run_train)
