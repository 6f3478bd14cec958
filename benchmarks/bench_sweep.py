"""ASHA vs the full grid on the same search space, over the synthetic demo benchmark on CPU.

Both sweeps search λ (soft-balance; the paper's Table 3 grid) x loss (concurrent softmax, ACSL) = 12 configurations
with the hybrid schedule. The anchor is the full grid (FIFO: every trial trains every stage-2 epoch); ASHA
(grace 1, reduction factor 3) stops weak trials after 1 or 3 evaluations. Reported:
  - total trial-epochs each sweep trained, and ASHA's as a fraction of the grid's (goal: <= 0.35);
  - whether both pick the same best configuration (best last AP; for ASHA among trials it ran to the end);
  - the stage-1 reuse saving: one stage-1 training shared by both sweeps' trials, against one per trial.
Both sweeps run in one Ray session in this process. The last stdout line is the JSON the issue specifies:
  {"benchmark": "sweep", "asha_epochs_fraction_of_grid": ..., "same_best": ..., "pretrain_runs": ...}

    python benchmarks/bench_sweep.py [--data data/demo] [--epochs 8] [--grace 1] [--reduction-factor 3] [--keep]
Takes ~20 min on 2 CPU cores (the grid trains 96 trial-epochs).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import ray
import yaml

from lt_models.synthetic import generate_benchmark
from pipelines import sweep
from pipelines.config import load_experiment_config


def make_config(root: Path, data: Path, name: str, scheduler: dict, epochs: int, samples: int) -> object:
    raw = {
        "name": name,
        "seed": 0,
        "data": {"train": str(data / "train.json"), "val": str(data / "val.json"),
                 "hierarchy": str(data / "hierarchy.json")},
        "model": {"backbone": "tiny", "image_size": 128},
        "stage1": {"epochs": 3, "batch_size": 8, "lr": 0.02, "warmup": 20},
        # step decay before the last epochs, as in the papers' 1x schedules (7 epochs, lr /10 after 4 and 6)
        "stage2": {"epochs": epochs, "batch_size": 8, "lr": 0.01, "warmup": 10, "samples_per_epoch": samples,
                   "lr_steps": [epochs - 2],
                   "sampler": "softbalance", "xi": 0.5},
        "eval": {"every": 1},
        "resources": {"cpus_per_trial": 1},
        "scheduler": scheduler,
        "search": {"num_samples": 1, "max_concurrent_trials": 2, "seed": 0},
        # the paper's Table 3 λ grid x the two losses: 12 configurations
        "space": {"lam": {"grid": [0.0, 0.3, 0.5, 0.7, 1.0, 1.5]}, "loss": {"grid": ["concurrent_softmax", "acsl"]}},
        "run": {"storage_path": str(root / "results"), "max_failures": 1, "checkpoints_to_keep": 1},
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_experiment_config(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("data/demo"), help="demo benchmark (generated if absent)")
    ap.add_argument("--epochs", type=int, default=8, help="stage-2 epochs (= evaluations) of a full trial")
    ap.add_argument("--samples-per-epoch", type=int, default=64)
    ap.add_argument("--grace", type=int, default=1, help="ASHA grace period (evaluations)")
    ap.add_argument("--reduction-factor", type=float, default=3)
    ap.add_argument("--keep", action="store_true", help="keep the results dir (default: a temp dir, removed)")
    args = ap.parse_args(argv)

    data = args.data.resolve()
    if not (data / "train.json").is_file():
        generate_benchmark(data, preset="demo", seed=0)
    root = Path(tempfile.mkdtemp(prefix="bench_sweep-"))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        grid_cfg = make_config(root, data, "grid", {"type": "fifo"}, args.epochs, args.samples_per_epoch)
        asha_cfg = make_config(root, data, "asha", {"type": "asha", "grace_period": args.grace,
                                                    "reduction_factor": args.reduction_factor, "max_t": args.epochs},
                               args.epochs, args.samples_per_epoch)
        t0 = time.time()
        grid = sweep.run_sweep(grid_cfg, progress=False)
        t_grid = time.time() - t0
        t0 = time.time()
        asha = sweep.run_sweep(asha_cfg, progress=False)
        t_asha = time.time() - t0
    finally:
        ray.shutdown()

    for s in (grid, asha):
        sweep.print_summary(s)
    key = lambda t: tuple(sorted(t.config.items())) if t is not None else None  # noqa: E731
    same_best = grid.best is not None and key(grid.best) == key(asha.best)
    pretrain_runs = sum(1 for s in (grid, asha) if s.stage1 is not None and s.stage1.trained)
    n_trials = len(grid.trials) + len(asha.trials)
    stage1_epochs = grid_cfg.stage1.epochs
    detail = {
        "grid_trial_epochs": grid.trial_epochs, "asha_trial_epochs": asha.trial_epochs,
        "grid_seconds": round(t_grid, 1), "asha_seconds": round(t_asha, 1),
        "asha_stopped_early": asha.stopped_early, "trials_per_sweep": len(grid.trials),
        "grid_best": grid.best.config if grid.best else None, "asha_best": asha.best.config if asha.best else None,
        "grid_best_AP": grid.best.metrics.get("AP") if grid.best else None,
        "asha_best_AP": asha.best.metrics.get("AP") if asha.best else None,
        "stage1_seconds": round(grid.stage1.seconds, 1) if grid.stage1 else None,
        "stage1_epochs_trained": pretrain_runs * stage1_epochs,
        "stage1_epochs_without_reuse": n_trials * stage1_epochs,
        "stage1_seconds_saved_estimate": round((n_trials - pretrain_runs) * grid.stage1.seconds, 1)
        if grid.stage1 else None,
        "errored_trials": grid.errored + asha.errored,
    }
    print("detail: " + json.dumps(detail))
    if args.keep:
        print(f"results kept in {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    fraction = asha.trial_epochs / grid.trial_epochs if grid.trial_epochs else float("nan")
    print(json.dumps({"benchmark": "sweep", "asha_epochs_fraction_of_grid": round(fraction, 4),
                      "same_best": bool(same_best), "pretrain_runs": pretrain_runs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
