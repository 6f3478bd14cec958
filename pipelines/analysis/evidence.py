"""Intervals and verdicts that count both sources of noise in a detection result: the training seeds and the
validation images.

Every interval of the product is computed here, by one method, named beside the numbers ("seeds x images").

- The estimate is m = mean over the n seeds of A_s, A_s being the metric of seed s's run on all validation images.
- Images: a paired bootstrap over the validation images. Replicate r draws the images with replacement, the same
  draw for every run that is compared; A_s^r is the metric of seed s's run on that draw, computed from the run's
  matched detections (``lt_models.evaluation.bootstrap``). V_img = var_r(mean_s A_s^r), V_each = mean_s var_r(A_s^r).
- Seeds: s^2, the sample variance of the A_s.
- Both s^2/n and V_img contain the seed x image interaction (each seed's own luck on each image). It is counted
  once: I = (V_each - V_img)/(n - 1) is removed from the seed part, S = max(s^2/n - I, 0), and
  SE^2 = max(S + V_img, s^2/n, V_img).
- The interval is m +- h with h^2 = t(0.975, n - 1)^2 S + z(0.975)^2 V_img: each part's own quantile (Student's t
  with n - 1 degrees of freedom for the seeds, the normal one for the images), combined in quadrature. It is
  Student's t when the seeds dominate and the normal interval when the images do. (Welch-Satterthwaite degrees of
  freedom instead gave 91% coverage with 3 seeds when the seeds dominate: too narrow.)

A plain two-stage bootstrap (resample seeds, then images, take percentiles) counts the interaction twice and, with
the 2-5 seeds a sweep affords, gives intervals that are too narrow for the seed part (measured: 79% coverage with 3
seeds when the seeds dominate, 99.9% with 5 when the interaction does); the coverage test (tests/test_evidence.py)
checks this method's 95% intervals on simulated studies with a known truth.

Without matched detections (the training loss, Open Images AP, or runs written by an older ltsweep) an interval
counts the seeds only (Student's t over them) and says so. With one seed the seed noise is unknown: the interval
counts the images only, says so, and a comparison on one seed gets no verdict.

Verdicts: a comparison's two-sided p-value inverts the same interval: the p at which the (1 - p) interval's edge
reaches 0 (no p-value without spread: a difference with no variation at all gets none, rather than p = 0; one beyond
the computed range is reported as p < 1e-12, never 0). The verdicts of comparisons shown together (a family: the sweep
summary's, ``ltsweep confirm``'s, the papers' findings of bench_fidelity) are corrected with Holm's step-down
procedure at family-wise 5%: "better" or "worse" when the corrected test rejects "no difference", else "cannot
tell". The words printed follow the corrected verdict.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

CONFIDENCE = 0.95
ALPHA = 1 - CONFIDENCE
SEEDS_X_IMAGES = "seeds x images"
SEEDS_ONLY = "seeds only"
IMAGES_ONLY = "images only (one seed)"
P_FLOOR = 1e-12  # the smallest p-value computed; a smaller one is reported as this bound ("p < 1e-12")


@dataclasses.dataclass(frozen=True)
class Interval:
    """An estimate with its 95% interval and how it was computed: the variance of the seed part (``seed_var``, with
    ``n_seeds - 1`` degrees of freedom) and of the image part (``image_var``, from ``replicates`` bootstrap draws)."""

    estimate: float
    low: float
    high: float
    seed_var: float
    image_var: float
    n_seeds: int
    method: str
    replicates: int = 0

    @property
    def defined(self) -> bool:
        return math.isfinite(self.low) and math.isfinite(self.high)

    @property
    def se(self) -> float:
        v = self.seed_var + self.image_var
        return math.sqrt(v) if math.isfinite(v) else math.nan

    def half_width(self, confidence: float = CONFIDENCE) -> float:
        return _half_width(self.seed_var, self.image_var, self.n_seeds, confidence)

    def p_value(self) -> float:
        """Two-sided p of "the true value is 0": the 1 - p interval just reaches 0 (NaN without spread, or with
        one seed)."""
        from scipy.optimize import brentq

        if not (self.se > 0) or self.method == IMAGES_ONLY:
            return math.nan
        gap = abs(self.estimate)
        if gap >= self.half_width(1 - P_FLOOR):
            return P_FLOOR  # beyond what is computed: p < 1e-12, never 0
        if gap <= self.half_width(1e-12):
            return 1.0
        return float(brentq(lambda p: self.half_width(1 - p) - gap, P_FLOOR, 1 - 1e-12, xtol=1e-12))

    def text(self, digits: int = 3, signed: bool = False) -> str:
        f = f"{{:{'+' if signed else ''}.{digits}f}}"
        if not math.isfinite(self.estimate):
            return "-"
        if not self.defined:
            return f.format(self.estimate)
        return f"{f.format(self.estimate)} [{f.format(self.low)}, {f.format(self.high)}]"


def interval(full: Sequence[float], replicates: np.ndarray | None = None) -> Interval:
    """The seeds x images interval of the mean over seeds of ``full`` [n] (each seed's metric on all images), with
    ``replicates`` [n, R] (each seed's metric on R bootstrap draws of the images, the same draws for every seed;
    NaN where a draw leaves the metric undefined), or seeds only when ``replicates`` is None."""
    a = np.asarray(full, np.float64)
    n = len(a)
    nan = math.nan
    if n == 0:
        return Interval(nan, nan, nan, nan, nan, 0, SEEDS_ONLY)
    m = float(a.mean())
    seed_var = float(a.var(ddof=1)) / n if n > 1 else nan
    if replicates is None:
        if n < 2:
            return Interval(m, nan, nan, nan, nan, n, SEEDS_ONLY)
        return _make(m, seed_var, 0.0, n, SEEDS_ONLY, 0)
    reps = np.asarray(replicates, np.float64).reshape(n, -1)
    reps = reps[:, np.isfinite(reps).all(0)]  # draws that left some run's metric undefined are not replicates
    R = reps.shape[1]
    if R < 2:
        return Interval(m, nan, nan, nan, nan, n, SEEDS_X_IMAGES, R)
    v_img = float(reps.mean(0).var(ddof=1))
    if n < 2:
        return _make(m, 0.0, v_img, n, IMAGES_ONLY, R)
    v_each = float(reps.var(axis=1, ddof=1).mean())
    inter = max(v_each - v_img, 0.0) / (n - 1)  # the seed x image interaction, which both parts hold
    seed_part = max(seed_var - inter, 0.0)
    if seed_part + v_img < max(seed_var, v_img):  # never less than either part measured alone
        seed_part = max(seed_var, v_img) - v_img
    return _make(m, seed_part, v_img, n, SEEDS_X_IMAGES, R)


def _half_width(seed_var: float, image_var: float, n: int, confidence: float) -> float:
    from scipy import stats

    level = 0.5 + confidence / 2
    t = float(stats.t.ppf(level, n - 1)) if n > 1 and seed_var > 0 else 0.0
    z = float(stats.norm.ppf(level))
    return math.sqrt(t * t * seed_var + z * z * image_var)


def _make(m: float, seed_var: float, image_var: float, n: int, method: str, R: int) -> Interval:
    h = _half_width(seed_var, image_var, n, CONFIDENCE)
    return Interval(m, m - h, m + h, seed_var, image_var, n, method, R)


@dataclasses.dataclass(frozen=True)
class Verdict:
    """A comparison's words after the family's correction: "better", "worse" or "cannot tell", and why."""

    word: str
    p: float  # two-sided p of the comparison alone (NaN: no test)
    p_holm: float  # Holm-adjusted within its family (NaN: no test)
    family: int  # how many tested comparisons the family holds
    reason: str = ""

    def text(self) -> str:
        if not math.isfinite(self.p):
            return f"{self.word} ({self.reason})"
        return f"{self.word} ({_p_text(self.p)}; Holm-adjusted over {self.family}: {_p_text(self.p_holm)})"


def _p_text(p: float) -> str:
    return f"p < {P_FLOOR:.0e}" if p <= P_FLOOR else f"p = {p:.3g}"


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (NaN stays NaN and does not count in the family)."""
    idx = [i for i, p in enumerate(p_values) if math.isfinite(p)]
    m = len(idx)
    out = [math.nan] * len(p_values)
    running = 0.0
    for rank, i in enumerate(sorted(idx, key=lambda i: p_values[i])):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        out[i] = running
    return out


def verdicts(
    differences: Sequence[Interval], higher_is_better: bool | Sequence[bool] = True, alpha: float = ALPHA
) -> list[Verdict]:
    """The verdicts of a family of differences (a - b), corrected together with Holm's procedure;
    ``higher_is_better``: for the whole family or per difference."""
    ups = [higher_is_better] * len(differences) if isinstance(higher_is_better, bool) else list(higher_is_better)
    ps = [d.p_value() for d in differences]
    adjusted = holm(ps)
    family = sum(math.isfinite(p) for p in ps)
    out = []
    for d, p, ph, better_up in zip(differences, ps, adjusted, ups):
        if not math.isfinite(p):
            out.append(Verdict("cannot tell", p, ph, family, _no_test_reason(d)))
        elif ph <= alpha:
            out.append(Verdict("better" if (d.estimate > 0) == better_up else "worse", p, ph, family))
        else:
            out.append(Verdict("cannot tell", p, ph, family))
    return out


def _no_test_reason(d: Interval) -> str:
    if d.n_seeds < 2 and d.method != IMAGES_ONLY and d.replicates == 0:
        return f"{d.n_seeds} common seed(s) and no matched detections: the noise is unknown"
    if d.method == IMAGES_ONLY:
        return "one common seed: the seed-to-seed noise is unknown; rerun with search.seeds or `ltsweep confirm`"
    if d.se == 0:
        return "no spread at all between the runs: a test needs variation"
    return "too few runs for a test"


def independent_difference(a: Interval, b: Interval) -> Interval:
    """``a - b`` for two estimates from independent runs on independent images (e.g. a confirmation on fresh seeds
    and held-out images against the sweep's own estimate): the variances add; the seed part takes the smaller
    number of seeds. Undefined when either interval is."""
    nan = math.nan
    if not (a.defined and b.defined):
        return Interval(a.estimate - b.estimate, nan, nan, nan, nan, min(a.n_seeds, b.n_seeds), a.method)
    method = a.method if a.method == b.method else f"{a.method} / {b.method}"
    return _make(
        a.estimate - b.estimate,
        a.seed_var + b.seed_var,
        a.image_var + b.image_var,
        min(a.n_seeds, b.n_seeds),
        method,
        min(a.replicates, b.replicates),
    )
