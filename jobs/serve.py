"""Ray job: deploy the PixelLM Serve application and keep serving (same options as `pixellm serve`).

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/serve.py --model models:/pixellm-tiny/latest --recipe platform/recipes/tiny.yaml

For a declarative deployment use `serve run platform/serve/pixellm.yaml` (or `serve deploy`).
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from pixellm.serve.commands import add_serve_arguments, run_serve  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Parse the `pixellm serve` options and serve until interrupted."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_serve_arguments(parser)
    return run_serve(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
