"""Benchmark: lt_models.evaluation.evaluate_lvis against lvis-api's LVISEval on an LVIS v0.5 val-sized case.

The case is generated here (seeded): 5000 images, 1230 categories (454 rare / 461 common / 315 frequent, as in
LVIS v0.5), about 10 objects per image over a few categories each, federated fields (neg_category_ids,
not_exhaustive_category_ids), and 300 detections per image. Some detections sit near objects with the right or
a confused class, the rest are background boxes. Scores are rounded to 3 decimals so ties occur.

Both evaluators get the same input (the list of result dicts) in the same process. lvis-api runs through
lvis_oracle, and its timing covers LVIS index creation, LVISResults and LVISEval.run(). Our timing is the
median of 3 calls of evaluate_lvis. peak_rss_mb is the process's peak resident memory just after our evaluator
ran and before lvis-api starts. It includes the generated case (1.5 M result dicts, most of it). The
"ltsweep evaluate_lvis" line gives the evaluator's own increment. lvis-api's peak is printed too.

Other LVIS evaluators, when installed (``pip install hotcoco ultrafast-pycocotools``), and ours run on the same case,
each in child processes of its own (``--backends``): the time of the evaluation from the loaded case (their own
ground-truth object and result list) and the peak memory above it, the time from the detection file's path (its
parsing included: ours streams it) and the peak above the start, and the largest difference from lvis-api over the
summary metrics (``backends`` in the JSON line).

All of them equal lvis-api on that case, so each installed backend is also checked on the edge cases of
``make_case`` in lvis_oracle (seeds 0-2, 40 images, 10 classes: zero-area detections, gt ``ignore`` flags, score
ties, non-contiguous ids, federated fields), in this process, against lvis-api: the largest |difference| over the
summary metrics and seeds (``edge_case_max_abs_diff``). ``chosen_backend`` is the fastest one from the loaded case
among those within 1e-12 of lvis-api both on the big case and on the edge cases. With --skip-lvis there is no
oracle, so both are null.

Usage: python benchmarks/bench_eval.py [--images 5000] [--seed 0] [--skip-lvis] [--backends ltsweep hotcoco ultrafast]
Last stdout line: {"benchmark": "eval", "speedup_vs_lvis_api": ..., "max_abs_diff": ..., "peak_rss_mb": ...,
"backends": {name: {"seconds", "peak_above_case_mb", "max_abs_diff_vs_lvis_api", "from_file_seconds",
"from_file_peak_above_start_mb", "edge_case_max_abs_diff"} or {"missing": why}}, "chosen_backend": name or null}
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lt_models.evaluation import evaluate_lvis

N_RARE, N_COMMON, N_FREQ = 454, 461, 315


def make_lvis_val_case(
    n_images: int = 5000,
    seed: int = 0,
    objects_per_image: float = 10.0,
    dets_per_image: int = 300,
    buckets: tuple[int, int, int] = (N_RARE, N_COMMON, N_FREQ),
) -> tuple[dict, list[dict]]:
    """The generated case (see the module docstring); ``buckets``: the numbers of rare, common and frequent
    categories (LVIS v0.5 by default)."""
    rng = np.random.default_rng(seed)
    n_cat = sum(buckets)
    freq = np.array(["r"] * buckets[0] + ["c"] * buckets[1] + ["f"] * buckets[2])
    rng.shuffle(freq)
    cat_ids = np.arange(1, n_cat + 1)
    # sampling weight of a category in an image: frequent >> common >> rare
    w = np.where(freq == "f", 40.0, np.where(freq == "c", 3.0, 0.3)) * rng.uniform(0.5, 1.5, n_cat)
    w /= w.sum()
    cats = [
        {
            "id": int(c),
            "name": f"class_{c}",
            "synset": f"class_{c}.n.01",
            "frequency": str(f),
            "image_count": int({"r": 5, "c": 50, "f": 500}[f]),
        }
        for c, f in zip(cat_ids, freq)
    ]
    images, anns, dets = [], [], []
    sizes = np.array([12, 20, 28, 40, 60, 90, 130, 200, 300])
    aid = 1
    for i in range(n_images):
        img_id = int(i * 3 + 1)
        W, H = 640, 480
        n_img_cats = min(1 + rng.poisson(2.5), 8)
        img_cats = rng.choice(cat_ids, size=n_img_cats, replace=False, p=w)
        n_obj = max(1, int(rng.poisson(objects_per_image)))
        obj_cat = img_cats[rng.integers(0, n_img_cats, n_obj)]
        s = rng.choice(sizes, n_obj).astype(float)
        bw = np.round(s * rng.uniform(0.6, 1.5, n_obj), 2)
        bh = np.round(s * rng.uniform(0.6, 1.5, n_obj), 2)
        bx = np.round(rng.uniform(0, 1, n_obj) * np.maximum(W - bw, 1), 2)
        by = np.round(rng.uniform(0, 1, n_obj) * np.maximum(H - bh, 1), 2)
        area = np.round(bw * bh * rng.uniform(0.55, 0.95, n_obj), 2)  # mask area < box area, as in LVIS
        for k in range(n_obj):
            anns.append(
                {
                    "id": aid,
                    "image_id": img_id,
                    "category_id": int(obj_cat[k]),
                    "bbox": [float(bx[k]), float(by[k]), float(bw[k]), float(bh[k])],
                    "area": float(area[k]),
                }
            )
            aid += 1
        present = set(obj_cat.tolist())
        neg = [int(c) for c in rng.choice(cat_ids, size=12, replace=False, p=w) if c not in present][:8]
        nel = [int(c) for c in present if rng.random() < 0.1]
        images.append(
            {
                "id": img_id,
                "width": W,
                "height": H,
                "neg_category_ids": sorted(neg),
                "not_exhaustive_category_ids": sorted(nel),
            }
        )
        # detections: 40% around objects (80% right class), 60% background boxes (25% of those on
        # classes verified in the image)
        n_near = int(0.4 * dets_per_image)
        n_bg = dets_per_image - n_near
        src = rng.integers(0, n_obj, n_near)
        jit = rng.normal(0, 0.12, (n_near, 4))
        nx = bx[src] + jit[:, 0] * bw[src]
        ny = by[src] + jit[:, 1] * bh[src]
        nw = np.maximum(bw[src] * (1 + jit[:, 2]), 1.0)
        nh = np.maximum(bh[src] * (1 + jit[:, 3]), 1.0)
        nc = np.where(rng.random(n_near) < 0.8, obj_cat[src], rng.choice(cat_ids, n_near, p=w))
        verified = np.array(sorted(present) + neg)
        bs = rng.choice(sizes, n_bg).astype(float)
        gw = bs * rng.uniform(0.5, 1.5, n_bg)
        gh = bs * rng.uniform(0.5, 1.5, n_bg)
        gx = rng.uniform(0, 1, n_bg) * np.maximum(W - gw, 1)
        gy = rng.uniform(0, 1, n_bg) * np.maximum(H - gh, 1)
        gc = np.where(
            rng.random(n_bg) < 0.25, verified[rng.integers(0, len(verified), n_bg)], rng.choice(cat_ids, n_bg, p=w)
        )
        score = np.round(np.concatenate([rng.beta(4, 2, n_near), rng.beta(1.5, 5, n_bg)]), 3)
        xs = np.concatenate([nx, gx]).tolist()
        ys = np.concatenate([ny, gy]).tolist()
        ws = np.concatenate([nw, gw]).tolist()
        hs = np.concatenate([nh, gh]).tolist()
        cs = np.concatenate([nc, gc]).tolist()
        sc = score.tolist()
        for k in range(dets_per_image):
            dets.append(
                {"image_id": img_id, "category_id": int(cs[k]), "bbox": [xs[k], ys[k], ws[k], hs[k]], "score": sc[k]}
            )
    gt = {"info": {}, "licenses": [], "images": images, "annotations": anns, "categories": cats}
    return gt, dets


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _status_mb(field: str) -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def _current_rss_mb() -> float:
    return _status_mb("VmRSS")


def _reset_peak() -> None:
    """Start the peak (VmHWM) afresh at the current RSS (Linux): a child's ru_maxrss starts at the parent's RSS at
    the fork, which would count the parent's memory as the child's."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _hwm_mb() -> float:
    return _status_mb("VmHWM")


