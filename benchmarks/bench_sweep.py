"""ASHA vs the full grid on the same search space and the same seeds, over the synthetic demo benchmark on CPU.

The sweeps search λ (soft-balance) x loss (concurrent softmax, ACSL) = 8 configurations, each run with 3 training
seeds (`search.seeds`), with the hybrid schedule. The anchor is the full grid (FIFO: every trial trains every
stage-2 epoch). ASHA is `scheduler.type: asha_configs` (grace 1, reduction factor 3: rungs after 1 and 3
evaluations), which promotes configurations on their mean over seeds (pipelines/tune/asha.py); a third sweep runs Tune's
per-trial ASHA (`scheduler.type: asha`) on the same grid for comparison (--no-tune-asha skips it). Reported:
  - total trial-epochs each sweep trained, and ASHA's as a fraction of the grid's (goal: <= 0.35);
  - the pick of each sweep (best mean AP over seeds among configurations whose runs all ran to the end), whether
    ASHA's pick is the grid's best, and whether it is tied with it: the grid's 95% CIs of the two configurations
    overlap (measured on the grid's own full runs of both);
  - stage 1: one training per seed, shared by every sweep's trials.
All sweeps run in one Ray session in this process. The last stdout line is one JSON object:
  {"benchmark": "sweep", "asha_epochs_fraction_of_grid": ..., "same_best": ..., "tied_with_best": ...,
   "pretrain_runs": ..., "seeds": ...}

    python benchmarks/bench_sweep.py [--data data/demo] [--epochs 8] [--seeds 0 1 2] [--keep]
Takes ~25 min on 2 CPU cores (the grid trains 192 trial-epochs of 64 images).
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

from lt_models.data.synthetic.generate import generate_benchmark
from pipelines.config.load import load_experiment_config
from pipelines.tune import sweep


def make_config(
    root: Path, data: Path, name: str, scheduler: dict, epochs: int, samples: int, seeds: list[int]
) -> object:
    raw = {
        "name": name,
        "seed": 0,
        "data": {
            "train": str(data / "train.json"),
            "val": str(data / "val.json"),
            "hierarchy": str(data / "hierarchy.json"),
        },
        "model": {"backbone": "tiny", "image_size": 128},
        "stage1": {"epochs": 3, "batch_size": 8, "lr": 0.02, "warmup": 20},
        # step decay before the last epochs, as in the papers' 1x schedules (7 epochs, lr /10 after 4 and 6)
        "stage2": {
            "epochs": epochs,
            "batch_size": 8,
            "lr": 0.01,
            "warmup": 10,
            "samples_per_epoch": samples,
            "lr_steps": [epochs - 2],
            "sampler": "softbalance",
            "xi": 0.5,
        },
        "eval": {"every": 1},
        "resources": {"cpus_per_trial": 1},
        "scheduler": scheduler,
        "search": {"num_samples": 1, "max_concurrent_trials": 2, "seed": 0, "seeds": seeds},
        # λ x the two losses: 8 configurations, each once per seed
        "space": {"lam": {"grid": [0.0, 0.5, 1.0, 1.5]}, "loss": {"grid": ["concurrent_softmax", "acsl"]}},
        "run": {"storage_path": str(root / "results"), "max_failures": 1, "checkpoints_to_keep": 1},
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_experiment_config(path)


def pick_vs_grid(grid, early) -> tuple[bool, bool, object]:
    """Is the early-stopping sweep's pick the grid's best, or tied with it: on the grid's own runs, the 95% CIs of
    the pick and of the grid's best overlap?"""
    grid_best, pick = grid.best_config, early.best_config
    same = grid_best is not None and pick is not None and grid_best.config == pick.config
    pick_in_grid = next((c for c in grid.configs if pick is not None and c.config == pick.config), None)
    tied = same or (
        grid_best is not None
        and pick_in_grid is not None
        and pick_in_grid.stats["AP"].ci_high >= grid_best.stats["AP"].ci_low
    )
    return same, tied, pick_in_grid


