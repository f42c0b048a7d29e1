"""Ray job: convert one corpus to Parquet shards (a Ray Data job, one task per shard).

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

from pixellm.data.commands import add_build_arguments, run_build  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Parse the ``pixellm shards build`` options and run the build."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_build_arguments(parser)
    return run_build(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
