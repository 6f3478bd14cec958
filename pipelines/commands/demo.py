"""`ltsweep demo` (`make demo`): the whole product in a few minutes on a 2-core CPU.

1. generate the synthetic demo benchmark in DATA (if absent) and print its long-tail statistics;
2. train the shared stage-1 (non-balance, softmax) checkpoint once;
3. run an ASHA sweep of 8 stage-2 trials over λ (soft-balance), the loss (concurrent softmax / ACSL) and ξ
   (search_spaces/demo.yaml);
4. print every trial's AP, APr, APc, APf and epochs, the best configuration, how many trials ASHA stopped
   early, and the commands that open MLflow and TensorBoard.
Each demo run is its own sweep (demo-<timestamp>) under results/, so runs can be compared in MLflow.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import search_spaces
from pipelines.analysis import aggregate
from pipelines.config.load import load_experiment_config
from pipelines.names import BUCKET_METRICS
from pipelines.tune.sweep import run_sweep


def _print_stats(train_json: Path) -> None:
    try:
        from lt_models.data.stats import dataset_stats, format_stats
    except ImportError:  # pragma: no cover - the data layer ships both
        return
    print(format_stats(dataset_stats(train_json, lam=0.7)))


def run_demo(data_dir: os.PathLike = Path("data/demo"), seed: int = 0) -> int:
    """Run the embedded demo; return a process exit code (0 = every trial finished without error)."""
    t0 = time.time()
    data_dir = Path(data_dir).expanduser().resolve()
    train_json = data_dir / "train.json"
    if not train_json.is_file():
        from lt_models.data.synthetic.generate import generate_benchmark

        print(f"== generating the synthetic demo benchmark in {data_dir} (seed {seed})", flush=True)
        generate_benchmark(data_dir, preset="demo", seed=seed)
    print(f"== long-tail statistics of {train_json}", flush=True)
    _print_stats(train_json)

    name = f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    overrides = [f"name={name}", f"seed={seed}", f"data.train={train_json}", f"data.val={data_dir / 'val.json'}"]
    hierarchy = data_dir / "hierarchy.json"
    overrides.append(f"data.hierarchy={hierarchy}" if hierarchy.is_file() else "data.hierarchy=null")
    cfg = load_experiment_config(search_spaces.path("demo"), overrides)
    print(
        f"\n== sweep {name}: stage 1 once, then {_n_trials(cfg)} stage-2 trials under ASHA "
        f"(storage {cfg.run.storage_path})",
        flush=True,
    )
    summary = run_sweep(cfg, include_dashboard=False)

    print(f"\n== demo summary ({time.time() - t0:.0f} s)")
    hdr = (
        f"{'trial':<28}{'lam':>6}  {'loss':<20}{'xi':>5}"
        + "".join(f"{m:>8}" for m in BUCKET_METRICS)
        + f"{'epochs':>8}  status"
    )
    print(hdr)
    for t in sorted(summary.trials, key=lambda t: t.trial_id):
        c = t.config
        status = "ERROR" if t.error else ("stopped early" if t.stopped_early else "ran to the end")
        print(
            f"{t.trial_id:<28}{c.get('lam', '-'):>6}  {str(c.get('loss', '-')):<20}{c.get('xi', '-'):>5}"
            + "".join(f"{t.metrics.get(m, float('nan')):>8.3f}" for m in BUCKET_METRICS)
            + f"{t.epochs:>8}  {status}"
        )
    best = summary.best_config
    print("\nper configuration over its seeds (mean [95% interval]):")
    print(aggregate.format_table(summary.configs, best=best))
    print(aggregate.method_line(summary.configs))
    if best is not None:
        print(
            f"best configuration: {best.label()} (AP {best.stats['AP'].text()}, APr {best.stats['APr'].text()}, "
            f"n={best.n})"
        )
        for sentence in summary.comparisons():
            print(sentence)
    print(
        f"ASHA stopped {summary.stopped_early} of {len(summary.trials)} trials early; "
        f"{summary.trial_epochs} trial-epochs instead of {len(summary.trials) * cfg.stage2.epochs} for the "
        "full grid"
    )
    for seed, ckpt in (summary.stage1 or {}).items():
        print(f"stage 1 ({ckpt.sha256[:12]}, seed {seed}) was trained once and restored by every trial of that seed")
    if summary.model is not None:
        print(
            f"best model: {summary.model.uri} (load: mlflow.pyfunc.load_model({summary.model.uri!r})"
            ".predict(image_hwc_uint8); see docs/dashboards.md)"
        )
    print("\nopen the dashboards:")
    print(f"  mlflow ui --backend-store-uri {summary.tracking_uri} --host 127.0.0.1")
    if summary.experiment_id is not None:
        from pipelines.mlflow_io.client import runs_table_url

        print(f"  # then {runs_table_url(summary.experiment_id)}")
    print(f"  tensorboard --logdir {summary.experiment_path} --host 127.0.0.1        # then http://127.0.0.1:6006")
    sys.stdout.flush()
    return summary.exit_code()


def _n_trials(cfg) -> int:
    n = cfg.search.num_samples
    for p in cfg.space.values():
        if p.kind == "grid":
            n *= len(p.grid)
    return n