def ci(c) -> list | None:
    return (
        None
        if c is None
        else [round(c.stats["AP"].mean, 4), round(c.stats["AP"].ci_low, 4), round(c.stats["AP"].ci_high, 4)]
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("data/demo"), help="demo benchmark (generated if absent)")
    ap.add_argument("--epochs", type=int, default=8, help="stage-2 epochs (= evaluations) of a full trial")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds of every configuration")
    ap.add_argument("--samples-per-epoch", type=int, default=64)
    ap.add_argument("--grace", type=int, default=1, help="ASHA grace period (evaluations)")
    ap.add_argument("--reduction-factor", type=float, default=3)
    ap.add_argument(
        "--no-tune-asha", action="store_true", help="skip the third sweep (Tune's per-trial ASHA, for comparison)"
    )
    ap.add_argument("--keep", action="store_true", help="keep the results dir (default: a temp dir, removed)")
    args = ap.parse_args(argv)

    data = args.data.resolve()
    if not (data / "train.json").is_file():
        generate_benchmark(data, preset="demo", seed=0)
    root = Path(tempfile.mkdtemp(prefix="bench_sweep-"))
    asha = {"grace_period": args.grace, "reduction_factor": args.reduction_factor, "max_t": args.epochs}
    kinds = {"grid": {"type": "fifo"}, "asha": {"type": "asha_configs", **asha}}
    if not args.no_tune_asha:
        kinds["tune_asha"] = {"type": "asha", **asha}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    sweeps, seconds, cfgs = {}, {}, {}
    try:
        for name, scheduler in kinds.items():
            cfgs[name] = make_config(root, data, name, scheduler, args.epochs, args.samples_per_epoch, args.seeds)
            t0 = time.time()
            sweeps[name] = sweep.run_sweep(cfgs[name], progress=False)
            seconds[name] = round(time.time() - t0, 1)
    finally:
        ray.shutdown()

    for s in sweeps.values():
        sweep.print_summary(s)
    grid, early = sweeps["grid"], sweeps["asha"]
    same_best, tied, pick_in_grid = pick_vs_grid(grid, early)
    pretrain_runs = len({c.sha256 for s in sweeps.values() for c in (s.stage1 or {}).values() if c.trained})
    n_trials = sum(len(s.trials) for s in sweeps.values())
    stage1_epochs = cfgs["grid"].stage1.epochs
    detail = {
        "grid_trial_epochs": grid.trial_epochs,
        "asha_trial_epochs": early.trial_epochs,
        "seconds": seconds,
        "asha_stopped_early": early.stopped_early,
        "trials_per_sweep": len(grid.trials),
        "seeds": args.seeds,
        "grid_best": grid.best_config.config if grid.best_config else None,
        "asha_best": early.best_config.config if early.best_config else None,
        "grid_best_AP_mean_ci": ci(grid.best_config),
        "asha_pick_AP_mean_ci_in_grid": ci(pick_in_grid),
        "asha_pick_AP_mean_ci_in_asha": ci(early.best_config),
        "stage1_seconds": round(sum(c.seconds for c in (grid.stage1 or {}).values()), 1),
        "stage1_epochs_trained": pretrain_runs * stage1_epochs,
        "stage1_epochs_without_reuse": n_trials * stage1_epochs,
        "errored_trials": sum(s.errored for s in sweeps.values()),
    }
    if "tune_asha" in sweeps:  # the per-trial rule on the same grid and seeds
        t_same, t_tied, _ = pick_vs_grid(grid, sweeps["tune_asha"])
        detail["tune_asha"] = {
            "trial_epochs": sweeps["tune_asha"].trial_epochs,
            "fraction_of_grid": round(sweeps["tune_asha"].trial_epochs / grid.trial_epochs, 4),
            "best": (sweeps["tune_asha"].best_config.config if sweeps["tune_asha"].best_config else None),
            "best_ran_full_schedule": bool(sweeps["tune_asha"].best_config and sweeps["tune_asha"].best_config.full),
            "same_best": bool(t_same),
            "tied_with_best": bool(t_tied),
        }
    print("detail: " + json.dumps(detail))
    if args.keep:
        print(f"results kept in {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    fraction = early.trial_epochs / grid.trial_epochs if grid.trial_epochs else float("nan")
    print(
        json.dumps(
            {
                "benchmark": "sweep",
                "asha_epochs_fraction_of_grid": round(fraction, 4),
                "same_best": bool(same_best),
                "tied_with_best": bool(tied),
                "pretrain_runs": pretrain_runs,
                "seeds": len(args.seeds),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
