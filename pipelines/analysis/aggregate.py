"""Results over repeated seeds: per-configuration n, mean, standard deviation and 95% interval, the best
configuration, and paired comparisons with verdicts. Every place that shows a sweep's answer (the summary table,
``ltsweep compare``, the HTML report, the MLflow sweep run, ``ltsweep confirm``) goes through here.

A *configuration* is a trial's searched values without its ``seed``; its trials are its repeats (``search.seeds``).
Every interval is :mod:`pipelines.analysis.evidence`'s: seeds x images when the runs carry bootstrap replicates of
the validation images (each trial's checkpoint holds them), else seeds only; the method is named beside the numbers.
A paired comparison of two configurations uses the seeds both ran (same seed = same stage-1 checkpoint and the
same sampler draws) and the same image draws. The comparisons shown together get their verdicts ("better",
"worse", "cannot tell") together, with Holm's correction.

The best configuration is the best *mean* of the metric among configurations whose every run reached the full
schedule (ASHA's survivors); when none did, among all configurations. This module imports neither Ray nor MLflow.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

from pipelines.analysis import evidence
from pipelines.analysis.evidence import CONFIDENCE, Interval, Verdict
from pipelines.names import BUCKET_METRICS, finite_number

T = TypeVar("T")
SEED_KEY = "seed"
Replicates = Callable[[Any, str], "np.ndarray | None"]  # (run record, metric) -> its image-bootstrap values [R]

__all__ = [
    "CONFIDENCE",
    "Comparison",
    "ConfigResult",
    "Stat",
    "aggregate",
    "best_config",
    "best_trial",
    "comparisons",
    "describe",
    "format_table",
    "matches",
    "paired",
    "ranked",
    "table",
]


@dataclasses.dataclass(frozen=True)
class Stat:
    """n finite values: their mean, sample standard deviation and 95% interval of the mean (NaN when undefined),
    and how the interval was computed (``method``; ``replicates``: image draws, 0 for seeds only)."""

    n: int
    mean: float
    sd: float
    ci_low: float
    ci_high: float
    method: str = evidence.SEEDS_ONLY
    replicates: int = 0
    seed_var: float = math.nan  # the interval's parts (pipelines.analysis.evidence.Interval)
    image_var: float = math.nan

    def interval(self) -> Interval:
        return Interval(
            self.mean, self.ci_low, self.ci_high, self.seed_var, self.image_var, self.n, self.method, self.replicates
        )

    def text(self, digits: int = 3) -> str:
        if self.n == 0:
            return "-"
        if not math.isfinite(self.ci_low):
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} [{self.ci_low:.{digits}f}, {self.ci_high:.{digits}f}]"


def describe(values: Iterable[Any], replicates: Sequence[np.ndarray | None] | None = None) -> Stat:
    """n, mean, sd and the 95% interval of the finite values (an empty frequency bucket, -1, is not a value);
    ``replicates``: each value's image-bootstrap values (aligned with ``values``), for the seeds x images
    interval."""
    pairs = [(finite_number(v), r) for v, r in zip(values, replicates or itertools.repeat(None))]
    kept = [(v, r) for v, r in pairs if v is not None and v >= 0]
    xs = [v for v, _ in kept]
    n = len(xs)
    if n == 0:
        return Stat(0, math.nan, math.nan, math.nan, math.nan)
    reps = [r for _, r in kept]
    iv = evidence.interval(xs, _stack(reps))
    sd = float(np.std(xs, ddof=1)) if n > 1 else math.nan
    return Stat(n, iv.estimate, sd, iv.low, iv.high, iv.method, iv.replicates, iv.seed_var, iv.image_var)


def _stack(reps: Sequence[np.ndarray | None]) -> np.ndarray | None:
    """[n, R] when every run has replicates of one length, else None (the interval counts the seeds only)."""
    if not reps or any(r is None for r in reps) or len({len(r) for r in reps if r is not None}) != 1:
        return None
    return np.stack([np.asarray(r, np.float64) for r in reps if r is not None])


@dataclasses.dataclass
class ConfigResult:
    """One configuration and its runs (one per seed)."""

    config: dict[str, Any]  # the searched values without the seed
    runs: dict[Any, Any]  # seed -> the run's record
    full: bool  # every run reached the full schedule
    stats: dict[str, Stat]  # metric -> Stat over the runs

    @property
    def n(self) -> int:
        return len(self.runs)

    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in sorted(self.config.items())) or "(fixed config)"


def aggregate(
    records: Iterable[T],
    *,
    config: Callable[[T], Mapping[str, Any]],
    metric: Callable[[T, str], Any],
    full: Callable[[T], bool],
    failed: Callable[[T], bool],
    metrics: Sequence[str] = BUCKET_METRICS,
    replicates: Replicates | None = None,
) -> list[ConfigResult]:
    """Group trial records (summary trials, MLflow rows) by configuration. ``config(r)`` is a record's searched
    values including ``seed``; ``metric(r, name)`` its final value of a metric; ``full(r)`` whether it ran the full
    schedule; failed records count as runs that did not finish (no values). ``replicates(r, name)``: the record's
    image-bootstrap values of the metric, or None."""
    groups: dict[tuple, ConfigResult] = {}
    for r in records:
        values = dict(config(r))
        seed = values.pop(SEED_KEY, None)
        key = tuple(sorted((k, str(v)) for k, v in values.items()))
        g = groups.setdefault(key, ConfigResult(values, {}, True, {}))
        g.runs[seed if seed is not None else len(g.runs)] = r
        g.full = g.full and full(r) and not failed(r)
    reps = replicates or (lambda r, m: None)
    for g in groups.values():
        ok = [r for r in g.runs.values() if not failed(r)]
        g.stats = {m: describe([metric(r, m) for r in ok], [reps(r, m) for r in ok]) for m in metrics}
    return sorted(groups.values(), key=lambda g: g.label())


def ranked(configs: Sequence[ConfigResult], metric: str = "AP", mode: str = "max") -> list[ConfigResult]:
    """Configurations that reported ``metric``, best first: those whose runs all ran the full schedule before the
    others, each group by mean (``mode`` max or min); ties go to the larger n, then the label."""
    sign = 1.0 if mode == "max" else -1.0
    scored = [c for c in configs if c.stats.get(metric) is not None and c.stats[metric].n > 0]
    return sorted(scored, key=lambda c: (c.full, sign * c.stats[metric].mean, c.n, c.label()), reverse=True)


def best_config(configs: Sequence[ConfigResult], metric: str = "AP", mode: str = "max") -> ConfigResult | None:
    """The sweep's answer: the best mean of ``metric`` among configurations whose runs all ran the full schedule
    (all configurations if none did); the first of :func:`ranked`."""
    order = ranked(configs, metric, mode)
    return order[0] if order else None


def table(configs: Sequence[ConfigResult], best: ConfigResult | None) -> list[dict[str, Any]]:
    """The configurations as JSON-able rows (config, n, full, best, and n / mean / sd / interval per metric)."""
    return [
        {
            "config": c.config,
            "n": c.n,
            "full": c.full,
            "best": c is best,
            **{m: dataclasses.asdict(st) for m, st in c.stats.items()},
        }
        for c in configs
    ]


@dataclasses.dataclass(frozen=True)
class Comparison:
    """a - b in ``metric`` over the seeds both configurations ran (and the same image draws): the interval of the
    mean difference, and (once its family is judged) the verdict."""

    metric: str
    n: int
    difference: Interval
    verdict: Verdict | None = None

    def text(self, digits: int = 3) -> str:
        d = self.difference
        how = f"{d.method}, n={self.n}" + (f", {d.replicates} image draws" if d.replicates else "")
        return f"{d.text(digits, signed=True)} ({how})"


def paired(
    a: ConfigResult,
    b: ConfigResult,
    metric: str,
    value: Callable[[Any, str], Any],
    replicates: Replicates | None = None,
) -> Comparison:
    """``a - b`` in ``metric`` over their common seeds, paired image by image when both have replicates."""
    reps = replicates or (lambda r, m: None)
    diffs, draws = [], []
    for seed in sorted(set(a.runs) & set(b.runs), key=str):
        x, y = finite_number(value(a.runs[seed], metric)), finite_number(value(b.runs[seed], metric))
        if x is None or y is None or x < 0 or y < 0:
            continue
        diffs.append(x - y)
        ra, rb = reps(a.runs[seed], metric), reps(b.runs[seed], metric)
        same = ra is not None and rb is not None and len(ra) == len(rb)
        draws.append(np.asarray(ra, np.float64) - np.asarray(rb, np.float64) if same else None)
    return Comparison(metric, len(diffs), evidence.interval(diffs, _stack(draws)))


def lead_sentence(best: ConfigResult, other: ConfigResult, comparison: Comparison, what: str = "the runner-up") -> str:
    """In words: the best configuration against ``other``, with the comparison's verdict."""
    m = comparison.metric
    head = f"{best.label()} vs {what} ({other.label()}) in {m}: {comparison.text()}"
    if best.full and not other.full:  # ASHA stopped it: its numbers come from a shorter schedule
        return (
            f"{head}; the scheduler stopped {other.label()} early, so this compares a full schedule with a shorter "
            "one and gets no verdict; `ltsweep confirm SWEEP --top K` reruns the top configurations to the full "
            "schedule."
        )
    v = comparison.verdict
    return f"{head}: {v.text() if v is not None else 'cannot tell'}."


