"""Benchmark: the annotation store at LVIS v1 and full Open Images size, against the JSON path, in one run.

Generated here (seeded, no pixels), with realistic per-image label and box counts and a long tail:
- **Open Images** (full: 1.7M images, ~14.6M boxes, 500 classes): the challenge CSVs (boxes with group-of flags,
  image-level labels with verified negatives, classes, an image-sizes CSV) and a two-level MID hierarchy. About a
  fifth of the leaf boxes also carry the parent's label on an identical box (one object, two labels), as in the
  real files.
- **LVIS v1** (100k images, ~1.27M boxes, 1,203 classes: 337 rare / 461 common / 405 frequent): an LVIS-format
  training JSON and a folder of empty image files (the loader only checks that they exist).
- **LVIS v1 val-sized evaluation**: 20k images, 1,203 classes, 300 detections per image (bench_eval's generator).

Measured, each in a fresh child process (peak = the child's VmHWM):
- ``oi_convert_s`` / ``oi_convert_peak_mb``: `convert_openimages_store`, CSVs -> store (streaming).
- ``oi_trial_ready_s`` / ``oi_trial_private_mb``: a trial's dataset ready (open the store, the dataset, its
  soft-balance sampler, one epoch of draws and 256 targets), and its private RSS (Private_Clean + Private_Dirty of
  /proc/self/smaps_rollup) while a second trial process maps the same store.
- ``oi_rij_s`` / ``lvis_rij_s``: `concurrent_rate_matrix` over the store, with the hierarchy for Open Images.
- ``lvis_store_build_s``: JSON -> store once (validation, merge, write); ``lvis_trial_ready_s`` as for Open Images.
- ``json_path_trial_ready_s``: the same LVIS v1 dataset built from the JSON in the trial process (no store).
  The JSON path at Open Images size is not run: its file alone is ~2 GB of JSON per trial process.
- ``lvis_val_eval_s`` / ``lvis_val_eval_peak_mb``: `evaluate_lvis` on the 20k-image case (its peak includes the
  6M generated detection dicts, as `engine.predict` returns them); ``eval_identical``: lvis-api's LVISEval gives
  the same summary metrics on a 1,000-image subsample of the same case, in the same run.

Usage: python benchmarks/bench_scale.py [--quick] [--data DIR]   (--quick: everything at 1/10 size)
Last stdout line: {"benchmark": "scale", "oi_convert_s": .., ..., "json_path_trial_ready_s": ..}
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OI_FULL = {"images": 1_700_000, "boxes": 14_600_000, "classes": 500}
LVIS_FULL = {"images": 100_000, "boxes": 1_270_000, "rare": 337, "common": 461, "frequent": 405}
EVAL_FULL = {"images": 20_000, "subsample": 1_000}


# ----------------------------------------------------------------------------------------------------------------
# Generators
# ----------------------------------------------------------------------------------------------------------------
def _zipf_weights(rng, n: int, a: float = 1.1) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** a
    w = w[rng.permutation(n)]
    return w / w.sum()


def _boxes_per_image(rng, n_images: int, n_boxes: int) -> np.ndarray:
    counts = rng.poisson(n_boxes / n_images - 1, n_images) + 1
    return counts


def make_openimages(out: Path, n_images: int, n_boxes: int, n_classes: int, seed: int = 0) -> dict:
    """The challenge-format CSVs + hierarchy of a synthetic Open Images split; returns their paths."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    mids = np.array([f"/m/{i:05x}" for i in range(n_classes)])
    n_parent = n_classes // 5  # 100 parents, 400 leaves at full size
    parent_of = np.r_[np.full(n_parent, -1), rng.integers(0, n_parent, n_classes - n_parent)]
    tree = {
        "LabelName": "/m/0bl9f",
        "Subcategory": [
            {
                "LabelName": str(mids[p]),
                "Subcategory": [{"LabelName": str(mids[c])} for c in np.flatnonzero(parent_of == p)],
            }
            for p in range(n_parent)
        ],
    }
    (out / "hierarchy.json").write_text(json.dumps(tree))
    (out / "classes.csv").write_text("".join(f"{m},Class {i}\n" for i, m in enumerate(mids)))

    ids = np.array([f"{v:016x}" for v in rng.integers(0, 2**63, n_images)])
    per_image = _boxes_per_image(rng, n_images, int(n_boxes / 1.2))  # leaf boxes; parent copies come on top
    box_img = np.repeat(np.arange(n_images), per_image)
    n = len(box_img)
    leaf_w = _zipf_weights(rng, n_classes - n_parent)
    img_cats = rng.choice(n_classes - n_parent, size=(n_images, 3), p=leaf_w) + n_parent  # 3 classes per image
    box_cat = img_cats[box_img, rng.integers(0, 3, n)]
    x0, y0 = rng.uniform(0, 0.8, n), rng.uniform(0, 0.8, n)
    x1, y1 = x0 + rng.uniform(0.02, 0.2, n), y0 + rng.uniform(0.02, 0.2, n)
    group = (rng.random(n) < 0.05).astype(np.int8)
    dup = np.flatnonzero(rng.random(n) < 0.2)  # the parent's label on the same box
    box_img, box_cat = np.r_[box_img, box_img[dup]], np.r_[box_cat, parent_of[box_cat[dup]]]
    x0, x1, y0, y1, group = (np.r_[a, a[dup]] for a in (x0, x1, y0, y1, group))
    order = np.argsort(box_img, kind="stable")
    q = lambda a: np.round(a[order], 6)  # noqa: E731 (6 decimals, as the CSVs)
    boxes = pa.table(
        {
            "ImageID": pa.DictionaryArray.from_arrays(pa.array(box_img[order].astype(np.int32)), pa.array(ids)),
            "Source": pa.array(np.full(len(order), "xclick")).dictionary_encode(),
            "LabelName": pa.DictionaryArray.from_arrays(pa.array(box_cat[order].astype(np.int32)), pa.array(mids)),
            "Confidence": np.ones(len(order), np.int8),
            "XMin": q(x0),
            "XMax": q(np.minimum(x1, 1.0)),
            "YMin": q(y0),
            "YMax": q(np.minimum(y1, 1.0)),
            "IsOccluded": np.zeros(len(order), np.int8),
            "IsTruncated": np.zeros(len(order), np.int8),
            "IsGroupOf": group[order],
            "IsDepiction": np.zeros(len(order), np.int8),
            "IsInside": np.zeros(len(order), np.int8),
        }
    )
    opts = pacsv.WriteOptions(quoting_style="none")
    pacsv.write_csv(boxes, out / "boxes.csv", opts)
    # image-level labels: every boxed class verified present, one absent leaf per image (not boxed there)
    present = np.unique(box_img.astype(np.int64) * n_classes + box_cat)
    neg_cat = rng.integers(n_parent, n_classes, n_images)
    neg_key = np.arange(n_images) * n_classes + neg_cat
    neg_key = neg_key[~np.isin(neg_key, present)]
    keys = np.r_[present, neg_key]
    conf = np.r_[np.ones(len(present), np.int8), np.zeros(len(neg_key), np.int8)]
    order = np.argsort(keys, kind="stable")
    labels = pa.table(
        {
            "ImageID": pa.DictionaryArray.from_arrays(
                pa.array((keys[order] // n_classes).astype(np.int32)), pa.array(ids)
            ),
            "Source": pa.array(np.full(len(keys), "verification")).dictionary_encode(),
            "LabelName": pa.DictionaryArray.from_arrays(
                pa.array((keys[order] % n_classes).astype(np.int32)), pa.array(mids)
            ),
            "Confidence": conf[order],
        }
    )
    pacsv.write_csv(labels, out / "labels.csv", opts)
    sizes = pa.table(
        {
            "ImageID": pa.array(ids),
            "ImageWidth": rng.choice([640, 800, 1024], n_images).astype(np.int32),
            "ImageHeight": rng.choice([480, 600, 768], n_images).astype(np.int32),
        }
    )
    pacsv.write_csv(sizes, out / "sizes.csv", opts)
    return {"boxes": int(len(box_img)), "labels": int(len(keys)), "images": n_images}


def make_lvis(out: Path, n_images: int, n_boxes: int, rare: int, common: int, frequent: int, seed: int = 0) -> dict:
    """An LVIS v1-shaped training JSON (and empty image files); ~5% of objects carry a second label on a
    near-identical box."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    c = rare + common + frequent
    freq = np.array(["r"] * rare + ["c"] * common + ["f"] * frequent)[rng.permutation(c)]
    w = np.where(freq == "f", 40.0, np.where(freq == "c", 3.0, 0.1)) * rng.uniform(0.5, 1.5, c)
    per_image = _boxes_per_image(rng, n_images, int(n_boxes / 1.05))
    box_img = np.repeat(np.arange(n_images), per_image)
    n = len(box_img)
    img_cats = rng.choice(c, size=(n_images, 4), p=w / w.sum())
    box_cat = img_cats[box_img, rng.integers(0, 4, n)]
    xy = rng.uniform(0, 400, (n, 2))
    wh = rng.uniform(8, 200, (n, 2))
    dup = np.flatnonzero(rng.random(n) < 0.05)
    box_img, box_cat = np.r_[box_img, box_img[dup]], np.r_[box_cat, rng.integers(0, c, len(dup))]
    xy, wh = np.r_[xy, xy[dup]], np.r_[wh, wh[dup] * 0.99]
    order = np.argsort(box_img, kind="stable")
    xy, wh = np.round(xy[order], 2).tolist(), np.round(wh[order], 2).tolist()
    bi, bc = box_img[order].tolist(), box_cat[order].tolist()
    images_dir = out / "images"
    images_dir.mkdir(exist_ok=True)
    images = [
        {
            "id": i + 1,
            "file_name": f"{i + 1:012d}.jpg",
            "width": 640,
            "height": 640,
            "neg_category_ids": [],
            "not_exhaustive_category_ids": [],
        }
        for i in range(n_images)
    ]
    for img in images:
        (images_dir / img["file_name"]).touch()
    anns = [
        {
            "id": k + 1,
            "image_id": bi[k] + 1,
            "category_id": bc[k] + 1,
            "bbox": xy[k] + wh[k],
            "area": wh[k][0] * wh[k][1],
            "iscrowd": 0,
        }
        for k in range(len(bi))
    ]
    cats = [
        {"id": k + 1, "name": f"class_{k + 1}", "synset": f"class_{k + 1}.n.01", "frequency": str(freq[k])}
        for k in range(c)
    ]
    with open(out / "lvis_v1_train.json", "w") as fh:
        json.dump({"images": images, "annotations": anns, "categories": cats}, fh)
    return {"images": n_images, "boxes": len(anns), "classes": c}


# ----------------------------------------------------------------------------------------------------------------
# Child tasks (each prints one JSON line; VmHWM = its peak RSS)
# ----------------------------------------------------------------------------------------------------------------
def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def _private_mb() -> float:
    total = 0
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith(("Private_Clean:", "Private_Dirty:")):
            total += int(line.split()[1])
    return total / 1024.0


def child(task: str, a: dict) -> dict:
    if task == "convert":
        from lt_models.data.openimages.streaming import convert_openimages_store

        t0 = time.perf_counter()
        d = Path(a["dir"])
        convert_openimages_store(
            d / "boxes.csv",
            d / "labels.csv",
            d / "classes.csv",
            d / "hierarchy.json",
            a["store"],
            image_sizes=d / "sizes.csv",
        )
        return {"s": time.perf_counter() - t0}
    if task == "build":
        from lt_models.data.datasets import dataset_store

        t0 = time.perf_counter()
        dataset_store(a["ann"], image_dir=a["images"], cache_root=a["cache"])
        return {"s": time.perf_counter() - t0}
    if task == "rij":
        from lt_models.data.rate_matrix import concurrent_rate_matrix
        from lt_models.data.store import open_store

        t0 = time.perf_counter()
        r = concurrent_rate_matrix(open_store(a["store"]), hierarchy=a.get("hierarchy"), sparse=True)
        return {"s": time.perf_counter() - t0, "nnz": int(r._nnz())}
    if task == "ready":
        import torch  # noqa: F401  (a trial process has torch loaded before its dataset)

        from lt_models.data.datasets import LVISDetection
        from lt_models.data.sampler_spec import SamplerSpec, build_sampler

        t0 = time.perf_counter()
        ds = LVISDetection(
            a["ann"], image_dir=a.get("images"), hierarchy_file=a.get("hierarchy"), cache_root=a.get("cache")
        )
        indptr, labels = ds.label_csr()
        sampler = build_sampler(SamplerSpec("softbalance", lam=0.5), indptr, labels, ds.num_classes, seed=0)
        sampler.set_epoch(0)
        draws = 0
        for i in sampler:  # one epoch of draws, consumed as a DataLoader does; 256 targets built
            if draws < 256:
                ds.target(i)
            draws += 1
        out = {"s": time.perf_counter() - t0, "images": len(ds), "draws": draws}
        if a.get("pair"):  # wait until the second trial is ready too, then measure
            print(json.dumps({"ready": True}), flush=True)
            sys.stdin.readline()
        out["private_mb"] = _private_mb()
        return out
    if task == "eval":
        import bench_eval

        bench_eval.N_RARE, bench_eval.N_COMMON, bench_eval.N_FREQ = 337, 461, 405  # LVIS v1's 1,203 classes
        from lt_models.evaluation import evaluate_lvis

        gt, dets = bench_eval.make_lvis_val_case(a["images"], seed=0, dets_per_image=300)
        t0 = time.perf_counter()
        ours = evaluate_lvis(gt, dets)
        s = time.perf_counter() - t0
        peak = _status_mb("VmHWM")
        keep = {img["id"] for img in gt["images"][: a["subsample"]]}
        sub_gt = dict(
            gt,
            images=gt["images"][: a["subsample"]],
            annotations=[x for x in gt["annotations"] if x["image_id"] in keep],
        )
        sub_dets = [d for d in dets if d["image_id"] in keep]
        del dets
        mine = evaluate_lvis(sub_gt, sub_dets)
        ref, _ = bench_eval.run_lvis_api(sub_gt, sub_dets)
        diff = max(abs(mine[k] - ref[k]) for k in ref)
        return {"s": s, "peak_mb": peak, "AP": ours["AP"], "sub_max_abs_diff": diff, "sub_AP": mine["AP"]}
    raise SystemExit(f"unknown task {task}")


def run_child(task: str, **a) -> dict:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'benchmarks'}")
    proc = subprocess.run(
        [sys.executable, __file__, "--child", task, json.dumps(a, default=str)], env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise SystemExit(f"child {task} failed:\n{proc.stderr[-4000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    print(
        f"  {task}: {json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()})}", flush=True
    )
    return out


def two_trials(**a) -> dict:
    """Two trial processes on one store: the first's ready time, and its private RSS beside the second."""
    env = dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'benchmarks'}")
    cmd = [sys.executable, __file__, "--child", "ready", json.dumps(dict(a, pair=True), default=str)]
    procs = []
    for _ in range(2):  # one after the other: the second maps the store the first has opened
        p = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if json.loads(p.stdout.readline()).get("ready") is not True:
            raise SystemExit("trial child did not get ready")
        procs.append(p)
    outs = []
    for p in procs:
        p.stdin.write("\n")
        p.stdin.flush()
    for p in procs:
        outs.append(json.loads(p.stdout.read().strip().splitlines()[-1]))
        if p.wait() != 0:
            raise SystemExit("trial child failed")
    print(f"  two trials: {outs}", flush=True)
    return {"s": outs[0]["s"], "private_mb": max(o["private_mb"] for o in outs)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="everything at 1/10 size")
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "bench_scale", help="generated files (reused)")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(dict(child(args.child[0], json.loads(args.child[1])), peak_mb=_status_mb("VmHWM"))))
        return 0
    f = 10 if args.quick else 1
    data = args.data / ("quick" if args.quick else "full")
    oi_dir, lvis_dir = data / "openimages", data / "lvis_v1"
    if not (oi_dir / "sizes.csv").is_file():
        t0 = time.perf_counter()
        info = make_openimages(oi_dir, OI_FULL["images"] // f, OI_FULL["boxes"] // f, OI_FULL["classes"])
        print(f"generated Open Images CSVs {info} in {time.perf_counter() - t0:.0f} s", flush=True)
    if not (lvis_dir / "lvis_v1_train.json").is_file():
        t0 = time.perf_counter()
        info = make_lvis(
            lvis_dir,
            LVIS_FULL["images"] // f,
            LVIS_FULL["boxes"] // f,
            LVIS_FULL["rare"],
            LVIS_FULL["common"],
            LVIS_FULL["frequent"],
        )
        print(f"generated LVIS v1 JSON {info} in {time.perf_counter() - t0:.0f} s", flush=True)
    mb = sum(p.stat().st_size for p in oi_dir.glob("*.csv")) / 2**20
    print(
        f"Open Images CSVs: {mb:.0f} MB; LVIS JSON: {(lvis_dir / 'lvis_v1_train.json').stat().st_size / 2**20:.0f} MB",
        flush=True,
    )

    import shutil

    store = data / "oi_train.store"
    cache = data / "cache"
    shutil.rmtree(store, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    print("Open Images:", flush=True)
    conv = run_child("convert", dir=oi_dir, store=store)
    oi_peak = conv.pop("peak_mb")
    oi_ready = two_trials(ann=store, hierarchy=oi_dir / "hierarchy.json")
    oi_rij = run_child("rij", store=store, hierarchy=oi_dir / "hierarchy.json")
    print("LVIS v1:", flush=True)
    ann, images = lvis_dir / "lvis_v1_train.json", lvis_dir / "images"
    build = run_child("build", ann=ann, images=images, cache=cache)
    lvis_ready = two_trials(ann=ann, images=images, cache=cache)
    lvis_store = next(p for p in cache.iterdir() if p.is_dir() and not p.name.startswith("."))
    lvis_rij = run_child("rij", store=lvis_store)
    json_ready = run_child("ready", ann=ann, images=images)
    print("LVIS v1 val-sized evaluation:", flush=True)
    ev = run_child("eval", images=EVAL_FULL["images"] // f, subsample=EVAL_FULL["subsample"] // f)
    result = {
        "benchmark": "scale",
        "quick": args.quick,
        "oi_convert_s": round(conv["s"], 2),
        "oi_convert_peak_mb": round(oi_peak, 1),
        "oi_trial_ready_s": round(oi_ready["s"], 3),
        "oi_trial_private_mb": round(oi_ready["private_mb"], 1),
        "oi_rij_s": round(oi_rij["s"], 2),
        "lvis_store_build_s": round(build["s"], 2),
        "lvis_trial_ready_s": round(lvis_ready["s"], 3),
        "lvis_trial_private_mb": round(lvis_ready["private_mb"], 1),
        "lvis_rij_s": round(lvis_rij["s"], 2),
        "lvis_val_eval_s": round(ev["s"], 2),
        "lvis_val_eval_peak_mb": round(ev["peak_mb"], 1),
        "eval_identical": bool(ev["sub_max_abs_diff"] == 0.0),
        "eval_subsample_max_abs_diff": ev["sub_max_abs_diff"],
        "json_path_trial_ready_s": round(json_ready["s"], 2),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
