"""A real loopback cluster from cluster/local.sh: one `up` for the module, three `ray job submit`s, down.

1. A trivial job prints where `platform` was imported from and its sys.path, to prove the working dir
   (the repository root, first on sys.path in every worker) shadows no standard-library module.
2. The tiny training job (jobs/train.py) runs two steps on shards built here, logs to the cluster's
   MLflow server and exports the model.
3. A scoring job (jobs/score.py) scores the MUSE val split with that exported model through Serve.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "cluster" / "local.sh"
VENV_BIN = ROOT / ".venv" / "bin"
RUNTIME_ENV = "platform/runtime/local.yaml"

JOB = (
    "import json, platform, sys; "
    "print('PIXELLM-JOB ' + json.dumps({'platform': platform.__file__, 'sys_path': sys.path, "
    "'executable': sys.executable}))"
)
# The generated corpus -> shards directory name the tiny recipe's mixture expects.
SHARD_SETS = {"muse": "muse", "coco": "sem_seg", "refer": "refer_seg", "llava": "vqa"}


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _run(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def local_cluster() -> Iterator[dict[str, str]]:
    """`cluster/local.sh up` on free ports in a short temp dir (Ray's socket paths are length-limited)."""
    if not (VENV_BIN / "ray").exists():
        pytest.skip("no .venv with ray (run `make env`)")
    cluster_dir = tempfile.mkdtemp(prefix="pxlc-", dir="/tmp")
    gcs, dashboard, client, head_agent, worker_agent, mlflow = _free_ports(6)
    env = {
        **os.environ,
        "PIXELLM_CLUSTER_DIR": cluster_dir,
        "PIXELLM_RAY_PORT": str(gcs),
        "PIXELLM_RAY_DASHBOARD_PORT": str(dashboard),
        "PIXELLM_RAY_CLIENT_PORT": str(client),
        "PIXELLM_RAY_HEAD_AGENT_PORT": str(head_agent),
        "PIXELLM_RAY_WORKER_AGENT_PORT": str(worker_agent),
        "PIXELLM_MLFLOW_PORT": str(mlflow),
        "PIXELLM_HEAD_CPUS": "1",
        "PIXELLM_WORKER_CPUS": "2",
    }
    try:
        up = _run(["bash", str(SCRIPT), "up"], env, timeout=240)
        assert up.returncode == 0, f"local.sh up failed:\n{up.stderr}\n{up.stdout}"
        yield {**env, "PIXELLM_ENV_FILE": up.stdout.strip().splitlines()[-1]}
    finally:
        down = _run(["bash", str(SCRIPT), "down"], env, timeout=120)
        shutil.rmtree(cluster_dir, ignore_errors=True)
        assert down.returncode == 0, down.stderr


@pytest.fixture(scope="module")
def submit_env(local_cluster) -> dict[str, str]:
    """The variables `source runs/local-cluster/env.sh` would export."""
    env = dict(local_cluster)
    for line in Path(local_cluster["PIXELLM_ENV_FILE"]).read_text().splitlines():
        if line.startswith("export ") and "PATH=" not in line.split("=")[0]:
            key, value = line[len("export ") :].split("=", 1)
            env[key] = value
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env['PATH']}"
    return env


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Shards of a small generated corpus, built in-process (absolute: jobs run in a copied dir)."""
    from pixellm.data.corpus import generate_corpus
    from pixellm.data.shards import build_shards

    root = tmp_path_factory.mktemp("cluster-data").resolve()
    generate_corpus(root / "corpus", seed=0, images=24, image_size=64)
    for fmt, name in SHARD_SETS.items():
        build_shards(fmt, root / "corpus" / fmt, str(root / "shards" / name), engine="local")
    return root / "shards"


def _submit(env: dict[str, str], job_id: str, entrypoint: list[str], timeout: float) -> str:
    """`ray job submit` (blocking), then assert SUCCEEDED and return the job's logs."""
    submit = _run(
        [
            "ray",
            "job",
            "submit",
            "--submission-id",
            job_id,
            "--working-dir",
            ".",
            "--runtime-env",
            RUNTIME_ENV,
            "--",
            *entrypoint,
        ],
        env,
        timeout=timeout,
    )
    logs = _run(["ray", "job", "logs", job_id], env, timeout=60)
    assert logs.returncode == 0, logs.stdout + logs.stderr
    job_status = _run(["ray", "job", "status", job_id], env, timeout=60)
    assert submit.returncode == 0, submit.stdout + submit.stderr + logs.stdout[-4000:]
    assert re.search(r"SUCCEEDED|Job '[^']+' succeeded", job_status.stdout + job_status.stderr), (
        job_status.stdout + job_status.stderr + logs.stdout[-4000:]
    )
    return logs.stdout


