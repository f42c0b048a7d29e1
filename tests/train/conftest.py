"""Shared fixtures for training tests: a small generated corpus as shards, a real MLflow server
(SQLite store) on loopback, one local Ray cluster for the session, and tiny recipes."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pixellm.config import Recipe, load_recipe
from tests.train.resume_helpers import (
    RESUME_RUN,
    TINY,
    metric_history,
    read_sample_log,
    tiny_recipe_overrides,
)

_FORMATS = [
    ("muse", "muse", "muse"),
    ("coco", "coco/instances.json", "sem_seg"),
    ("refer", "refer", "refer_seg"),
    ("llava", "llava/llava_instruct.json", "vqa"),
]


def build_test_shards(root: Path, images: int = 40) -> Path:
    """Generate a small corpus under ``root`` and shard every format; returns the shards root."""
    from pixellm.data.corpus import generate_corpus
    from pixellm.data.shards import build_shards

    corpus = root / "corpus"
    generate_corpus(corpus, seed=0, images=images, image_size=128)
    for fmt, rel, name in _FORMATS:
        build_shards(
            fmt, corpus / rel, str(root / "shards" / name), images=corpus / "images", engine="local"
        )
    return root / "shards"


@pytest.fixture(scope="session")
def train_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """Shards + a running MLflow server (started in parallel: both take seconds on 2 cores)."""
    from pixellm.tracking import start_mlflow_server

    root = tmp_path_factory.mktemp("train")
    box: dict = {}

    def start() -> None:
        try:
            box["server"] = start_mlflow_server(root / "mlflow")
        except Exception as err:  # noqa: BLE001 - re-raised in the main thread
            box["error"] = err

    thread = threading.Thread(target=start)
    thread.start()
    shards = build_test_shards(root)
    thread.join()
    if "error" in box:
        raise box["error"]
    server = box["server"]
    try:
        yield {"root": root, "shards": shards, "mlflow_uri": server.uri}
    finally:
        server.stop()


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """One local loopback Ray cluster for every integration test of the session."""
    import ray

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}},
    )
    yield
    ray.shutdown()


@pytest.fixture
def make_recipe() -> Callable[..., Recipe]:
    """``make_recipe(env, run_name, *overrides)`` → a tiny recipe wired to the test services."""
    return tiny_recipe


def tiny_recipe(env: dict, run_name: str, *overrides: str) -> Recipe:
    """The tiny recipe on the test shards, storage and MLflow server, plus ``overrides``."""
    return load_recipe(TINY, overrides=[*tiny_recipe_overrides(env, run_name), *overrides])


@pytest.fixture(scope="session")
def reference_run(train_env: dict, ray_cluster: None) -> dict:
    """The uninterrupted 2-worker run every resume drill is compared with (run once per session)."""
    from pixellm.train import train

    recipe = tiny_recipe(train_env, "reference", *RESUME_RUN)
    result = train(recipe)
    return {
        "recipe": recipe,
        "result": result,
        "samples": {r: read_sample_log(result.run_dir, r) for r in range(2)},
        "loss": metric_history(train_env, result.mlflow_run_id, "loss"),
    }