def run_lvis_api(gt: dict, dets: list[dict]) -> tuple[dict, float]:
    from lvis import LVISEval, LVISResults

    from lvis_oracle import lvis_from_dict

    t0 = time.perf_counter()
    with warnings.catch_warnings():  # lvis 0.5.3 calls the deprecated Logger.warn
        warnings.simplefilter("ignore", DeprecationWarning)
        lvis_gt = lvis_from_dict(gt)
        lvis_dt = LVISResults(lvis_gt, dets, max_dets=300)
        ev = LVISEval(lvis_gt, lvis_dt, iou_type="bbox")
        ev.run()
    dt = time.perf_counter() - t0
    return {k: float(v) for k, v in ev.get_results().items()}, dt


SUMMARY_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")


def _ltsweep(gt_path: str):
    return json.loads(Path(gt_path).read_text()), evaluate_lvis


def _hotcoco(gt_path: str):
    import hotcoco

    def run(gt, dets) -> dict:
        ev = hotcoco.LVISEval(gt, hotcoco.LVISResults(gt, dets, max_dets=300), "bbox")
        ev.run()
        return dict(ev.get_results())

    return hotcoco.COCO(gt_path), run


def _ultrafast(gt_path: str):
    import ultrafast_pycocotools as uf

    def run(gt, dets) -> dict:
        ev = uf.COCOeval(gt, gt.loadRes(dets), "bbox", lvis_style=True)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        return dict(ev.stats_as_dict)

    return uf.COCO(gt_path), run


