"""Reading sweeps back from MLflow, and pictures of them: the HTML sweep report and ``ltsweep compare``.

- :func:`search_tagged` finds runs by their tags (:mod:`pipelines.names`), for the report and for the MLflow writer.
- :func:`log_sweep_report` (called by the MLflow writer when the sweep ends) writes ``sweep_report.html``
  on the sweep's parent run: a table of trials and, embedded as base64 PNGs, AP/APr vs λ, AP/APr vs ξ, APr/APc/APf
  per trial, how many evaluations each trial ran before ASHA stopped it, and AP by frequency rank of the best trial
  against the stage-1 baseline (the pretrain run's per-class AP, when that run logged one).
- :func:`row_configs` groups a sweep's trial rows by configuration (their seeds are repeats,
  :mod:`pipelines.analysis.aggregate`); the report shows n, mean and 95% CI per configuration, the best configuration's lead over the runner-up and over
  the baseline in words, and one line per value of the other searched factors in its "vs λ" / "vs ξ" plots.
  ``ltsweep compare`` (:mod:`pipelines.analysis.compare`) reads sweeps back the same way.

Plots use matplotlib's object API with the Agg canvas (no pyplot state, no display needed). AP values of -1 mean
"no category in this frequency bucket" (LVIS convention) and are shown as missing.
"""
from __future__ import annotations

import base64
import html
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from lt_models.atomic import write_bytes_atomic
from pipelines.analysis import aggregate
from pipelines.names import (AP_BY_FREQUENCY_PNG, CONFIG_AGGREGATES_JSON, ITERATIONS_TAG, MLFLOW_TRIAL_METRICS,
                              PARENT_TAG, PER_CLASS_JSON, PRETRAIN_SHA_PARAM, PRETRAIN_SHA_TAG, REPORT_HTML,
                              REPORT_TABLE_METRICS, ROLE_PRETRAIN, ROLE_SWEEP, ROLE_TAG, ROLE_TRIAL, SEED_PARAM, TRIAL_ID_TAG,
                              TRIAL_STATUS_TAG, best_trial, finite_number, per_class_dict)

_LAM_NAMES = ("lam", "lambda")
_XI_NAMES = ("xi",)


# --------------------------------------------------------------------------------------------------------------
# small helpers
def _num(v: Any) -> float | None:
    """A finite, non-negative metric value, else None (-1 marks an empty frequency bucket)."""
    f = finite_number(v)
    return f if f is not None and f >= 0 else None


def _fmt(v: Any, digits: int = 3) -> str:
    f = _num(v)
    return "n/a" if f is None else f"{f:.{digits}f}"


def _figure(w: float = 6.4, h: float = 3.6):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _key_named(keys: Iterable[str], names: Sequence[str]) -> str | None:
    for k in keys:
        if k.rsplit(".", 1)[-1].lower() in names:
            return k
    return None


def _short(name: str, n: int = 18) -> str:
    return name if len(name) <= n else "…" + name[-(n - 1):]


# --------------------------------------------------------------------------------------------------------------
# reading a sweep back from MLflow
def search_tagged(client, experiment_id: str, tags: Mapping[str, str]) -> list:
    """Active runs whose tags equal ``tags`` (keys given verbatim, e.g. ``{"ltsweep.role": "trial"}``), oldest
    first."""
    from mlflow.entities import ViewType
    from mlflow.utils import get_results_from_paginated_fn

    def q(value: str) -> str:  # a string literal of an MLflow filter string
        return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"

    flt = " and ".join(f"tags.`{k}` = {q(v)}" for k, v in tags.items())
    return get_results_from_paginated_fn(
        lambda n, token: client.search_runs([experiment_id], filter_string=flt, run_view_type=ViewType.ACTIVE_ONLY,
                                            max_results=n, order_by=["attributes.start_time ASC"], page_token=token),
        1000)


