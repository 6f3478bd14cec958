"""``ltsweep compare``: the answer of several sweeps side by side, read back from MLflow.

For each sweep, its best configuration by the sweep's own metric and mode
(:func:`pipelines.analysis.aggregate.best_config`: the best mean over seeds among configurations that ran the full
schedule), with n and the mean [95% interval] of AP, APr, APc and APf (seeds x images when its trial runs logged
image-bootstrap replicates, :mod:`pipelines.analysis.evidence`): a printed table and a PNG of grouped bars with the
intervals as error bars. Identical studies run with different seeds then show overlapping intervals instead of
seemingly different numbers.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lt_models.atomic import write_bytes_atomic
from lt_models.errors import ConfigError
from pipelines.analysis import aggregate, replicates
from pipelines.analysis.plots import fmt_metric, metric_or_none, new_figure, png_bytes
from pipelines.analysis.report import row_configs
from pipelines.mlflow_io.reads import latest_sweep_run, trial_replicates_file, trial_rows
from pipelines.names import (
    BUCKET_METRICS,
    MAX_T_TAG,
    METRIC_TAG,
    MODE_TAG,
    REPORT_TABLE_METRICS,
    ROLE_SWEEP,
    ROLE_TAG,
    SEARCHED_KEYS_TAG,
)


def _resolve(client, name: str):
    """A sweep named by its experiment name (its latest sweep run) or by the run id of a sweep run."""
    exp = client.get_experiment_by_name(name)
    if exp is not None and exp.lifecycle_stage != "deleted":
        return exp, latest_sweep_run(client, exp.name)
    if re.fullmatch(r"[0-9a-f]{32}", name):
        try:
            run = client.get_run(name)
        except Exception:
            run = None
        if run is not None and run.data.tags.get(ROLE_TAG) == ROLE_SWEEP:
            return client.get_experiment(run.info.experiment_id), run
    known = sorted(e.name for e in client.search_experiments() if e.name != "Default")
    raise ConfigError(
        f"ltsweep compare: no sweep named {name!r} (an experiment name or the run id of a sweep run) "
        f"in {client.tracking_uri} (sweeps there: {', '.join(known) or 'none'}); check the name or "
        "pass --tracking-uri"
    )


def _ci(row: Mapping[str, Any], m: str) -> str:
    st = row.get("stats", {}).get(m)
    if st is None:
        return fmt_metric(row.get(m))
    return "n/a" if st.n == 0 else st.text()


def format_compare_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Plain-text table: one line per sweep (its best configuration: n, mean [95% CI] per metric)."""
    keys = sorted({k for r in rows for k in r["params"]})
    header = ["sweep", "best trial", "n", *REPORT_TABLE_METRICS, "evals", "trials", *keys]
    lines = [
        [
            str(r["sweep"]),
            str(r["trial_id"]),
            str(r.get("n", 1)),
            *(_ci(r, m) for m in REPORT_TABLE_METRICS),
            str(r["iterations"]),
            str(r["n_trials"]),
            *(str(r["params"].get(k, "—")) for k in keys),
        ]
        for r in rows
    ]
    widths = [max(len(h), *(len(l[i]) for l in lines)) if lines else len(h) for i, h in enumerate(header)]

    def fmt(cells):
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [fmt(header), "  ".join("-" * w for w in widths)]
    out += [fmt(l) for l in lines]
    return "\n".join(out)


def plot_compare(rows: Sequence[Mapping[str, Any]], out_png: str | os.PathLike) -> Path:
    """Grouped bars: mean AP, APr, APc, APf of each sweep's best configuration, 95% CIs as error bars."""
    import numpy as np

    fig = new_figure(max(6.4, 1.2 * len(rows) + 4), 3.8)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(BUCKET_METRICS))
    width = 0.8 / max(1, len(rows))
    for i, r in enumerate(rows):
        ys = [metric_or_none(r.get(m)) for m in BUCKET_METRICS]
        stats = [r.get("stats", {}).get(m) for m in BUCKET_METRICS]
        err = [
            [0.0 if st is None or not math.isfinite(st.ci_low) else y - st.ci_low for y, st in zip(ys, stats)],
            [0.0 if st is None or not math.isfinite(st.ci_high) else st.ci_high - y for y, st in zip(ys, stats)],
        ]
        err = [[0.0 if y is None else e for y, e in zip(ys, side)] for side in err]
        bars = ax.bar(
            x - 0.4 + width * (i + 0.5),
            [0.0 if y is None else y for y in ys],
            width,
            yerr=err,
            capsize=3,
            label=f"{r['sweep']} (n={r.get('n', 1)})",
        )
        for b, y in zip(bars, ys):
            ax.annotate(
                "n/a" if y is None else f"{y:.3f}",
                (b.get_x() + b.get_width() / 2, b.get_height()),
                ha="center",
                va="bottom",
                fontsize=7,
            )
    ax.set_xticks(x)
    ax.set_xticklabels(BUCKET_METRICS)
    ax.set_ylabel("mean AP of the best configuration")
    ax.set_title("best configuration of each sweep: AP by frequency bucket (95% intervals)")
    ax.legend(fontsize=8)
    out = Path(out_png)
    write_bytes_atomic(out, png_bytes(fig))
    return out


