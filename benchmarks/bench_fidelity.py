"""Fidelity: do the papers' tables hold on the LVIS-like synthetic benchmark? Paired effects over seeds, verdicts.

Studies (arms in ``benchmarks/fidelity/plan.py``, findings in ``benchmarks/fidelity/findings.py``), every arm on every
seed, backbone from stage 0 (``ltsweep stage0``: balanced synthetic classification pretraining, the CPU stand-in for
ImageNet) unless it says scratch:
  concurrent-softmax paper Table 1: one-stage softmax, concurrent softmax (scored by softmax, as the table's rows),
      multi-hot softmax and BCE, class-aware (λ = 1) and non-balance; the same label set for every loss: LVIS AP over
      the leaf classes, and the Open Images AP@0.5 with every detection counted for its ancestors;
  Table 2: training loss (softmax, concurrent softmax) x test scores (softmax, eq 5), one model per loss rescored;
  Table 3: soft-balance λ ∈ {0, 0.3, 0.5, 0.7, 1.0, 1.5} and non-balance, in the paper's one-stage protocol and in
      stage 2 of the hybrid: the curve's shape (λ = 0.7 and the best interior λ vs λ = 1.0 and vs λ = 0);
  Table 4: the hybrid (non-balance stage 1, then soft-balance λ = 0.7) vs one-stage runs of the same total epochs;
  ACSL paper Table 2: the decoupled classifier (official code: only fc_cls trains, from the softmax stage 1) with
      ξ ∈ {0.1, 0.3, 0.5, 0.7, 0.9}, softmax and BCE, on the leaf classes;
  ablations: the stated causes of findings that do not hold (no lr restart, a 2x stage 1, from scratch; the paper's
      one-stage softmax baseline).

Statistics (``pipelines.analysis.evidence``): per finding, the paired differences over seeds, seeds x images 95%
intervals from each run's 1000 bootstrap draws of the validation images (Open Images AP: seeds only, named), and
Holm's correction within each study; verdicts "holds" / "contradicts" / "cannot tell".

Each finished run is cached as JSON under --cache (its spec, the commit that trained it, its views), written
atomically: a rerun trains only what is missing, so the benchmark can run in pieces (``--arms REGEX``). Only stage-1
checkpoints stay on disk. fidelity.json records the commit(s) that trained the runs and the one that computed the
statistics; ``--table`` rewrites README.md's and docs/evidence.md's fidelity tables from it.

    python benchmarks/bench_fidelity.py [--seeds 0 1 2] [--data data/lvislike] [--data-seeds] [--workers 2]
        [--arms REGEX] [--cache DIR] [--out benchmarks/results/fidelity.json] [--device auto] [--quick] [--table]
--quick: the demo preset, a 1-epoch schedule and a tiny stage 0 in a temp dir: a smoke test of the script.
Progress lines go to stderr. Last stdout line: {"benchmark": "fidelity", "commit", "report_commit", "seeds",
"data_seeds", "preset", "schedule", "stage0", "intervals", "correction", "findings": [{"study", "name", "arm",
"arm_view", "baseline", "baseline_view", "metric", "effect", "ci_low", "ci_high", "p_value", "p_holm", "verdict",
"why", "threshold", "method", "paper", and where it does not hold "stated_cause", "tested_by"}, ...], "ablations":
[... + "tests", "cause", "cause_key"], "minutes", "untested_causes"}
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fidelity import findings as fd
from fidelity import runner, table
from fidelity.plan import FULL, QUICK, REPLICATES, Schedule, arms, epochs_of, make_spec
from lt_models.atomic import write_json_atomic
from lt_models.data.synthetic.generate import generate_benchmark

ROOT = Path(__file__).resolve().parents[1]
PRESET, QUICK_PRESET = "lvislike", "demo"


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def data_dir(data: Path, seed: int, data_seeds: bool) -> Path:
    """The benchmark a seed trains on: the shared draw, or with --data-seeds its own draw ``<data>-data<seed>``."""
    return data.with_name(f"{data.name}-data{seed}") if data_seeds else data


def ensure_benchmark(data: Path, preset: str, seed: int) -> None:
    if not (data / "train.json").is_file():
        s = generate_benchmark(data, preset=preset, seed=seed)
        runner.stderr(
            f"generated {s['preset']} (data seed {seed}) in {data}: {s['train_images']} train / {s['val_images']} val "
            f"images, {s['categories']} classes, buckets {s['buckets']} ({s['seconds']:.0f} s)"
        )


def stage0_weights(preset: str, storage: Path, quick: bool) -> tuple[str, dict]:
    """The stage-0 backbone file (built once, content-addressed) and its metrics."""
    from lt_models.engine.stage0 import Stage0Spec
    from pipelines.storage.stage0_cache import ensure_stage0

    spec = Stage0Spec(preset=preset, **({"images_per_class": 12, "holdout_per_class": 4, "epochs": 1} if quick else {}))
    found = ensure_stage0(spec, storage)
    return str(found.weights), found.metrics


def build_jobs(args, sched: Schedule, weights: str | None, cache: Path, selected: list[str]) -> tuple[dict, dict, dict]:
    """(jobs, done (cached records), parents) for ``selected`` arms x seeds."""
    plan, commit = arms(), _commit()
    jobs, done, parents = {}, {}, {}
    for seed in args.seeds:
        data = data_dir(args.data, seed, args.data_seeds)
        leaves = runner.leaf_cat_ids(data)
        for name in selected:
            arm = plan[name]
            spec = make_spec(arm, seed, data, sched, weights, args.device).to_dict()
            stem = f"{name}__seed{seed}" + ("__dataseed" if args.data_seeds else "")
            key = (name, seed)
            jobs[key] = {
                "name": name,
                "seed": seed,
                "stage": arm.stage,
                "commit": commit,
                "spec": spec,
                "epochs": epochs_of(arm.epochs, sched),
                "rescore": list(arm.rescore),
                "leaves": leaves,
                "replicates": REPLICATES,
                "out_dir": str(cache / stem),
                "cache_file": str(cache / f"{stem}.json"),
                "init_checkpoint": None,
            }
            if arm.parent is not None:
                parents[key] = (arm.parent, seed)
            record = runner.cached(cache / f"{stem}.json", spec)
            if record is not None:
                done[key] = record
    for key in [k for k in done if plan[k[0]].stage == "stage1"]:  # a stage 1 is usable only with its checkpoint
        needed = any(p == key and k not in done for k, p in parents.items())
        if needed and not (Path(done[key]["checkpoint_dir"]) / "checkpoint.pt").is_file():
            del done[key]
    return jobs, done, parents


def selected_arms(pattern: str | None) -> list[str]:
    """The arms matching ``pattern`` and the stage-1 arms they start from, in plan order."""
    plan = arms()
    chosen = {n for n in plan if pattern is None or re.search(pattern, n)}
    chosen |= {plan[n].parent for n in chosen if plan[n].parent}
    return [n for n in plan if n in chosen]


def assemble(done: dict, seeds: list[int]) -> dict:
    """table[arm][view] = {"values": {metric: [per seed]}, "reps": {metric: [per seed [R]]}} for finished arms."""
    out: dict = {}
    for name in [n for n in arms() if any(k[0] == n for k in done)]:
        if any((name, s) not in done for s in seeds):
            continue
        views = done[(name, seeds[0])]["views"]
        out[name] = {}
        for view in views:
            per = [done[(name, s)]["views"][view] for s in seeds]
            entry = {"values": {m: [p["values"].get(m) for p in per] for m in per[0]["values"]}}
            if all("reps" in p for p in per):
                entry["reps"] = {m: [p["reps"][m] for p in per] for m in per[0]["reps"]}
            out[name][view] = entry
    return out


def print_tables(tab: dict, rows: list[dict], ablation_rows: list[dict], minutes: float, seeds: list[int]) -> None:
    from pipelines.analysis import evidence

    print(f"\nfidelity, {len(seeds)} seeds {seeds}, {minutes:.1f} min; mean [95% interval]")
    cols = [("lvis", "AP"), ("lvis", "APr"), ("leaves", "AP"), ("oi", "AP")]
    print(f"{'arm':<32}" + "".join(f"{v + ' ' + m:>24}" for v, m in cols))
    for name, views in tab.items():
        cells = []
        for v, m in cols:
            if v not in views:
                cells.append(f"{'-':>24}")
                continue
            vals = [x for x in views[v]["values"].get(m, []) if x is not None]
            reps = views[v].get("reps", {}).get(m)
            cells.append(f"{evidence.interval(vals, None if reps is None else np.asarray(reps)).text():>24}")
        print(f"{name:<32}" + "".join(cells))
    study = None
    for r in rows + ablation_rows:
        if r["study"] != study:
            study = r["study"]
            print(f"\n{study}")
        view = r["arm_view"] if r["arm_view"] == r["baseline_view"] else f"{r['arm_view']} vs {r['baseline_view']}"
        print(
            f"  {r['name'][:72]:<72} {view[:28]:>28} {r['metric']:>4} {table._ci(r):>26} "
            f"Holm p {table._p(r['p_holm']):>6}  {r['verdict']}"
        )


def make_payload(args, preset: str, sched: Schedule, s0: dict, done: dict, rows, ablation_rows, minutes) -> dict:
    """fidelity.json: the commit(s) that trained the runs, the setting, the findings and the ablations."""
    commits = sorted({str(done[k].get("commit")) for k in done})
    return {
        "benchmark": "fidelity",
        "commit": commits[0] if len(commits) == 1 else commits,
        "report_commit": _commit(),
        "seeds": args.seeds,
        "data_seeds": args.seeds if args.data_seeds else [0],
        "preset": preset,
        "schedule": {
            "stage1": sched.s1,
            "stage2": sched.s2,
            "one_stage": sched.os,
            "cls": sched.cls,
            "image_size": sched.image_size,
        },
        "stage0": {k: v for k, v in s0.items() if not isinstance(v, (list, dict))},
        "train_minutes": round(sum(r.get("minutes", 0) for r in done.values()), 1),
        "intervals": "seeds x images (pipelines.analysis.evidence); Open Images AP: seeds only",
        "correction": fd.CORRECTION,
        "findings": rows,
        "ablations": ablation_rows,
        "minutes": round(minutes, 1),
    }


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--data", type=Path, default=None, help="benchmark dir (default data/lvislike; --quick: temp)")
    ap.add_argument("--data-seeds", action="store_true", help="seed s trains on its own draw <data>-data<s>")
    ap.add_argument("--workers", type=int, default=2, help="runs in parallel, one torch thread each")
    ap.add_argument("--arms", default=None, help="regex: train only these arms (and their stage 1s); a piece")
    ap.add_argument("--cache", type=Path, default=None, help="per-run records (default <data>/fidelity_runs)")
    ap.add_argument("--out", type=Path, default=None, help="default benchmarks/results/fidelity.json (--quick: none)")
    ap.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda")
    ap.add_argument("--quick", action="store_true", help="tiny preset, schedule and stage 0: a smoke test")
    ap.add_argument("--table", action="store_true", help="only rewrite the README / docs tables from --out")
    args = ap.parse_args()
    if not args.table and (len(set(args.seeds)) < 2 or args.workers < 1):
        ap.error("--seeds: at least 2 distinct seeds (3 or more for a useful interval); --workers: at least 1")
    args.seeds = sorted(set(args.seeds))
    return args


def main() -> int:
    args = parse_args()
    out = args.out or (None if args.quick else ROOT / "benchmarks/results/fidelity.json")
    if args.table:
        for path in table.regenerate(
            out or ROOT / "benchmarks/results/fidelity.json", ROOT / "README.md", ROOT / "docs/evidence.md"
        ):
            print(f"rewrote {path}")
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="fidelity_quick_")) if args.quick and args.data is None else None
    args.data = args.data or (tmp / "bench" if tmp else ROOT / "data/lvislike")
    sched, preset = (QUICK, QUICK_PRESET) if args.quick else (FULL, PRESET)
    cache = args.cache or args.data / "fidelity_runs"
    t0 = time.perf_counter()
    try:
        for seed in args.seeds:
            ensure_benchmark(data_dir(args.data, seed, args.data_seeds), preset, seed if args.data_seeds else 0)
        weights, s0 = stage0_weights(preset, (tmp or args.data.parent) / "stage0", args.quick)
        runner.stderr(f"stage 0: {weights} ({s0})")
        jobs, done, parents = build_jobs(args, sched, weights, cache, selected_arms(args.arms))
        runner.stderr(f"{len(done)} of {len(jobs)} runs cached in {cache}; {len(jobs) - len(done)} to train")
        failed = runner.run_jobs(jobs, done, parents, args.workers, log=runner.stderr)
        if failed:
            runner.stderr(
                "failed (rerun to retry; finished runs are cached): "
                + "; ".join(f"{n} seed {s}: {w}" for (n, s), w in failed.items())
            )
            return 1
        tab = assemble(done, args.seeds)
        missing = [n for n in arms() if n not in tab and not n.startswith("stage1")]
        if missing:
            runner.stderr(
                f"{len(missing)} arms not trained yet ({', '.join(missing[:6])}...): no findings; run the rest"
            )
            return 0
        rows, ablation_rows = fd.evaluate(tab, fd.all_findings()), fd.evaluate(tab, fd.ablations())
        untested = fd.link_causes(rows, ablation_rows)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    minutes = (time.perf_counter() - t0) / 60
    print_tables(tab, rows, ablation_rows, minutes, args.seeds)
    print(f"\nfindings that do not hold whose stated cause no ablation tests: {len(untested)}")
    for name in untested:
        print(f"  {name}")
    payload = make_payload(args, preset, sched, s0, done, rows, ablation_rows, minutes)
    payload["untested_causes"] = untested
    if out is not None:
        write_json_atomic(out, payload, indent=1)
    print(json.dumps(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
