"""Per-configuration statistics over seeds (pipelines.analysis.aggregate) against values computed by hand."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from pipelines.analysis import aggregate
from pipelines.analysis.summary import SweepSummary, TrialSummary

T975_2 = 4.302652729911275  # Student's t, 97.5% quantile, 2 degrees of freedom
T975_1 = 12.706204736174707  # 1 degree of freedom


def test_describe_is_the_t_interval_of_the_mean():
    st = aggregate.describe([0.30, 0.34, 0.26, -1.0, None, float("nan")])  # -1 / None / NaN are not values
    mean, sd = 0.30, 0.04  # deviations +-0.04, 0: sd = sqrt((0.0016 * 2) / 2)
    assert (st.n, st.mean, st.sd) == (3, pytest.approx(mean), pytest.approx(sd))
    half = T975_2 * sd / math.sqrt(3)
    assert (st.ci_low, st.ci_high) == (pytest.approx(mean - half), pytest.approx(mean + half))
    one = aggregate.describe([0.5])
    assert one.n == 1 and one.mean == 0.5 and math.isnan(one.ci_low) and one.text() == "0.500"
    assert aggregate.describe([]).text() == "-"


def rec(tid, seed, ap, apr, evals=3, error=None, **config):
    return TrialSummary(
        tid,
        {**config, "seed": seed},
        {"AP": ap, "APr": apr, "APc": ap, "APf": ap},
        evals,
        evals,
        evals < 3 and error is None,
        error,
    )


def summary(trials, baseline=None):
    return SweepSummary("s", "/x", "/x", "sqlite://", "AP", "max", 3, trials, None, None, baseline=baseline)


def test_configs_group_seeds_and_the_best_is_the_best_full_mean():
    trials = [
        rec("a0", 0, 0.30, 0.10, lam=0.7),
        rec("a1", 1, 0.34, 0.14, lam=0.7),
        rec("a2", 2, 0.32, 0.12, lam=0.7),
        rec("b0", 0, 0.28, 0.05, lam=0.0),
        rec("b1", 1, 0.31, 0.06, lam=0.0),
        rec("b2", 2, 0.29, 0.07, lam=0.0),
        # the highest mean, but one run was stopped early: not a full configuration
        rec("c0", 0, 0.50, 0.20, lam=1.5),
        rec("c1", 1, 0.40, 0.20, evals=1, lam=1.5),
    ]
    s = summary(trials, baseline={"lam": 0.0})
    configs = {c.config["lam"]: c for c in s.configs}
    assert {k: c.n for k, c in configs.items()} == {0.7: 3, 0.0: 3, 1.5: 2}
    assert configs[0.7].stats["AP"].mean == pytest.approx(0.32) and not configs[1.5].full
    assert s.best_config is configs[0.7]
    # the paired comparison with the baseline, by hand: differences 0.02, 0.03, 0.03 over the same seeds
    d = [0.02, 0.03, 0.03]
    mean = sum(d) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 2)
    p = aggregate.paired(configs[0.7], configs[0.0], "AP", lambda t, m: t.metrics[m])
    d_iv = p.difference
    assert (p.n, d_iv.estimate, d_iv.method) == (3, pytest.approx(mean), "seeds only")
    assert (d_iv.low, d_iv.high) == (
        pytest.approx(mean - T975_2 * sd / math.sqrt(3)),
        pytest.approx(mean + T975_2 * sd / math.sqrt(3)),
    )
    from scipy import stats

    # without image replicates the interval is the paired t-test's
    assert d_iv.p_value() == pytest.approx(2 * stats.t.sf(mean / (sd / math.sqrt(3)), 2))
    sentences = s.comparisons()
    assert any("the baseline" in x and "in AP" in x and ": better (p = " in x for x in sentences), sentences
    table = aggregate.format_table(s.configs, best=s.best_config)
    assert "*best*" in table and "0.320 [" in table


def test_a_lead_inside_the_noise_is_said_in_words():
    trials = [
        rec("a0", 0, 0.30, 0.1, loss="x"),
        rec("a1", 1, 0.36, 0.1, loss="x"),
        rec("b0", 0, 0.33, 0.1, loss="y"),
        rec("b1", 1, 0.32, 0.1, loss="y"),
    ]
    s = summary(trials)
    best = s.best_config
    assert best.config == {"loss": "x"}
    (sentence,) = s.comparisons()
    assert ": cannot tell (p = " in sentence
    # one seed: the noise is unknown, and the sentence says so
    (single,) = summary([rec("a0", 0, 0.30, 0.1, loss="x"), rec("b0", 0, 0.20, 0.1, loss="y")]).comparisons()
    assert "cannot tell" in single and "noise is unknown" in single
    p = aggregate.paired(*summary(trials).configs, "AP", lambda t, m: t.metrics[m])
    sd = abs(0.04 - (-0.03)) / math.sqrt(2)  # differences -0.03 and +0.04
    iv = p.difference
    assert p.n == 2 and iv.high - iv.low == pytest.approx(2 * T975_1 * sd / math.sqrt(2))


def test_a_runner_up_stopped_early_is_not_called_beaten():
    # ASHA: only the winner ran the full schedule; the runner-up's numbers come from its first evaluation
    trials = [
        rec("a0", 0, 0.30, 0.1, lam=1.0),
        rec("a1", 1, 0.32, 0.1, lam=1.0),
        rec("b0", 0, 0.20, 0.1, evals=1, lam=0.5),
        rec("b1", 1, 0.21, 0.1, evals=1, lam=0.5),
    ]
    (sentence,) = summary(trials).comparisons()
    assert "stopped lam=0.5 early" in sentence and "ltsweep confirm" in sentence
    assert "no verdict" in sentence and "better" not in sentence


def test_failed_runs_do_not_count_and_make_a_configuration_partial():
    trials = [rec("a0", 0, 0.30, 0.1, lam=1), TrialSummary("a1", {"lam": 1, "seed": 1}, {}, 0, 0, False, "boom")]
    (c,) = summary(trials).configs
    assert c.n == 2 and c.stats["AP"].n == 1 and not c.full
    assert SimpleNamespace(**{"ok": aggregate.matches({"loss": "softmax", "lam": 0.7}, {"loss": "softmax"})}).ok


def test_with_image_replicates_the_intervals_are_seeds_x_images_and_paired_by_draw():
    """Runs that carry replicates (one per image draw, the same draws for every run) get the seeds x images
    interval; a comparison subtracts the two runs' replicates draw by draw."""
    import numpy as np

    rng = np.random.default_rng(0)
    draws = {("a", s): 0.30 + 0.01 * s + rng.normal(0, 0.01, 200) for s in range(3)}
    draws |= {("b", s): draws[("a", s)] - 0.02 + rng.normal(0, 0.002, 200) for s in range(3)}
    trials = [rec(f"{c}{s}", s, float(draws[(c, s)].mean()), 0.1, loss=c) for c in "ab" for s in range(3)]
    by_id = {t.trial_id: draws[(t.config["loss"], t.config["seed"])] for t in trials}
    reps = lambda t, m: by_id[t.trial_id] if m == "AP" else None  # noqa: E731
    configs = aggregate.aggregate(
        trials,
        config=lambda t: t.config,
        metric=lambda t, m: t.metrics.get(m),
        full=lambda t: True,
        failed=lambda t: False,
        replicates=reps,
    )
    a, b = sorted(configs, key=lambda c: c.config["loss"])
    assert (a.stats["AP"].method, a.stats["AP"].replicates) == ("seeds x images", 200)
    assert a.stats["APr"].method == "seeds only"  # no replicates of APr: said so
    p = aggregate.paired(a, b, "AP", lambda t, m: t.metrics[m], reps)
    diff_draws = np.stack([by_id[f"a{s}"] - by_id[f"b{s}"] for s in range(3)])
    expected = evidence_interval([by_id[f"a{s}"].mean() - by_id[f"b{s}"].mean() for s in range(3)], diff_draws)
    assert (p.difference.low, p.difference.high) == (pytest.approx(expected.low), pytest.approx(expected.high))
    assert "seeds x images, n=3, 200 image draws" in p.text()


def evidence_interval(full, draws):
    from pipelines.analysis.evidence import interval

    return interval(full, draws)
