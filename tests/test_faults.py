"""Fault injection with real tiny sweeps: what is safe to kill (README, "Reliability").

Each test runs one scenario of the `benchmarks/faults` package (shared with `benchmarks/bench_faults.py`, which
runs every scenario several times and counts) on the e2e tests' TINY synthetic benchmark (64 px, ~50 images), 2-3 trials
of 2-3 stage-2 epochs, and asserts on what the scenario found. A scenario returns every failed check in words
(`problems`) together with the benchmark's five counts (lost trials, duplicate MLflow runs, orphan MLflow runs,
wrong exit codes, unloadable checkpoints), so each test asserts both and then the facts that make its case.

Covered here:
  - kill -9 of a trial worker half-way through an epoch -> Tune retries it from its last checkpoint;
  - kill -9 of the sweep driver's process group (its own local Ray) -> `--resume` in a new process;
  - a diverged trial, resumed with --resume-errored in a new Ray session -> fails at once (marker in storage);
  - kill -9 of `ltsweep train` half-way through deleting a rotated-out checkpoint -> a rerun cleans up.
Covered elsewhere (not repeated): Ctrl+C + --resume, retry after an exception, divergence within one session
(tests/test_sweep_e2e.py); two drivers on a new MLflow store (tests/test_store_race.py) and on one stage-1 key
(tests/test_pretrain.py::test_two_drivers_train_it_once); a corrupt stage-1 cache
(tests/test_pretrain.py::test_a_corrupt_stage1_cache_is_not_trusted); kills during checkpoint writing and rotation,
simulated (tests/test_atomic.py, tests/test_engine.py). The benchmark runs all of them with real processes.

Every wait is a bounded poll on files or processes; the subprocess drivers run their own local Ray in temp dirs of
their own, and every process of theirs is accounted for (and killed if it outlives its driver).
"""

import pytest
import ray

import faults as fs

pytestmark = pytest.mark.slow

NO_COUNTS = dict.fromkeys(fs.Outcome.COUNTS, 0)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """The TINY benchmark and a trained stage-1 cache that each scenario copies into its fresh store."""
    return fs.prepare(tmp_path_factory.mktemp("faults"))


@pytest.fixture(scope="module")
def local_ray():
    """The in-process Ray session of the in-process sweeps, in a temp dir of its own."""
    if ray.is_initialized():  # another module's session
        ray.shutdown()
    session = fs.LocalRay(num_cpus=2)
    session.start()
    yield session
    assert session.stop() == [], "Ray processes outlived ray.shutdown()"


def test_worker_kill9_mid_epoch_is_retried_from_its_last_checkpoint(ws, local_ray):
    """A trial's worker process is SIGKILLed half-way through epoch 2 of 3 (after one optimizer step of it, from a
    watcher thread in the driver): Tune runs the trial again in a new process from its epoch-1 checkpoint, so
    epochs 1, 2, 3 are each reported once; the sweep exits 0 with one FINISHED MLflow run per trial."""
    o = fs.worker_kill(ws, epochs=3)
    assert o.problems == []
    assert o.counts() == NO_COUNTS
    assert o.details["exit_codes"] == {"sweep": 0}
    victim = o.details["victim"]
    assert victim["attempt_pids"][0] == victim["pid"] and len(set(victim["attempt_pids"])) == 2
    trials = o.details["trials"]
    assert len(trials) == 2 and trials[victim["trial"]]["num_failures"] == 1
    assert {tid: t["epochs"] for tid, t in trials.items()} == {tid: [1, 2, 3] for tid in trials}
    assert {t["status"] for t in trials.values()} == {"TERMINATED"}
    assert o.details["mlflow_runs"]["worker-kill"] == {"sweep": 1, "pretrain": 1, "trial": 2}
    assert o.details["checkpoints_loaded"] >= 2


