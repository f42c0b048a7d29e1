"""``pixellm corpus generate`` and ``pixellm shards build``."""

from __future__ import annotations

import argparse
import json
import time

from pixellm.data.schema import CORPUS_BY_FORMAT, FORMATS

__all__ = [
    "add_build_all_arguments",
    "add_build_arguments",
    "register",
    "run_build",
    "run_build_all",
]


def _generate(args: argparse.Namespace) -> int:
    from pixellm.config import ConfigError
    from pixellm.data.corpus import generate_corpus

    start = time.perf_counter()
    try:
        summary = generate_corpus(
            args.out,
            seed=args.seed,
            images=args.images,
            image_size=args.image_size,
            held_out_pool=args.held_out_pool,
        )
    except ValueError as err:  # a size out of range: one line, before anything is written
        raise ConfigError(f"pixellm corpus generate: {err}") from None
    print(
        json.dumps(
            {
                "out": summary.out,
                "files": summary.files,
                "seconds": round(time.perf_counter() - start, 2),
            }
        )
    )
    return 0


def add_build_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``pixellm shards build`` (shared with jobs/prepare_shards.py)."""
    parser.add_argument(
        "--format", required=True, choices=FORMATS, help="on-disk format of --input"
    )
    parser.add_argument("--input", required=True, help="corpus file or directory in that format")
    parser.add_argument(
        "--images", default=None, help="image directory (default: images/ beside it)"
    )
    parser.add_argument("--out", required=True, help="shard directory: local path or pyarrow URI")
    parser.add_argument(
        "--corpus",
        default=None,
        help=f"corpus name in rows (default per format: {CORPUS_BY_FORMAT})",
    )
    parser.add_argument("--split", default=None, help="force one split name (default: from input)")
    parser.add_argument("--rows-per-shard", type=int, default=256, help="rows per Parquet file")
    parser.add_argument("--row-group-size", type=int, default=64, help="rows per Parquet row group")
    parser.add_argument(
        "--engine", choices=("ray", "local"), default="ray", help="ray = Ray Data job (default)"
    )


def run_build(args: argparse.Namespace) -> int:
    """Build shards from parsed ``add_build_arguments`` options.

    Prints the quarantine summary (one line per reject reason), then a JSON summary as the last
    line. An input file that cannot be read prints ``error: <file>: <problem>`` and returns 2.
    """
    from pixellm.data.formats import DataError
    from pixellm.data.shards import build_shards, reject_summary

    try:
        result = build_shards(
            args.format,
            args.input,
            args.out,
            images=args.images,
            corpus=args.corpus,
            split=args.split,
            rows_per_shard=args.rows_per_shard,
            row_group_size=args.row_group_size,
            engine=args.engine,
        )
    except DataError as err:  # a file-level problem: one line, no traceback
        print(f"error: {err}", flush=True)
        return 2
    m = result.manifest
    print("\n".join(reject_summary(m)), flush=True)
    print(
        json.dumps(
            {
                "out": args.out,
                "corpus": m["corpus"],
                "rows": {k: v["rows"] for k, v in m["splits"].items()},
                "shards_written": result.written,
                "shards_skipped": result.skipped,
                "rejected": m["rejected"]["by_reason"],
                "seconds": round(result.seconds, 2),
            }
        )
    )
    return 0


def add_build_all_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``pixellm shards build-all`` (shared with jobs/prepare_shards.py)."""
    parser.add_argument(
        "--recipe", required=True, help="recipe YAML: data.mixture, data.shards_root"
    )
    parser.add_argument(
        "--sources", required=True, help="sources YAML (platform/data/sources.example.yaml)"
    )
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="recipe overrides"
    )
    parser.add_argument("--out", default=None, help="shards root (default: data.shards_root)")
    parser.add_argument(
        "--engine", choices=("ray", "local"), default="ray", help="ray = Ray Data job (default)"
    )


def run_build_all(args: argparse.Namespace) -> int:
    """Build every corpus of the sources file (``pixellm.data.build_all``); prints a JSON summary."""
    from pixellm.config import ConfigError
    from pixellm.data.build_all import build_all
    from pixellm.data.formats import DataError

    try:
        summary = build_all(args.recipe, args.sources, args.set, args.out, args.engine)
    except (ConfigError, DataError) as err:
        print(f"error: {err}", flush=True)
        return 2
    print(json.dumps(summary))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``corpus generate`` and ``shards build``."""
    corpus = subparsers.add_parser("corpus", help="the generated default corpus")
    corpus_sub = corpus.add_subparsers(dest="corpus_command", metavar="ACTION", required=True)
    gen = corpus_sub.add_parser("generate", help="write the shape-world corpus in every format")
    gen.add_argument("--out", required=True, help="output directory")
    gen.add_argument("--seed", type=int, default=0, help="world seed (same seed = same bytes)")
    gen.add_argument("--images", type=int, default=240, help="number of images")
    gen.add_argument("--image-size", type=int, default=128, help="longest image side in pixels")
    gen.add_argument(
        "--held-out-pool",
        type=int,
        default=None,
        help="draw val/test from the first N images; the rest are train (default: all images)",
    )
    gen.set_defaults(func=_generate)

    shards = subparsers.add_parser("shards", help="corpora → Parquet shards")
    shards_sub = shards.add_subparsers(dest="shards_command", metavar="ACTION", required=True)
    build = shards_sub.add_parser("build", help="convert one corpus to shards + manifest.json")
    add_build_arguments(build)
    build.set_defaults(func=run_build)
    build_all = shards_sub.add_parser(
        "build-all", help="every corpus a recipe's mixture needs, from a sources YAML"
    )
    add_build_all_arguments(build_all)
    build_all.set_defaults(func=run_build_all)
