"""Ray job: score a benchmark split through the PixelLM Serve deployment (as `pixellm score`).

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/score.py --address auto --model models:/pixellm-tiny/latest \
        --benchmark runs/quickstart/shards/muse --split val --out runs/score/val

Ray Data streams the rows through the deployment's handle; predictions (JSONL + Parquet), the
report (JSON, Markdown, HTML, overlays) and MLflow figures land in --out. A rerun skips scored rows.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from pixellm.serve.commands import add_score_arguments, run_score  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Parse the `pixellm score` options and score."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_score_arguments(parser)
    return run_score(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
