"""Soft-balance sampler at Open Images scale vs a straightforward per-class-list implementation.

Builds a synthetic label table like Open Images' (1.7M images, 500 classes, ~7 labels per image, Zipf class
popularity) and measures, each in a fresh subprocess so that peak RSS is the sampler's own:
  ours:  SoftBalanceSampler construction (validation + class -> images CSR + eq 8), one epoch's draws of
         1.7M indices (``draw``), and peak RSS (resource.getrusage, includes Python + torch + the label table);
  naive: the common detection-codebase approach: dict class -> list of image ids built in Python loops, then per
         sample a class from P*_s (random.choices on the cumulative weights) and random.choice of an image from
         that class's list. Run in full (no extrapolation).
Timings are medians over repeats (the machine is shared). speedup_vs_naive = naive (index build + one epoch)
divided by ours (index build + one epoch), i.e. the cost of preparing and drawing the first epoch.

Usage: python benchmarks/bench_sampler.py [--images 1700000] [--classes 500] [--lam 0.7] [--repeats 5]
Last stdout line: {"benchmark": "sampler", "index_build_s": ..., "epoch_draw_s": ..., "peak_rss_mb": ...,
"speedup_vs_naive": ...}
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np


def synthetic_label_table(
    num_images: int, num_classes: int, mean_labels: float = 7.0, zipf_s: float = 1.1, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Image -> classes CSR (indptr, labels) with Zipf(s) class popularity, built vectorised.

    Each image draws 1 + Poisson(mean_labels - 1 + slack) classes with replacement from the Zipf popularity and
    duplicates are dropped; slack is chosen so the mean number of distinct labels per image is ~mean_labels.
    """
    rng = np.random.default_rng(seed)
    pop = 1.0 / np.arange(1, num_classes + 1) ** zipf_s
    pop /= pop.sum()
    slack = 0.0
    for _ in range(3):  # calibrate the duplicate loss on a small sample
        k = 1 + rng.poisson(mean_labels - 1 + slack, size=20_000)
        img = np.repeat(np.arange(k.size), k)
        cls = rng.choice(num_classes, size=k.sum(), p=pop)
        distinct = np.unique(img * num_classes + cls).size / k.size  # small: np.unique is fine
        slack += mean_labels - distinct
    k = 1 + rng.poisson(mean_labels - 1 + slack, size=num_images)
    cls = rng.choice(num_classes, size=int(k.sum()), p=pop).astype(np.int64)
    key = np.repeat(np.arange(num_images, dtype=np.int64), k) * num_classes + cls
    key.sort()  # by image, then class; then drop duplicate (image, class) pairs (np.unique is far slower here)
    key = key[np.concatenate([[True], key[1:] != key[:-1]])]
    labels = key % num_classes
    per_image = np.bincount(key // num_classes, minlength=num_images)
    indptr = np.zeros(num_images + 1, dtype=np.int64)
    np.cumsum(per_image, out=indptr[1:])
    return indptr, labels


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kb / 1024.0


class Timings:
    """Wall-clock and CPU seconds of repeated runs; medians are reported, minima and CPU time for context."""

    def __init__(self):
        self.wall, self.cpu = [], []

    def __enter__(self):
        self._t = (time.perf_counter(), time.process_time())

    def __exit__(self, *exc):
        self.wall.append(time.perf_counter() - self._t[0])
        self.cpu.append(time.process_time() - self._t[1])

    def summary(self) -> dict:
        return {
            "median_s": statistics.median(self.wall),
            "min_s": min(self.wall),
            "cpu_median_s": statistics.median(self.cpu),
        }


def measure_ours(indptr, labels, num_classes, lam, repeats) -> dict:
    from lt_models.data.samplers import SoftBalanceSampler

    baseline = peak_rss_mb()  # Python + numpy + torch + the loaded label table
    build, draw, iterate = Timings(), Timings(), Timings()
    sampler = None
    for r in range(repeats):
        del sampler  # one sampler alive at a time, so peak RSS is one sampler's
        with build:
            sampler = SoftBalanceSampler(indptr, labels, num_classes, lam=lam, seed=0)
        with draw:
            _, images = sampler.draw(r)
        assert len(images) == len(indptr) - 1
    with iterate:
        n_iter = sum(1 for _ in sampler)  # what the DataLoader sees: the epoch as Python ints
    assert n_iter == len(sampler)
    return {
        "build": build.summary(),
        "draw": draw.summary(),
        "iterate": iterate.summary(),
        "peak_rss_mb": peak_rss_mb(),
        "baseline_rss_mb": baseline,
        "probabilities": sampler.probabilities.tolist(),
    }


def measure_naive(indptr, labels, num_classes, lam, repeats) -> dict:
    """The per-class-list approach, as detection codebases usually write it."""
    import random

    from lt_models.data.samplers import soft_balance_probabilities

    baseline = peak_rss_mb()
    indptr_l, labels_l = indptr.tolist(), labels.tolist()
    num_images = len(indptr_l) - 1
    build, draw = Timings(), Timings()
    for r in range(repeats):
        with build:
            class_to_imgs = {c: [] for c in range(num_classes)}
            for img in range(num_images):
                for c in labels_l[indptr_l[img] : indptr_l[img + 1]]:
                    class_to_imgs[c].append(img)
            counts = [len(class_to_imgs[c]) for c in range(num_classes)]
            probs = soft_balance_probabilities(counts, lam).tolist()
            classes = list(range(num_classes))
            cum, acc = [], 0.0
            for p in probs:
                acc += p
                cum.append(acc)
        random.seed(r)
        with draw:
            epoch = []
            for _ in range(num_images):
                c = random.choices(classes, cum_weights=cum)[0]
                epoch.append(random.choice(class_to_imgs[c]))
        assert len(epoch) == num_images
        del class_to_imgs, epoch
    return {"build": build.summary(), "draw": draw.summary(), "peak_rss_mb": peak_rss_mb(), "baseline_rss_mb": baseline}


def child(which: str, table: str, num_classes: int, lam: float, repeats: int) -> None:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    data = np.load(table)
    indptr, labels = data["indptr"], data["labels"]
    fn = measure_ours if which == "ours" else measure_naive
    print(json.dumps(fn(indptr, labels, num_classes, lam, repeats)))


def run_child(which: str, table: str, args) -> dict:
    out = subprocess.run(
        [
            sys.executable,
            os.path.abspath(__file__),
            "--child",
            which,
            "--table",
            table,
            "--classes",
            str(args.classes),
            "--lam",
            str(args.lam),
            "--repeats",
            str(args.repeats if which == "ours" else args.naive_repeats),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1_700_000)
    ap.add_argument("--classes", type=int, default=500)
    ap.add_argument("--lam", type=float, default=0.7)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--naive-repeats", type=int, default=3)
    ap.add_argument("--child", choices=["ours", "naive"])
    ap.add_argument("--table")
    args = ap.parse_args()
    if args.child:
        child(args.child, args.table, args.classes, args.lam, args.repeats)
        return

    t0 = time.perf_counter()
    indptr, labels = synthetic_label_table(args.images, args.classes)
    counts = np.bincount(labels, minlength=args.classes)
    print(
        f"label table: {args.images} images, {args.classes} classes, {labels.size} labels "
        f"({labels.size / args.images:.2f}/image), images per class {counts.max()} .. {counts.min()} "
        f"(built in {time.perf_counter() - t0:.1f} s)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        table = os.path.join(tmp, "table.npz")
        np.savez(table, indptr=indptr, labels=labels)
        ours = run_child("ours", table, args)
        naive = run_child("naive", table, args)

    from lt_models.data.samplers import soft_balance_probabilities  # sanity: the child used eq 8

    np.testing.assert_allclose(ours.pop("probabilities"), soft_balance_probabilities(counts, args.lam))
    ob, od, nb, nd = ours["build"], ours["draw"], naive["build"], naive["draw"]
    speedup = (nb["median_s"] + nd["median_s"]) / (ob["median_s"] + od["median_s"])
    cpu_speedup = (nb["cpu_median_s"] + nd["cpu_median_s"]) / (ob["cpu_median_s"] + od["cpu_median_s"])

    def fmt(t):
        return f"{t['median_s']:.3f} s (min {t['min_s']:.3f}, cpu {t['cpu_median_s']:.3f})"

    print(
        f"ours  (median of {args.repeats}): index build {fmt(ob)} [goal < 2 s], epoch draw {fmt(od)} "
        f"[goal < 0.5 s]; iterating the epoch as Python ints {fmt(ours['iterate'])}; peak RSS "
        f"{ours['peak_rss_mb']:.0f} MB, of which {ours['baseline_rss_mb']:.0f} MB before building "
        f"(interpreter, torch import, label table)"
    )
    print(
        f"naive (median of {args.naive_repeats}, full size, not extrapolated): index build {fmt(nb)}, "
        f"epoch draw {fmt(nd)}; peak RSS {naive['peak_rss_mb']:.0f} MB, of which "
        f"{naive['baseline_rss_mb']:.0f} MB before building"
    )
    print(
        f"speedup (wall medians): index build x{nb['median_s'] / ob['median_s']:.1f}, epoch draw "
        f"x{nd['median_s'] / od['median_s']:.1f}, build + one epoch x{speedup:.1f} (reported); "
        f"build + one epoch on CPU time x{cpu_speedup:.1f}; load average {os.getloadavg()[0]:.1f} "
        f"on {os.cpu_count()} cores"
    )
    print(
        json.dumps(
            {
                "benchmark": "sampler",
                "index_build_s": round(ob["median_s"], 4),
                "epoch_draw_s": round(od["median_s"], 4),
                "peak_rss_mb": round(ours["peak_rss_mb"], 1),
                "speedup_vs_naive": round(speedup, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
