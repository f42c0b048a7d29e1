"""Every corpus a recipe's mixture needs, in one step: ``pixellm shards build-all``.

A sources file (``platform/data/sources.example.yaml``) maps each corpus name of ``data.mixture``
(the shard directory the training stream reads: ``sem_seg``, ``refer_seg``, ``vqa``, ``muse``) to
the on-disk corpus that feeds it (converter ``format``, ``input``, ``images``). ``build_all`` checks
the whole file against the recipe before any conversion starts, then runs the ordinary converter
(``pixellm.data.shards.build_shards``) once per corpus, writing ``<shards_root>/<name>`` with the
name as the rows' ``corpus`` field. Relative paths in the sources file are relative to that file.
Extra entries that the mixture does not use (e.g. ``reason_seg`` for evaluation) are built too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pixellm.config import ConfigError, load_recipe
from pixellm.data.schema import FORMATS

__all__ = ["Source", "SourcesFile", "build_all", "load_sources"]


class Source(BaseModel):
    """One corpus on disk: which converter reads it, and where its files are."""

    model_config = ConfigDict(extra="forbid")

    format: str = Field(description=f"converter: one of {FORMATS}")
    input: str = Field(min_length=1)  # the file or directory the converter reads
    images: str | None = None  # image directory (None = the converter's default)
    split: str | None = None  # force one split name (None = from the input)
    rows_per_shard: int = Field(256, gt=0)


class SourcesFile(BaseModel):
    """``corpora: {<mixture corpus name>: Source}``."""

    model_config = ConfigDict(extra="forbid")

    corpora: dict[str, Source] = Field(min_length=1)


def load_sources(path: str | Path) -> SourcesFile:
    """Read and validate a sources YAML; relative paths become relative to the file.

    Raises:
        ConfigError: unreadable file, unknown key, bad format name (every problem named).
    """
    path = Path(path)
    try:
        raw: Any = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot read sources file: {err}") from None
    try:
        sources = SourcesFile.model_validate(raw)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()
        )
        raise ConfigError(f"{path}: {problems}") from None
    bad = {n: s.format for n, s in sources.corpora.items() if s.format not in FORMATS}
    if bad:
        raise ConfigError(f"{path}: unknown format {bad}; choose from {list(FORMATS)}")
    base = path.resolve().parent
    for source in sources.corpora.values():
        source.input = _under(base, source.input)
        if source.images is not None:
            source.images = _under(base, source.images)
    return sources


def _under(base: Path, p: str) -> str:
    return p if "://" in p or Path(p).is_absolute() else str(base / p)


def build_all(
    recipe: str | Path,
    sources_path: str | Path,
    overrides: list[str] | None = None,
    out_root: str | None = None,
    engine: str = "ray",
) -> dict[str, dict[str, Any]]:
    """Build the shards of every corpus in the sources file into ``<shards_root>/<name>``.

    Args:
        recipe: recipe YAML whose ``data.mixture`` names the corpora and ``data.shards_root`` the root.
        sources_path: sources YAML (see the module docstring).
        overrides: dotted recipe overrides (e.g. ``data.shards_root=/mnt/shared/pixellm/shards``).
        out_root: shards root instead of the recipe's ``data.shards_root``.
        engine: ``"ray"`` (Ray Data, one task per shard) or ``"local"``.

    Returns:
        ``{name: {"out", "format", "rows", "shards_written", "shards_skipped", "rejected"}}``.

    Raises:
        ConfigError: a mixture corpus has no source, or a bad recipe / sources file; raised before
            any conversion starts.
        DataError: an input cannot be read at all.
    """
    from pixellm.data.shards import build_shards

    cfg = load_recipe(recipe, list(overrides or []))
    sources = load_sources(sources_path)
    missing = sorted(set(cfg.data.mixture) - set(sources.corpora))
    if missing:
        raise ConfigError(
            f"{sources_path}: no source for the mixture corpora {missing} of {recipe} "
            f"(data.mixture = {dict(cfg.data.mixture)}); add them under `corpora:`"
        )
    root = (out_root or cfg.data.shards_root).rstrip("/")
    summary: dict[str, dict[str, Any]] = {}
    for name, source in sources.corpora.items():
        out = f"{root}/{name}"
        result = build_shards(
            source.format,
            source.input,
            out,
            images=source.images,
            corpus=name,
            split=source.split,
            rows_per_shard=source.rows_per_shard,
            engine=engine,
        )
        m = result.manifest
        summary[name] = {
            "out": out,
            "format": source.format,
            "in_mixture": name in cfg.data.mixture,
            "rows": {k: v["rows"] for k, v in m["splits"].items()},
            "shards_written": result.written,
            "shards_skipped": result.skipped,
            "rejected": m["rejected"]["by_reason"],
        }
    return summary