BACKENDS = {"ltsweep": _ltsweep, "hotcoco": _hotcoco, "ultrafast": _ultrafast}  # name -> (its gt object, evaluate)


def _backend_run(name: str, mode: str, gt_path: str, dets_path: str, out) -> None:
    """Child process: evaluate the case with backend ``name`` and send (seconds, peak above the start, results).
    ``mode`` "list": from the loaded case (the backend's ground-truth object and the result list, loaded before the
    clock starts); "file": from the detection file's path (its parsing timed), the ground truth loaded before."""
    import contextlib
    import io

    dets: Any = dets_path if mode == "file" else json.loads(Path(dets_path).read_text())
    with contextlib.redirect_stdout(io.StringIO()):
        gt, evaluate = BACKENDS[name](gt_path)
        base = _current_rss_mb()
        _reset_peak()
        t0 = time.perf_counter()
        res = evaluate(gt, dets)
    seconds = time.perf_counter() - t0
    out.put((seconds, _hwm_mb() - base, {k: float(res[k]) for k in SUMMARY_KEYS if k in res}))


def run_backends(names: list[str], gt: dict, dets: list[dict], ref: dict | None) -> dict:
    """Each installed backend on the case, in a child process of its own; why a backend is missing otherwise."""
    import importlib.util
    import multiprocessing as mp
    import tempfile

    modules = {"ltsweep": "lt_models", "hotcoco": "hotcoco", "ultrafast": "ultrafast_pycocotools"}
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench_eval_") as tmp:
        gt_path, dets_path = Path(tmp) / "gt.json", Path(tmp) / "dets.json"
        gt_path.write_text(json.dumps(gt))
        dets_path.write_text(json.dumps(dets))
        for name in names:
            if importlib.util.find_spec(modules[name]) is None:
                out[name] = {"missing": f"pip install {modules[name].replace('_', '-')}"}
                continue
            row: dict = {}
            for mode in ("list", "file"):
                ctx = mp.get_context("spawn")
                q = ctx.Queue()
                proc = ctx.Process(target=_backend_run, args=(name, mode, str(gt_path), str(dets_path), q))
                proc.start()
                seconds, peak, res = q.get()
                proc.join()
                key = "" if mode == "list" else "from_file_"
                row[f"{key}seconds"] = round(seconds, 2)
                row[f"{key}peak_above_start_mb" if mode == "file" else "peak_above_case_mb"] = round(peak, 1)
                if mode == "list":
                    row["max_abs_diff_vs_lvis_api"] = (
                        None if ref is None else max(abs(res[k] - ref[k]) for k in res if k in ref)
                    )
            out[name] = row
            print(f"{name}: {row}", flush=True)
    return out