@pytest.mark.timeout(300)
def test_local_cluster_runs_a_submitted_job_without_shadowing_the_stdlib(local_cluster, submit_env):
    env = submit_env
    assert env["RAY_ADDRESS"].startswith("http://127.0.0.1:")
    assert env["MLFLOW_TRACKING_URI"].startswith("http://127.0.0.1:")

    # `up` returns once the worker process is started; the node registers with the head a few
    # seconds later on a loaded machine, so poll `status` (bounded) until it shows the worker.
    deadline = time.monotonic() + 90
    while True:
        status = _run(["bash", str(SCRIPT), "status"], local_cluster, timeout=60)
        assert status.returncode == 0, status.stdout + status.stderr
        if "local_worker" in status.stdout or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert "ray:          up" in status.stdout and "mlflow:       up" in status.stdout
    assert "local_worker" in status.stdout  # the worker node joined

    logs = _submit(env, f"pixellm-test-{os.getpid()}", ["python", "-c", JOB], timeout=180)
    (line,) = [ln for ln in logs.splitlines() if ln.startswith("PIXELLM-JOB ")]
    report = json.loads(line[len("PIXELLM-JOB ") :])

    # `platform` came from the standard library, not from the repository's platform/ directory.
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    assert Path(report["platform"]).resolve().parent == stdlib, report["platform"]
    # The job ran in the project venv (the cluster was started from it).
    assert Path(report["executable"]).parent.resolve() == VENV_BIN.resolve()
    # The working dir is on sys.path, and none of its top-level entries is a stdlib module.
    working_dirs = [
        Path(p) for p in report["sys_path"] if p and (Path(p) / "cluster" / "local.sh").exists()
    ]
    assert working_dirs, f"working dir not on sys.path: {report['sys_path']}"
    for wd in working_dirs:
        importable = {
            p.name.removesuffix(".py")
            for p in wd.iterdir()
            if p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists())
        }
        assert importable & set(sys.stdlib_module_names) == set(), importable


@pytest.fixture(scope="module")
def trained(submit_env, shards, tmp_path_factory) -> dict[str, object]:
    """The tiny training job for two steps, logging to the cluster's MLflow; its logs and paths."""
    storage = tmp_path_factory.mktemp("ray-results").resolve()
    run_name = f"pixellm-cluster-{os.getpid()}-{int(time.time())}"
    overrides = [
        "train.steps_per_epoch=2",
        "train.warmup_steps=1",
        "train.checkpoint_every=1",
        f"data.shards_root={shards}",
        f"train.storage_path={storage}",
        f"train.run_name={run_name}",
        f"mlflow.experiment={run_name}",
        f"mlflow.registered_model_name={run_name}",
    ]
    entrypoint = ["python", "jobs/train.py", "--recipe", "platform/recipes/tiny.yaml"]
    for item in overrides:
        entrypoint += ["--set", item]
    logs = _submit(submit_env, f"{run_name}-train", entrypoint, timeout=600)
    return {"logs": logs, "run_name": run_name, "export_dir": storage / run_name / "model"}


@pytest.mark.timeout(600)
def test_local_cluster_runs_the_tiny_training_job(trained, submit_env):
    logs = trained["logs"]
    assert re.search(r"\[pixellm\.train\] starting step 0/2", logs), logs[-4000:]
    for step in (1, 2):
        assert re.search(rf"\[pixellm\.train\] step {step}/2 .*samples/s=", logs), logs[-4000:]
    assert f"model exported to {trained['export_dir']}" in logs, logs[-4000:]
    assert any(trained["export_dir"].iterdir()), trained["export_dir"]

    # Logged to the cluster's MLflow server (inherited MLFLOW_TRACKING_URI), model registered.
    from mlflow import MlflowClient

    client = MlflowClient(submit_env["MLFLOW_TRACKING_URI"])
    versions = client.search_model_versions(f"name='{trained['run_name']}'")
    assert versions, f"no registered model {trained['run_name']}"
    run = client.get_run(versions[0].run_id)
    assert run.data.metrics, run


@pytest.mark.timeout(600)
def test_local_cluster_runs_a_scoring_job(trained, submit_env, shards, tmp_path):
    out = tmp_path.resolve() / "score"
    logs = _submit(
        submit_env,
        f"{trained['run_name']}-score",
        [
            "python",
            "jobs/score.py",
            "--address",
            "auto",
            "--model",
            str(trained["export_dir"]),
            "--recipe",
            "platform/recipes/tiny.yaml",
            "--set",
            f"mlflow.experiment={trained['run_name']}",
            "--benchmark",
            str(shards / "muse"),
            "--split",
            "val",
            "--out",
            str(out),
            "--max-new-tokens",
            "8",
            "--overlays",
            "1",
            "--num-cpus",
            "1",
        ],
        timeout=600,
    )
    report = json.loads((out / "report.json").read_text())
    assert "val" in report["splits"], report
    assert report["extra"]["scoring"]["errors"] == 0
    assert report["extra"]["scoring"]["scored_now"] > 0, report
    assert '"n_errors": 0' in logs, logs[-4000:]
