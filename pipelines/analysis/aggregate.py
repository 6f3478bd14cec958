"""Results over repeated seeds: per-configuration n, mean, standard deviation and 95% confidence interval, the
best configuration, and paired comparisons. Every place that shows a sweep's answer (the summary table,
``ltsweep compare``, the HTML report, the MLflow sweep run, ``ltsweep confirm``) goes through here.

A *configuration* is a trial's searched values without its ``seed``; its trials are its repeats (``search.seeds``).
Statistics come from scipy.stats:

- the 95% CI of a mean is Student's t interval, mean ± t(0.975, n − 1) · sd / √n (``scipy.stats.t.interval``);
  with one run there is no spread, and the CI is undefined (NaN, shown as "-");
- a paired comparison of two configurations uses the seeds both ran (same seed = same stage-1 checkpoint and the
  same sampler draws), ``scipy.stats.ttest_rel`` for the p-value and its ``confidence_interval`` for the CI of
  the mean difference.

The best configuration is the best *mean* of the metric among configurations whose every run reached the full
schedule (ASHA's survivors); when none did, among all configurations. This module imports neither Ray nor MLflow.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from pipelines.names import BUCKET_METRICS, finite_number

T = TypeVar("T")
SEED_KEY = "seed"
CONFIDENCE = 0.95


@dataclasses.dataclass(frozen=True)
class Stat:
    """n finite values: their mean, sample standard deviation and the 95% t interval of the mean (NaN if n < 2)."""

    n: int
    mean: float
    sd: float
    ci_low: float
    ci_high: float

    def text(self, digits: int = 3) -> str:
        if self.n == 0:
            return "-"
        if self.n == 1 or not math.isfinite(self.ci_low):
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} [{self.ci_low:.{digits}f}, {self.ci_high:.{digits}f}]"


def describe(values: Iterable[Any]) -> Stat:
    """n, mean, sd and the 95% CI of the finite values (an empty frequency bucket, -1, is not a value)."""
    from scipy import stats

    xs = [f for f in (finite_number(v) for v in values) if f is not None and f >= 0]
    n = len(xs)
    if n == 0:
        return Stat(0, math.nan, math.nan, math.nan, math.nan)
    mean = sum(xs) / n
    if n == 1:
        return Stat(1, mean, math.nan, math.nan, math.nan)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    if sd == 0:
        return Stat(n, mean, 0.0, mean, mean)
    low, high = stats.t.interval(CONFIDENCE, n - 1, loc=mean, scale=sd / math.sqrt(n))
    return Stat(n, mean, sd, float(low), float(high))


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
) -> list[ConfigResult]:
    """Group trial records (summary trials, MLflow rows) by configuration. ``config(r)`` is a record's searched
    values including ``seed``; ``metric(r, name)`` its final value of a metric; ``full(r)`` whether it ran the full
    schedule; failed records count as runs that did not finish (no values)."""
    groups: dict[tuple, ConfigResult] = {}
    for r in records:
        values = dict(config(r))
        seed = values.pop(SEED_KEY, None)
        key = tuple(sorted((k, str(v)) for k, v in values.items()))
        g = groups.setdefault(key, ConfigResult(values, {}, True, {}))
        g.runs[seed if seed is not None else len(g.runs)] = r
        g.full = g.full and full(r) and not failed(r)
    for g in groups.values():
        ok = [r for r in g.runs.values() if not failed(r)]
        g.stats = {m: describe(metric(r, m) for r in ok) for m in metrics}
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
    """The configurations as JSON-able rows (config, n, full, best, and n / mean / sd / CI per metric)."""
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
class Paired:
    """a − b over the seeds both configurations ran: mean difference, its 95% CI and the paired t-test p-value."""

    metric: str
    n: int
    diff: float
    ci_low: float
    ci_high: float
    p_value: float

    def significant(self, alpha: float = 1 - CONFIDENCE) -> bool:
        return self.n >= 2 and math.isfinite(self.p_value) and self.p_value < alpha

    def text(self, digits: int = 3) -> str:
        if self.n < 2:
            return f"{self.diff:+.{digits}f} (n={self.n}: no CI)"
        return (
            f"{self.diff:+.{digits}f} [{self.ci_low:+.{digits}f}, {self.ci_high:+.{digits}f}], p = "
            f"{self.p_value:.3g} (n={self.n})"
        )


def paired(a: ConfigResult, b: ConfigResult, metric: str, value: Callable[[Any, str], Any]) -> Paired:
    """Paired comparison of ``metric`` between two configurations over their common seeds (scipy.stats.ttest_rel)."""
    from scipy import stats

    pairs = []
    for seed in sorted(set(a.runs) & set(b.runs), key=str):
        x, y = finite_number(value(a.runs[seed], metric)), finite_number(value(b.runs[seed], metric))
        if x is not None and y is not None and x >= 0 and y >= 0:
            pairs.append((x, y))
    n = len(pairs)
    if n == 0:
        return Paired(metric, 0, math.nan, math.nan, math.nan, math.nan)
    diffs = [x - y for x, y in pairs]
    mean = sum(diffs) / n
    if n < 2 or all(d == diffs[0] for d in diffs):
        return Paired(
            metric,
            n,
            mean,
            mean if n >= 2 else math.nan,
            mean if n >= 2 else math.nan,
            0.0 if n >= 2 and mean != 0 else math.nan,
        )
    res = stats.ttest_rel([x for x, _ in pairs], [y for _, y in pairs])
    ci = res.confidence_interval(CONFIDENCE)
    return Paired(metric, n, mean, float(ci.low), float(ci.high), float(res.pvalue))


def lead_sentence(best: ConfigResult, other: ConfigResult, comparison: Paired, what: str = "the runner-up") -> str:
    """In words: is the best configuration's lead over ``other`` larger than the seed-to-seed noise?"""
    m = comparison.metric
    if best.full and not other.full:  # ASHA stopped it: its numbers come from a shorter schedule
        return (
            f"{best.label()} leads {what} ({other.label()}) in {m} by {comparison.text()}, but the scheduler "
            f"stopped {other.label()} early, so this compares a full schedule with a shorter one; `ltsweep "
            "confirm SWEEP --top K` reruns the top configurations to the full schedule."
        )
    if comparison.n < 2:
        return (
            f"The lead of {best.label()} over {what} ({other.label()}) in {m} is {comparison.diff:+.3f} on "
            f"{comparison.n} common seed(s): with fewer than 2 seeds the noise is unknown; rerun with "
            "search.seeds (or `ltsweep confirm`)."
        )
    if comparison.significant():
        return (
            f"{best.label()} leads {what} ({other.label()}) in {m} by {comparison.text()}: the lead is larger "
            "than the seed-to-seed noise."
        )
    return (
        f"{best.label()} leads {what} ({other.label()}) in {m} by {comparison.text()}: the CI contains 0, so "
        "the lead is inside the noise - the two are tied on this evidence."
    )