def latest_sweep_run(client, experiment_name: str):
    """The newest sweep run (``ltsweep.role=sweep``) of the experiment named ``experiment_name``, or None."""
    exp = client.get_experiment_by_name(experiment_name)
    runs = [] if exp is None else search_tagged(client, exp.experiment_id, {ROLE_TAG: ROLE_SWEEP})
    return runs[-1] if runs else None  # search_tagged lists oldest first


def trial_rows(client, experiment_id: str, parent_run_id: str) -> list[dict[str, Any]]:
    """One dict per trial run of the sweep: ids, status, iterations, params and the latest metric values."""
    rows = []
    for r in search_tagged(client, experiment_id, {ROLE_TAG: ROLE_TRIAL, PARENT_TAG: parent_run_id}):
        tags, metrics = r.data.tags, r.data.metrics
        iters = tags.get(ITERATIONS_TAG)
        if iters is None:  # still running, or ended without our tag: the last step logged
            hist = client.get_metric_history(r.info.run_id, "epoch") or client.get_metric_history(r.info.run_id, "AP")
            iters = max((m.step for m in hist), default=0)
        row = {"trial_id": tags.get(TRIAL_ID_TAG, ""), "run_id": r.info.run_id, "name": r.info.run_name or "",
               "status": r.info.status, "tune_status": tags.get(TRIAL_STATUS_TAG, ""), "iterations": int(iters),
               "params": dict(r.data.params)}
        for k in MLFLOW_TRIAL_METRICS:
            row[k] = metrics.get(k)
        rows.append(row)
    rows.sort(key=lambda row: row["trial_id"])
    return rows


def best_row(rows: Sequence[Mapping[str, Any]], metric: str = "AP", mode: str = "max",
             max_t: int | None = None) -> Mapping[str, Any] | None:
    """The best of :func:`trial_rows` by final ``metric`` (``mode`` max or min), by the sweep's one best-trial rule
    (:func:`pipelines.names.best_trial`; ``max_t``: evaluations of a full-length trial)."""
    return best_trial(rows, value=lambda r: r.get(metric), evaluations=lambda r: r["iterations"],
                      failed=lambda r: r.get("status") == "FAILED", trial_id=lambda r: r["trial_id"], mode=mode,
                      full_length=max_t)


def row_configs(rows: Sequence[Mapping[str, Any]], searched_keys: Sequence[str], max_t: int | None,
                metric: str = "AP") -> list[aggregate.ConfigResult]:
    """:func:`trial_rows` grouped by configuration: the searched params without ``seed`` (a run's ``seed`` param
    tells its repeat), with n, mean, sd and 95% CI of each table metric and of the sweep's ``metric``."""
    keys = [k for k in searched_keys if k != PRETRAIN_SHA_PARAM] or sorted(
        {k for r in rows for k in r["params"] if k != PRETRAIN_SHA_PARAM})
    keys = list(dict.fromkeys(keys + [SEED_PARAM]))
    return aggregate.aggregate(rows, config=lambda r: {k: r["params"][k] for k in keys if k in r["params"]},
                               metric=lambda r, m: r.get(m), full=lambda r: not max_t or r["iterations"] >= max_t,
                               failed=lambda r: r.get("status") == "FAILED",
                               metrics=tuple(dict.fromkeys(REPORT_TABLE_METRICS + (metric,))))


def _download_per_class(client, run_id: str) -> dict[int, float]:
    try:
        with tempfile.TemporaryDirectory(prefix="ltsweep-report-") as tmp:
            p = client.download_artifacts(run_id, PER_CLASS_JSON, tmp)
            return per_class_dict(json.loads(Path(p).read_text()))
    except Exception:  # noqa: BLE001 - the artifact is optional (trial without per-class AP)
        return {}