def test_diverged_trial_fails_at_once_when_resumed_in_a_new_ray_session(ws, local_ray):
    """The divergence marker lives in the trial's storage directory: after the first run (exit 1; the retry stopped
    at the marker, one engine call) the sweep is resumed with --resume-errored in a fresh Ray session, and the
    trial fails at once with TrialDivergedError - the engine is not called again - while the finished trial is left
    as it was."""
    o = fs.diverged_resume(ws, local_ray)
    assert o.problems == []
    assert o.counts() == NO_COUNTS
    assert o.details["marker_in_storage"]
    assert o.details["engine_calls_first"] == 1 and o.details["engine_calls_after_resume"] == 1
    assert o.details["exit_codes"] == {"first run": 1, "resume --resume-errored": 1}
    by_lam = {t["lam"]: t for t in o.details["trials"].values()}
    assert by_lam[fs.DIVERGING_LAM]["status"] == "ERROR" and by_lam[fs.DIVERGING_LAM]["epochs"] == []
    assert by_lam[0.0]["status"] == "TERMINATED" and by_lam[0.0]["epochs"] == [1, 2]


def test_driver_kill9_then_resume_in_a_new_process(ws):
    """`python -m pipelines sweep` (its own local Ray, own session) is SIGKILLed with its process group once one
    trial finished and another is mid-training; none of its processes survives; `--resume` in a new process exits
    0, keeps the finished trials' result.json byte for byte, reuses stage 1, and leaves one FINISHED MLflow run per
    trial (3), none RUNNING."""
    o = fs.driver_kill(ws)
    assert o.problems == []
    assert o.counts() == NO_COUNTS
    assert o.details["exit_codes"] == {"killed driver": -9, "resume": 0}
    assert o.details["leaked_processes"] == []
    assert o.details["killed_with"]["finished"] and o.details["killed_with"]["mid_training"]
    trials = o.details["trials"]
    assert len(trials) == 3 and {t["status"] for t in trials.values()} == {"TERMINATED"}
    assert all(t["epochs"] == [1, 2] for t in trials.values())
    assert o.details["mlflow_runs"]["driver-kill"] == {"sweep": 1, "pretrain": 1, "trial": 3}


def test_ltsweep_train_killed_while_deleting_a_rotated_checkpoint(ws):
    """`ltsweep train` SIGKILLs itself half-way through deleting the checkpoint that rotation renamed away: only
    complete, loadable checkpoints are left under their names; a rerun into the same --out exits 0 and removes the
    leftover."""
    o = fs.rotation_kill(ws, point="mid-delete")
    assert o.problems == []
    assert o.counts() == NO_COUNTS
    assert o.details["exit_codes"] == {"killed run": -9, "rerun": 0}
    assert o.details["after_kill"]["visible"] == ["checkpoint_epoch0002"]
    assert [name.endswith(".del") for name in o.details["after_kill"]["hidden"]] == [True]
    assert o.details["after_rerun"] == {"visible": ["checkpoint_epoch0002"], "hidden": []}


def test_pbt_driver_kill9_then_resume_keeps_its_population(ws):
    """The same kill -9 and `--resume` of a PBT sweep (3 members, perturbed after every evaluation): the resume exits
    0 with the same 3 trials (the population), each TERMINATED with its last reported epoch E (a member that copied
    another goes on from the donor's epoch), one FINISHED MLflow run per trial and none RUNNING."""
    pbt = {"type": "pbt", "perturbation_interval": 1, "quantile_fraction": 0.34}
    o = fs.driver_kill(ws, epochs=3, scheduler=pbt)
    assert o.problems == []
    assert o.counts() == NO_COUNTS
    assert o.details["exit_codes"] == {"killed driver": -9, "resume": 0}
    assert o.details["leaked_processes"] == []
    assert len(o.details["trials"]) == 3 and all(t["epochs"][-1] == 3 for t in o.details["trials"].values())
    assert o.details["mlflow_runs"]["driver-kill"] == {"sweep": 1, "pretrain": 1, "trial": 3}
