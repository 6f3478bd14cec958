"""Per-class views of an evaluation result: a text table, a per-class CSV and AP by frequency rank (plot).

They take the result dict of `evaluate_lvis` or `evaluate_openimages` and the ground truth it was computed on.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lt_models.atomic import write_bytes_atomic
from lt_models.data.annotations import FREQ_LABELS
from lt_models.evaluation.inputs import Frequency, GroundTruth

_SUMMARY_ORDER = (
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "APr",
    "APc",
    "APf",
    "AR@300",
    "ARs@300",
    "ARm@300",
    "ARl@300",
)


def format_results(res: Mapping[str, Any]) -> str:
    """A plain-text table of a result dict (values x100; 'n/a' where a metric is undefined, i.e. -1)."""
    keys = [k for k in _SUMMARY_ORDER if k in res]
    keys += [
        k
        for k, v in res.items()
        if k not in keys and isinstance(v, (int, float)) and k != "per_class" and k != "num_classes_evaluated"
    ]
    lines = [f"{'metric':<10} {'value':>7}", f"{'-' * 10} {'-' * 7}"]
    for k in keys:
        v = float(res[k])
        lines.append(f"{k:<10} {'n/a' if v < 0 else f'{100 * v:.2f}':>7}")
    pc = res.get("per_class") or {}
    if pc:
        n_def = sum(1 for v in pc.values() if v >= 0)
        lines.append(f"per-class AP defined for {n_def} of {len(pc)} categories (the others have no ground truth)")
    return "\n".join(lines)


def _image_counts(g: GroundTruth, image_counts: Mapping[Any, int] | Sequence[int] | None) -> tuple[list[int], str]:
    if image_counts is not None:
        if isinstance(image_counts, Mapping):
            return [int(image_counts.get(c, 0)) for c in g.cat_ids], "given"
        return [int(x) for x in image_counts], "given"
    if all("image_count" in g.cats[c] for c in g.cat_ids):
        return [int(g.cats[c]["image_count"]) for c in g.cat_ids], "categories[].image_count"
    counts = np.zeros(g.n_cat, np.int64)
    pairs = np.unique(g.ann_cat * g.n_img + g.ann_img)
    np.add.at(counts, pairs // g.n_img, 1)
    return counts.tolist(), "images of the evaluated set"


def per_class_table(
    res: Mapping[str, Any],
    gt: str | Path | Mapping[str, Any],
    image_counts: Mapping[Any, int] | Sequence[int] | None = None,
    frequency: Frequency = None,
) -> list[dict]:
    """One row per category, most images first: rank, category_id, name, frequency, image_count, instances, AP.

    image_count is the category's `image_count` field (training images, as in LVIS), else ``image_counts``
    when given, else the number of images of `gt` containing the category. AP is -1 where undefined.
    """
    g = GroundTruth(gt, frequency, require_frequency=False)
    counts, _ = _image_counts(g, image_counts)
    instances = np.bincount(g.ann_cat, minlength=g.n_cat)
    by_str = {str(c): c for c in g.cat_ids}  # per_class keys turn into strings after a JSON round trip
    pc = {(k if k in g.cat_index else by_str.get(str(k), k)): v for k, v in (res.get("per_class") or {}).items()}
    order = sorted(range(g.n_cat), key=lambda k: (-counts[k], g.cat_ids[k]))
    rows = []
    for rank, k in enumerate(order):
        cid = g.cat_ids[k]
        rows.append(
            {
                "rank": rank,
                "category_id": cid,
                "name": g.cats[cid].get("name", str(cid)),
                "frequency": g.frequency[k] if g.frequency else "",
                "image_count": counts[k],
                "instances": int(instances[k]),
                "AP": float(pc.get(cid, -1.0)),
            }
        )
    return rows


def write_per_class_csv(
    res: Mapping[str, Any],
    gt: str | Path | Mapping[str, Any],
    path: str | Path,
    image_counts: Mapping[Any, int] | Sequence[int] | None = None,
    frequency: Frequency = None,
) -> Path:
    """Write per_class_table as CSV (atomically: temp file + os.replace). Returns the path."""
    rows = per_class_table(res, gt, image_counts, frequency)
    buf = io.StringIO()
    writer = csv.DictWriter(
        buf,
        fieldnames=["rank", "category_id", "name", "frequency", "image_count", "instances", "AP"],
        lineterminator="\n",
    )
    writer.writeheader()
    for r in rows:
        writer.writerow({**r, "AP": f"{r['AP']:.6f}" if r["AP"] >= 0 else "-1"})
    return write_bytes_atomic(path, buf.getvalue().encode())


_BUCKET_COLOURS = {"f": "#d9ead3", "c": "#fff2cc", "r": "#f4cccc"}
_BUCKET_NAMES = {"f": "frequent", "c": "common", "r": "rare"}


def plot_ap_by_frequency(
    runs: Mapping[str, Mapping[str, Any]],
    gt: str | Path | Mapping[str, Any],
    path: str | Path,
    image_counts: Mapping[Any, int] | Sequence[int] | None = None,
    frequency: Frequency = None,
    title: str | None = None,
) -> Path:
    """Per-class AP against frequency rank, several runs overlaid (the papers' Fig 4 / Fig 5 style).

    x: categories sorted by image count, most images first (see per_class_table); y: per-class AP. One line
    per run (e.g. {"baseline": res_a, "ACSL": res_b}); categories without gt are skipped. Frequent / common / rare
    regions are shaded. Uses matplotlib's Agg canvas (no display, no pyplot state); written atomically.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not runs:
        raise ValueError("plot_ap_by_frequency needs at least one run")
    base = per_class_table(next(iter(runs.values())), gt, image_counts, frequency)
    fig = Figure(figsize=(10, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    n = len(base)
    x = np.arange(n)
    freq = [r["frequency"] for r in base]
    start = 0
    labelled = set()
    for i in range(1, n + 1):  # shade each run of equal buckets
        if i == n or freq[i] != freq[start]:
            f = freq[start]
            if f in _BUCKET_COLOURS:
                ax.axvspan(
                    start - 0.5,
                    i - 0.5,
                    color=_BUCKET_COLOURS[f],
                    alpha=0.6,
                    lw=0,
                    label=None if f in labelled else _BUCKET_NAMES[f],
                )
                labelled.add(f)
            start = i
    for label, res in runs.items():
        rows = per_class_table(res, gt, image_counts, frequency)
        ap = np.array([r["AP"] for r in rows], float)
        ok = ap >= 0
        mean = f"AP {100 * res['AP']:.1f}" if isinstance(res.get("AP"), (int, float)) and res["AP"] >= 0 else ""
        parts = [mean] + [
            f"AP{b} {100 * res[f'AP{b}']:.1f}"
            for b in FREQ_LABELS
            if isinstance(res.get(f"AP{b}"), (int, float)) and res[f"AP{b}"] >= 0
        ]
        parts = [p for p in parts if p]
        ax.plot(
            x[ok],
            ap[ok],
            lw=1.0,
            marker="." if ok.sum() < 300 else None,
            ms=3,
            label=f"{label} ({', '.join(parts)})" if parts else str(label),
        )
    ax.set_xlim(-0.5, n - 0.5)
    ax.set_ylim(0, 1)
    ax.set_xlabel("categories sorted by number of training images (most first)")
    ax.set_ylabel("per-class AP")
    ax.set_title(title or "AP by frequency rank")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return write_bytes_atomic(path, buf.getvalue())
