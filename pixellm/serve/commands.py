"""``pixellm serve`` and ``pixellm score``: the Serve application and batch scoring from the CLI."""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict

__all__ = ["add_score_arguments", "add_serve_arguments", "register", "run_score", "run_serve"]

APP_NAME = "pixellm"


def _init_ray(address: str | None, extra_cpus: float = 0.0) -> bool:
    """Connect to ``address`` or ``$RAY_ADDRESS``, else start a loopback-only local Ray.

    Returns True when this call started Ray. Inside a Ray job ``RAY_ADDRESS`` is set and Ray refuses
    resource arguments when connecting, so none are passed then. A local Ray gets ``extra_cpus`` logical CPUs on top of the machine's: Ray Data's file-listing
    task needs a whole CPU, which a replica holding one of two cores would otherwise never leave.
    """
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return False
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address)  # None = $RAY_ADDRESS (the cluster a Ray job runs on)
        return False
    ray.init(include_dashboard=False, num_cpus=(os.cpu_count() or 1) + math.ceil(extra_cpus))
    return True


def _raise_interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_serve(args: argparse.Namespace) -> int:
    """Deploy the app on a local Ray (or ``--address``) and serve until Ctrl-C or SIGTERM.

    Both stop the same way: Serve is shut down and, when this command started the local Ray, Ray
    too (its dashboard, runtime-env and log agents included), so nothing is left running.
    """
    from ray import serve

    from pixellm.config import load_recipe
    from pixellm.serve.app import build_app

    overrides = list(args.set)
    if args.port is not None:
        overrides.append(f"serve.port={args.port}")
    cfg = load_recipe(args.recipe, overrides).serve
    app = build_app(
        {
            "model": args.model,
            "recipe": args.recipe,
            "set": overrides,
            "tracking_uri": args.tracking_uri,
            "num_cpus": args.num_cpus,
            "num_gpus": args.num_gpus,
        }
    )
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    started = False
    try:
        started = _init_ray(args.address)
        # ray.init installs its own SIGTERM handler: put ours back so SIGTERM == Ctrl-C.
        signal.signal(signal.SIGTERM, _raise_interrupt)
        serve.start(http_options={"host": cfg.host, "port": cfg.port})
        serve.run(app, name=APP_NAME, route_prefix="/")
        url = f"http://{cfg.host}:{cfg.port}"
        print(
            f"PixelLM serving {args.model} at {url}  (POST /v1/segment, GET /healthz, GET /v1/model)"
        )
        print("Ctrl-C or SIGTERM stops it.", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping", file=sys.stderr, flush=True)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second signal must not cut the clean-up
        import ray

        if ray.is_initialized():
            if started:
                serve.shutdown()
                ray.shutdown()
            else:  # someone else's cluster: remove only what this command deployed
                serve.delete(APP_NAME)
        signal.signal(signal.SIGTERM, previous)
    print("stopped", file=sys.stderr, flush=True)
    return 0


def run_score(args: argparse.Namespace) -> int:
    """Score one split through the deployment; print a JSON summary."""
    from pixellm.config import load_recipe
    from pixellm.serve.score import ScoreOptions, score_benchmark

    cfg = load_recipe(args.recipe, args.set).serve
    started = _init_ray(
        args.address, extra_cpus=args.num_cpus if args.num_cpus is not None else cfg.num_cpus
    )
    opts = ScoreOptions(
        model=args.model,
        benchmark=args.benchmark,
        split=args.split,
        out=args.out,
        protocol=args.protocol,
        teacher_forced=args.teacher_forced,
        recipe=args.recipe,
        overrides=list(args.set),
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        callers=args.callers,
        app_name=args.app,
        use_running=args.use_running,
        tracking_uri=args.tracking_uri,
        n_overlays=args.overlays,
        replica_cpus=args.num_cpus,
        replica_gpus=args.num_gpus,
        # On a cluster Serve may outlive this run: start it where `pixellm serve` would.
        http_options=None if started else {"host": cfg.host, "port": cfg.port},
    )
    try:
        result = score_benchmark(opts)
    finally:
        if started:
            import ray
            from ray import serve

            serve.shutdown()
            ray.shutdown()
    summary = asdict(result)
    print(json.dumps(summary, indent=2, default=str))
    return 1 if result.n_errors else 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", required=True, help="exported model directory or models:/NAME/VERSION"
    )
    p.add_argument("--recipe", default=None, help="recipe YAML (serve + mlflow sections)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="recipe overrides")
    p.add_argument("--tracking-uri", default=None, help="MLflow URI (default $MLFLOW_TRACKING_URI)")
    p.add_argument(
        "--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else local)"
    )
    p.add_argument("--num-cpus", type=float, default=None, help="CPUs per replica (serve.num_cpus)")
    p.add_argument("--num-gpus", type=float, default=None, help="GPUs per replica (serve.num_gpus)")


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``pixellm serve`` (shared with ``jobs/serve.py``)."""
    _common(p)
    p.add_argument("--port", type=int, default=None, help="HTTP port (default serve.port)")


def add_score_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``pixellm score`` (shared with ``jobs/score.py``)."""
    _common(p)
    p.add_argument("--benchmark", required=True, help="SHARDS_DIR with <split>/part-*.parquet")
    p.add_argument("--split", default="val")
    p.add_argument("--out", required=True, help="output directory (a rerun skips scored samples)")
    p.add_argument("--protocol", choices=["muse", "referring"], default="muse")
    p.add_argument(
        "--teacher-forced",
        action="store_true",
        help="ground-truth answer in the prompt; masks from one forward pass",
    )
    p.add_argument("--max-new-tokens", type=int, default=None, help="default serve.max_new_tokens")
    p.add_argument("--batch-size", type=int, default=None, help="rows per Ray Data batch")
    p.add_argument("--callers", type=int, default=1, help="Ray Data actors calling the handle")
    p.add_argument("--app", default="pixellm-score", help="Serve application name")
    p.add_argument(
        "--use-running",
        action="store_true",
        help="score through the running application --app instead of deploying one",
    )
    p.add_argument("--overlays", type=int, default=8, help="overlay pictures in the report")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``serve`` and ``score``."""
    p = subparsers.add_parser("serve", help="serve a model over HTTP with Ray Serve")
    add_serve_arguments(p)
    p.set_defaults(func=run_serve)
    p = subparsers.add_parser("score", help="score a benchmark split through the Serve deployment")
    add_score_arguments(p)
    p.set_defaults(func=run_score)
