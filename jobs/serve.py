"""Ray job: deploy the PixelLM Serve application and keep serving (same options as `pixellm serve`).

    ray job submit --working-dir . --runtime-env platform/runtime/gpu-pip.yaml -- \
        python jobs/serve.py --model models:/pixellm-7b/latest --recipe platform/recipes/pixellm-7b.yaml

Inside a Ray job it joins the job's cluster ($RAY_ADDRESS, no resource arguments); run standalone it
starts a local loopback Ray. Replica resources and autoscaling bounds come from the recipe's `serve`
section (--num-cpus / --num-gpus override the resources).

For a declarative deployment use `serve run platform/serve/pixellm.yaml` (or `serve deploy`).
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from pixellm.serve.commands import add_serve_arguments, run_serve  # noqa: E402


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The job's argument parser (the options of ``pixellm serve``)."""
    parser = argparse.ArgumentParser(
        prog="jobs/serve.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_serve_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse the ``pixellm serve`` options and run."""
    return run_serve(build_parser(argv).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