def comparisons(
    ranked_configs: Sequence[ConfigResult],
    metric: str,
    baseline: Mapping[str, Any] | None,
    value: Callable[[Any, str], Any],
    replicates: Replicates | None = None,
    mode: str = "max",
) -> list[str]:
    """Sentences on the best configuration against the runner-up and against the baseline configuration(s). The
    comparisons are one family: their verdicts are corrected together (Holm)."""
    if not ranked_configs:
        return []
    best = ranked_configs[0]
    items: list[tuple[ConfigResult, Comparison, str]] = []
    notes: list[str] = []
    if len(ranked_configs) > 1:
        other = ranked_configs[1]
        items.append((other, paired(best, other, metric, value, replicates), "the runner-up"))
    if baseline:
        bases = [c for c in ranked_configs if matches(c.config, baseline) and c is not best]
        if not bases and matches(best.config, baseline):
            notes.append(f"The baseline ({baseline}) is itself the best configuration.")
        for b in bases:
            for m in dict.fromkeys([metric, "APr"]):
                items.append((b, paired(best, b, m, value, replicates), "the baseline"))
        if not bases and not matches(best.config, baseline):
            notes.append(f"No configuration of this sweep matches the baseline {baseline}.")
    judged = [i for i, (o, _, _) in enumerate(items) if not (best.full and not o.full)]
    ups = [items[i][1].metric != metric or mode == "max" for i in judged]  # APr: higher is better in any mode
    words = dict(zip(judged, evidence.verdicts([items[i][1].difference for i in judged], ups)))
    out = []
    for i, (other, comp, what) in enumerate(items):
        comp = dataclasses.replace(comp, verdict=words.get(i))
        out.append(lead_sentence(best, other, comp, what))
    return out + notes


