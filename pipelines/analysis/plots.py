"""The figures of the sweep report and of `ltsweep compare`: matplotlib's object API on the Agg canvas (no pyplot
state, no display needed), returned as PNG bytes. AP values of -1 mean "no category in this frequency bucket"
(LVIS convention) and are shown as missing."""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lt_models.atomic import write_bytes_atomic
from pipelines.names import (
    AP_BY_FREQUENCY_PNG,
    finite_number,
)


# --------------------------------------------------------------------------------------------------------------
# small helpers
def metric_or_none(v: Any) -> float | None:
    """A finite, non-negative metric value, else None (-1 marks an empty frequency bucket)."""
    f = finite_number(v)
    return f if f is not None and f >= 0 else None


def fmt_metric(v: Any, digits: int = 3) -> str:
    f = metric_or_none(v)
    return "n/a" if f is None else f"{f:.{digits}f}"


def new_figure(w: float = 6.4, h: float = 3.6):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _short(name: str, n: int = 18) -> str:
    return name if len(name) <= n else "…" + name[-(n - 1) :]


# --------------------------------------------------------------------------------------------------------------
# plots
def plot_ap_by_rank(
    runs: Mapping[str, Mapping[int, float]],
    path: str | os.PathLike | None = None,
    *,
    order: Sequence[int] | None = None,
    xlabel: str = "category (id order)",
    title: str = "per-class AP",
) -> bytes:
    """Per-class AP of several runs over the same category order (lines). Writes ``path`` if given; returns PNG."""
    fig = new_figure(7.0, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    ids = list(order) if order is not None else sorted({c for pc in runs.values() for c in pc})
    xs = list(range(1, len(ids) + 1))
    for label, pc in runs.items():
        ys = [pc.get(c, float("nan")) for c in ids]
        ys = [y if (y is not None and y == y and y >= 0) else float("nan") for y in ys]
        ax.plot(xs, ys, marker="o", markersize=3, linewidth=1, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("AP")
    ax.set_ylim(bottom=0)
    ax.set_title(title)
    if runs:
        ax.legend(fontsize=8)
    data = png_bytes(fig)
    if path is not None:
        write_bytes_atomic(Path(path), data)
    return data


def plot_vs_param(rows, key: str, others: Sequence[str], title: str, xlabel: str) -> bytes:
    """AP (left) and APr (right) against a searched value: one line per combination of the other searched factors
    (e.g. one per loss), through the mean over seeds at each value; the runs are the dots."""
    fig = new_figure(9.6, 3.6)
    for i, metric in enumerate(("AP", "APr")):
        ax = fig.add_subplot(1, 2, i + 1)
        groups: dict[tuple, dict[float, list[float]]] = {}
        for r in rows:
            x, y = finite_number(r["params"].get(key)), metric_or_none(r.get(metric))
            if x is None or y is None:
                continue
            label = tuple((k, r["params"].get(k)) for k in others if k in r["params"])
            groups.setdefault(label, {}).setdefault(x, []).append(y)
        for label, pts in sorted(groups.items(), key=lambda kv: str(kv[0])):
            xs = sorted(pts)
            name = ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in label) or metric
            line = ax.plot(xs, [sum(pts[x]) / len(pts[x]) for x in xs], marker="o", linewidth=1.2, label=name)
            ax.scatter(
                [x for x in xs for _ in pts[x]],
                [y for x in xs for y in pts[x]],
                s=10,
                alpha=0.5,
                color=line[0].get_color(),
            )
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"final {metric}")
        ax.set_title(f"{title}: {metric}")
        if groups:
            ax.legend(fontsize=7)
    return png_bytes(fig)


PER_TRIAL_BARS = 40  # above this many trials the per-trial figures summarise (one bar per trial stops being readable)


