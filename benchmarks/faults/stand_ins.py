"""Stand-in trainables and callbacks of the in-process scenarios: the production trainable with a fault hooked in
(a worker that waits to be SIGKILLed, a trial whose loss diverges), the watcher thread that kills the worker, and a
Tune callback that sends SIGINT to the driver.

The trainables run in Ray workers, which cannot import this package by name (benchmarks/ is not on their path):
the package registers itself with cloudpickle so that they are shipped by value (see faults/__init__.py).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

from ray import tune

from .common import DIVERGING_LAM, KILL_WAIT_S, _claim, _write_atomic


class _DieAfterFirstBatch:
    """A data loader that, once its first batch has been trained on, writes this process's pid to `pid_file` and
    then waits for the SIGKILL that the watcher sends (bounded: KILL_WAIT_S, then the trial fails loudly)."""

    def __init__(self, loader, pid_file: Path):
        self.loader, self.pid_file = loader, pid_file

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if i == 1:  # the engine asks for batch 2: batch 1's optimizer step is done, the epoch is half-way
                _write_atomic(self.pid_file, str(os.getpid()))
                deadline = time.monotonic() + KILL_WAIT_S
                while time.monotonic() < deadline:  # ends by SIGKILL; nothing here can end it otherwise
                    time.sleep(0.05)
                raise RuntimeError(f"nobody killed worker {os.getpid()} within {KILL_WAIT_S} s")
            yield batch


def killable_trial(config, experiment, stage1=None, shared=None):
    """The production trainable (pipelines.tune.trainable.train_trial). The first trial to start its second epoch, on
    its first attempt only, becomes the victim: half-way through that epoch it writes its pid to
    <storage>/faults/pid-<trial_id>.txt and waits to be SIGKILLed by :class:`WorkerKiller`. Every attempt appends its
    pid to attempts-<trial_id>.txt."""
    from lt_models.engine import loop as engine
    from pipelines.tune import trainable

    faults = Path(experiment.run.storage_path) / "faults"
    trial_id = tune.get_context().get_trial_id()
    with open(faults / f"attempts-{trial_id}.txt", "a") as f:
        f.write(f"{os.getpid()}\n")
    real = engine.train_one_epoch

    def hooked(model, optimizer, data_loader, device, epoch, **kw):
        if epoch == 1 and _claim(faults / "victim.claim"):  # epoch is 0-based: the second epoch
            data_loader = _DieAfterFirstBatch(data_loader, faults / f"pid-{trial_id}.txt")
        return real(model, optimizer, data_loader, device, epoch, **kw)

    engine.train_one_epoch = hooked
    try:
        trainable.train_trial(config, experiment, stage1, shared)
    finally:
        engine.train_one_epoch = real


def diverging_trial(config, experiment, stage1=None, shared=None):
    """The production trainable; for λ = DIVERGING_LAM the engine reports a non-finite loss at once. Every call of
    the engine for any trial is counted in <storage>/faults/engine-calls-<trial_id>.txt."""
    from lt_models.engine import loop as engine
    from pipelines.tune import trainable

    faults = Path(experiment.run.storage_path) / "faults"
    trial_id = tune.get_context().get_trial_id()
    real = engine.train

    def counted(spec, out_dir, **kw):
        with open(faults / f"engine-calls-{trial_id}.txt", "a") as f:
            f.write("call\n")
        if float(config["lam"]) == DIVERGING_LAM:
            raise engine.NonFiniteLossError(3, 0, {"loss_classifier": float("nan")}, 0.01)
        return real(spec, out_dir, **kw)

    engine.train = counted
    try:
        trainable.train_trial(config, experiment, stage1, shared)
    finally:
        engine.train = real


class WorkerKiller(threading.Thread):
    """In the driver: watches <faults>/pid-*.txt and SIGKILLs each Ray worker named there, once, writing
    killed-<trial_id>.txt. Only processes whose command line is a Ray worker's (`ray::...`) are killed."""

    def __init__(self, faults: Path):
        super().__init__(daemon=True)
        self.faults = faults
        self.done = threading.Event()
        self.killed: dict[str, int | None] = {}

    def run(self) -> None:
        import psutil

        while not self.done.is_set():
            for f in sorted(self.faults.glob("pid-*.txt")):
                trial_id = f.stem[len("pid-") :]
                if trial_id in self.killed:
                    continue
                pid = int(f.read_text())
                try:
                    ok = psutil.Process(pid).cmdline()[0].startswith("ray::")
                except (psutil.Error, IndexError):
                    ok = False
                if ok:
                    os.kill(pid, signal.SIGKILL)
                self.killed[trial_id] = pid if ok else None
                _write_atomic(self.faults / f"killed-{trial_id}.txt", str(pid if ok else "not a Ray worker"))
            self.done.wait(0.02)

    def stop(self) -> None:
        self.done.set()
        self.join(10)


class InterruptAfterFirstTrial(tune.Callback):
    """Sends SIGINT to the driver (as Ctrl+C would) at the first report after the first trial has completed. The
    signal lands in the widest window a real Ctrl+C can hit: the reporting trial's result is in, its checkpoint not
    yet registered (Tune registers it when the trial's ``save`` comes back), so ``--resume`` restores that trial
    one report back, and the interrupted sweep always holds a trial short of its schedule. Once per flag file:
    ``flag`` holds the completed trial's id, and ``flag`` + ".sent" marks the signal sent (Tune pickles its callbacks
    with the sweep, so a resumed sweep runs this callback again and must find both)."""

    def __init__(self, flag: Path):
        self.flag = flag
        self.sent = flag.with_name(flag.name + ".sent")

    def on_trial_complete(self, iteration, trials, trial, **info):
        if not self.flag.exists():
            self.flag.write_text(trial.trial_id)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.flag.exists() and not self.sent.exists():
            self.sent.write_text("")
            os.kill(os.getpid(), signal.SIGINT)