EDGE_SEEDS = (0, 1, 2)
IDENTICAL = 1e-12  # the largest |difference| from lvis-api that still counts as identical


def edge_case_diffs(names: list[str]) -> dict[str, list[float]]:
    """Each named backend and lvis-api on ``make_case`` of lvis_oracle (seeds EDGE_SEEDS, 40 images, 10 classes:
    zero-area detections, gt ``ignore`` flags, score ties, non-contiguous ids, federated fields), in this process
    (the cases are small): per seed, the largest |difference| from lvis-api over SUMMARY_KEYS (inf for a key the
    backend does not report). hotcoco and ultrafast read the case's ground truth from a temporary file."""
    import contextlib
    import copy
    import io
    import math
    import tempfile

    from lvis_oracle import lvis_api_evaluate, make_case

    diffs: dict[str, list[float]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="bench_eval_edge_") as tmp:
        for seed in EDGE_SEEDS:
            gt, dets = make_case(seed=seed, n_img=40, n_cat=10)
            ref = lvis_api_evaluate(gt, dets)
            gt_path = Path(tmp) / f"gt_{seed}.json"
            gt_path.write_text(json.dumps(gt))
            for name in names:
                with contextlib.redirect_stdout(io.StringIO()):
                    backend_gt, evaluate = BACKENDS[name](str(gt_path))
                    res = evaluate(backend_gt, copy.deepcopy(dets))
                diffs[name].append(max(abs(float(res[k]) - ref[k]) if k in res else math.inf for k in SUMMARY_KEYS))
    return diffs


def add_edge_cases(backends: dict, have_oracle: bool) -> None:
    """``edge_case_max_abs_diff`` in each installed backend's row (max over EDGE_SEEDS; None without the oracle),
    with one line per backend."""
    names = [name for name, row in backends.items() if "missing" not in row]
    if not have_oracle:
        for name in names:
            backends[name]["edge_case_max_abs_diff"] = None
        print("edge cases: not checked (--skip-lvis: no lvis-api oracle)", flush=True)
        return
    for name, per_seed in edge_case_diffs(names).items():
        backends[name]["edge_case_max_abs_diff"] = max(per_seed)
        print(
            f"edge cases ({name} vs lvis-api, make_case seeds {EDGE_SEEDS[0]}-{EDGE_SEEDS[-1]}, 40 images, "
            f"10 classes): max |diff| {max(per_seed):.3g} (per seed: {', '.join(f'{d:.3g}' for d in per_seed)})",
            flush=True,
        )


def choose_backend(backends: dict) -> tuple[str | None, str]:
    """The fastest backend (``seconds`` from the loaded case) among those whose |difference| from lvis-api is at
    most IDENTICAL both on the big case and on the edge cases, and why."""
    rows = {name: row for name, row in backends.items() if "missing" not in row}
    if not rows:
        return None, "no backend ran (none named with --backends is installed)"
    if any(r["max_abs_diff_vs_lvis_api"] is None or r["edge_case_max_abs_diff"] is None for r in rows.values()):
        return None, "no lvis-api oracle (--skip-lvis), so no backend can be shown identical to it"
    identical = {
        name: row
        for name, row in rows.items()
        if row["max_abs_diff_vs_lvis_api"] <= IDENTICAL and row["edge_case_max_abs_diff"] <= IDENTICAL
    }
    others = ", ".join(
        f"{name} ({row['seconds']} s; max |diff| {row['max_abs_diff_vs_lvis_api']:.3g} on the big case, "
        f"{row['edge_case_max_abs_diff']:.3g} on the edge cases)"
        for name, row in rows.items()
        if name not in identical
    )
    if not identical:
        return None, f"none is identical to lvis-api (|diff| <= {IDENTICAL:g}): {others}"
    chosen = min(identical, key=lambda name: identical[name]["seconds"])
    why = (
        f"the fastest of those identical to lvis-api (|diff| <= {IDENTICAL:g} on the big case and the edge cases): "
        + ", ".join(f"{name} {row['seconds']} s" for name, row in identical.items())
    )
    return chosen, why + (f"; not identical: {others}" if others else "")


