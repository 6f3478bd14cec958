"""A multi-node Ray cluster on this one machine, for the cluster test and the driver benchmark.

Each node is a `ray start` of this venv's `ray` with its own short temp dir (unix socket paths must stay under 108
bytes) and explicit ports (its node manager, object manager, agents and a worker-port range), so that several nodes,
and other users' Ray, share the host without clashing. ``stop_cluster`` stops exactly one node's processes: those
whose command line names its temp dir, and their descendants. Plain `ray stop` would kill every Ray process on the
machine.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")
_TAKEN: set[int] = set()  # ports handed out here: never twice, and never inside a worker-port range


def free_port() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _TAKEN:
            _TAKEN.add(port)
            return port


def free_port_range(n: int) -> int:
    """The first of n consecutive ports that are all free now: a node's worker-port range. It lies below the kernel's
    ephemeral range (where `free_port` and every outgoing connection get their ports), so nothing else on the host
    is handed a port inside it while the cluster runs."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(200):
        base = random.randrange(10000, low - n)
        if _TAKEN & set(range(base, base + n)):
            continue
        socks = []
        try:
            for port in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            _TAKEN.update(range(base, base + n))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports")


def node_ports() -> list[str]:
    """Explicit ports for one node's processes."""
    workers = free_port_range(100)
    return [
        "--node-manager-port", str(free_port()),
        "--object-manager-port", str(free_port()),
        "--min-worker-port", str(workers),
        "--max-worker-port", str(workers + 99),
        "--dashboard-agent-listen-port", str(free_port()),
        "--dashboard-agent-grpc-port", str(free_port()),
        "--runtime-env-agent-port", str(free_port()),
        "--metrics-export-port", str(free_port()),
    ]  # fmt: skip


def cluster_env() -> dict:
    """The environment a user has after `source .venv/bin/activate`, without any Ray address of another cluster."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(VENV_BIN.parent)
    return env


def new_temp_dir(prefix: str = "ltsray-") -> str:
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


def start_worker_node(gcs_address: str, cpus: int, temp_dir: str, env: dict, extra: list[str] = ()) -> None:
    """`ray start --address` one more node on this host; raises with its output if it fails."""
    cmd = [RAY, "start", "--address", gcs_address, "--num-cpus", str(cpus), "--temp-dir", temp_dir, *node_ports(),
           *extra, "--disable-usage-stats"]  # fmt: skip
    out = subprocess.run(cmd, env=env, timeout=300, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")


def stop_cluster(temp_dir: str) -> None:
    """SIGTERM (then SIGKILL) the processes of one node only: those naming temp_dir, and their descendants."""
    import psutil
    import ray  # noqa: F401  (puts Ray's bundled psutil, the one `ray stop` uses, on sys.path)

    me = os.getpid()
    procs = {}
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.pid != me and any(temp_dir in arg for arg in (p.info["cmdline"] or [])):
                procs[p.pid] = p
                for child in p.children(recursive=True):
                    procs[child.pid] = child
        except psutil.Error:
            continue
    for p in procs.values():
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(list(procs.values()), timeout=5)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=10)