def plot_buckets(rows) -> bytes:
    """APr / APc / APf of each trial; with more than ``PER_TRIAL_BARS`` trials, of the ones with the best final AP."""
    import numpy as np

    title = "AP per frequency bucket, per trial (rare / common / frequent)"
    if len(rows) > PER_TRIAL_BARS:
        ranked = sorted(rows, key=lambda r: -(metric_or_none(r.get("AP")) or -1.0))
        rows, title = ranked[:PER_TRIAL_BARS], f"{title}: the {PER_TRIAL_BARS} best of {len(rows)} trials by AP"
    fig = new_figure(max(6.4, 0.55 * len(rows) + 2), 3.6)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(rows))
    width = 0.27
    for i, metric in enumerate(("APr", "APc", "APf")):
        ys = [metric_or_none(r.get(metric)) for r in rows]
        ax.bar(x + (i - 1) * width, [0.0 if y is None else y for y in ys], width, label=metric)
    ax.set_xticks(x)
    ax.set_xticklabels([_short(r["trial_id"]) for r in rows], rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("final AP")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    return png_bytes(fig)


def _ran(r, max_t: int) -> str:
    return "failed" if r["status"] == "FAILED" else "stopped early" if r["iterations"] < max_t else "full schedule"


_RAN_COLORS = {"full schedule": "tab:blue", "stopped early": "tab:orange", "failed": "tab:red"}


def plot_iterations(rows, max_t: int) -> bytes:
    """How many evaluations each trial reported (orange: stopped early, red: failed); with more than
    ``PER_TRIAL_BARS`` trials, how many trials stopped after each number of evaluations."""
    if len(rows) > PER_TRIAL_BARS:
        return _plot_iteration_counts(rows, max_t)
    fig = new_figure(6.4, max(2.4, 0.28 * len(rows) + 1.2))
    ax = fig.add_subplot(1, 1, 1)
    ax.barh(range(len(rows)), [r["iterations"] for r in rows], color=[_RAN_COLORS[_ran(r, max_t)] for r in rows])
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([_short(r["trial_id"]) for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.axvline(max_t, color="gray", linestyle="--", linewidth=1)
    ax.set_xlabel("evaluations reported (Tune training_iteration)")
    ax.set_title("how long each trial ran (orange: stopped early, red: failed)")
    return png_bytes(fig)


def _plot_iteration_counts(rows, max_t: int) -> bytes:
    fig = new_figure(6.4, 3.2)
    ax = fig.add_subplot(1, 1, 1)
    ticks = sorted({int(r["iterations"]) for r in rows})
    bottom = [0] * len(ticks)
    for kind, color in _RAN_COLORS.items():
        counts = [sum(1 for r in rows if int(r["iterations"]) == t and _ran(r, max_t) == kind) for t in ticks]
        if any(counts):
            ax.bar(range(len(ticks)), counts, bottom=bottom, color=color, label=kind)
            bottom = [b + c for b, c in zip(bottom, counts, strict=True)]
    ax.set_xticks(range(len(ticks)))
    ax.set_xticklabels([str(t) for t in ticks])
    ax.set_xlabel("evaluations reported (Tune training_iteration)")
    ax.set_ylabel("trials")
    ax.set_title(f"how long the {len(rows)} trials ran")
    ax.legend(fontsize=8)
    return png_bytes(fig)


def plot_rank(best_label: str, best_pc, base_pc, val_annotations) -> bytes:
    """AP by frequency rank, best trial vs stage 1: lt_models.evaluation.plot_ap_by_frequency when the annotations
    are known (frequency buckets shaded), else a plain line plot in category-id order."""
    runs = {best_label: {"per_class": best_pc}}
    if base_pc:
        runs["stage 1 (non-balance baseline)"] = {"per_class": base_pc}
    if val_annotations:
        from lt_models.evaluation import plot_ap_by_frequency

        with tempfile.TemporaryDirectory(prefix="ltsweep-report-") as tmp:
            p = Path(tmp) / AP_BY_FREQUENCY_PNG
            plot_ap_by_frequency(
                runs, val_annotations, p, title="per-class AP by frequency rank: best trial vs stage 1"
            )
            return p.read_bytes()
    return plot_ap_by_rank(
        {k: v["per_class"] for k, v in runs.items()},
        xlabel="category id (no annotations given to rank by frequency)",
        title="per-class AP: best trial vs stage 1",
    )


def plot_reliability(reliability: Mapping[str, Mapping[str, Any]], ece: Mapping[str, Any]) -> bytes:
    """Reliability diagram per frequency bucket: precision (share of true positives at IoU 0.5) against the mean
    score of each score bin, one panel per bucket (all / r / c / f), the diagonal = perfectly calibrated; the bar
    under each point is the share of the bucket's detections in that bin."""
    names = [b for b in ("all", "r", "c", "f") if b in reliability]
    fig = new_figure(3.0 * max(1, len(names)), 3.2)
    for i, name in enumerate(names):
        r = reliability[name]
        ax = fig.add_subplot(1, max(1, len(names)), i + 1)
        pts = [(c, p) for c, p in zip(r["confidence"], r["precision"]) if c is not None and p is not None]
        total = sum(r["count"]) or 1
        edges = r["edges"]
        ax.bar(edges[:-1], [n / total for n in r["count"]], width=edges[1] - edges[0], align="edge", color="0.85")
        ax.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=1)
        if pts:
            ax.plot([c for c, _ in pts], [p for _, p in pts], marker="o", color="tab:blue")
        key = "ECE" if name == "all" else f"ECE{name}"
        value = metric_or_none(ece.get(key))
        label = {"all": "all classes", "r": "rare", "c": "common", "f": "frequent"}[name]
        ax.set_title(f"{label}: ECE {'n/a' if value is None else f'{value:.3f}'}", fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("score", fontsize=8)
        if i == 0:
            ax.set_ylabel("precision (IoU 0.5)", fontsize=8)
    return png_bytes(fig)


def plot_schedules(series: Mapping[str, Sequence[tuple[int, float]]], best: str | None) -> bytes:
    """λ against the evaluation, one line per trial (``series``: trial id -> [(step, λ)]), the best trial bold."""
    fig = new_figure(6.4, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    for trial_id, points in sorted(series.items()):
        steps, lams = zip(*sorted(points)) if points else ((), ())
        is_best = trial_id == best
        ax.step(steps, lams, where="post", linewidth=2.5 if is_best else 1.0, alpha=1.0 if is_best else 0.5,
                label=f"{_short(trial_id)} (best)" if is_best else None)  # fmt: skip
    ax.set_xlabel("evaluation (Tune training_iteration)")
    ax.set_ylabel("λ of the epochs before it")
    ax.set_title("soft-balance λ over each trial (PBT)")
    if best is not None:
        ax.legend(fontsize=7)
    return png_bytes(fig)
