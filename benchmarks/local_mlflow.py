"""An `mlflow server` on this machine, for the driver benchmark and the tracking tests.

``start_server`` runs ``python -m mlflow server`` (this venv's) on 127.0.0.1 in a process group of its own, with a
backend store (default: a sqlite file under ``root``) and proxied artifacts under ``root``; ``wait_healthy`` waits
for ``GET /health`` (bounded, the server's log in the error); ``stop_process_group`` stops it and its workers.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    root: Path
    log: Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(root: Path, backend_uri: str | None = None, workers: int = 1, env: dict | None = None) -> Server:
    """Start the server (not yet answering: see ``wait_healthy``)."""
    root.mkdir(parents=True, exist_ok=True)
    port, log = free_port(), root / "server.log"
    backend = backend_uri or f"sqlite:///{root / 'server.db'}"
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend,
           "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", str(workers)]  # fmt: skip
    # no background job runner (MLflow 3's GenAI jobs: extra Python processes nothing here uses)
    env = {**os.environ, **(env or {}), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    return Server(proc, f"http://127.0.0.1:{port}", root, log)


def wait_healthy(server: Server, timeout: float = 180.0) -> None:
    """Return once ``GET /health`` answers OK; RuntimeError with the log's tail if the server exits or never does."""
    deadline = time.monotonic() + timeout
    while True:
        if server.proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {server.proc.returncode}:\n{server.log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(server.url + "/health", timeout=2) as r:
                if r.status == 200 and r.read().strip() == b"OK":
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"mlflow server not healthy after {timeout:g} s:\n{server.log.read_text()[-3000:]}")
        time.sleep(0.2)  # polling a server that is starting: there is no event to wait on


def stop_process_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group a server was started in (start_new_session=True), SIGKILL it after 30 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
