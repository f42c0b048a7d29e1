"""The ``pixellm`` command line.

Each area of the package contributes its subcommands through a ``register(subparsers)`` function in
its own ``commands`` module, listed in ``COMMAND_MODULES``. Each subcommand sets ``func`` to a
function of the parsed arguments that returns an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["build_parser", "main"]

# One module per area; each defines register(subparsers: argparse._SubParsersAction) -> None.
COMMAND_MODULES: tuple[str, ...] = (
    "pixellm.data.commands",
    "pixellm.eval.commands",
    "pixellm.model.commands",
    "pixellm.train.commands",
    "pixellm.serve.commands",
    "pixellm.commands",
)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every area's subcommands."""
    parser = argparse.ArgumentParser(
        prog="pixellm",
        description="PixelLM platform: corpora → shards → Ray Train + DeepSpeed → MLflow → Ray Serve.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``pixellm`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    from pixellm.config import ConfigError

    try:
        return int(args.func(args) or 0)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
