"""The HTML sweep report, from the sweep's runs read back from MLflow (:mod:`pipelines.mlflow_io.reads`).

- :func:`log_sweep_report` (called by the MLflow writer when the sweep ends) writes ``sweep_report.html``
  on the sweep's parent run: a table of trials and, embedded as base64 PNGs, AP/APr vs λ, AP/APr vs ξ, APr/APc/APf
  per trial, how many evaluations each trial ran before ASHA stopped it, and AP by frequency rank of the best trial
  against the stage-1 baseline (the pretrain run's per-class AP, when that run logged one).
- :func:`row_configs` groups a sweep's trial rows by configuration (their seeds are repeats,
  :mod:`pipelines.analysis.aggregate`); the report shows n, mean and 95% CI per configuration, the best configuration's
  lead over the runner-up and over the baseline in words, and one line per value of the other searched factors in its
  "vs λ" / "vs ξ" plots. ``ltsweep compare`` (:mod:`pipelines.analysis.compare`) reads sweeps back the same way.

Plots use matplotlib's object API with the Agg canvas (no pyplot state, no display needed). AP values of -1 mean
"no category in this frequency bucket" (LVIS convention) and are shown as missing.
"""

from __future__ import annotations

import base64
import html
import json
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pipelines.analysis import aggregate
from pipelines.analysis.aggregate import best_trial
from pipelines.analysis.plots import (
    fmt_metric,
    plot_buckets,
    plot_iterations,
    plot_rank,
    plot_reliability,
    plot_schedules,
    plot_vs_param,
)
from pipelines.analysis.replicates import metric_of
from pipelines.mlflow_io.reads import download_calibration, download_per_class, stage1_per_class, trial_rows
from pipelines.names import (
    CONFIG_AGGREGATES_JSON,
    INTERVALS_TAG,
    PRETRAIN_SHA_PARAM,
    REPORT_HTML,
    REPORT_TABLE_METRICS,
    SEED_PARAM,
    TIDE_ERROR_TYPES,
    TRIAL_TABLE_METRICS,
    finite_number,
    per_class_dict,
)

_LAM_NAMES = ("lam", "lambda")
_XI_NAMES = ("xi",)


def _key_named(keys: Iterable[str], names: Sequence[str]) -> str | None:
    for k in keys:
        if k.rsplit(".", 1)[-1].lower() in names:
            return k
    return None


def best_row(
    rows: Sequence[Mapping[str, Any]], metric: str = "AP", mode: str = "max", max_t: int | None = None
) -> Mapping[str, Any] | None:
    """The best of :func:`trial_rows` by final ``metric`` (``mode`` max or min), by the sweep's one best-trial rule
    (:func:`pipelines.analysis.aggregate.best_trial`; ``max_t``: evaluations of a full-length trial)."""
    return best_trial(
        rows,
        value=lambda r: r.get(metric),
        evaluations=lambda r: r["iterations"],
        failed=lambda r: r.get("status") == "FAILED",
        trial_id=lambda r: r["trial_id"],
        mode=mode,
        full_length=max_t,
    )


def row_configs(
    rows: Sequence[Mapping[str, Any]], searched_keys: Sequence[str], max_t: int | None, metric: str = "AP"
) -> list[aggregate.ConfigResult]:
    """:func:`trial_rows` grouped by configuration: the searched params without ``seed`` (a run's ``seed`` param
    tells its repeat), with n, mean, sd and 95% interval of each table metric and of the sweep's ``metric`` (seeds
    x images for rows that carry ``replicates``)."""
    keys = [k for k in searched_keys if k != PRETRAIN_SHA_PARAM] or sorted(
        {k for r in rows for k in r["params"] if k != PRETRAIN_SHA_PARAM}
    )
    keys = list(dict.fromkeys(keys + [SEED_PARAM]))
    return aggregate.aggregate(
        rows,
        config=lambda r: {k: r["params"][k] for k in keys if k in r["params"]},
        metric=lambda r, m: r.get(m),
        full=lambda r: not max_t or r["iterations"] >= max_t,
        failed=lambda r: r.get("status") == "FAILED",
        metrics=tuple(dict.fromkeys(REPORT_TABLE_METRICS + (metric,))),
        replicates=row_replicates,
    )


