"""Fault-injection scenarios for ltsweep: real tiny sweeps (and `ltsweep train` runs) that are killed, interrupted,
corrupted or raced, then recovered, and checked.

Used by `benchmarks/bench_faults.py` (every scenario `--runs N` times, counted) and by `tests/test_faults.py`
(some scenarios once, asserted), both with benchmarks/ on sys.path (`import faults as fs`). Each scenario function
builds a fresh store (its own `run.storage_path`, with the shared stage-1 cache copied in unless the scenario is about
stage 1), injects its fault, recovers, and returns an :class:`Outcome`: the five counts of the benchmark (see
faults.common) and every failed check in words (``problems``).

Modules:
  common          constants, Outcome, the workspace (data, configs, stage-1 cache), bounded waiting, the checks
  processes       our own Ray instances: LocalRay (in-process session) and Driver (a sweep subprocess), leak checks
  stand_ins       the stand-in trainables and callbacks shipped to Ray workers
  sweep_faults    in-process scenarios: worker_kill, diverged_resume, sigint_resume, corrupt_stage1
  process_faults  subprocess scenarios: driver_kill, two_drivers, rotation_kill

Processes: a sweep driver run as a subprocess (`python -m pipelines sweep`) starts its own local Ray in its own
temp dir (RAY_TMPDIR) and session, with a tag in its environment; after it ends (or is killed) every process that
names that temp dir or carries the tag is found and, if still alive after a bounded wait, killed and reported as
leaked. Nothing else on the machine is touched. In-process sweeps share one Ray session (:class:`LocalRay`), also in
a temp dir of its own.

No sleeps synchronise anything: every wait is a bounded poll on a file or a process (:func:`wait_for`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import ray
import ray.cloudpickle

# Ray workers cannot import this package by name (benchmarks/ is not on their path): ship the functions and classes
# of all its modules (faults.*) by value. Registered before the submodules are imported.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

from .common import (  # noqa: E402  (after register_pickle_by_value, which must see the package first)
    DIVERGING_LAM,
    DRIVER_TIMEOUT_S,
    KILL_WAIT_S,
    PYTHON,
    REPO,
    SAMPLES_PER_EPOCH,
    TAG_ENV,
    TINY,
    Outcome,
    Workspace,
    check_checkpoints,
    check_mlflow,
    check_sweep,
    config_dict,
    load_problem,
    mlflow_runs,
    prepare,
    reported_epochs,
    results,
    seed_stage1,
    tune_trials,
    wait_for,
    write_config,
)
from .process_faults import KILL_POINTS, driver_kill, rotation_kill, two_drivers  # noqa: E402
from .processes import Driver, LocalRay, own_processes, stop_own_processes  # noqa: E402
from .stand_ins import InterruptAfterFirstTrial, WorkerKiller, diverging_trial, killable_trial  # noqa: E402
from .sweep_faults import CORRUPTIONS, corrupt_stage1, diverged_resume, sigint_resume, worker_kill  # noqa: E402

# name -> (function, needs the in-process Ray session, needs the LocalRay object)
SCENARIOS: dict[str, tuple[Callable[..., Outcome], bool, bool]] = {
    "worker_kill": (worker_kill, True, False),
    "driver_kill": (driver_kill, False, False),
    "sigint_resume": (sigint_resume, True, False),
    "diverged_resume": (diverged_resume, True, True),
    "two_drivers": (two_drivers, False, False),
    "corrupt_stage1": (corrupt_stage1, True, False),
    "rotation_kill": (rotation_kill, False, False),
}

__all__ = [
    "CORRUPTIONS",
    "DIVERGING_LAM",
    "DRIVER_TIMEOUT_S",
    "KILL_POINTS",
    "KILL_WAIT_S",
    "PYTHON",
    "REPO",
    "SAMPLES_PER_EPOCH",
    "SCENARIOS",
    "TAG_ENV",
    "TINY",
    "Driver",
    "InterruptAfterFirstTrial",
    "LocalRay",
    "Outcome",
    "WorkerKiller",
    "Workspace",
    "check_checkpoints",
    "check_mlflow",
    "check_sweep",
    "config_dict",
    "corrupt_stage1",
    "diverged_resume",
    "diverging_trial",
    "driver_kill",
    "killable_trial",
    "load_problem",
    "mlflow_runs",
    "own_processes",
    "prepare",
    "reported_epochs",
    "results",
    "rotation_kill",
    "seed_stage1",
    "sigint_resume",
    "stop_own_processes",
    "tune_trials",
    "two_drivers",
    "wait_for",
    "worker_kill",
    "write_config",
]
