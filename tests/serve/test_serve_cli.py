"""``pixellm serve`` as a user runs it (a subprocess): auth from $PIXELLM_SERVE_TOKEN, an empty token
refused before anything starts, and SIGTERM stopping everything the command started (Ray's
GCS, raylet, dashboard / runtime-env / log agents, Serve), exactly like Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests

from tests.serve.serve_helpers import ROOT, export_tiny_model

pytestmark = pytest.mark.integration

PIXELLM = str(Path(sys.executable).with_name("pixellm"))


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PIXELLM_SERVE_TOKEN"}
    env.update({"PYTHONPATH": str(ROOT), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", **extra})
    return env


def test_empty_token_is_a_config_error_before_anything_starts(tmp_path):
    proc = subprocess.run(
        [PIXELLM, "serve", "--model", str(tmp_path), "--recipe", "platform/recipes/tiny.yaml"],
        cwd=ROOT,
        env=_env(PIXELLM_SERVE_TOKEN=""),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "PIXELLM_SERVE_TOKEN is set but empty" in proc.stderr + proc.stdout


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"pixellm serve exited early with {proc.returncode}")
        try:
            if requests.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise AssertionError("pixellm serve did not become healthy")


def test_sigterm_stops_everything_serve_started(tmp_path):
    from pixellm.tracking import free_port

    model = export_tiny_model(tmp_path / "model")
    port = free_port()
    token = "cli-token"
    proc = subprocess.Popen(
        [
            PIXELLM,
            "serve",
            "--model",
            str(model),
            "--recipe",
            "platform/recipes/tiny.yaml",
            "--port",
            str(port),
            "--num-cpus",
            "0.5",
        ],
        cwd=ROOT,
        env=_env(PIXELLM_SERVE_TOKEN=token),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc)
        assert requests.get(f"{url}/v1/model", timeout=10).status_code == 401
        auth = {"Authorization": f"Bearer {token}"}
        info = requests.get(f"{url}/v1/model", headers=auth, timeout=10).json()
        assert info["limits"]["auth"] is True
        started = psutil.Process(proc.pid).children(recursive=True)
        names = {p.name() for p in started if p.is_running()}
        assert any("raylet" in n for n in names), names  # Ray really runs under the command
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out[-3000:]
        assert "stopping" in out and "stopped" in out
        _, alive = psutil.wait_procs(started, timeout=60)
        assert not alive, [(p.pid, p.name()) for p in alive]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