def row_replicates(row: Mapping[str, Any], metric: str):
    """A trial row's image-bootstrap replicates of ``metric`` (``row["replicates"]``), or None."""
    return metric_of(row.get("replicates"), metric)


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
    out = [
        f"<h2>Per configuration over its seeds</h2><p>Mean [95% CI] over the seeds of each configuration; the best "
        f"configuration is the best mean {e(metric)} among those whose runs all ran the full schedule.</p>",
        "<table><tr>"
        + "".join(f"<th class='l'>{e(k)}</th>" for k in factors)
        + "<th>n</th>"
        + "".join(f"<th>{m}</th>" for m in REPORT_TABLE_METRICS)
        + "<th>full</th></tr>",
    ]
    for c in configs:
        cls = " class='best'" if c is best else ""
        out.append(
            f"<tr{cls}>"
            + "".join(f"<td class='l'>{e(str(c.config.get(k, '—')))}</td>" for k in factors)
            + f"<td>{c.n}</td>"
            + "".join(f"<td>{e(c.stats[m].text())}</td>" for m in REPORT_TABLE_METRICS)
            + f"<td>{'yes' if c.full else 'no'}</td></tr>"
        )
    out.append("</table>")
    sentences = aggregate.comparisons(
        ranking, metric, baseline, value=lambda r, m: r.get(m), replicates=row_replicates, mode=mode
    )
    out.append(f"<p class='note'>{e(aggregate.method_line(configs))}</p>")
    out.extend(f"<p class='verdict'>{e(x)}</p>" for x in sentences)
    return out


def build_sweep_report(
    sweep_name: str,
    rows: Sequence[Mapping[str, Any]],
    *,
    searched_keys: Sequence[str],
    metric: str = "AP",
    mode: str = "max",
    best_per_class: Mapping[int, float] | None = None,
    stage1_per_class: Mapping[int, float] | None = None,
    val_annotations: str | None = None,
    max_t: int | None = None,
    baseline: Mapping[str, Any] | None = None,
    best_calibration: Mapping[str, Any] | None = None,
    schedules: Mapping[str, Sequence[tuple[int, float]]] | None = None,
) -> str:
    """The sweep report as one self-contained HTML page (figures embedded as base64 PNGs). ``best_calibration``:
    the best trial's ``calibration.json`` (reliability diagram per bucket and ECEs)."""
    e = html.escape
    max_t = max_t or max((r["iterations"] for r in rows), default=0)  # full length: ASHA's max_t
    best = best_row(rows, metric, mode, max_t)
    keys = list(searched_keys) or sorted({k for r in rows for k in r["params"] if k != PRETRAIN_SHA_PARAM})
    n_failed = sum(r["status"] == "FAILED" for r in rows)
    n_early = sum(r["status"] != "FAILED" and r["iterations"] < max_t for r in rows)
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>ltsweep sweep {e(sweep_name)}</title>"
        f"<style>{_CSS}</style></head><body>",
        f"<h1>Sweep <code>{e(sweep_name)}</code></h1>",
        f"<p>{len(rows)} trials; {n_early} stopped early (before {max_t} evaluations); {n_failed} failed. "
        f"Best trial by {e(metric)} ({e(mode)}): "
        + (
            f"<b>{e(best['trial_id'])}</b> with {e(metric)} = {fmt_metric(best.get(metric))}, "
            + ", ".join(f"{e(k)} = {e(str(best['params'].get(k, '—')))}" for k in keys)
            if best
            else "none (no trial reported it)"
        )
        + ".</p>",
    ]
    parts.extend(_trial_table(rows, keys, best))
    parts.extend(_config_section(rows, keys, metric, mode, max_t, baseline))
    if schedules:
        png = plot_schedules(schedules, None if best is None else best["trial_id"])
        parts.append("<h2>λ over each trial (population-based training)</h2>" + _img(png, "lambda schedules"))
    parts.extend(_search_figures(rows, keys, max_t))
    parts.extend(_rank_figure(best, best_per_class, stage1_per_class, val_annotations))
    parts.extend(_errors_table(rows, keys, metric, mode, best))
    parts.extend(_calibration_figure(best, best_calibration))
    parts.append("</body></html>")
    return "\n".join(parts)


