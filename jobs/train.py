"""Ray job entrypoint: ``ray job submit --working-dir . -- python jobs/train.py --recipe R [--set k=v]``.

Same arguments as ``pixellm train``. The recipe is validated before Ray is touched; a bad recipe
exits with code 2 and one message. Connects to the cluster the job runs on (``RAY_ADDRESS``).
"""

from __future__ import annotations

import argparse
import sys

from pixellm.config import ConfigError
from pixellm.train.commands import add_train_arguments, run_train


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The job's argument parser (the options of ``pixellm train``)."""
    parser = argparse.ArgumentParser(prog="jobs/train.py", description=__doc__)
    add_train_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, validate, train; returns the exit code."""
    args = build_parser(argv).parse_args(argv)
    try:
        return run_train(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
