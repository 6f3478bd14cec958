"""PBT's λ schedule vs the best fixed λ vs the hybrid schedule, at equal images, decided on fresh seeds and held-out
images (the study benchmark, CPU).

Selection (seeds 0 1 2; the selection half of the validation images, ``data.holdout: 0.5``):
  pbt     search_spaces/pbt_lambda.yaml as it is: one-stage members over λ, PBT after every evaluation;
  grid    the same trials with λ fixed (scheduler fifo).
Picks: the PBT sweep's best trial (the sweeps' best-trial rule) and its λ schedule; the grid's best λ (highest
mean over seeds).
Confirmation (fresh seeds 10 11 12 on the held-out half; one sweep per arm, so the arms pair by seed):
  pbt_schedule  one-stage, ``stage2.lam_schedule`` = PBT's schedule
  fixed         one-stage, ``stage2.lam`` = the grid's pick
  hybrid        stage 1 (non-balance softmax, S1 epochs) + stage 2 at λ = 0.7 (the other epochs)
Equal images: one epoch is the training set's size for every sampler (``samples_per_epoch`` unset), and the hybrid's
two stages add up to the one-stage epochs. Comparisons: pbt_schedule - fixed, pbt_schedule - hybrid, fixed -
hybrid in AP and APr, each paired by seed with the seeds x images interval (the confirmation runs' bootstrap
replicates of the held-out images), Holm over the six; the words follow the interval (better / worse / cannot
tell). The selection sweeps' own numbers are printed too, but they chose the picks and are not the evidence.

    python benchmarks/bench_pbt.py [--data data/study] [--s1 3] [--keep]      # ~1 h on 2 CPU cores
    python benchmarks/bench_pbt.py --quick                                     # demo data, 2 epochs: a smoke test
The last stdout line is one JSON object: {"benchmark": "pbt", "schedule": ..., "fixed_lam": ..., "comparisons": ...}
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import yaml

import search_spaces
from pipelines.analysis import evidence
from pipelines.analysis.replicates import metric_of
from pipelines.analysis.schedule import trial_lam_schedule
from pipelines.config.load import load_experiment_config
from pipelines.tune import sweep

HYBRID_LAM = 0.7
METRICS = ("AP", "APr")
PAIRS = (("pbt_schedule", "fixed"), ("pbt_schedule", "hybrid"), ("fixed", "hybrid"))


def preset(args) -> dict:
    """The PBT preset with this run's data, storage and (--quick) size."""
    raw = yaml.safe_load(search_spaces.path("pbt_lambda").read_text())
    data = args.data.resolve()
    raw["data"].update(train=str(data / "train.json"), val=str(data / "val.json"))
    raw["data"].update(hierarchy=str(data / "hierarchy.json"), synthetic=args.preset)
    raw["run"]["storage_path"] = str(args.root / "results")
    raw["search"]["seeds"] = list(args.seeds)
    if args.quick:
        raw["stage2"].update(epochs=2, lr_steps=[], warmup=5, samples_per_epoch=96)
        raw["space"]["lam"] = {"grid": [0.0, 1.0]}
    return raw


def write(args, raw: dict, name: str):
    raw = copy.deepcopy(raw)
    raw["name"] = name
    path = args.root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return load_experiment_config(path)


def selection_configs(args, base: dict) -> dict:
    grid = copy.deepcopy(base)
    grid["scheduler"] = {"type": "fifo", "metric": "AP", "mode": "max"}
    return {"pbt": write(args, base, "pbt"), "grid": write(args, grid, "grid")}


def confirmation_configs(args, base: dict, schedule: list, lam: float) -> dict:
    """The three arms on the confirmation seeds and the held-out images."""
    out = {}
    one = copy.deepcopy(base)
    one["data"]["evaluate_on"] = "holdout"
    one["search"]["seeds"] = list(args.confirm_seeds)
    one["scheduler"] = {"type": "fifo", "metric": "AP", "mode": "max"}
    one["space"] = {}
    epochs, steps = one["stage2"]["epochs"], one["stage2"]["lr_steps"]
    arms = {
        "pbt_schedule": {"lam_schedule": schedule},
        "fixed": {"lam": lam},
        # the one-stage lr steps, counted from the start of stage 2
        "hybrid": {
            "lam": HYBRID_LAM,
            "epochs": epochs - args.s1,
            "lr_steps": [s - args.s1 for s in steps if s > args.s1],
        },
    }
    for name, stage2 in arms.items():
        raw = copy.deepcopy(one)
        if "lam_schedule" in stage2:
            del raw["stage2"]["lam"]  # the schedule sets λ per epoch
        raw["stage2"].update(stage2)
        if name == "hybrid":
            s2 = raw["stage2"]
            raw["stage1"] = {"epochs": args.s1, "batch_size": s2["batch_size"], "lr": s2["lr"], "warmup": s2["warmup"]}
            raw["stage2"]["warmup"] = min(s2["warmup"], 20)
        out[name] = write(args, raw, name)
    return out


def best_fixed_lam(grid) -> float:
    best = grid.best_config
    if best is None:
        raise RuntimeError("the grid sweep has no configuration that ran its full schedule")
    return float(best.config["lam"])


def pbt_schedule(pbt) -> list:
    if pbt.best is None:
        raise RuntimeError("the PBT sweep has no best trial")
    schedule = trial_lam_schedule(pbt.tracking_uri, pbt.name, pbt.best.trial_id, pbt.eval_every)
    return schedule or [[0, float(pbt.best.config["lam"])]]


