"""Benchmark: the bootstrap over validation images, 1000 replicates of LVIS AP, from the matched detections.

Two generated cases (``bench_eval.make_lvis_val_case``, seeded): LVIS v1 val size (20,000 images, 1,203 categories:
337 rare / 461 common / 405 frequent, 300 detections per image, 6 M detections) and the demo's size (119 images,
30 categories, 100 detections per image). For each: one ``evaluate_lvis(..., keep_matches=True)`` (the anchor:
what one replicate would cost if the evaluator ran again on the resampled images), then ``weighted_ap`` over 1000
bootstrap replicates (multinomial image weights). The AP of the replicates with all weights 1 is checked against
the evaluator's AP in the same run.

Goals: 1000 replicates at LVIS v1 val size in <= 60 s on 2 cores; at demo size in <= 2 s.

Usage: python benchmarks/bench_bootstrap.py [--replicates 1000] [--lvis-images 20000] [--skip-lvis]
Last stdout line: {"benchmark": "bootstrap", "lvis_v1_s": ..., "demo_s": ..., ...}
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_eval import make_lvis_val_case

from lt_models.evaluation import evaluate_lvis
from lt_models.evaluation.bootstrap import image_weights, weighted_ap

LVIS_V1 = (337, 461, 405)
DEMO = (10, 10, 10)


def run_case(name: str, n_images: int, buckets, dets_per_image: int, replicates: int) -> dict:
    print(f"== {name}: {n_images} images, {sum(buckets)} categories, {dets_per_image} dets/image", flush=True)
    gt, dets = make_lvis_val_case(n_images, seed=0, dets_per_image=dets_per_image, buckets=buckets)
    t0 = time.perf_counter()
    res = evaluate_lvis(gt, dets, keep_matches=True)
    eval_s = time.perf_counter() - t0
    m = res.pop("matches")
    del gt, dets
    unit = weighted_ap(m, np.ones((m.n_images, 1)))
    diff = max(abs(float(unit[k][0]) - res[k]) for k in ("AP", "APr", "APc", "APf"))
    w = image_weights(m.n_images, replicates, np.random.default_rng(0))
    t0 = time.perf_counter()
    reps = weighted_ap(m, w, threads=2)  # this machine's 2 cores
    boot_s = time.perf_counter() - t0
    ap = reps["AP"]
    out = {
        "images": m.n_images,
        "categories": m.n_categories,
        "matched_detections": len(m.det_cat),
        "evaluate_s": round(eval_s, 2),
        "bootstrap_s": round(boot_s, 2),
        "per_replicate_ms": round(1000 * boot_s / replicates, 2),
        "vs_rerunning_the_evaluator": round(eval_s * replicates / boot_s, 1),
        "unit_weights_max_abs_diff": diff,
        "AP": round(res["AP"], 4),
        "AP_boot_sd": round(float(np.nanstd(ap, ddof=1)), 5),
    }
    print(json.dumps({name: out}), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--replicates", type=int, default=1000)
    ap.add_argument("--lvis-images", type=int, default=20000)
    ap.add_argument("--skip-lvis", action="store_true", help="the demo-sized case only")
    args = ap.parse_args(argv)
    demo = run_case("demo", 119, DEMO, 100, args.replicates)
    lvis = None if args.skip_lvis else run_case("lvis_v1_val", args.lvis_images, LVIS_V1, 300, args.replicates)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    line = {
        "benchmark": "bootstrap",
        "replicates": args.replicates,
        "demo_s": demo["bootstrap_s"],
        "demo_goal_s": 2.0,
        "lvis_v1_s": None if lvis is None else lvis["bootstrap_s"],
        "lvis_v1_goal_s": 60.0,
        "lvis_v1_vs_rerunning_the_evaluator": None if lvis is None else lvis["vs_rerunning_the_evaluator"],
        "unit_weights_max_abs_diff": max(d["unit_weights_max_abs_diff"] for d in (demo, lvis) if d),
        "peak_rss_mb": round(peak),
    }
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