def _best_with_replicates(client, rows, searched, max_t, metric: str, mode: str) -> aggregate.ConfigResult | None:
    """The best configuration, with the image-bootstrap replicates of its runs (downloaded from their trial runs)
    behind its intervals."""
    best = aggregate.best_config(row_configs(rows, searched, max_t, metric), metric, mode)
    if best is None:
        return None
    for r in best.runs.values():
        data = trial_replicates_file(client, r["run_id"])
        r["replicates"] = None if data is None else replicates.from_bytes(data)
    return aggregate.best_config(row_configs(rows, searched, max_t, metric), metric, mode)


def compare_sweeps(
    client, sweeps: Sequence[str], out_png: str | os.PathLike = Path("compare.png"), quiet: bool = False
) -> list[dict[str, Any]]:
    """Best configuration of each sweep (by the sweep's own metric/mode, default AP/max) side by side.

    ``client``: an MlflowClient of the store holding the sweeps (`ltsweep compare` opens it with
    :func:`pipelines.mlflow_io.client.open_store`). Prints a table (n, AP, AP50, APr, APc, APf as mean [95% CI],
    evaluations, trials, searched values) and writes a PNG of grouped bars to ``out_png``. Returns one dict per
    sweep: the means under the metric names, their :class:`pipelines.analysis.aggregate.Stat` under ``stats``, the best
    single run of that configuration (``trial_id``, ``run_id``), and the sweep-level metrics of the sweep run
    (``sweep_metrics``).
    """
    if not sweeps:
        raise ConfigError("ltsweep compare: name at least one sweep (the `name:` of its YAML)")
    uri = client.tracking_uri
    out: list[dict[str, Any]] = []
    for name in sweeps:
        exp, parent = _resolve(client, name)
        if parent is None:
            raise ConfigError(
                f"ltsweep compare: experiment {name!r} in {uri} has no ltsweep sweep run "
                "(tag ltsweep.role=sweep); was it logged by `ltsweep sweep`?"
            )
        metric = parent.data.tags.get(METRIC_TAG, "AP")
        mode = parent.data.tags.get(MODE_TAG, "max")
        try:
            searched = json.loads(parent.data.tags.get(SEARCHED_KEYS_TAG, "[]"))
        except ValueError:
            searched = []
        rows = trial_rows(client, exp.experiment_id, parent.info.run_id)
        max_t = parent.data.tags.get(MAX_T_TAG)
        max_t = int(max_t) if max_t else max((r["iterations"] for r in rows), default=0)
        best = _best_with_replicates(client, rows, searched, max_t, metric, mode)
        if best is None:
            raise ConfigError(f"ltsweep compare: sweep {name!r} has no trial that reported {metric} yet")
        sign = 1.0 if mode == "max" else -1.0
        top = max(
            (r for r in best.runs.values() if metric_or_none(r.get(metric)) is not None),
            key=lambda r: sign * float(r[metric]),
        )
        out.append(
            {
                "sweep": exp.name,
                "trial_id": top["trial_id"],
                "run_id": top["run_id"],
                "parent_run_id": parent.info.run_id,
                "metric": metric,
                "mode": mode,
                "n": best.n,
                **{m: best.stats[m].mean if m in best.stats else top.get(m) for m in REPORT_TABLE_METRICS},
                "stats": best.stats,
                "intervals": aggregate.method_line([best]),
                "iterations": top["iterations"],
                "n_trials": len(rows),
                "params": {k: str(v) for k, v in best.config.items()},
                # what the sweep logged on its own run: AP.. (+ _ci_low / _ci_high), best_n, trials,
                # stopped_early, errored, trial_epochs
                "sweep_metrics": dict(parent.data.metrics),
            }
        )
    png = plot_compare(out, out_png)
    if not quiet:  # `ltsweep compare --json` prints the rows instead
        print(format_compare_table(out))
        for r in out:
            print(f"{r['sweep']}: {r['intervals']}")
        print(f"wrote {png}")
    return out
