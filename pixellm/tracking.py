"""A local MLflow tracking server for the quickstart, tests and serving.

``start_mlflow_server`` runs ``mlflow server`` with a SQLite backend store and a local artifact
directory, bound to 127.0.0.1 on a free port, and waits until ``GET /health`` answers. The returned
``MlflowServer`` is a context manager; ``stop()`` terminates the process it started (and only it).

Example:
    >>> with start_mlflow_server("runs/mlflow") as server:  # doctest: +SKIP
    ...     os.environ["MLFLOW_TRACKING_URI"] = server.uri
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

__all__ = ["MlflowServer", "MlflowServerError", "free_port", "start_mlflow_server"]


class MlflowServerError(RuntimeError):
    """The MLflow server did not come up (the message carries the tail of its log)."""


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on ``host`` right now.

    Args:
        host: Interface to probe (loopback by default).

    Returns:
        A port number the OS reported as unused.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class MlflowServer:
    """A running ``mlflow server`` process started by :func:`start_mlflow_server`.

    Attributes:
        uri: Tracking URI (``http://127.0.0.1:PORT``).
        root: Directory holding ``mlflow.db``, ``artifacts/`` and ``server.log``.
        process: The server process (its own process group, so stop() reaches the gunicorn/uvicorn
            workers it forks).
    """

    uri: str
    root: Path
    process: subprocess.Popen[bytes] = field(repr=False)

    @property
    def log_path(self) -> Path:
        """Path of the server's combined stdout/stderr log."""
        return self.root / "server.log"

    def healthy(self) -> bool:
        """Whether ``GET /health`` answers 200 right now."""
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as resp:  # noqa: S310
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self, timeout_s: float = 15.0) -> None:
        """Terminate the server's process group (SIGTERM, then SIGKILL after ``timeout_s``)."""
        if self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=timeout_s)

    def __enter__(self) -> MlflowServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _log_tail(path: Path, chars: int = 2000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


def start_mlflow_server(
    root: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    timeout_s: float = 90.0,
    workers: int = 1,
) -> MlflowServer:
    """Start ``mlflow server`` (SQLite store + local artifacts) and wait for ``/health``.

    Args:
        root: Directory for ``mlflow.db``, ``artifacts/`` and ``server.log`` (created if missing).
            Reusing a directory keeps earlier experiments, runs and registered models.
        host: Bind address; loopback unless you mean to expose it.
        port: TCP port; ``None`` picks a free one.
        timeout_s: How long to wait for ``/health`` before giving up.
        workers: Server worker processes (1 is plenty for a laptop and keeps memory low).

    Returns:
        The running server; use it as a context manager or call ``stop()``.

    Raises:
        MlflowServerError: the process exited or ``/health`` did not answer within ``timeout_s``.
    """
    root = Path(root).resolve()
    (root / "artifacts").mkdir(parents=True, exist_ok=True)
    port = port or free_port(host)
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow_bin)] if mlflow_bin.exists() else [sys.executable, "-m", "mlflow"]
    cmd += [
        "server",
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination",
        str(root / "artifacts"),
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]
    log = (root / "server.log").open("ab")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    # MLflow 3 starts a pool of background job workers (huey) by default: a dozen Python processes
    # this platform never uses. They cost seconds of start-up and hundreds of MB on a laptop.
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    process = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env
    )
    log.close()
    server = MlflowServer(uri=f"http://{host}:{port}", root=root, process=process)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise MlflowServerError(
                f"mlflow server exited with code {process.returncode} before answering /health "
                f"on {server.uri}; log {server.log_path}:\n{_log_tail(server.log_path)}"
            )
        if server.healthy():
            return server
        time.sleep(0.5)
    server.stop()
    raise MlflowServerError(
        f"mlflow server on {server.uri} did not answer /health within {timeout_s:.0f} s; "
        f"log {server.log_path}:\n{_log_tail(server.log_path)}"
    )
