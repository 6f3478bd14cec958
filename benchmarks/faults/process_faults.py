"""The subprocess scenarios: the sweep driver's process group killed with SIGKILL then resumed, two drivers racing
on a fresh store, and `ltsweep train` SIGKILLed during checkpoint rotation/writing then rerun.

Each driver runs as `python -m pipelines sweep` with its own local Ray (:class:`faults.processes.Driver`); every
process of it is accounted for afterwards (and killed, and reported as leaked, if it outlives a bounded wait).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
from pathlib import Path

from .common import (
    DRIVER_TIMEOUT_S,
    PYTHON,
    REPO,
    Outcome,
    Workspace,
    _timed,
    check_sweep,
    load_problem,
    seed_stage1,
    wait_for,
    write_config,
)
from .processes import Driver


def _trial_progress(exp_dir: Path, epochs: int) -> tuple[list[Path], list[Path]]:
    """(finished, mid-training) trial dirs by their result.json on storage: all E epochs reported, or 1..E-1."""
    finished, partial = [], []
    for f in exp_dir.glob("*/result.json"):
        n = len([line for line in f.read_text().splitlines() if line.strip()])
        if n >= epochs:
            finished.append(f.parent)
        elif n >= 1:
            partial.append(f.parent)
    return finished, partial


@_timed
def driver_kill(ws: Workspace, run: int = 0, *, epochs: int = 2, scheduler: dict | None = None) -> Outcome:
    """kill -9 of the sweep driver's whole process group (the driver and its own local Ray) once at least one trial
    finished and another is mid-training (3 trials, 2 at a time), then `--resume` in a new process. ``scheduler``:
    e.g. PBT (a population that changes its λ; see check_sweep).

    Asserts: no process of the killed driver's Ray outlives a bounded wait; the resume exits 0; the finished trials'
    result.json are byte-identical; stage 1 was not trained again (same cache, same meta.json, "reused"); every
    trial reports epochs 1..E once; one MLflow run per trial, FINISHED, none RUNNING; every kept checkpoint loads."""
    from pipelines.tune.tuner import experiment_path

    kind = (scheduler or {}).get("type", "fifo")
    o = Outcome("driver_kill" if kind == "fifo" else f"driver_kill_{kind}")
    store = ws.store(f"driver-kill-{run}" if kind == "fifo" else f"driver-kill-{kind}-{run}")
    sha_dir = seed_stage1(ws, store)
    path, cfg = write_config(ws, store, "driver-kill", lams=(0.0, 0.5, 1.0), epochs=epochs, scheduler=scheduler)
    exp_dir = experiment_path(cfg)
    driver = Driver([str(path), "--no-register"], store / "driver-1.log")
    try:

        def one_finished_one_running():
            finished, partial = _trial_progress(exp_dir, epochs)
            if kind != "fifo":  # a population: mid-sweep, by the checkpoints on storage (Tune rewrites the
                # result.json of a member that copies another, and writes it in bursts)
                counts = [len(list(d.glob("checkpoint_*"))) for d in exp_dir.glob("train_trial_*")]
                mid = any(0 < c < epochs for c in counts) and sum(counts) >= 2
                return (finished, partial) if mid else None
            return (finished, partial) if finished and partial else None

        finished, partial = wait_for(
            one_finished_one_running,
            DRIVER_TIMEOUT_S,
            "a finished and a mid-training trial" if kind == "fifo" else "two reporting trials, one mid-training",
            poll=0.1,
            alive=driver.check_alive,
        )
        driver.kill9()
    finally:
        if driver.proc.poll() is None:
            driver.kill9()
        leaked = driver.cleanup()
    o.details["killed_with"] = {"finished": [p.name for p in finished], "mid_training": [p.name for p in partial]}
    o.details["leaked_processes"] = leaked
    o.check(not leaked, f"processes of the killed driver's Ray still alive: {leaked}")
    o.details["exit_codes"] = {"killed driver": driver.proc.returncode}
    snapshot = {p: (p / "result.json").read_bytes() for p in _trial_progress(exp_dir, epochs)[0]}
    meta_before = (sha_dir / "meta.json").read_bytes()

    resumed = Driver([str(path), "--resume", "--no-register"], store / "driver-2.log")
    try:
        rc = resumed.wait()
    finally:
        leaked2 = resumed.cleanup()
    o.check(not leaked2, f"processes left after the resumed driver exited: {leaked2}")
    out = resumed.output()
    if rc != 0:
        o.details["resume_output_tail"] = out[-2000:]
    for p, before in snapshot.items():
        o.check(
            (p / "result.json").read_bytes() == before, f"finished trial {p.name}: result.json changed by the resume"
        )
    o.check(
        [p.name for p in (store / "pretrain").iterdir() if p.is_dir()] == [sha_dir.name]
        and (sha_dir / "meta.json").read_bytes() == meta_before,
        "the stage-1 cache changed",
    )
    o.check("(reused)" in out and "trained for this sweep" not in out, "the resumed driver trained stage 1 again")
    check_sweep(o, cfg, epochs=epochs, expected_exit=0, exit_code=rc, label="resume")
    return o


@_timed
def two_drivers(ws: Workspace, run: int = 0, *, epochs: int = 1) -> Outcome:
    """Two sweep drivers (each its own process and local Ray) start together on a fresh store: no mlflow.db and no
    stage-1 cache yet; same stage-1 settings, different sweep names, one trial each.

    Asserts: both exit 0; stage 1 was trained once (one cache directory; exactly one driver says it trained it, the
    other that it reused it); each sweep has one MLflow experiment with one sweep run, one stage-1 run and one run
    per trial, none RUNNING; every kept checkpoint loads."""
    o = Outcome("two_drivers")
    store = ws.store(f"two-drivers-{run}")
    cfgs = [write_config(ws, store, f"race-{c}", lams=(0.5,), epochs=epochs) for c in "ab"]
    drivers = [Driver([str(p), "--no-register"], store / f"driver-{c.name}.log") for p, c in cfgs]
    rcs = []
    try:
        for d in drivers:
            rcs.append(d.wait())
    finally:
        leaked = [x for d in drivers for x in d.cleanup()]
    o.check(not leaked, f"processes left after the drivers exited: {leaked}")
    outs = [d.output() for d in drivers]
    trained = sum("trained for this sweep" in out for out in outs)
    reused = sum("(reused)" in out for out in outs)
    o.details["stage1"] = {
        "trained": trained,
        "reused": reused,
        "waited_for_the_other": sum("trained by another driver meanwhile" in out for out in outs),
    }
    o.check(trained == 1 and reused == 1, f"stage 1 trained by {trained} driver(s), reused by {reused}")
    caches = [p.name for p in (store / "pretrain").iterdir() if p.is_dir()] if (store / "pretrain").is_dir() else []
    o.check(len(caches) == 1, f"stage-1 cache directories: {caches}")
    from mlflow import MlflowClient

    from pipelines.tune.tuner import tracking_uri_for

    names = [e.name for e in MlflowClient(tracking_uri_for(cfgs[0][1])).search_experiments()]
    for (_, cfg), rc, d in zip(cfgs, rcs, drivers):
        o.check(names.count(cfg.name) == 1, f"MLflow experiments named {cfg.name}: {names.count(cfg.name)}")
        if rc != 0:
            o.details.setdefault("output_tails", {})[cfg.name] = d.output()[-2000:]
        check_sweep(o, cfg, epochs=epochs, expected_exit=0, exit_code=rc, label=cfg.name)
    return o


KILL_POINTS = ("rename-away", "mid-delete", "mid-write")

# `ltsweep train` with a SIGKILL of itself at one point of checkpoint writing / rotation (argv: point, config, out)
_ROTATION_RUNNER = textwrap.dedent("""
    import os, shutil, signal, sys
    from pathlib import Path

    point, config, out = sys.argv[1:4]

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if point in ("rename-away", "mid-delete"):
        real_rmtree = shutil.rmtree

        def rmtree(path, *a, **k):  # remove_dir renamed the old checkpoint into .<name>.*.del and now deletes it
            p = Path(path)
            if p.name.endswith(".del"):
                if point == "mid-delete":
                    next(f for f in sorted(p.rglob("*")) if f.is_file()).unlink()
                die()
            return real_rmtree(path, *a, **k)

        shutil.rmtree = rmtree
    elif point == "mid-write":
        from lt_models import checkpoint

        real_save = checkpoint.save_checkpoint

        def save(path, *a, epoch, **k):  # checkpoint.pt of epoch 2 is in the temp dir; metrics/spec/run.json not yet
            r = real_save(path, *a, epoch=epoch, **k)
            if epoch == 2:
                die()
            return r

        checkpoint.save_checkpoint = save
    from pipelines.cli import main

    sys.exit(main(["train", config, "--out", out]))
