"""``pixellm quickstart``: the whole platform end to end on the generated corpus."""

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


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``quickstart``."""
    from pixellm.quickstart import register_arguments

    p = subparsers.add_parser("quickstart", help="corpus → shards → train → serve → score → report")
    register_arguments(p, _run)
