"""The seeds x images intervals cover the truth, and the corrected verdicts keep their error rate.

Simulated studies with a known true difference: two configurations, n seeds each, the same validation images.
Per seed s and image i, the difference of the two runs' per-image scores is
    d[s, i] = delta + u[s] + v[i] + e[s, i]
(u: the training seed's effect on the difference, v: the image's, e: their interaction). The metric of a run is the
mean over images, so a bootstrap replicate with image weights w is the weighted mean. The truth is delta, the
expected difference over new seeds and new images. In three regimes (seed noise, image noise or the interaction
dominating) the 95% interval must cover delta in 93-97% of the studies; under no difference, a family of two
comparisons corrected with Holm's procedure must say "better" (or "worse") in at most 5% of the studies.
"""

import math

import numpy as np
import pytest

from pipelines.analysis.evidence import IMAGES_ONLY, SEEDS_ONLY, Interval, holm, interval, verdicts

STUDIES, IMAGES, REPLICATES = 2000, 120, 200
REGIMES = {  # (sd of u, sd of v, sd of e) per seed / image / seed x image
    "seeds dominate": (0.03, 0.05, 0.05),
    "images dominate": (0.002, 0.25, 0.05),
    "interaction dominates": (0.002, 0.02, 0.4),
}


def _study(rng, delta: float, sd: tuple[float, float, float], n_seeds: int) -> tuple[np.ndarray, np.ndarray]:
    su, sv, se = sd
    d = delta + rng.normal(0, su, (n_seeds, 1)) + rng.normal(0, sv, (1, IMAGES)) + rng.normal(0, se, (n_seeds, IMAGES))
    w = rng.multinomial(IMAGES, np.full(IMAGES, 1 / IMAGES), size=REPLICATES).T  # [I, R]
    return d.mean(1), d @ w / IMAGES


@pytest.mark.parametrize("regime", sorted(REGIMES))
@pytest.mark.parametrize("n_seeds", [3, 5])
def test_95_percent_intervals_cover_the_true_difference(regime, n_seeds):
    rng = np.random.default_rng([2026, n_seeds, sorted(REGIMES).index(regime)])
    delta = 0.02
    covered = 0
    for _ in range(STUDIES):
        full, reps = _study(rng, delta, REGIMES[regime], n_seeds)
        iv = interval(full, reps)
        covered += iv.low <= delta <= iv.high
    rate = covered / STUDIES
    assert 0.93 <= rate <= 0.97, f"{regime}, {n_seeds} seeds: coverage {rate:.3f}"


def test_under_no_difference_holm_keeps_false_verdicts_at_5_percent():
    rng = np.random.default_rng(2026)
    wrong = 0
    for k in range(STUDIES):
        regime = sorted(REGIMES)[k % 3]
        family = [interval(*_study(rng, 0.0, REGIMES[regime], 3)) for _ in range(2)]
        wrong += any(v.word != "cannot tell" for v in verdicts(family))
    assert wrong / STUDIES <= 0.05, wrong / STUDIES


def test_holm_by_hand():
    # p sorted 0.01, 0.02, 0.04 of m = 3: 3 * 0.01, max(0.03, 2 * 0.02), max(0.04, 1 * 0.04); NaN is not counted
    assert holm([0.04, 0.01, math.nan, 0.02]) == pytest.approx([0.04, 0.03, math.nan, 0.04], nan_ok=True)
    assert holm([0.5, 0.9]) == [1.0, 1.0]


def test_the_interval_by_hand():
    # two seeds, replicates without image noise: the seed part alone, Student's t with 1 df
    full = [0.30, 0.34]
    iv = interval(full, np.array([[0.30] * 5, [0.34] * 5]))
    se = math.sqrt(np.var(full, ddof=1) / 2)
    assert iv.estimate == pytest.approx(0.32) and iv.se == pytest.approx(se)
    assert iv.high - iv.estimate == pytest.approx(12.7062047 * se)  # t(0.975, 1 df)
    # no seed variation: the image bootstrap alone, the normal quantile
    reps = np.array([[0.1, 0.2, 0.3, 0.2], [0.1, 0.2, 0.3, 0.2]])
    iv = interval([0.2, 0.2], reps)
    sd = np.std([0.1, 0.2, 0.3, 0.2], ddof=1)
    assert iv.se == pytest.approx(sd) and iv.high - iv.estimate == pytest.approx(1.959964 * sd)
    # both parts: t for the seeds, z for the images, in quadrature; p is where that interval reaches 0
    both = Interval(0.1, math.nan, math.nan, 0.0004, 0.0009, 3, "seeds x images", 100)
    h = math.sqrt(4.30265273**2 * 0.0004 + 1.959964**2 * 0.0009)
    assert both.half_width() == pytest.approx(h)
    p = both.p_value()
    assert 0.05 < p < 0.1 and both.half_width(1 - p) == pytest.approx(0.1)  # 0.1 lies just inside the 95% interval


def test_no_false_certainty():
    same = interval([0.01, 0.01, 0.01])  # every paired difference equal: no spread, no p = 0
    assert same.se == 0 and math.isnan(same.p_value())
    [v] = verdicts([same])
    assert v.word == "cannot tell" and "no spread" in v.reason
    one = interval([0.05], np.array([[0.04, 0.05, 0.06]]))  # one seed: images only, no verdict
    assert one.method == IMAGES_ONLY and one.defined and math.isnan(one.p_value())
    assert verdicts([one])[0].word == "cannot tell"
    huge = Interval(0.5, 0.49, 0.51, 1e-14, 1e-14, 3, "seeds x images", 100)  # far beyond the computed range
    assert huge.p_value() == 1e-12 and "p < 1e-12" in verdicts([huge])[0].text()
    alone = interval([0.05])
    assert alone.method == SEEDS_ONLY and not alone.defined
    assert "noise is unknown" in verdicts([alone])[0].reason


def test_verdict_words_follow_the_sign_and_the_direction():
    up = Interval(0.05, 0.03, 0.07, 0.0, 1e-4, 3, "seeds x images", 100)
    down = Interval(-0.05, -0.07, -0.03, 0.0, 1e-4, 3, "seeds x images", 100)
    assert [v.word for v in verdicts([up, down])] == ["better", "worse"]
    assert [v.word for v in verdicts([up, down], higher_is_better=False)] == ["worse", "better"]