def stage1_per_class(client, experiment_id: str, sha256: str | None) -> tuple[dict[int, float], str | None]:
    """Per-class AP of the stage-1 (pretrain) run with this sha256: this experiment first, then any experiment
    (a reused stage-1 checkpoint is logged where it was trained). Returns ({}, None) if none is found."""
    candidates = []
    tags = {ROLE_TAG: ROLE_PRETRAIN, **({PRETRAIN_SHA_TAG: sha256} if sha256 else {})}
    candidates.extend(search_tagged(client, experiment_id, tags))
    if not candidates and sha256:
        for exp in client.search_experiments():
            if exp.experiment_id != experiment_id:
                candidates.extend(search_tagged(client, exp.experiment_id, tags))
    for run in reversed(candidates):  # the newest first
        pc = _download_per_class(client, run.info.run_id)
        if pc:
            return pc, run.info.run_id
    return {}, None


# --------------------------------------------------------------------------------------------------------------
# plots
def plot_ap_by_rank(runs: Mapping[str, Mapping[int, float]], path: str | os.PathLike | None = None, *,
                    order: Sequence[int] | None = None, xlabel: str = "category (id order)",
                    title: str = "per-class AP") -> bytes:
    """Per-class AP of several runs over the same category order (lines). Writes ``path`` if given; returns PNG."""
    fig = _figure(7.0, 3.6)
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
    data = _png_bytes(fig)
    if path is not None:
        write_bytes_atomic(Path(path), data)
    return data


def _plot_vs_param(rows, key: str, others: Sequence[str], title: str, xlabel: str) -> bytes:
    """AP (left) and APr (right) against a searched value: one line per combination of the other searched factors
    (e.g. one per loss), through the mean over seeds at each value; the runs are the dots."""
    fig = _figure(9.6, 3.6)
    for i, metric in enumerate(("AP", "APr")):
        ax = fig.add_subplot(1, 2, i + 1)
        groups: dict[tuple, dict[float, list[float]]] = {}
        for r in rows:
            x, y = finite_number(r["params"].get(key)), _num(r.get(metric))
            if x is None or y is None:
                continue
            label = tuple((k, r["params"].get(k)) for k in others if k in r["params"])
            groups.setdefault(label, {}).setdefault(x, []).append(y)
        for label, pts in sorted(groups.items(), key=lambda kv: str(kv[0])):
            xs = sorted(pts)
            name = ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in label) or metric
            line = ax.plot(xs, [sum(pts[x]) / len(pts[x]) for x in xs], marker="o", linewidth=1.2, label=name)
            ax.scatter([x for x in xs for _ in pts[x]], [y for x in xs for y in pts[x]], s=10, alpha=0.5,
                       color=line[0].get_color())
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"final {metric}")
        ax.set_title(f"{title}: {metric}")
        if groups:
            ax.legend(fontsize=7)
    return _png_bytes(fig)


