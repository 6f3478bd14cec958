"""Sigmoid-type stage 2 after a softmax stage 1 (hybrid schedule): AP before and after the classifier switch.

For each seed, on the synthetic demo benchmark (tiny backbone, 128 px):
  stage 1  3 epochs, batch 8, lr 0.02, warm-up 20 iterations, non-balance sampling, conventional softmax CE;
  stage 2  from that checkpoint, 4 epochs of 160 soft-balance (λ = 0.7) images, batch 8, lr 0.01, warm-up 10, all
           layers, one run per arm:
             softmax      conventional softmax CE (the reference);
             acsl_before  ACSL ξ = 0.7 with the stage-1 classifier as it is (``classifier_switch.AUTO_SWITCH`` off);
             acsl_after   ACSL ξ = 0.7 with the classifier switch (``lt_models.modeling.classifier_switch``, background-
                          relative logits; what ``engine.train`` does by default);
             bce_before / bce_after   the same pair for plain sigmoid BCE.
Every run evaluates once, after its last epoch (LVIS AP with training-frequency r/c/f buckets). Runs use 1 torch
thread each, two at a time in "spawn" worker processes. Per arm: mean AP / APr / APf with a 95% t interval over the
seeds (scipy.stats.t); then the paired difference acsl_after − softmax in AP and APr (scipy.stats.ttest_rel, its
confidence_interval()). Goal: acsl_after mean AP >= 80% of softmax's.

Usage: python benchmarks/bench_acsl_switch.py [--data /work/data_demo] [--seeds 0 1 2] [--work DIR] [--workers 2]
Last stdout line: {"benchmark": "acsl_switch", "seeds": 3, "softmax_AP": .., "acsl_before_AP": .., "acsl_after_AP": ..,
"acsl_after_over_softmax_AP": .., "APr_diff": .., "APr_diff_ci": [lo, hi], "APr_p": .., ...}
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from scipy import stats

ARMS = {  # name: (loss, classifier switch on)
    "softmax": ("softmax", True),
    "acsl_before": ("acsl", False),
    "acsl_after": ("acsl", True),
    "bce_before": ("bce", False),
    "bce_after": ("bce", True),
}
METRICS = ("AP", "APr", "APc", "APf")


def _spec(data: Path, stage: str, seed: int, loss: str):
    from lt_models.data.sampler_spec import SamplerSpec
    from lt_models.engine.spec import STAGE1_SAMPLER, TrainSpec
    from lt_models.losses.registry import LossSpec

    common = dict(
        train_ann=str(data / "train.json"),
        val_ann=str(data / "val.json"),
        hierarchy_file=str(data / "hierarchy.json") if (data / "hierarchy.json").exists() else None,
        backbone="tiny",
        image_size=128,
        batch_size=8,
        lr_steps=(),
        seed=seed,
        num_threads=1,
        device="cpu",
        progress=False,
    )
    if stage == "stage1":
        return TrainSpec(
            stage="stage1",
            sampler=STAGE1_SAMPLER,
            loss=LossSpec("softmax"),
            epochs=3,
            lr=0.02,
            warmup=20,
            eval_every=3,
            **common,
        )
    return TrainSpec(
        stage="stage2",
        sampler=SamplerSpec("softbalance", lam=0.7, num_samples=160),
        loss=LossSpec("acsl", xi=0.7) if loss == "acsl" else LossSpec(loss),
        epochs=4,
        lr=0.01,
        warmup=10,
        eval_every=4,
        **common,
    )


def run_job(job: dict) -> dict:
    """One training run in a worker process: stage 1 (job["arm"] is None) or one stage-2 arm."""
    import torch

    import lt_models.modeling.classifier_switch as switch
    from lt_models.engine.loop import train

    torch.set_num_threads(1)
    data, work, seed, arm = Path(job["data"]), Path(job["work"]), job["seed"], job["arm"]
    t0 = time.perf_counter()
    if arm is None:
        metrics = train(_spec(data, "stage1", seed, "softmax"), work / f"stage1_seed{seed}")
    else:
        loss, on = ARMS[arm]
        switch.AUTO_SWITCH = on
        metrics = train(_spec(data, "stage2", seed, loss), work / f"{arm}_seed{seed}", init_checkpoint=job["init"])
    out = {k: float(metrics[k]) for k in METRICS}
    out.update(seed=seed, arm=arm or "stage1", seconds=time.perf_counter() - t0, checkpoint=metrics["checkpoint_dir"])
    return out


def mean_ci(values) -> tuple[float, float, float]:
    """Mean and 95% t interval over the seeds."""
    x = np.asarray(values, dtype=float)
    m = float(x.mean())
    if len(x) < 2:
        return m, math.nan, math.nan
    h = float(stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return m, m - h, m + h


def paired(a, b) -> tuple[float, float, float, float]:
    """Mean of a − b, its 95% interval and the p-value of the paired t-test."""
    res = stats.ttest_rel(a, b)
    ci = res.confidence_interval(0.95)
    return float(np.mean(np.subtract(a, b))), float(ci.low), float(ci.high), float(res.pvalue)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--data", type=str, default="/work/data_demo", help="synthetic demo benchmark dir (generated there if absent)"
    )
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--work", type=str, default=None, help="keep checkpoints here (default: a temp dir)")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    data = Path(args.data)
    if not (data / "train.json").exists():
        from lt_models.data.synthetic.generate import generate_benchmark

        print(f"generating the demo benchmark in {data}", flush=True)
        generate_benchmark(data, preset="demo", seed=0)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        print(
            f"data={data} seeds={args.seeds} arms={args.arms} workers={args.workers} (1 torch thread each)", flush=True
        )
        results: dict[str, dict[int, dict]] = {arm: {} for arm in args.arms}
        t0 = time.perf_counter()
        with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as ex:
            pending = {ex.submit(run_job, dict(data=str(data), work=str(work), seed=s, arm=None)) for s in args.seeds}
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    r = fut.result()
                    print(
                        f"  {r['arm']:<12} seed {r['seed']}: AP {r['AP']:.4f} APr {r['APr']:.4f} "
                        f"APf {r['APf']:.4f} ({r['seconds']:.0f} s)",
                        flush=True,
                    )
                    if r["arm"] == "stage1":
                        pending |= {
                            ex.submit(
                                run_job,
                                dict(data=str(data), work=str(work), seed=r["seed"], arm=arm, init=r["checkpoint"]),
                            )
                            for arm in args.arms
                        }
                    else:
                        results[r["arm"]][r["seed"]] = r
        print(f"all runs: {time.perf_counter() - t0:.0f} s", flush=True)

    seeds = sorted(args.seeds)
    per = {arm: {k: [results[arm][s][k] for s in seeds] for k in METRICS} for arm in args.arms}
    print(f"\nstage 2 after a softmax stage 1, {len(seeds)} seeds: mean [95% CI]")
    print(f"{'arm':<12} {'AP':>24} {'APr':>24} {'APf':>24}")
    for arm in args.arms:
        cells = []
        for k in ("AP", "APr", "APf"):
            m, lo, hi = mean_ci(per[arm][k])
            cells.append(f"{m:.4f} [{lo:.4f}, {hi:.4f}]")
        print(f"{arm:<12} " + " ".join(f"{c:>24}" for c in cells))
    print("per seed AP: " + "; ".join(f"{arm} " + ", ".join(f"{v:.4f}" for v in per[arm]["AP"]) for arm in args.arms))

    summary = {"benchmark": "acsl_switch", "seeds": len(seeds)}
    for arm in args.arms:
        summary[f"{arm}_AP"] = round(float(np.mean(per[arm]["AP"])), 4)
    if {"softmax", "acsl_after"} <= set(args.arms):
        sm, acsl = per["softmax"], per["acsl_after"]
        ratio = float(np.mean(acsl["AP"]) / np.mean(sm["AP"]))
        print("\npaired difference acsl_after − softmax (95% CI, paired t-test p):")
        for k in ("AP", "APr"):
            d, lo, hi, p = paired(acsl[k], sm[k])
            print(f"  {k:<4} {d:+.4f} [{lo:+.4f}, {hi:+.4f}]  p = {p:.3g}")
            summary.update(
                {f"{k}_diff": round(d, 4), f"{k}_diff_ci": [round(lo, 4), round(hi, 4)], f"{k}_p": round(p, 4)}
            )
        print(
            f"acsl_after mean AP / softmax mean AP = {ratio:.3f} (goal >= 0.80: {'met' if ratio >= 0.8 else 'NOT met'})"
        )
        summary["acsl_after_over_softmax_AP"] = round(ratio, 4)
        summary["goal_met"] = ratio >= 0.8
    order = [
        "benchmark",
        "seeds",
        "softmax_AP",
        "acsl_before_AP",
        "acsl_after_AP",
        "acsl_after_over_softmax_AP",
        "APr_diff",
        "APr_diff_ci",
        "APr_p",
    ]
    print(
        json.dumps(
            {k: summary[k] for k in order if k in summary} | {k: v for k, v in summary.items() if k not in order}
        )
    )


if __name__ == "__main__":
    main()
