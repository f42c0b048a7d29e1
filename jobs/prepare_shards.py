"""Ray job: convert corpora to Parquet shards (a Ray Data job, one task per shard).

One corpus (same options as `pixellm shards build`), or with --sources every corpus of a recipe's
mixture, each into the directory the mixture names (as `pixellm shards build-all`):

    ray job submit --working-dir . --runtime-env platform/runtime/gpu-pip.yaml -- \
        python jobs/prepare_shards.py --recipe platform/recipes/pixellm-7b.yaml \
        --sources /mnt/shared/corpora/sources.yaml

    ray job submit --working-dir . --runtime-env platform/runtime/gpu-pip.yaml -- \
        python jobs/prepare_shards.py --format muse --input data/muse --images data/coco/train2014 \
        --out s3://bucket/shards/muse

Inside a Ray job Ray Data runs on the job's cluster ($RAY_ADDRESS); standalone it starts a local Ray.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from pixellm.data.commands import (  # noqa: E402
    add_build_all_arguments,
    add_build_arguments,
    run_build,
    run_build_all,
)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The ``pixellm shards build`` parser, or with --sources in ``argv`` the ``build-all`` one."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="jobs/prepare_shards.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if any(a == "--sources" or a.startswith("--sources=") for a in argv):
        add_build_all_arguments(parser)
    else:
        add_build_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse the options and build one corpus (``run_build``) or all (``run_build_all``)."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    return run_build_all(args) if hasattr(args, "sources") else run_build(args)


if __name__ == "__main__":
    sys.exit(main())
