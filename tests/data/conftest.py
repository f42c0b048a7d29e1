"""Shared fixtures of the data tests: a small generated corpus, its shards, a local Ray cluster."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pixellm.config import Recipe
from pixellm.data.corpus import generate_corpus
from pixellm.data.shards import build_shards

SOURCES = {  # corpus name -> (format, input path relative to the corpus directory)
    "muse": ("muse", "muse"),
    "sem_seg": ("coco", "coco"),
    "refer_seg": ("refer", "refer"),
    "vqa": ("llava", "llava/llava_instruct.json"),
    "reason_seg": ("reasonseg", "reasonseg"),
}


@pytest.fixture(scope="session")
def corpus_sources() -> dict[str, tuple[str, str]]:
    """Corpus name -> (format, input path relative to the generated corpus)."""
    return dict(SOURCES)


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The generated corpus with 40 images (seed 0)."""
    out = tmp_path_factory.mktemp("corpus")
    generate_corpus(out, seed=0, images=40, image_size=128)
    return out


@pytest.fixture(scope="session")
def shards_root(corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shards of every corpus of the small generated corpus (built in-process)."""
    root = tmp_path_factory.mktemp("shards")
    for corpus, (fmt, rel) in SOURCES.items():
        build_shards(fmt, corpus_dir / rel, str(root / corpus), rows_per_shard=100, engine="local")
    return root


@pytest.fixture(scope="session")
def small_recipe(shards_root: Path) -> Recipe:
    """The tiny recipe on the test shards, with 32-px images so streaming stays cheap."""
    return Recipe.model_validate(
        {
            "data": {"shards_root": str(shards_root), "mask_max_size": 32},
            "model": {"image_size": 32, "llm_image_grid": 2, "max_length": 256},
        }
    )


@pytest.fixture(scope="module")
def ray_cluster():
    """A 2-CPU local Ray on 127.0.0.1, shut down at the end if this fixture started it."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()
