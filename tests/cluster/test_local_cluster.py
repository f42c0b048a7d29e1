"""A real loopback cluster from cluster/local.sh: up, status, one `ray job submit`, down.

The job prints where `platform` was imported from and its sys.path, to prove the working dir (the
repository root, first on sys.path in every worker) shadows no standard-library module.
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
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "cluster" / "local.sh"
VENV_BIN = ROOT / ".venv" / "bin"

JOB = (
    "import json, platform, sys; "
    "print('PIXELLM-JOB ' + json.dumps({'platform': platform.__file__, 'sys_path': sys.path, "
    "'executable': sys.executable}))"
)


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


@pytest.fixture
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
        "PIXELLM_WORKER_CPUS": "1",
    }
    try:
        up = _run(["bash", str(SCRIPT), "up"], env, timeout=240)
        assert up.returncode == 0, f"local.sh up failed:\n{up.stderr}\n{up.stdout}"
        yield {**env, "PIXELLM_ENV_FILE": up.stdout.strip().splitlines()[-1]}
    finally:
        down = _run(["bash", str(SCRIPT), "down"], env, timeout=120)
        shutil.rmtree(cluster_dir, ignore_errors=True)
        assert down.returncode == 0, down.stderr


def _submit_env(env_file: str, base: dict[str, str]) -> dict[str, str]:
    """The variables `source runs/local-cluster/env.sh` would export."""
    env = dict(base)
    for line in Path(env_file).read_text().splitlines():
        if line.startswith("export ") and "PATH=" not in line.split("=")[0]:
            key, value = line[len("export ") :].split("=", 1)
            env[key] = value
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env['PATH']}"
    return env


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_local_cluster_runs_a_submitted_job_without_shadowing_the_stdlib(local_cluster):
    env = _submit_env(local_cluster["PIXELLM_ENV_FILE"], local_cluster)
    assert env["RAY_ADDRESS"].startswith("http://127.0.0.1:")
    assert env["MLFLOW_TRACKING_URI"].startswith("http://127.0.0.1:")

    status = _run(["bash", str(SCRIPT), "status"], local_cluster, timeout=60)
    assert status.returncode == 0, status.stdout + status.stderr
    assert "ray:          up" in status.stdout and "mlflow:       up" in status.stdout
    assert "local_worker" in status.stdout  # the worker node joined

    job_id = f"pixellm-test-{os.getpid()}"
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
            "platform/runtime/local.yaml",
            "--",
            "python",
            "-c",
            JOB,
        ],
        env,
        timeout=180,
    )
    assert submit.returncode == 0, submit.stdout + submit.stderr
    job_status = _run(["ray", "job", "status", job_id], env, timeout=60)
    assert re.search(r"SUCCEEDED|Job '[^']+' succeeded", job_status.stdout + job_status.stderr), (
        job_status.stdout
    )
    logs = _run(["ray", "job", "logs", job_id], env, timeout=60)
    assert logs.returncode == 0, logs.stderr
    (line,) = [ln for ln in logs.stdout.splitlines() if ln.startswith("PIXELLM-JOB ")]
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
