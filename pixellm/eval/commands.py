"""``pixellm evaluate``: score a predictions JSONL file against a benchmark shards directory.

Exit codes: 0 scored, 2 bad input (file, line or flag named), 3 judge failure (URL named).
"""

from __future__ import annotations

import argparse
import json
import sys

from pixellm.eval.data import EvalInputError, load_benchmark, load_predictions
from pixellm.eval.harness import PROTOCOLS, evaluate_predictions
from pixellm.eval.judge import JudgeError, OpenAIJudge, openai_judge_from_env
from pixellm.eval.report import format_table, write_report

__all__ = ["register", "run_evaluate"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``evaluate`` subcommand."""
    p = subparsers.add_parser(
        "evaluate",
        help="score predictions (JSONL) against a benchmark (gIoU / cIoU, MUSE protocol)",
        description=__doc__,
    )
    p.add_argument("--benchmark", required=True, help="SHARDS_DIR with <split>/part-*.parquet")
    p.add_argument("--predictions", required=True, help="predictions JSONL, one line per sample")
    p.add_argument("--protocol", required=True, choices=PROTOCOLS)
    p.add_argument(
        "--split", nargs="+", action="extend", default=None, help="splits (default: all present)"
    )
    p.add_argument("--matching", choices=("iou", "bce_dice"), default="iou", help="muse cost")
    p.add_argument("--seed", type=int, default=0, help="point-sampling seed of bce_dice")
    p.add_argument("--judge", choices=("none", "openai"), default="none")
    p.add_argument("--judge-url", help="OpenAI-compatible base URL (default $OPENAI_BASE_URL)")
    p.add_argument("--judge-model", help="judge model (default $PIXELLM_JUDGE_MODEL)")
    p.add_argument("--judge-api-key-env", default="OPENAI_API_KEY", help="env var of the key")
    p.add_argument("--judge-cache", help="judge answer cache (default ~/.cache/pixellm/judge)")
    p.add_argument("--judge-timeout", type=float, default=60.0, help="seconds per request")
    p.add_argument("--judge-retries", type=int, default=3, help="retries on errors/timeouts")
    p.add_argument("--report", help="also write report.{json,md,html} and overlays/ here")
    p.add_argument("--n-overlays", type=int, default=8, help="overlay pictures in --report")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run_evaluate)


def _judge(args: argparse.Namespace) -> OpenAIJudge | None:
    if args.judge == "none":
        return None
    return openai_judge_from_env(
        url=args.judge_url,
        model=args.judge_model,
        api_key_env=args.judge_api_key_env,
        cache_dir=args.judge_cache,
        timeout_s=args.judge_timeout,
        max_retries=args.judge_retries,
    )


def run_evaluate(args: argparse.Namespace) -> int:
    """Run ``pixellm evaluate``; returns the exit code."""
    try:
        predictions = load_predictions(args.predictions)
        report = evaluate_predictions(
            args.benchmark,
            predictions,
            args.protocol,
            splits=args.split,
            judge=_judge(args),
            matching=args.matching,
            seed=args.seed,
        )
        if args.report:
            samples = load_benchmark(args.benchmark, args.split, with_images=True)
            write_report(args.report, report, samples, predictions, n_overlays=args.n_overlays)
    except (EvalInputError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except JudgeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        judge = report.judge
        print(f"protocol {report.protocol} (matching {report.matching}), judge {judge['name']}")
        print(format_table(report))
        if args.report:
            print(f"report written to {args.report}")
    return 0