def _trial_table(rows, keys: Sequence[str], best) -> list[str]:
    """One row per trial: status, evaluations, searched values and final metrics (the best one highlighted)."""
    e = html.escape
    head = "".join(f"<th>{e(k)}</th>" for k in keys)
    parts = [
        f"<table><tr><th class='l'>trial</th><th class='l'>status</th><th>evals</th>{head}"
        + "".join(f"<th>{m}</th>" for m in TRIAL_TABLE_METRICS)
        + "</tr>"
    ]
    for r in rows:
        cls = " class='best'" if best is not None and r["run_id"] == best["run_id"] else ""
        parts.append(
            f"<tr{cls}><td class='l'>{e(r['trial_id'])}</td><td class='l'>{e(r['status'])}</td>"
            f"<td>{r['iterations']}</td>"
            + "".join(f"<td>{e(str(r['params'].get(k, '—')))}</td>" for k in keys)
            + "".join(f"<td>{fmt_metric(r.get(m))}</td>" for m in TRIAL_TABLE_METRICS)
            + "</tr>"
        )
    parts.append(
        "</table><p class='note'>Final values (the last evaluation each trial reported); n/a = empty "
        "frequency bucket or not reported.</p>"
    )
    return parts


def _search_figures(rows, keys: Sequence[str], max_t: int) -> list[str]:
    """AP/APr vs λ and vs ξ (one line per value of the other searched factors; the seed is a repeat, not a
    factor), the buckets per trial and how long each trial ran."""
    factors = [k for k in keys if k != SEED_PARAM]
    lam, xi = _key_named(factors, _LAM_NAMES), _key_named(factors, _XI_NAMES)
    loss_key = _key_named(factors, ("loss",))
    parts = ["<h2>AP and APr vs λ (soft-balance sampling)</h2>"]
    parts.append(
        _img(plot_vs_param(rows, lam, [k for k in factors if k != lam], "vs λ", "λ"), "AP vs lambda")
        if lam
        else "<p class='note'>λ was not searched in this sweep.</p>"
    )
    parts.append("<h2>AP and APr vs ξ (ACSL threshold)</h2>")
    if xi:
        xi_rows = [r for r in rows if loss_key is None or "acsl" in str(r["params"].get(loss_key, "acsl"))]
        note = " (ACSL trials only)" if loss_key else ""
        parts.append(
            _img(
                plot_vs_param(xi_rows, xi, [k for k in factors if k not in (xi, loss_key)], f"vs ξ{note}", "ξ"),
                "AP vs xi",
            )
            if xi_rows
            else "<p class='note'>no ACSL trial in this sweep.</p>"
        )
        if loss_key and xi_rows:
            parts.append("<p class='note'>ACSL trials only: ξ has no effect on the other losses.</p>")
    else:
        parts.append("<p class='note'>ξ was not searched in this sweep.</p>")
    if rows:
        parts.append("<h2>APr / APc / APf per trial</h2>" + _img(plot_buckets(rows), "buckets per trial"))
        parts.append(
            "<h2>How long each trial ran before ASHA stopped it</h2>"
            + _img(plot_iterations(rows, max_t), "iterations per trial")
        )
    return parts


