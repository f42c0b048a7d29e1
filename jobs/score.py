"""Ray job: score a benchmark split through the PixelLM Serve deployment (as `pixellm score`).

    ray job submit --working-dir . --runtime-env platform/runtime/gpu-pip.yaml -- \
        python jobs/score.py --model models:/pixellm-7b/latest --recipe platform/recipes/pixellm-7b.yaml \
        --benchmark /mnt/shared/pixellm/shards/muse --split val --out /mnt/shared/pixellm/reports/muse-val

Inside a Ray job it joins the job's cluster ($RAY_ADDRESS, no resource arguments); run standalone
(`python jobs/score.py ...`) it starts a local loopback Ray. Replica resources: --num-cpus /
--num-gpus, else the recipe's `serve.num_cpus` / `serve.num_gpus` (7B: 8 CPUs + 1 GPU per replica).

Ray Data streams the rows through the deployment's handle; predictions (JSONL + Parquet), the
report (JSON, Markdown, HTML, overlays) and MLflow figures land in --out. A rerun skips scored rows.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from pixellm.serve.commands import add_score_arguments, run_score  # noqa: E402


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The job's argument parser (the options of ``pixellm score``)."""
    parser = argparse.ArgumentParser(
        prog="jobs/score.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_score_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse the ``pixellm score`` options and run."""
    return run_score(build_parser(argv).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
