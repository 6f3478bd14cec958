"""Shared pieces of the fault-injection scenarios: constants, :class:`Outcome`, the workspace (TINY data, sweep
configs, the stage-1 cache), bounded waiting, and the checks of a recovered sweep (Tune's trials, result.json, MLflow
runs, exit codes, loadable checkpoints).

What is counted (over the trials of the scenario's sweeps, after the recovery):
  lost_trials            a grid configuration without a trial that ran its whole schedule (TERMINATED, epochs
                         1..E in result.json); a trial that is meant to diverge is expected to end in ERROR instead
  duplicate_runs         MLflow runs beyond the first of one trial id (or of the sweep's parent / stage-1 run)
  orphan_runs            MLflow runs left RUNNING, and trial runs whose trial id is no Tune trial of the sweep
  wrong_exit_codes       an exit code other than the rule's: 0 when every trial finished, 1 when any failed or
                         diverged or the sweep was interrupted (before the resume), 2 for bad input
  unloadable_checkpoints a checkpoint directory under its final name that lt_models.engine.checkpoint cannot load
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from lt_models.data.synthetic.generate import generate_benchmark
from lt_models.data.synthetic.layout import Preset

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable  # the venv's interpreter
TAG_ENV = "LTSWEEP_FAULTS_TAG"

# The synthetic benchmark of the e2e tests (64 px, ~50 training and 16 validation images).
TINY = Preset(
    "tiny",
    image_size=64,
    families=2,
    appearances=3,
    t_max=40,
    t_min=2,
    q=5,
    val_ratio=0.25,
    val_min=2,
    objects_per_image=(0.5, 0.5),
    min_size=14,
    max_size=30,
    n_confusable=1,
    n_two_leaf=1,
    swap_rates=((0.3, 0.1, 0.2),),
    parent_only_rates=(0.1,),
    workers=1,
)
SAMPLES_PER_EPOCH = 8  # 2 iterations of batch 4 per stage-2 epoch
DIVERGING_LAM = 1.0  # diverging_trial: the configuration whose loss becomes NaN
KILL_WAIT_S = 120.0  # how long a victim worker waits for its SIGKILL before failing its trial
DRIVER_TIMEOUT_S = 900.0  # bound on any one driver process


# ---- outcome -----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    """What one run of one scenario found."""

    scenario: str
    lost_trials: int = 0
    duplicate_runs: int = 0
    orphan_runs: int = 0
    wrong_exit_codes: int = 0
    unloadable_checkpoints: int = 0
    problems: list[str] = dataclasses.field(default_factory=list)  # every failed check, in words
    details: dict[str, Any] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0

    COUNTS = ("lost_trials", "duplicate_runs", "orphan_runs", "wrong_exit_codes", "unloadable_checkpoints")

    def fail(self, text: str) -> None:
        self.problems.append(text)

    def check(self, ok: bool, text: str) -> bool:
        if not ok:
            self.fail(text)
        return ok

    def exit_code(self, label: str, got: int | None, want: int) -> None:
        """Record a process's (or summary's) exit code and count it if it breaks the rule."""
        self.details.setdefault("exit_codes", {})[label] = got
        if got != want:
            self.wrong_exit_codes += 1
            self.fail(f"{label}: exit code {got}, the rule says {want}")

    def counts(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.COUNTS}


# ---- workspace: data, configs, stage-1 cache ---------------------------------------------------------------------


@dataclasses.dataclass
class Workspace:
    root: Path  # everything of this bench/test lives under it
    data: Path  # the TINY benchmark (train.json, val.json, hierarchy.json, images/)
    stage1_store: Path  # a storage_path whose pretrain/ holds the trained stage-1 checkpoint

    def store(self, name: str) -> Path:
        """A fresh storage_path for one scenario run."""
        path = self.root / "stores" / name
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        return path


def config_dict(
    ws: Workspace,
    store: Path,
    name: str,
    *,
    lams=(0.0, 1.0),
    epochs: int = 2,
    max_concurrent: int = 2,
    max_failures: int = 1,
    scheduler: dict | None = None,
) -> dict[str, Any]:
    """A hybrid sweep over stage-2 λ (FIFO unless ``scheduler``: every trial runs its whole schedule, one evaluation
    per epoch)."""
    d = ws.data
    return {
        "name": name,
        "seed": 0,
        "data": {"train": str(d / "train.json"), "val": str(d / "val.json"), "hierarchy": str(d / "hierarchy.json")},
        "model": {"backbone": "tiny", "image_size": 64},
        "stage1": {"epochs": 1, "batch_size": 4, "lr": 0.02, "warmup": 5},
        "stage2": {"epochs": epochs, "batch_size": 4, "lr": 0.01, "warmup": 2, "samples_per_epoch": SAMPLES_PER_EPOCH},
        "eval": {"every": 1},
        "resources": {"cpus_per_trial": 1},
        "scheduler": scheduler or {"type": "fifo"},
        "search": {"num_samples": 1, "max_concurrent_trials": max_concurrent, "seed": 0},
        "space": {"lam": {"grid": list(lams)}},
        "run": {"storage_path": str(store), "max_failures": max_failures, "checkpoints_to_keep": 1, "ray_num_cpus": 2},
    }


def write_config(ws: Workspace, store: Path, name: str, **kw):
    """(YAML path, validated ExperimentConfig) of config_dict(...)."""
    from pipelines.config.load import load_experiment_config

    path = store / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config_dict(ws, store, name, **kw)))
    return path, load_experiment_config(path)


def prepare(root: Path) -> Workspace:
    """Generate the TINY benchmark and train the stage-1 checkpoint once (in this process, without Ray)."""
    root.mkdir(parents=True, exist_ok=True)
    data = root / "data"
    if not (data / "val.json").is_file():
        generate_benchmark(data, preset=TINY, seed=0)
    ws = Workspace(root, data, root / "stage1-cache")
    ws.stage1_store.mkdir(exist_ok=True)
    _stage1_cache(ws)
    return ws


def _stage1_cache(ws: Workspace) -> Path:
    """The cached stage-1 directory for the current code (its key covers the lt_models sources: trained again here,
    once, if they changed since prepare)."""
    from pipelines.tune.stage1 import ensure_stage1

    _, cfg = write_config(ws, ws.stage1_store, "stage1")
    return ensure_stage1(cfg, use_ray=False).path


def seed_stage1(ws: Workspace, store: Path) -> Path:
    """Copy the trained stage-1 cache into a store (its key is the content's, not the path's); returns its dir."""
    src = _stage1_cache(ws)
    dst = store / "pretrain" / src.name
    shutil.copytree(src, dst)
    return dst


# ---- bounded waiting ---------------------------------------------------------------------------------------------


def wait_for(
    cond: Callable[[], Any], timeout: float, what: str, poll: float = 0.1, alive: Callable[[], None] | None = None
) -> Any:
    """Poll cond() until it returns something truthy (returned) or `timeout` s pass (TimeoutError naming `what`).
    alive(), if given, is called on every round and may raise (a process that died too early)."""
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if alive is not None:
            alive()
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:.0f} s for {what}")
        time.sleep(poll)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _claim(path: Path) -> bool:
    """True for the first caller only (across processes): O_EXCL creation of `path`."""
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


# ---- timing a scenario -----------------------------------------------------------------------------------------------


def _timed(fn):
    def run(*a, **kw):
        t0 = time.monotonic()
        o = fn(*a, **kw)
        o.seconds = round(time.monotonic() - t0, 1)
        return o

    run.__name__, run.__doc__ = fn.__name__, fn.__doc__
    return run


# ---- reading a sweep back: Tune's trials, result.json, MLflow, checkpoints ---------------------------------------


def tune_trials(exp_dir: Path) -> dict[str, dict[str, Any]]:
    """Tune's trials of an experiment from its latest experiment_state-<date>.json (the one `Tuner.restore` would
    continue; a resumed run writes a new one and syncs the old ones again): {trial_id: {status, path, config,
    num_failures}}."""
    states = sorted(exp_dir.glob("experiment_state-*.json"))
    if not states:
        return {}
    out = {}
    for trial_json, runtime_json in json.loads(states[-1].read_text())["trial_data"]:
        t, r = json.loads(trial_json), json.loads(runtime_json)
        out[t["trial_id"]] = {
            "status": t["status"],
            "path": exp_dir / t["relative_logdir"],
            "config": t["config"],
            "num_failures": r.get("num_failures", 0),
        }
    return out


def results(trial_dir: Path) -> list[dict[str, Any]]:
    """Every result Tune recorded for a trial (result.json: one JSON object per report)."""
    path = Path(trial_dir) / "result.json"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _check_population(o: Outcome, uri: str, trials: dict, runs: list, expected: int, epochs: int) -> None:
    from mlflow import MlflowClient

    from pipelines.names import TRIAL_ID_TAG

    client = MlflowClient(uri)
    history = {
        r.data.tags.get(TRIAL_ID_TAG): [
            int(m.value)
            for m in sorted(client.get_metric_history(r.info.run_id, "epoch"), key=lambda m: (m.timestamp, m.step))
        ]
        for r in runs
    }
    info = {}
    for tid, t in trials.items():
        ep = history.get(tid, [])
        info[tid] = {"lam": float(t["config"]["lam"]), "status": t["status"], "epochs": ep}
        ok = t["status"] == "TERMINATED" and ep and ep[-1] == epochs and all(1 <= e <= epochs for e in ep)
        if not ok:
            o.lost_trials += 1
            o.fail(f"trial {tid}: status {t['status']}, MLflow epochs {ep} (expected within 1..{epochs}, ending there)")
    o.details.setdefault("trials", {}).update(info)
    o.check(len(trials) == expected, f"{len(trials)} Tune trials, expected the population's {expected}")


def reported_epochs(trial_dir: Path) -> list[int]:
    return [int(r["epoch"]) for r in results(trial_dir)]


def load_problem(ckpt_dir: Path) -> str | None:
    """None if lt_models can load the checkpoint directory (the detector from spec.json + checkpoint.pt, and the whole
    training state); else why not."""
    from lt_models.engine.checkpoint import load_checkpoint
    from lt_models.engine.inference import load_detector

    try:
        model, _ = load_detector(ckpt_dir)
        load_checkpoint(ckpt_dir, model, restore_rng=False)
        json.loads((Path(ckpt_dir) / "metrics.json").read_text())
    except Exception as exc:
        return f"{ckpt_dir}: {type(exc).__name__}: {str(exc)[:200]}"
    return None


def check_checkpoints(o: Outcome, trial_dirs) -> None:
    """Every checkpoint directory Tune kept for the trials (checkpoint_*/ holding the engine's checkpoint.pt)."""
    n = 0
    for trial_dir in trial_dirs:
        for ckpt in sorted(Path(trial_dir).glob("checkpoint_*")):
            for pt in sorted(ckpt.rglob("checkpoint.pt")):
                n += 1
                problem = load_problem(pt.parent)
                if problem:
                    o.unloadable_checkpoints += 1
                    o.fail(f"unloadable checkpoint {problem}")
    o.details["checkpoints_loaded"] = o.details.get("checkpoints_loaded", 0) + n


def mlflow_runs(tracking_uri: str, experiment: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else client.search_runs([exp.experiment_id], max_results=5000)


def check_mlflow(
    o: Outcome, tracking_uri: str, experiment: str, trials: dict[str, dict], expect_status: dict[str, str]
) -> dict[str, list]:
    """One sweep run, one stage-1 run per sha256, one trial run per Tune trial (with the expected status), none left
    RUNNING, no trial run without its Tune trial. Returns the runs by role."""
    from pipelines.names import PRETRAIN_SHA_TAG, ROLE_TAG, TRIAL_ID_TAG

    runs = mlflow_runs(tracking_uri, experiment)
    by_role: dict[str, list] = {}
    for r in runs:
        by_role.setdefault(r.data.tags.get(ROLE_TAG, "?"), []).append(r)
    running = [r for r in runs if r.info.status == "RUNNING"]
    for r in running:
        o.fail(
            f"MLflow run {r.info.run_id} ({r.data.tags.get(ROLE_TAG)} "
            f"{r.data.tags.get(TRIAL_ID_TAG, '')}) is left RUNNING"
        )
    orphans = {r.info.run_id for r in running}
    per_trial: dict[str, list] = {}
    for r in by_role.get("trial", []):
        per_trial.setdefault(r.data.tags.get(TRIAL_ID_TAG), []).append(r)
    for tid, rs in per_trial.items():
        if len(rs) > 1:
            o.duplicate_runs += len(rs) - 1
            o.fail(f"trial {tid} has {len(rs)} MLflow runs")
        if tid not in trials:
            orphans.update(r.info.run_id for r in rs)
            o.fail(f"MLflow trial run(s) of {tid}, which is no Tune trial of the sweep")
    o.orphan_runs += len(orphans)
    for tid, want in expect_status.items():
        got = sorted(r.info.status for r in per_trial.get(tid, []))
        o.check(
            got == [want] or (len(got) > 1 and want in got),
            f"trial {tid}: MLflow run status {got or 'none (no run)'}, expected {want}",
        )
    sweeps = by_role.get("sweep", [])
    if len(sweeps) > 1:
        o.duplicate_runs += len(sweeps) - 1
    o.check(len(sweeps) == 1, f"{len(sweeps)} MLflow sweep runs for {experiment}")
    shas: dict[str, int] = {}
    for r in by_role.get("pretrain", []):
        sha = r.data.tags.get(PRETRAIN_SHA_TAG)
        shas[sha] = shas.get(sha, 0) + 1
    for sha, n in shas.items():
        if n > 1:
            o.duplicate_runs += n - 1
            o.fail(f"{n} stage-1 runs for {sha[:12]}")
    o.details.setdefault("mlflow_runs", {})[experiment] = {k: len(v) for k, v in by_role.items()}
    return by_role


def check_sweep(
    o: Outcome,
    cfg,
    *,
    epochs: int,
    diverging: tuple = (),
    expected_exit: int | None = None,
    exit_code: int | None = None,
    label: str = "sweep",
) -> dict[str, dict]:
    """The common checks of a recovered sweep: every grid configuration has a trial that ran epochs 1..E exactly once
    each (TERMINATED), or ended in ERROR without a report when its λ is in `diverging`; MLflow as in check_mlflow;
    every kept checkpoint loads; the exit code follows the rule. Returns Tune's trials.

    A population (scheduler pbt / pb2) changes a trial's λ, and Tune restarts the result.json of a trial that copies
    another's checkpoint: there, as many trials as the grid x seeds, each TERMINATED, and each trial's MLflow run
    holds the epochs it reported, within 1..E and ending at E (a copy goes on from the donor's epoch, which may be
    ahead of or behind its own: epochs may skip or repeat)."""
    from pipelines.tune.tuner import experiment_path, tracking_uri_for

    if expected_exit is not None:
        o.exit_code(label, exit_code, expected_exit)
    trials = tune_trials(experiment_path(cfg))
    grid = [float(x) for x in cfg.space["lam"].args]
    if cfg.scheduler.type in ("pbt", "pb2"):
        runs = check_mlflow(o, tracking_uri_for(cfg), cfg.name, trials, {tid: "FINISHED" for tid in trials})
        _check_population(o, tracking_uri_for(cfg), trials, runs.get("trial", []), len(grid) * len(cfg.seeds), epochs)
        check_checkpoints(o, [t["path"] for t in trials.values()])
        return trials
    by_lam: dict[float, list[str]] = {}
    expect_status = {}
    info = {}
    for tid, t in trials.items():
        lam = float(t["config"]["lam"])
        by_lam.setdefault(lam, []).append(tid)
        ep = reported_epochs(t["path"])
        info[tid] = {"lam": lam, "status": t["status"], "epochs": ep, "num_failures": t["num_failures"]}
        if lam in diverging:
            expect_status[tid] = "FAILED"
            o.check(
                t["status"] == "ERROR" and ep == [],
                f"trial {tid} (lam {lam}, meant to diverge): status {t['status']}, epochs {ep}",
            )
        else:
            expect_status[tid] = "FINISHED"
            o.check(ep == list(range(1, len(ep) + 1)), f"trial {tid}: reported epochs {ep} have a gap or a repeat")
    o.details.setdefault("trials", {}).update(info)
    for lam in grid:
        tids = by_lam.get(float(lam), [])
        if len(tids) > 1:
            o.fail(f"lam {lam} has {len(tids)} Tune trials {tids}")
        if float(lam) in diverging:
            o.check(len(tids) >= 1, f"lam {lam}: no trial")
            continue
        ok = [
            tid
            for tid in tids
            if info[tid]["status"] == "TERMINATED" and info[tid]["epochs"] == list(range(1, epochs + 1))
        ]
        if not ok:
            o.lost_trials += 1
            o.fail(
                f"lam {lam}: no trial finished its {epochs} epochs "
                f"({[(tid, info[tid]['status'], info[tid]['epochs']) for tid in tids] or 'no trial at all'})"
            )
    check_mlflow(o, tracking_uri_for(cfg), cfg.name, trials, expect_status)
    check_checkpoints(o, [t["path"] for t in trials.values()])
    return trials