def _rank_figure(best, best_per_class, stage1_per_class, val_annotations) -> list[str]:
    """AP by frequency rank of the best trial against the stage-1 baseline."""
    parts = ["<h2>AP by frequency rank: best trial vs stage-1 baseline</h2>"]
    if best is None or not best_per_class:
        return [*parts, "<p class='note'>The best trial reported no per-class AP.</p>"]
    label = f"best trial {best['trial_id']}"
    png = plot_rank(label, dict(best_per_class), dict(stage1_per_class or {}), val_annotations)
    parts.append(_img(png, "AP by frequency rank"))
    if not stage1_per_class:
        parts.append(
            "<p class='note'>No stage-1 per-class AP was logged (one-stage sweep, or the pretrain run "
            "has no per_class_ap.json): only the best trial is shown.</p>"
        )
    return parts


def _errors_table(rows, keys: Sequence[str], metric: str, mode: str, best, top: int = 8) -> list[str]:
    """TIDE's dAP per error type (every class / rare classes) of the best trials, so that the difference between
    two configurations is explained by where their AP goes."""
    e = html.escape
    parts = ["<h2>Where the AP goes: TIDE's error breakdown (dAP50, every class / rare)</h2>"]
    shown = [r for r in rows if r.get("dAP_Cls") is not None]
    if not shown:
        return [*parts, "<p class='note'>No trial logged TIDE's breakdown (an LVIS evaluation logs it).</p>"]
    sign = -1.0 if mode == "max" else 1.0
    shown.sort(key=lambda r: (r.get(metric) is None, sign * float(r.get(metric) or 0.0)))
    head = "".join(f"<th>{e(k)}</th>" for k in keys) + "".join(f"<th>{t}</th>" for t in TIDE_ERROR_TYPES)
    parts.append(f"<table><tr><th class='l'>trial</th>{head}<th>{e(metric)}</th></tr>")
    for r in shown[:top]:
        cls = " class='best'" if best is not None and r["run_id"] == best["run_id"] else ""
        cells = "".join(
            f"<td>{fmt_metric(r.get(f'dAP_{t}'))} / {fmt_metric(r.get(f'dAP_{t}_r'))}</td>" for t in TIDE_ERROR_TYPES
        )
        params = "".join(f"<td>{e(str(r['params'].get(k, '—')))}</td>" for k in keys)
        parts.append(
            f"<tr{cls}><td class='l'>{e(r['trial_id'])}</td>{params}{cells}<td>{fmt_metric(r.get(metric))}</td></tr>"
        )
    parts.append(
        "</table><p class='note'>The AP50 a trial would gain if every error of that type were fixed (TIDE: Cls "
        "wrong class, Loc poorly localised, Both, Dupe duplicate, Bkg background, Miss missed box), over every "
        "class / over the rare classes; the larger, the more AP that error type costs. Per bucket in MLflow: "
        "dAP_&lt;type&gt;_r, _c, _f.</p>"
    )
    return parts


def _lam_series(client, run_id: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client.get_metric_history(run_id, "lam")]


def _calibration_figure(best, calibration: Mapping[str, Any] | None) -> list[str]:
    """The best trial's reliability diagram per frequency bucket, with its ECEs."""
    parts = ["<h2>Calibration of the best trial's scores, per frequency bucket</h2>"]
    if best is None or not calibration or not isinstance(calibration.get("reliability"), Mapping):
        return [
            *parts,
            "<p class='note'>The best trial logged no reliability diagram (an LVIS evaluation logs it).</p>",
        ]
    parts.append(_img(plot_reliability(calibration["reliability"], calibration), "reliability diagram"))
    parts.append(
        "<p class='note'>Precision (true positives at IoU 0.5) against the mean score per score bin; the diagonal "
        "is a perfectly calibrated detector, ECE the count-weighted gap. AP-pool ranks every class's detections "
        "together, so it rewards scores that are calibrated across classes; per-class AP never sees it.</p>"
    )
    return parts


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
    counts = {
        "trials": len(rows),
        "errored": sum(failed),
        "stopped_early": sum(not f and r["iterations"] < max_t for r, f in zip(rows, failed)),
        "trial_epochs": sum(int(finite_number(r.get("epoch")) or 0) for r in rows),
    }
    metrics = [Metric(k, float(v), ts, 0) for k, v in counts.items()]
    if best is not None:
        metrics.append(Metric("best_n", float(best.n), ts, 0))
        for m, st in best.stats.items():
            for suffix, v in (("", st.mean), ("_ci_low", st.ci_low), ("_ci_high", st.ci_high)):
                if finite_number(v) is not None:
                    metrics.append(Metric(f"{m}{suffix}", float(v), ts, 0))
    client.log_batch(parent_run_id, metrics=metrics)
    client.set_tag(parent_run_id, INTERVALS_TAG, aggregate.method_line(configs))