def comparisons(
    ranked_configs: Sequence[ConfigResult],
    metric: str,
    baseline: Mapping[str, Any] | None,
    value: Callable[[Any, str], Any],
) -> list[str]:
    """Sentences on the best configuration's lead: over the runner-up and over the baseline configuration(s)."""
    if not ranked_configs:
        return []
    best, out = ranked_configs[0], []
    if len(ranked_configs) > 1:
        out.append(lead_sentence(best, ranked_configs[1], paired(best, ranked_configs[1], metric, value)))
    if baseline:
        bases = [c for c in ranked_configs if matches(c.config, baseline) and c is not best]
        if not bases and matches(best.config, baseline):
            out.append(f"The baseline ({baseline}) is itself the best configuration.")
        for b in bases:
            for m in dict.fromkeys([metric, "APr"]):
                out.append(lead_sentence(best, b, paired(best, b, m, value), what="the baseline"))
        if not bases and not matches(best.config, baseline):
            out.append(f"No configuration of this sweep matches the baseline {baseline}.")
    return out


def matches(config: Mapping[str, Any], selector: Mapping[str, Any]) -> bool:
    """Does a configuration have every value of ``selector`` (e.g. the report's baseline {loss: softmax})?"""
    return all(str(config.get(k)) == str(v) for k, v in selector.items())


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