def finish(backends: dict, summary: dict, have_oracle: bool) -> None:
    """The edge cases, the choice and the last line (``summary``'s keys, ``backends`` and ``chosen_backend``)."""
    add_edge_cases(backends, have_oracle)
    chosen, why = choose_backend(backends)
    print(f"chosen backend: {chosen or 'none'}: {why}", flush=True)
    print(json.dumps({"benchmark": "eval", **summary, "backends": backends, "chosen_backend": chosen}))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-lvis", action="store_true", help="time only our evaluator (no speedup figure)")
    ap.add_argument(
        "--backends",
        nargs="*",
        default=list(BACKENDS),
        choices=list(BACKENDS),
        help="evaluators run in child processes of their own (ltsweep: ours, for the same conditions)",
    )
    args = ap.parse_args(argv)
    logging.getLogger("lvis").setLevel(logging.ERROR)

    t0 = time.perf_counter()
    gt, dets = make_lvis_val_case(args.images, args.seed)
    print(
        f"case: {len(gt['images'])} images, {len(gt['categories'])} categories, {len(gt['annotations'])} gt, "
        f"{len(dets)} detections (generated in {time.perf_counter() - t0:.1f} s)",
        flush=True,
    )

    rss_case = _current_rss_mb()
    times, ours = [], None
    for _ in range(3):
        t0 = time.perf_counter()
        ours = evaluate_lvis(gt, dets)
        times.append(time.perf_counter() - t0)
    t_ours = statistics.median(times)
    peak_ours = _peak_rss_mb()
    print(
        f"ltsweep evaluate_lvis: {t_ours:.2f} s (runs {', '.join(f'{t:.2f}' for t in times)}), "
        f"process peak RSS so far {peak_ours:.0f} MB (the generated case alone: {rss_case:.0f} MB, so the "
        f"evaluator adds at most {peak_ours - rss_case:.0f} MB)",
        flush=True,
    )
    print("ours: " + json.dumps({k: round(v, 5) for k, v in ours.items() if k != "per_class"}), flush=True)
    if args.skip_lvis:
        backends = run_backends(args.backends, gt, dets, None)
        summary = {"speedup_vs_lvis_api": None, "max_abs_diff": None, "peak_rss_mb": round(peak_ours, 1)}
        finish(backends, summary, have_oracle=False)
        return 0

    ref, t_ref = run_lvis_api(gt, dets)
    print(f"lvis-api LVISEval: {t_ref:.2f} s, process peak RSS {_peak_rss_mb():.0f} MB", flush=True)
    print("lvis: " + json.dumps({k: round(v, 5) for k, v in ref.items()}), flush=True)
    keys = ["AP", "APr", "APc", "APf"]
    max_diff = max(abs(ours[k] - ref[k]) for k in keys)
    all_diff = max(abs(ours[k] - ref[k]) for k in ref)
    print(f"max |diff| over AP/APr/APc/APf: {max_diff:.3g}; over all {len(ref)} summary metrics: {all_diff:.3g}")
    backends = run_backends(args.backends, gt, dets, ref)
    summary = {
        "speedup_vs_lvis_api": round(t_ref / t_ours, 2),
        "max_abs_diff": max_diff,
        "peak_rss_mb": round(peak_ours, 1),
    }
    finish(backends, summary, have_oracle=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
