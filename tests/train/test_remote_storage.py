"""``train.storage_path: s3://…`` end to end (issue 10, item 6).

A real S3-compatible HTTP server (moto's server mode, a test double at a boundary we cannot reach)
runs on 127.0.0.1; the endpoint and dummy credentials reach pyarrow through the standard AWS
environment. Round trip on S3: train 2 steps (checkpoint + export on S3), resubmit with 2 epochs
(resumes from the S3 checkpoint at step 2), finish at 4 and export again; the export downloaded
from S3 loads. Nothing is written to a local path named after the URI.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

BUCKET = "pixellm-test"


@pytest.fixture
def s3_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """moto's S3 server on a free loopback port, with a bucket; yields the endpoint URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    binary = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen(
        [str(binary), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2)  # noqa: S310
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"moto_server did not answer on {endpoint}") from None
                time.sleep(0.3)
        for key, value in {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }.items():
            monkeypatch.setenv(key, value)
        import pyarrow.fs as pafs

        fs, _ = pafs.FileSystem.from_uri(f"s3://{BUCKET}?allow_bucket_creation=true")
        fs.create_dir(BUCKET)
        yield endpoint
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def _files(prefix: str) -> dict[str, int]:
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(prefix)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return {i.path[len(path) + 1 :]: i.size for i in infos if i.type == pafs.FileType.File}


def test_s3_train_checkpoint_resume_export(
    s3_server, train_env, make_recipe, tmp_path, monkeypatch
) -> None:
    import ray

    # The Ray processes must see the S3 environment: start this test's own local cluster now.
    if ray.is_initialized():
        ray.shutdown()
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}},
    )
    try:
        _round_trip(train_env, make_recipe, tmp_path, monkeypatch)
    finally:
        ray.shutdown()


def _round_trip(train_env, make_recipe, tmp_path, monkeypatch) -> None:  # noqa: ANN001
    import pyarrow.fs as pafs

    from pixellm.model import PixelLM
    from pixellm.train import train

    monkeypatch.chdir(tmp_path)
    storage = f"s3://{BUCKET}/runs"
    common = (
        f"train.storage_path={storage}",
        "train.num_workers=1",
        "train.steps_per_epoch=2",
        "train.sample_log=true",  # S3 cannot append: the log is rewritten whole at each flush
    )
    first = train(make_recipe(train_env, "s3run", *common))
    assert first.metrics["step"] == 2
    assert first.export_dir == f"{storage}/s3run/model"
    with pytest.warns(UserWarning, match="train.epochs"):
        second = train(make_recipe(train_env, "s3run", *common, "train.epochs=2"))
    assert second.metrics["step"] == 4
    assert second.run_dir == f"{storage}/s3run"

    files = _files(f"{storage}/s3run")
    for step in (2, 4):
        assert f"checkpoint_step_{step:07d}/recipe_state.json" in files, sorted(files)
    assert files["model/model.safetensors"] > 0 and "model/pixellm_config.json" in files
    assert not (tmp_path / "s3:").exists()  # no URI turned into a local path
    fs, path = pafs.FileSystem.from_uri(f"{storage}/s3run/samples/rank-0.jsonl")
    with fs.open_input_stream(path) as f:
        steps = [json.loads(line)["step"] for line in f.read().decode().splitlines()]
    assert steps == sorted(steps) and set(steps) == {1, 2, 3, 4}, steps  # in order
    assert len({steps.count(step) for step in (1, 2, 3, 4)}) == 1, steps  # no step logged twice

    from mlflow.tracking import MlflowClient

    run = MlflowClient(train_env["mlflow_uri"]).get_run(second.mlflow_run_id)
    assert run.data.tags["resumed_from_step"] == "2"
    assert run.data.tags["export_dir"] == f"{storage}/s3run/model"

    local = tmp_path / "export"
    fs, path = pafs.FileSystem.from_uri(f"{storage}/s3run/model")
    pafs.copy_files(path, str(local), source_filesystem=fs)
    model = PixelLM.from_pretrained(local)
    assert model.config.base == "tiny"
