"""Fault injection, counted: every scenario of the benchmarks/faults package run `--runs N` times (default 5).

Scenarios (each on a fresh store, tiny synthetic data, 1-3 trials of 1-3 stage-2 epochs):
  worker_kill      kill -9 of a trial worker half-way through an epoch; Tune retries it from its last checkpoint
  driver_kill      kill -9 of the sweep driver's process group (with its own local Ray), then `--resume`
  sigint_resume    Ctrl+C (SIGINT) at the first report after the first trial completes, then resume
  diverged_resume  a trial diverges; resumed with --resume-errored in a fresh Ray session
  two_drivers      two drivers start together on a fresh store (no mlflow.db, no stage-1 cache)
  corrupt_stage1   the stage-1 cache's checkpoint.pt truncated / a byte flipped / emptied / deleted (by run)
  rotation_kill    `ltsweep train` SIGKILLed during checkpoint rotation/writing (3 kill points, by run), then rerun

Counted over all runs (see faults.common): lost_trials, duplicate_runs, orphan_runs, wrong_exit_codes,
unloadable_checkpoints. Every other failed check of a scenario is printed under its progress line and counted in
the per-scenario line as `problems`; a scenario that crashed is counted as `errors` there.

stdout: one progress line per scenario run (and its problems), then one JSON line per scenario
({"per_scenario": ...}), and as the LAST line exactly one JSON object:
  {"benchmark": "faults", "runs": N, "lost_trials": 0, "duplicate_runs": 0, "orphan_runs": 0,
   "wrong_exit_codes": 0, "unloadable_checkpoints": 0}
Ray, Tune and MLflow output goes to stderr; subprocess drivers write logs into their stores (kept with --keep).

    python benchmarks/bench_faults.py [--runs 5] [--scenarios worker_kill,driver_kill] [--workdir DIR] [--keep]
About 4-5 minutes per round of the 7 scenarios on 2 shared CPU cores.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import ray

import faults as fs


def run_one(name: str, ws: fs.Workspace, local_ray: fs.LocalRay, run: int) -> fs.Outcome:
    """One scenario run; its own output goes to stderr. A crash becomes an Outcome with the traceback's last line."""
    fn, needs_ray, needs_session = fs.SCENARIOS[name]
    if needs_ray and not ray.is_initialized():
        local_ray.start()
    t0 = time.monotonic()
    with contextlib.redirect_stdout(sys.stderr):
        try:
            return fn(ws, local_ray, run) if needs_session else fn(ws, run)
        except Exception as exc:
            traceback.print_exc()
            o = fs.Outcome(name, seconds=round(time.monotonic() - t0, 1))
            o.details["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:500]
            return o


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5, help="runs of each scenario (default 5)")
    p.add_argument(
        "--scenarios", default=",".join(fs.SCENARIOS), help=f"comma-separated subset of {','.join(fs.SCENARIOS)}"
    )
    p.add_argument("--workdir", type=Path, default=None, help="where to work (default: a new temp dir)")
    p.add_argument("--keep", action="store_true", help="keep every run's store (default: removed after its checks)")
    args = p.parse_args(argv)
    names = [n for n in args.scenarios.split(",") if n]
    unknown = sorted(set(names) - set(fs.SCENARIOS))
    if unknown:
        p.error(f"unknown scenario(s) {unknown}; choose from {list(fs.SCENARIOS)}")

    root = args.workdir or Path(tempfile.mkdtemp(prefix="bench_faults-"))
    t_start = time.monotonic()
    with contextlib.redirect_stdout(sys.stderr):
        ws = fs.prepare(root)
    print(
        f"workdir {root}; data and stage 1 ready in {time.monotonic() - t_start:.0f} s; {args.runs} run(s) of "
        f"{', '.join(names)}",
        flush=True,
    )
    local_ray = fs.LocalRay(num_cpus=2)
    per = {
        n: {"runs": 0, **dict.fromkeys(fs.Outcome.COUNTS, 0), "problems": 0, "errors": 0, "seconds": 0.0, "details": []}
        for n in names
    }
    try:
        for run in range(args.runs):
            for name in names:
                o = run_one(name, ws, local_ray, run)
                s = per[name]
                s["runs"] += 1
                for k in fs.Outcome.COUNTS:
                    s[k] += getattr(o, k)
                s["problems"] += len(o.problems)
                s["errors"] += "error" in o.details
                s["seconds"] += o.seconds
                s["details"].append(
                    {
                        k: o.details[k]
                        for k in (
                            "kill_point",
                            "corruption",
                            "victim",
                            "killed_with",
                            "stage1",
                            "exit_codes",
                            "times_reported",
                            "leaked_processes",
                            "error",
                        )
                        if k in o.details
                    }
                )
                counts = " ".join(f"{k}={v}" for k, v in o.counts().items())
                status = "ERROR" if "error" in o.details else "ok" if not o.problems else "PROBLEMS"
                print(f"[run {run + 1}/{args.runs}] {name:16s} {status:8s} {o.seconds:6.1f} s  {counts}", flush=True)
                for line in o.problems:
                    print(f"    problem: {line}", flush=True)
                if "error" in o.details:
                    print(f"    error: {o.details['error']}", flush=True)
                if not args.keep:
                    shutil.rmtree(root / "stores", ignore_errors=True)
    finally:
        with contextlib.redirect_stdout(sys.stderr):
            leaked = local_ray.stop() if local_ray.temp_dir else []
        if leaked:
            print(f"Ray processes of the in-process session had to be killed: {leaked}", flush=True)
        if not args.keep and args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)

    print(f"total {time.monotonic() - t_start:.0f} s", flush=True)
    for s in per.values():
        s["seconds"] = round(s["seconds"], 1)
    print(json.dumps({"per_scenario": per}), flush=True)
    total = {k: sum(s[k] for s in per.values()) for k in fs.Outcome.COUNTS}
    print(json.dumps({"benchmark": "faults", "runs": args.runs, **total}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