def log_sweep_report(
    client,
    experiment_id: str,
    parent_run_id: str,
    *,
    sweep_name: str,
    searched_keys: Sequence[str],
    val_annotations: str | None = None,
    metric: str = "AP",
    mode: str = "max",
    last_results: Mapping[str, Mapping[str, Any]] | None = None,
    max_t: int | None = None,
    baseline: Mapping[str, Any] | None = None,
    replicates: Mapping[str, Mapping[str, Any]] | None = None,
    schedules: bool = False,
) -> str:
    """Build the sweep report from MLflow (plus Tune's last results, for per-class AP) and log it as
    ``sweep_report.html`` on the parent run, with ``config_aggregates.json`` (n, mean, sd, 95% CI per configuration)
    and the sweep-level metrics of the parent run: the best configuration's means (``AP``, ``AP50``, ``APr``,
    ``APc``, ``APf``) with ``<metric>_ci_low`` / ``_ci_high`` and ``best_n`` (its runs), and ``trials``,
    ``stopped_early``, ``errored``, ``trial_epochs``, so sweeps sort and compare in the MLflow runs table.
    ``max_t``: evaluations of a full-length trial (default: the longest trial's). ``replicates``: each trial's
    image-bootstrap replicates by trial id, for the seeds x images intervals. ``schedules``: plot each trial's λ series
    (a PBT sweep). Returns the HTML."""
    rows = trial_rows(client, experiment_id, parent_run_id)
    for r in rows:
        r["replicates"] = (replicates or {}).get(r["trial_id"])
    _log_aggregates(
        client,
        parent_run_id,
        rows,
        searched_keys,
        metric,
        mode,
        max_t or max((r["iterations"] for r in rows), default=0),
    )
    best = best_row(rows, metric, mode, max_t or max((r["iterations"] for r in rows), default=0))
    best_pc: dict[int, float] = {}
    base_pc: dict[int, float] = {}
    best_cal: Mapping[str, Any] = {}
    if best is not None:
        best_pc = per_class_dict((last_results or {}).get(best["trial_id"], {}).get("per_class")) or download_per_class(
            client, best["run_id"]
        )
        base_pc, _ = stage1_per_class(client, experiment_id, best["params"].get(PRETRAIN_SHA_PARAM))
        last = (last_results or {}).get(best["trial_id"], {})
        best_cal = (
            {"reliability": last["reliability"], **last}
            if isinstance(last.get("reliability"), Mapping)
            else download_calibration(client, best["run_id"])
        )
    page = build_sweep_report(
        sweep_name,
        rows,
        searched_keys=searched_keys,
        metric=metric,
        mode=mode,
        best_per_class=best_pc,
        stage1_per_class=base_pc,
        val_annotations=val_annotations,
        max_t=max_t,
        baseline=baseline,
        best_calibration=best_cal,
        schedules={r["trial_id"]: _lam_series(client, r["run_id"]) for r in rows} if schedules else None,
    )
    with tempfile.TemporaryDirectory(prefix="ltsweep-report-") as tmp:
        p = Path(tmp) / REPORT_HTML
        p.write_text(page, encoding="utf-8")
        client.log_artifact(parent_run_id, str(p))
    return page