def _plot_buckets(rows) -> bytes:
    import numpy as np

    fig = _figure(max(6.4, 0.55 * len(rows) + 2), 3.6)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(rows))
    width = 0.27
    for i, metric in enumerate(("APr", "APc", "APf")):
        ys = [_num(r.get(metric)) for r in rows]
        ax.bar(x + (i - 1) * width, [0.0 if y is None else y for y in ys], width, label=metric)
    ax.set_xticks(x)
    ax.set_xticklabels([_short(r["trial_id"]) for r in rows], rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("final AP")
    ax.set_title("AP per frequency bucket, per trial (rare / common / frequent)")
    ax.legend(fontsize=8)
    return _png_bytes(fig)


def _plot_iterations(rows, max_t: int) -> bytes:
    fig = _figure(6.4, max(2.4, 0.28 * len(rows) + 1.2))
    ax = fig.add_subplot(1, 1, 1)
    colors = []
    for r in rows:
        if r["status"] == "FAILED":
            colors.append("tab:red")
        elif r["iterations"] < max_t:
            colors.append("tab:orange")
        else:
            colors.append("tab:blue")
    ax.barh(range(len(rows)), [r["iterations"] for r in rows], color=colors)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([_short(r["trial_id"]) for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.axvline(max_t, color="gray", linestyle="--", linewidth=1)
    ax.set_xlabel("evaluations reported (Tune training_iteration)")
    ax.set_title("how long each trial ran (orange: stopped early, red: failed)")
    return _png_bytes(fig)


def _plot_rank(best_label: str, best_pc, base_pc, val_annotations) -> bytes:
    """AP by frequency rank, best trial vs stage 1: lt_models.evaluation.plot_ap_by_frequency when the annotations
    are known (frequency buckets shaded), else a plain line plot in category-id order."""
    runs = {best_label: {"per_class": best_pc}}
    if base_pc:
        runs["stage 1 (non-balance baseline)"] = {"per_class": base_pc}
    if val_annotations:
        from lt_models.evaluation import plot_ap_by_frequency

        with tempfile.TemporaryDirectory(prefix="ltsweep-report-") as tmp:
            p = Path(tmp) / AP_BY_FREQUENCY_PNG
            plot_ap_by_frequency(runs, val_annotations, p, title="per-class AP by frequency rank: "
                                 "best trial vs stage 1")
            return p.read_bytes()
    return plot_ap_by_rank({k: v["per_class"] for k, v in runs.items()},
                           xlabel="category id (no annotations given to rank by frequency)",
                           title="per-class AP: best trial vs stage 1")


# --------------------------------------------------------------------------------------------------------------
# HTML report
_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse;
font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}th{background:#f3f3f3}
td.l,th.l{text-align:left}tr.best{background:#e8f5e9}img{max-width:100%;border:1px solid #eee;margin:4px 0}
.note{color:#666;font-size:13px}"""


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _config_section(rows, keys, metric: str, mode: str, max_t: int, baseline) -> list[str]:
    """The answer over seeds: one row per configuration (n, mean [95% CI]), and the best one's lead in words."""
    e = html.escape
    configs = row_configs(rows, keys, max_t, metric)
    ranking = aggregate.ranked(configs, metric, mode)
    best = ranking[0] if ranking else None
    factors = sorted({k for c in configs for k in c.config})
    out = [f"<h2>Per configuration over its seeds</h2><p>Mean [95% CI] over the seeds of each configuration; the best "
           f"configuration is the best mean {e(metric)} among those whose runs all ran the full schedule.</p>",
           "<table><tr>" + "".join(f"<th class='l'>{e(k)}</th>" for k in factors) + "<th>n</th>"
           + "".join(f"<th>{m}</th>" for m in REPORT_TABLE_METRICS) + "<th>full</th></tr>"]
    for c in configs:
        cls = " class='best'" if c is best else ""
        out.append(f"<tr{cls}>" + "".join(f"<td class='l'>{e(str(c.config.get(k, '—')))}</td>" for k in factors)
                   + f"<td>{c.n}</td>" + "".join(f"<td>{e(c.stats[m].text())}</td>" for m in REPORT_TABLE_METRICS)
                   + f"<td>{'yes' if c.full else 'no'}</td></tr>")
    out.append("</table>")
    sentences = aggregate.comparisons(ranking, metric, baseline, value=lambda r, m: r.get(m))
    out.extend(f"<p class='verdict'>{e(x)}</p>" for x in sentences)
    return out


def build_sweep_report(sweep_name: str, rows: Sequence[Mapping[str, Any]], *, searched_keys: Sequence[str],
                       metric: str = "AP", mode: str = "max", best_per_class: Mapping[int, float] | None = None,
                       stage1_per_class: Mapping[int, float] | None = None, val_annotations: str | None = None,
                       max_t: int | None = None, baseline: Mapping[str, Any] | None = None) -> str:
    """The sweep report as one self-contained HTML page (figures embedded as base64 PNGs)."""
    e = html.escape
    max_t = max_t or max((r["iterations"] for r in rows), default=0)  # full length: ASHA's max_t
    best = best_row(rows, metric, mode, max_t)
    keys = list(searched_keys) or sorted({k for r in rows for k in r["params"] if k != PRETRAIN_SHA_PARAM})
    n_failed = sum(r["status"] == "FAILED" for r in rows)
    n_early = sum(r["status"] != "FAILED" and r["iterations"] < max_t for r in rows)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>ltsweep sweep {e(sweep_name)}</title>"
             f"<style>{_CSS}</style></head><body>",
             f"<h1>Sweep <code>{e(sweep_name)}</code></h1>",
             f"<p>{len(rows)} trials; {n_early} stopped early (before {max_t} evaluations); {n_failed} failed. "
             f"Best trial by {e(metric)} ({e(mode)}): "
             + (f"<b>{e(best['trial_id'])}</b> with {e(metric)} = {_fmt(best.get(metric))}, "
                + ", ".join(f"{e(k)} = {e(str(best['params'].get(k, '—')))}" for k in keys)
                if best else "none (no trial reported it)") + ".</p>"]
    # table
    head = "".join(f"<th>{e(k)}</th>" for k in keys)
    parts.append(f"<table><tr><th class='l'>trial</th><th class='l'>status</th><th>evals</th>{head}"
                 + "".join(f"<th>{m}</th>" for m in REPORT_TABLE_METRICS) + "</tr>")
    for r in rows:
        cls = " class='best'" if best is not None and r["run_id"] == best["run_id"] else ""
        parts.append(f"<tr{cls}><td class='l'>{e(r['trial_id'])}</td><td class='l'>{e(r['status'])}</td>"
                     f"<td>{r['iterations']}</td>"
                     + "".join(f"<td>{e(str(r['params'].get(k, '—')))}</td>" for k in keys)
                     + "".join(f"<td>{_fmt(r.get(m))}</td>" for m in REPORT_TABLE_METRICS) + "</tr>")
    parts.append("</table><p class='note'>Final values (the last evaluation each trial reported); n/a = empty "
                 "frequency bucket or not reported.</p>")
    parts.extend(_config_section(rows, keys, metric, mode, max_t, baseline))
    # figures: one line per value of the other searched factors (the seed is a repeat, not a factor)
    factors = [k for k in keys if k != SEED_PARAM]
    lam, xi = _key_named(factors, _LAM_NAMES), _key_named(factors, _XI_NAMES)
    loss_key = _key_named(factors, ("loss",))
    parts.append("<h2>AP and APr vs λ (soft-balance sampling)</h2>")
    parts.append(_img(_plot_vs_param(rows, lam, [k for k in factors if k != lam], "vs λ", "λ"), "AP vs lambda")
                 if lam else "<p class='note'>λ was not searched in this sweep.</p>")
    parts.append("<h2>AP and APr vs ξ (ACSL threshold)</h2>")
    if xi:
        xi_rows = [r for r in rows if loss_key is None or "acsl" in str(r["params"].get(loss_key, "acsl"))]
        note = " (ACSL trials only)" if loss_key else ""
        parts.append(_img(_plot_vs_param(xi_rows, xi, [k for k in factors if k not in (xi, loss_key)],
                                         f"vs ξ{note}", "ξ"), "AP vs xi")
                     if xi_rows else "<p class='note'>no ACSL trial in this sweep.</p>")
        if loss_key and xi_rows:
            parts.append("<p class='note'>ACSL trials only: ξ has no effect on the other losses.</p>")
    else:
        parts.append("<p class='note'>ξ was not searched in this sweep.</p>")
    if rows:
        parts.append("<h2>APr / APc / APf per trial</h2>" + _img(_plot_buckets(rows), "buckets per trial"))
        parts.append("<h2>How long each trial ran before ASHA stopped it</h2>"
                     + _img(_plot_iterations(rows, max_t), "iterations per trial"))
    parts.append("<h2>AP by frequency rank: best trial vs stage-1 baseline</h2>")
    if best is not None and best_per_class:
        parts.append(_img(_plot_rank(f"best trial {best['trial_id']}", dict(best_per_class),
                                     dict(stage1_per_class or {}), val_annotations), "AP by frequency rank"))
        if not stage1_per_class:
            parts.append("<p class='note'>No stage-1 per-class AP was logged (one-stage sweep, or the pretrain run "
                         "has no per_class_ap.json): only the best trial is shown.</p>")
    else:
        parts.append("<p class='note'>The best trial reported no per-class AP.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _log_aggregates(client, parent_run_id: str, rows, searched_keys, metric: str, mode: str, max_t: int) -> None:
    import time

    from mlflow.entities import Metric

    configs = row_configs(rows, searched_keys, max_t, metric)
    best = aggregate.best_config(configs, metric, mode)
    table = aggregate.table(configs, best)
    with tempfile.TemporaryDirectory(prefix="ltsweep-report-") as tmp:
        p = Path(tmp) / CONFIG_AGGREGATES_JSON
        p.write_text(json.dumps(table, indent=1, default=str), encoding="utf-8")
        client.log_artifact(parent_run_id, str(p))
    ts = int(time.time() * 1000)
    failed = [r.get("status") == "FAILED" for r in rows]
    counts = {"trials": len(rows), "errored": sum(failed),
              "stopped_early": sum(not f and r["iterations"] < max_t for r, f in zip(rows, failed)),
              "trial_epochs": sum(int(finite_number(r.get("epoch")) or 0) for r in rows)}
    metrics = [Metric(k, float(v), ts, 0) for k, v in counts.items()]
    if best is not None:
        metrics.append(Metric("best_n", float(best.n), ts, 0))
        for m, st in best.stats.items():
            for suffix, v in (("", st.mean), ("_ci_low", st.ci_low), ("_ci_high", st.ci_high)):
                if finite_number(v) is not None:
                    metrics.append(Metric(f"{m}{suffix}", float(v), ts, 0))
    client.log_batch(parent_run_id, metrics=metrics)


def log_sweep_report(client, experiment_id: str, parent_run_id: str, *, sweep_name: str,
                     searched_keys: Sequence[str], val_annotations: str | None = None, metric: str = "AP",
                     mode: str = "max", last_results: Mapping[str, Mapping[str, Any]] | None = None,
                     max_t: int | None = None, baseline: Mapping[str, Any] | None = None) -> str:
    """Build the sweep report from MLflow (plus Tune's last results, for per-class AP) and log it as
    ``sweep_report.html`` on the parent run, with ``config_aggregates.json`` (n, mean, sd, 95% CI per configuration)
    and the sweep-level metrics of the parent run: the best configuration's means (``AP``, ``AP50``, ``APr``,
    ``APc``, ``APf``) with ``<metric>_ci_low`` / ``_ci_high`` and ``best_n`` (its runs), and ``trials``,
    ``stopped_early``, ``errored``, ``trial_epochs``, so sweeps sort and compare in the MLflow runs table.
    ``max_t``: evaluations of a full-length trial (default: the longest trial's). Returns the HTML."""
    rows = trial_rows(client, experiment_id, parent_run_id)
    _log_aggregates(client, parent_run_id, rows, searched_keys, metric, mode,
                    max_t or max((r["iterations"] for r in rows), default=0))
    best = best_row(rows, metric, mode, max_t or max((r["iterations"] for r in rows), default=0))
    best_pc: dict[int, float] = {}
    base_pc: dict[int, float] = {}
    if best is not None:
        best_pc = per_class_dict((last_results or {}).get(best["trial_id"], {}).get("per_class")) or \
            _download_per_class(client, best["run_id"])
        base_pc, _ = stage1_per_class(client, experiment_id, best["params"].get(PRETRAIN_SHA_PARAM))
    page = build_sweep_report(sweep_name, rows, searched_keys=searched_keys, metric=metric, mode=mode,
                              best_per_class=best_pc, stage1_per_class=base_pc, val_annotations=val_annotations,
                              max_t=max_t, baseline=baseline)
    with tempfile.TemporaryDirectory(prefix="ltsweep-report-") as tmp:
        p = Path(tmp) / REPORT_HTML
        p.write_text(page, encoding="utf-8")
        client.log_artifact(parent_run_id, str(p))
    return page