def matches(config: Mapping[str, Any], selector: Mapping[str, Any]) -> bool:
    """Does a configuration have every value of ``selector`` (e.g. the report's baseline {loss: softmax})?"""
    return all(str(config.get(k)) == str(v) for k, v in selector.items())


def method_line(configs: Sequence[ConfigResult]) -> str:
    """How the intervals of these configurations were computed, in one line."""
    used = sorted({(st.method, st.replicates) for c in configs for st in c.stats.values() if st.n > 0})
    text = {
        evidence.SEEDS_X_IMAGES: "seeds x images (Student's t over the seeds and a bootstrap over the validation "
        "images, {r} draws, the seed x image interaction counted once)",
        evidence.SEEDS_ONLY: "seeds only (Student's t over the seeds; no image replicates)",
        evidence.IMAGES_ONLY: "images only ({r} bootstrap draws; one seed, so the seed noise is not counted)",
    }
    parts = [text[m].format(r=r) for m, r in used if m in text]
    return "95% intervals: " + ("; ".join(parts) if parts else "none (no values)")


def format_table(
    configs: Sequence[ConfigResult], metrics: Sequence[str] = BUCKET_METRICS, best: ConfigResult | None = None
) -> str:
    """Fixed-width table: one line per configuration with n, then mean [95% CI] and sd of each metric."""
    keys = sorted({k for c in configs for k in c.config})
    head = keys + ["n"] + [f"{m} mean [95% CI]" for m in metrics] + [f"{metrics[0]} sd", "full"]
    rows = []
    for c in configs:
        mark = " *best*" if best is not None and c is best else ""
        sd = c.stats[metrics[0]].sd if metrics[0] in c.stats else math.nan
        rows.append(
            [str(c.config.get(k, "-")) for k in keys]
            + [str(c.n)]
            + [c.stats[m].text() if m in c.stats else "-" for m in metrics]
            + ["-" if not math.isfinite(sd) else f"{sd:.3f}", ("yes" if c.full else "no") + mark]
        )
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    line = lambda r: "  ".join(x.ljust(w) for x, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


# ---- the best-trial rule -----------------------------------------------------------------------------------------


def best_trial(
    records: Iterable[T],
    *,
    value: Callable[[T], Any],
    evaluations: Callable[[T], int],
    failed: Callable[[T], bool],
    trial_id: Callable[[T], str],
    mode: str = "max",
    full_length: int | None = None,
) -> T | None:
    """The best trial of a sweep, from any kind of trial record (the sweep's trial summaries, MLflow run rows).

    The accessors read one record: ``value`` its last reported metric (None if it reported none), ``evaluations``
    how many evaluations it reported, ``failed`` whether it ended with an error, ``trial_id`` Tune's trial id.

    Rule: among trials without error that reported a finite value, keep those that ran ``full_length``
    evaluations (the full schedule: ASHA's survivors); if none did (or ``full_length`` is not given), keep them
    all. The best is the largest value (``mode="max"``) or the smallest (``"min"``); of equal values, the largest
    trial id. None when no trial qualifies.
    """
    ok = []
    for r in records:
        v = finite_number(value(r))
        if v is not None and not failed(r):
            ok.append((v, r))
    full = [(v, r) for v, r in ok if full_length and evaluations(r) >= full_length] or ok
    if not full:
        return None
    sign = 1.0 if mode == "max" else -1.0
    return max(full, key=lambda vr: (sign * vr[0], trial_id(vr[1])))[1]
