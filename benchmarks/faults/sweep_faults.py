"""The in-process sweep scenarios (one Ray session in this process, :class:`faults.processes.LocalRay`): a worker
killed mid-epoch, a diverged trial resumed with --resume-errored, Ctrl+C then --resume, a corrupt stage-1 cache.

Each builds a fresh store, injects its fault, recovers, and returns an :class:`faults.common.Outcome`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .common import (
    DIVERGING_LAM,
    Outcome,
    Workspace,
    _timed,
    check_sweep,
    mlflow_runs,
    results,
    seed_stage1,
    write_config,
)
from .processes import LocalRay
from .stand_ins import InterruptAfterFirstTrial, WorkerKiller, diverging_trial, killable_trial


@_timed
def worker_kill(ws: Workspace, run: int = 0, *, epochs: int = 3) -> Outcome:
    """kill -9 of a trial worker half-way through its second epoch (2 trials, max_failures 1).

    Asserts: exactly one worker was killed, and Tune ran that trial again in another process (2 attempts); the retry
    continued from the epoch-1 checkpoint, so its result.json reports epochs 1..E once each (also training_iteration
    1..E); the sweep exits 0; every trial finished; one MLflow run per trial, FINISHED, with a retry count; every
    kept checkpoint loads."""
    from pipelines.names import RETRIES_TAG, TRIAL_ID_TAG
    from pipelines.tune import sweep

    o = Outcome("worker_kill")
    store = ws.store(f"worker-kill-{run}")
    seed_stage1(ws, store)
    faults = store / "faults"
    faults.mkdir()
    _, cfg = write_config(ws, store, "worker-kill", epochs=epochs)
    killer = WorkerKiller(faults)
    killer.start()
    try:
        summary = sweep.run_sweep(cfg, trainable_fn=killable_trial, verbose=0, progress=False, register=False)
    finally:
        killer.stop()
    o.details["killed"] = dict(killer.killed)
    trials = check_sweep(o, cfg, epochs=epochs, expected_exit=0, exit_code=summary.exit_code())
    if not o.check(
        len(killer.killed) == 1 and None not in killer.killed.values(),
        f"expected one killed worker, got {killer.killed}",
    ):
        return o
    ((victim, pid),) = killer.killed.items()
    attempts = [int(x) for x in (faults / f"attempts-{victim}.txt").read_text().split()]
    o.details["victim"] = {"trial": victim, "pid": pid, "attempt_pids": attempts}
    o.check(
        len(attempts) == 2 and attempts[0] == pid and attempts[1] != pid,
        f"victim {victim}: attempts ran in processes {attempts}; expected the killed {pid}, then another one",
    )
    t = trials.get(victim)
    if o.check(t is not None, f"the victim {victim} is no Tune trial"):
        rs = results(t["path"])
        o.check(
            [r["training_iteration"] for r in rs] == list(range(1, epochs + 1)),
            f"victim {victim}: training_iteration {[r['training_iteration'] for r in rs]}",
        )
        o.check(t["num_failures"] == 1, f"victim {victim}: Tune counted {t['num_failures']} failures, expected 1")
    runs = [r for r in mlflow_runs(summary.tracking_uri, cfg.name) if r.data.tags.get(TRIAL_ID_TAG) == victim]
    o.check(
        len(runs) == 1 and runs[0].data.tags.get(RETRIES_TAG) == "1",
        f"victim {victim}: MLflow runs {[(r.info.status, r.data.tags.get(RETRIES_TAG)) for r in runs]}, expected "
        "one with ltsweep.retries 1",
    )
    return o


@_timed
def diverged_resume(ws: Workspace, local_ray: LocalRay, run: int = 0, *, epochs: int = 2) -> Outcome:
    """A trial diverges (NaN loss at its first step); the sweep is then resumed with --resume-errored in a fresh Ray
    session.

    Asserts: the first run exits 1 with that trial in ERROR (TrialDivergedError) and the other trial finished;
    Tune's retry (max_failures 1) stopped at the divergence marker, which is in the trial's storage directory, so
    the engine ran once; the resume in a new Ray session exits 1 again and the trial fails at once with
    TrialDivergedError, the engine not called again; the finished trial's result.json is unchanged; MLflow: the
    diverged trial's one run is FAILED, the other's FINISHED, none RUNNING."""
    from pipelines.tune import sweep
    from pipelines.tune.trainable import DIVERGED_MARKER

    o = Outcome("diverged_resume")
    store = ws.store(f"diverged-{run}")
    seed_stage1(ws, store)
    faults = store / "faults"
    faults.mkdir()
    _, cfg = write_config(ws, store, "diverged", lams=(0.0, DIVERGING_LAM), epochs=epochs)
    first = sweep.run_sweep(cfg, trainable_fn=diverging_trial, verbose=0, progress=False, register=False)
    o.exit_code("first run", first.exit_code(), 1)
    bad = [t for t in first.trials if float(t.config["lam"]) == DIVERGING_LAM]
    if not o.check(len(bad) == 1 and bad[0].error is not None, f"diverging trial: {bad}"):
        return o
    bad = bad[0]
    o.check(
        bad.error.startswith("TrialDivergedError") and "non-finite training loss" in bad.error,
        f"first run: the diverged trial's error is {bad.error!r}",
    )
    calls_file = faults / f"engine-calls-{bad.trial_id}.txt"
    calls_first = len(calls_file.read_text().split())
    marker = Path(bad.path) / DIVERGED_MARKER
    o.details["engine_calls_first"] = calls_first
    o.details["marker_in_storage"] = marker.is_file()
    o.check(
        calls_first == 1,
        f"first run: the engine ran {calls_first} times for the diverged trial (its retry "
        "should have stopped at the marker)",
    )
    o.check(marker.is_file(), f"no divergence marker at {marker} (the trial's storage directory)")
    good = {t.trial_id: Path(t.path, "result.json").read_bytes() for t in first.trials if t.error is None}

    leaked = local_ray.restart()  # what a new `ltsweep sweep --resume --resume-errored` process gets
    o.check(not leaked, f"Ray processes left after ray.shutdown: {leaked}")
    second = sweep.run_sweep(
        cfg, resume=True, errored="resume", trainable_fn=diverging_trial, verbose=0, progress=False, register=False
    )
    calls_second = len(calls_file.read_text().split())
    o.details["engine_calls_after_resume"] = calls_second
    o.check(
        calls_second == calls_first,
        f"--resume-errored in a new Ray session ran the engine again ({calls_first} -> {calls_second} calls)",
    )
    again = next((t for t in second.trials if t.trial_id == bad.trial_id), None)
    o.check(
        again is not None and again.error is not None and again.error.startswith("TrialDivergedError"),
        f"after --resume-errored the diverged trial reads {again and again.error!r}",
    )
    for tid, before in good.items():
        t = next((t for t in second.trials if t.trial_id == tid), None)
        o.check(
            t is not None and Path(t.path, "result.json").read_bytes() == before,
            f"finished trial {tid}: result.json changed by the resume",
        )
    check_sweep(
        o,
        cfg,
        epochs=epochs,
        diverging=(DIVERGING_LAM,),
        expected_exit=1,
        exit_code=second.exit_code(),
        label="resume --resume-errored",
    )
    return o


@_timed
def sigint_resume(ws: Workspace, run: int = 0, *, epochs: int = 2) -> Outcome:
    """Ctrl+C (SIGINT to the driver) at the first report after the first of 3 trials completes (2 run at a time),
    then --resume.

    Asserts: the interrupted run exits 1 and reports unfinished trials as interrupted; the resume exits 0; the trial
    finished before the interrupt keeps its result.json byte for byte and its MLflow run and end time; every trial
    reports epochs 1..E once; one MLflow run per trial, FINISHED."""
    from mlflow import MlflowClient

    from pipelines.names import TRIAL_ID_TAG
    from pipelines.tune import sweep

    o = Outcome("sigint_resume")
    store = ws.store(f"sigint-{run}")
    seed_stage1(ws, store)
    _, cfg = write_config(ws, store, "sigint", lams=(0.0, 0.5, 1.0), epochs=epochs)
    flag = store / "interrupted.txt"
    first = sweep.run_sweep(cfg, callbacks=[InterruptAfterFirstTrial(flag)], verbose=0, progress=False, register=False)
    o.exit_code("interrupted run", first.exit_code(), 1)
    o.check(
        first.interrupted and first.unfinished >= 1, f"interrupted={first.interrupted}, unfinished={first.unfinished}"
    )
    done = flag.read_text() if flag.exists() else None
    t_done = next((t for t in first.trials if t.trial_id == done), None)
    if not o.check(t_done is not None, "no trial completed before the interrupt"):
        return o
    before = Path(t_done.path, "result.json").read_bytes()
    run_before = [r for r in mlflow_runs(first.tracking_uri, cfg.name) if r.data.tags.get(TRIAL_ID_TAG) == done]
    second = sweep.run_sweep(cfg, resume=True, verbose=0, progress=False, register=False)
    o.check(Path(t_done.path, "result.json").read_bytes() == before, f"finished trial {done}: result.json changed")
    if run_before:
        after = MlflowClient(first.tracking_uri).get_run(run_before[0].info.run_id)
        o.check(
            after.info.end_time == run_before[0].info.end_time and after.info.status == "FINISHED",
            f"finished trial {done}: its MLflow run was touched by the resume",
        )
    check_sweep(o, cfg, epochs=epochs, expected_exit=0, exit_code=second.exit_code(), label="resume")
    return o


CORRUPTIONS = ("truncate", "flip", "empty", "delete")


def _corrupt(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "flip":
        i = len(data) // 2
        path.write_bytes(data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :])
    elif how == "empty":
        path.write_bytes(b"")
    else:
        path.unlink()


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@_timed
def corrupt_stage1(ws: Workspace, run: int = 0, *, epochs: int = 1) -> Outcome:
    """The stage-1 cache's checkpoint.pt is truncated, has a flipped byte, is emptied or deleted (by run), then a
    sweep starts on that store.

    Asserts: the corrupt cache is reported once, in one line (its path, "is corrupt" or "no such file"), and trained
    again under the same key, after which it verifies; the sweep exits 0 and its trial finished from the new stage 1;
    one MLflow stage-1 run; every kept checkpoint loads."""
    from pipelines.tune import stage1 as pretrain
    from pipelines.tune import sweep

    o = Outcome("corrupt_stage1")
    how = CORRUPTIONS[run % len(CORRUPTIONS)]
    o.details["corruption"] = how
    store = ws.store(f"corrupt-{run}")
    sha_dir = seed_stage1(ws, store)
    _corrupt(sha_dir / "checkpoint" / "checkpoint.pt", how)
    o.check(pretrain.verify_stage1(sha_dir) is not None, "verify_stage1 did not notice the corruption")
    _, cfg = write_config(ws, store, "corrupt", lams=(0.5,), epochs=epochs)
    records = _Records()
    logging.getLogger("pipelines.tune.stage1").addHandler(records)
    try:
        summary = sweep.run_sweep(cfg, verbose=0, progress=False, register=False)
    finally:
        logging.getLogger("pipelines.tune.stage1").removeHandler(records)
    s1 = summary.stage1[0]
    o.check(s1.trained and s1.sha256 == sha_dir.name, f"stage 1 trained={s1.trained} sha={s1.sha256[:12]}")
    said = [line for line in records.lines if str(sha_dir) in line]
    # pipelines.tune.stage1 reports a corrupt cache once: the check under the lock passes report=False
    o.details["times_reported"] = len(said)
    o.check(
        len(said) == 1 and "\n" not in said[0] and ("is corrupt" in said[0] or "no such file" in said[0]),
        f"the corrupt cache was reported as {said}",
    )
    o.check(pretrain.verify_stage1(sha_dir) is None, "the retrained stage-1 cache does not verify")
    check_sweep(o, cfg, epochs=epochs, expected_exit=0, exit_code=summary.exit_code())
    return o
