"""Processes of our own Ray instances: :class:`LocalRay` (the in-process Ray session of the in-process sweeps) and
:class:`Driver` (one `python -m pipelines sweep` subprocess with its own local Ray, session and process group).

A subprocess driver starts its own local Ray in its own temp dir (RAY_TMPDIR) and session, with a tag in its
environment; after it ends (or is killed) every process that names that temp dir or carries the tag is found and, if
still alive after a bounded wait, killed and reported as leaked. Nothing else on the machine is touched.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import uuid
from pathlib import Path

import ray

from .common import DRIVER_TIMEOUT_S, PYTHON, REPO, TAG_ENV, wait_for


def own_processes(temp_dir: str, tag: str | None = None) -> list:
    """Live processes of one Ray instance of ours: those whose command line names `temp_dir` or whose environment
    carries `tag`, and their descendants (a Ray worker's command line is only `ray::...`)."""
    import psutil

    me = os.getpid()
    found = {}
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            hit = any(temp_dir in arg for arg in (p.info["cmdline"] or []))
            if not hit and tag is not None:
                hit = p.environ().get(TAG_ENV) == tag
            if hit and p.pid != me:
                found[p.pid] = p
                for c in p.children(recursive=True):
                    found[c.pid] = c
        except psutil.Error:
            continue
    return [p for p in found.values() if p.pid != me and p.is_running()]


def stop_own_processes(temp_dir: str, tag: str | None = None, grace: float = 30.0) -> list[str]:
    """Wait (bounded) for the processes of one of our Ray instances to exit by themselves, then SIGKILL whatever is
    left. Returns the leftovers that had to be killed ("pid cmdline"): leaked processes."""
    import psutil

    try:
        wait_for(lambda: not own_processes(temp_dir, tag), grace, "Ray processes to exit", poll=0.5)
        return []
    except TimeoutError:
        pass
    left = own_processes(temp_dir, tag)
    leaked = []
    for p in left:
        try:
            leaked.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(left, timeout=10)
    return leaked


class LocalRay:
    """The in-process Ray session the in-process sweeps use, in a temp dir of its own."""

    def __init__(self, num_cpus: int = 2):
        self.num_cpus = num_cpus
        self.temp_dir: str | None = None

    def start(self) -> None:
        self.temp_dir = tempfile.mkdtemp(prefix="ltsf-", dir="/tmp")  # short: Ray's socket paths must stay < 108
        ray.init(
            address="local",
            num_cpus=self.num_cpus,
            include_dashboard=False,
            log_to_driver=False,
            _temp_dir=self.temp_dir,
        )

    def stop(self) -> list[str]:
        ray.shutdown()
        leaked = stop_own_processes(self.temp_dir) if self.temp_dir else []
        if self.temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        self.temp_dir = None
        return leaked

    def restart(self) -> list[str]:
        """A fresh Ray session (what a new `ltsweep sweep --resume` process gets)."""
        leaked = self.stop()
        self.start()
        return leaked


class Driver:
    """One `python -m pipelines sweep ARGS` process: its own local Ray (RAY_TMPDIR, and a tag in its environment),
    its own session and process group, output to `log`."""

    def __init__(self, args: list[str], log: Path):
        self.temp_dir = tempfile.mkdtemp(prefix="ltsf-", dir="/tmp")
        self.tag = uuid.uuid4().hex
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # never join another cluster
        env.update({"RAY_TMPDIR": self.temp_dir, TAG_ENV: self.tag, "PYTHONUNBUFFERED": "1"})
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                [PYTHON, "-m", "pipelines", "sweep", *args],
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"the driver exited early with {self.proc.returncode}; see {self.log}:\n" + self.output()[-3000:]
            )

    def wait(self, timeout: float = DRIVER_TIMEOUT_S) -> int | None:
        """Its exit code, or None if it ran past `timeout` (then it is killed)."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill9()
            return None

    def kill9(self) -> None:
        """SIGKILL its whole process group (the driver and the Ray processes it started)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def cleanup(self) -> list[str]:
        """After it ended: kill and report whatever of its Ray instance is still alive; remove its temp dir."""
        leaked = stop_own_processes(self.temp_dir, self.tag)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return leaked

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""