def per_seed(summary, metric: str) -> dict[int, tuple[float, np.ndarray | None]]:
    out = {}
    for t in summary.trials:
        if t.error is None and t.metrics.get(metric) is not None:
            out[int(t.config["seed"])] = (float(t.metrics[metric]), metric_of(t.replicates, metric))
    return out


def comparisons(arms: dict) -> list[dict]:
    """Each pair's paired seeds x images interval, Holm-corrected together."""
    rows, intervals = [], []
    for a, b in PAIRS:
        for m in METRICS:
            sa, sb = per_seed(arms[a], m), per_seed(arms[b], m)
            seeds = sorted(set(sa) & set(sb))
            d = [sa[s][0] - sb[s][0] for s in seeds]
            reps = [sa[s][1] for s in seeds], [sb[s][1] for s in seeds]
            have = all(r is not None for r in reps[0] + reps[1]) and seeds
            rep_d = np.stack([x - y for x, y in zip(*reps)]) if have else None
            intervals.append(evidence.interval(d, rep_d))
            rows.append({"arm": a, "baseline": b, "metric": m, "seeds": seeds})
    for row, iv, v in zip(rows, intervals, evidence.verdicts(intervals)):
        row.update(
            effect=round(iv.estimate, 5),
            ci=[round(iv.low, 5), round(iv.high, 5)],
            p_holm=None if not np.isfinite(v.p_holm) else float(f"{v.p_holm:.4g}"),
            verdict=v.word,
            method=f"{iv.method}, {iv.n_seeds} seeds" + (f", {iv.replicates} image draws" if iv.replicates else ""),
        )
    return rows


def means(summary) -> dict:
    return {m: round(float(np.mean([v for v, _ in per_seed(summary, m).values()])), 4) for m in METRICS}


def run(cfgs: dict) -> dict:
    out = {}
    for name, cfg in cfgs.items():
        t0 = time.time()
        out[name] = sweep.run_sweep(cfg, progress=False, register=False)
        if out[name].exit_code() != 0:
            raise RuntimeError(f"sweep {name} did not finish every trial (exit code {out[name].exit_code()})")
        print(f"{name}: {len(out[name].trials)} trials in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    return out


def print_table(rows: list[dict]) -> None:
    print(f"{'comparison':<28} {'metric':<6} {'difference [95% CI]':<28} {'Holm p':<8} {'verdict':<11} method")
    for r in rows:
        diff = f"{r['effect']:+.4f} [{r['ci'][0]:+.4f}, {r['ci'][1]:+.4f}]"
        print(f"{r['arm'] + ' - ' + r['baseline']:<28} {r['metric']:<6} {diff:<28} {r['p_holm']!s:<8} "
              f"{r['verdict']:<11} {r['method']}")  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=None, help="default data/study (--quick: data/demo)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="selection seeds (the population's)")
    ap.add_argument("--confirm-seeds", type=int, nargs="+", default=[10, 11, 12], help="fresh seeds of the arms")
    ap.add_argument("--s1", type=int, default=3, help="the hybrid's stage-1 epochs (of the one-stage epochs)")
    ap.add_argument("--quick", action="store_true", help="demo data, 2 epochs, λ 0 and 1, seeds 0 1 / 10 11")
    ap.add_argument("--keep", action="store_true", help="keep the results (default: a temp dir, removed)")
    args = ap.parse_args(argv)
    args.preset = "demo" if args.quick else "study"
    args.data = args.data or Path(f"data/{args.preset}")
    if args.quick:
        args.seeds, args.confirm_seeds, args.s1 = args.seeds[:2], args.confirm_seeds[:2], 1
    if set(args.seeds) & set(args.confirm_seeds) or min(len(args.seeds), len(args.confirm_seeds)) < 2:
        ap.error("--seeds and --confirm-seeds: at least 2 each, and no seed in both (the evidence must be fresh)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    args.root = Path(tempfile.mkdtemp(prefix="bench_pbt-"))
    t0 = time.time()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        base = preset(args)
        if args.s1 >= base["stage2"]["epochs"]:
            raise SystemExit(f"--s1 {args.s1}: the hybrid needs a stage 2 (fewer than {base['stage2']['epochs']})")
        chosen = run(selection_configs(args, base))
        schedule, lam = pbt_schedule(chosen["pbt"]), best_fixed_lam(chosen["grid"])
        print(f"picks: PBT schedule {schedule}, best fixed λ {lam}", file=sys.stderr, flush=True)
        arms = run(confirmation_configs(args, base, schedule, lam))
    finally:
        ray.shutdown()
    for s in (*chosen.values(), *arms.values()):
        sweep.print_summary(s)
    rows = comparisons(arms)
    constant = len({lam for _, lam in schedule}) == 1
    if constant:
        same = " (the same runs as `fixed`)" if schedule[0][1] == lam else ""
        print(f"PBT's best trial kept one λ, {schedule[0][1]}, for its whole schedule{same}")
    print("\nconfirmation (fresh seeds, held-out images):")
    print_table(rows)
    payload = {
        "benchmark": "pbt",
        "schedule": schedule,
        "schedule_is_constant": constant,
        "fixed_lam": lam,
        "hybrid": {"lam": HYBRID_LAM, "stage1_epochs": args.s1},
        "selection_means": {k: means(v) for k, v in chosen.items()},
        "confirmation_means": {k: means(v) for k, v in arms.items()},
        "comparisons": rows,
        "seeds": {"selection": args.seeds, "confirmation": args.confirm_seeds},
        "minutes": round((time.time() - t0) / 60, 1),
    }
    if args.keep:
        print(f"results kept in {args.root}")
    else:
        shutil.rmtree(args.root, ignore_errors=True)
    print(json.dumps(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
