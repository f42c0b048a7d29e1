"""`serve run platform/serve/pixellm.yaml` as a user types it (Serve's own CLI, a subprocess).

The shipped YAML is run unchanged except for its HTTP port (a free one, so the test never collides
with another server on 8000). The working directory is laid out as after `make quickstart`: the
YAML's relative ``PIXELLM_MODEL`` (``runs/quickstart/model``) holds a tiny export and its relative
``PIXELLM_RECIPE`` (``platform/recipes/tiny.yaml``) is the repository's. The app answers
``/healthz`` and a real ``/v1/segment`` request, then Ctrl-C (SIGINT) stops everything it started.
"""

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
import yaml

from tests.serve.serve_helpers import ROOT, b64, export_tiny_model, png_bytes

pytestmark = pytest.mark.integration

SERVE = str(Path(sys.executable).with_name("serve"))
CONFIG = ROOT / "platform" / "serve" / "pixellm.yaml"


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 420) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(
                f"serve run exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            )
        try:
            if requests.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise AssertionError(f"serve run did not become healthy:\n{log.read_text()[-3000:]}")


def test_serve_run_of_the_shipped_config_answers(tmp_path):
    from pixellm.tracking import free_port

    raw = yaml.safe_load(CONFIG.read_text())
    port = free_port()
    raw["http_options"]["port"] = port  # the only change to the shipped file
    config = tmp_path / "pixellm.yaml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    env_vars = raw["applications"][0]["runtime_env"]["env_vars"]
    workdir = tmp_path / "work"
    export_tiny_model(workdir / env_vars["PIXELLM_MODEL"])
    (workdir / "platform").symlink_to(ROOT / "platform")
    assert (workdir / env_vars["PIXELLM_RECIPE"]).is_file()

    env = {k: v for k, v in os.environ.items() if k not in {"RAY_ADDRESS", "PIXELLM_SERVE_TOKEN"}}
    # unbuffered: the log keeps serve run's own shutdown lines even if it has to be killed
    env.update(
        {"PYTHONPATH": str(ROOT), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONUNBUFFERED": "1"}
    )
    log = tmp_path / "serve_run.log"
    # Started as from a terminal: a shell's background job (`nohup make test &`) runs with SIGINT
    # ignored, a child inherits that, and serve run would then ignore the Ctrl-C sent below.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with log.open("w") as out:
            proc = subprocess.Popen(
                [SERVE, "run", str(config)],
                cwd=workdir,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
    finally:
        signal.signal(signal.SIGINT, previous)
    url = f"http://127.0.0.1:{port}"
    started: list[psutil.Process] = []
    try:
        _wait_healthy(url, proc, log)
        started = psutil.Process(proc.pid).children(recursive=True)
        assert any("raylet" in p.name() for p in started), started  # serve run started its Ray
        info = requests.get(f"{url}/v1/model", timeout=10).json()
        assert info["model"] == "model" and "/" not in info["model"]  # no filesystem path
        assert info["limits"]["max_new_tokens"] == 152  # the YAML's user_config reached the replica
        body = {"image": b64(png_bytes(48, 64)), "question": "Please segment the circle."}
        answer = requests.post(f"{url}/v1/segment", json={**body, "max_new_tokens": 8}, timeout=300)
        assert answer.status_code == 200, answer.text
        assert set(answer.json()) >= {"text", "targets"}
        bad = requests.post(f"{url}/v1/segment", json={**body, "question": "<image> x"}, timeout=60)
        assert bad.status_code == 422 and bad.headers["content-type"].startswith("application/json")
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C: serve run shuts Serve and its Ray down
        try:
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
    _, alive = psutil.wait_procs([p for p in started if p.is_running()], timeout=60)
    for p in alive:  # never leave a cluster behind, even when the test fails below
        p.kill()
    assert not alive, [(p.pid, p.name()) for p in alive]