""")


def _checkpoint_dirs(folder: Path) -> tuple[list[Path], list[Path]]:
    """(checkpoint directories under their final names, hidden .tmp/.old/.del leftovers) of an engine out dir."""
    if not folder.is_dir():
        return [], []
    visible = sorted(p for p in folder.glob("checkpoint_epoch*") if p.is_dir())
    hidden = sorted(p for p in folder.iterdir() if p.name.startswith(".") and p.suffix in (".tmp", ".old", ".del"))
    return visible, hidden


@_timed
def rotation_kill(ws: Workspace, run: int = 0, *, epochs: int = 2, point: str | None = None) -> Outcome:
    """`ltsweep train` (keep 1 checkpoint) killed with SIGKILL at one point of checkpoint writing/rotation (by run:
    right after the old checkpoint was renamed away, half-way through deleting it, or half-way through writing the
    epoch-2 checkpoint; or `point`, one of KILL_POINTS), then run again into the same --out.

    Asserts: the kill point was reached (hidden leftovers exist) and every checkpoint directory under its final name
    loads right after the kill; the rerun exits 0, cleans every leftover up, and all its checkpoint directories
    load, the newest being epoch E."""
    o = Outcome("rotation_kill")
    point = point or KILL_POINTS[run % len(KILL_POINTS)]
    o.details["kill_point"] = point
    store = ws.store(f"rotation-{run}")
    seed_stage1(ws, store)
    path, _ = write_config(ws, store, "rotation", lams=(0.5,), epochs=epochs)
    out = store / "train-out"
    folder = out / "stage2"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    with open(store / "train-1.log", "w") as log:
        rc1 = subprocess.run(
            [PYTHON, "-c", _ROTATION_RUNNER, point, str(path), str(out)],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=DRIVER_TIMEOUT_S,
        ).returncode
    o.details["exit_codes"] = {"killed run": rc1}
    o.check(rc1 == -signal.SIGKILL, f"the killed run ended with {rc1}, not by SIGKILL (kill point not reached?)")
    visible, hidden = _checkpoint_dirs(folder)
    o.details["after_kill"] = {"visible": [p.name for p in visible], "hidden": [p.name for p in hidden]}
    o.check(bool(hidden), "no hidden leftovers after the kill: the kill point was not reached")
    for d in visible:
        problem = load_problem(d)
        if problem:
            o.unloadable_checkpoints += 1
            o.fail(f"after the kill: unloadable checkpoint {problem}")
    with open(store / "train-2.log", "w") as log:
        rc2 = subprocess.run(
            [PYTHON, "-c", _ROTATION_RUNNER, "none", str(path), str(out)],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=DRIVER_TIMEOUT_S,
        ).returncode
    o.exit_code("rerun", rc2, 0)
    visible, hidden = _checkpoint_dirs(folder)
    o.details["after_rerun"] = {"visible": [p.name for p in visible], "hidden": [p.name for p in hidden]}
    o.check(not hidden, f"leftovers not cleaned up by the rerun: {[p.name for p in hidden]}")
    for d in visible:
        problem = load_problem(d)
        if problem:
            o.unloadable_checkpoints += 1
            o.fail(f"after the rerun: unloadable checkpoint {problem}")
    if rc2 == 0:
        summary = json.loads((out / "result.json").read_text())
        ckpt = Path(summary["checkpoint"])
        o.check(
            ckpt.is_dir() and json.loads((ckpt / "run.json").read_text())["epoch"] == epochs,
            f"the rerun's result points at {ckpt}",
        )
    return o
