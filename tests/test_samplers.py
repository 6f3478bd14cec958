"""Samplers: eq 8 by hand, chi-square fit of class draws, seeds/epochs, shards, repeat factors by hand."""

import functools
import math

import numpy as np
import pytest
import torch
from scipy.stats import binomtest, chisquare

from lt_models.data.repeat_factor import RepeatFactorSampler, repeat_factors
from lt_models.data.sampler_spec import SAMPLERS, SamplerSpec, build_sampler
from lt_models.data.samplers import (
    ClassAwareSampler,
    NonBalanceSampler,
    SoftBalanceSampler,
    class_to_images,
    shard,
    soft_balance_probabilities,
)
from lt_models.errors import AnnotationError, ConfigError


def csr(rows):
    """image -> class lists -> (indptr, labels)."""
    indptr = np.zeros(len(rows) + 1, dtype=np.int64)
    indptr[1:] = np.cumsum([len(r) for r in rows])
    labels = np.array([c for r in rows for c in r], dtype=np.int64)
    return indptr, labels


@functools.cache
def long_tail_table(num_images=3000, num_classes=12, seed=0):
    """A small multi-label long-tail table; the last class has no image at all. Cached: do not mutate."""
    rng = np.random.default_rng(seed)
    pop = 1.0 / np.arange(1, num_classes) ** 1.3
    pop /= pop.sum()
    rows = []
    for _ in range(num_images):
        k = 1 + rng.poisson(1.5)
        rows.append(sorted(set(rng.choice(num_classes - 1, size=k, p=pop).tolist())))
    rows[5] = []  # an image without labels
    return csr(rows), num_classes


# ---------------------------------------------------------------------------------------------- eq 8 by hand
def test_eq8_closed_form_three_classes():
    counts = [1, 4, 16]  # P_n = [1, 4, 16] / 21
    np.testing.assert_allclose(soft_balance_probabilities(counts, 0.0), np.array([1, 4, 16]) / 21)
    np.testing.assert_allclose(soft_balance_probabilities(counts, 1.0), [1 / 3] * 3)
    # λ=0.5: P_n^0.5 ∝ [1, 2, 4];  λ=1.5: P_n^-0.5 ∝ [1, 1/2, 1/4] = [4, 2, 1]/4
    np.testing.assert_allclose(soft_balance_probabilities(counts, 0.5), np.array([1, 2, 4]) / 7)
    np.testing.assert_allclose(soft_balance_probabilities(counts, 1.5), np.array([4, 2, 1]) / 7)
    # λ=2: P_n^-1 ∝ [1, 1/4, 1/16] = [16, 4, 1]/16
    np.testing.assert_allclose(soft_balance_probabilities(counts, 2.0), np.array([16, 4, 1]) / 21)


@pytest.mark.parametrize("lam", [0.0, 0.3, 0.7, 1.0, 1.5])
def test_eq8_equals_eq7_normalised(lam):
    counts = np.array([3.0, 50.0, 7.0, 1000.0, 1.0])
    pn = counts / counts.sum()
    pa = np.full_like(pn, 1 / len(pn))
    ps = pa**lam * pn ** (1 - lam)  # eq 7
    np.testing.assert_allclose(soft_balance_probabilities(counts, lam), ps / ps.sum(), rtol=1e-12)


def test_eq8_zero_image_classes_get_zero():
    for lam, expected in [(0.0, [0, 0.2, 0.8]), (1.0, [0, 0.5, 0.5]), (1.5, [0, 2 / 3, 1 / 3])]:
        np.testing.assert_allclose(soft_balance_probabilities([0, 1, 4], lam), expected)


def test_eq8_extreme_values_stay_finite():
    p = soft_balance_probabilities([1, 10**9], 6.0)  # P_n^-5: ratio 1e45
    assert np.all(np.isfinite(p)) and p[0] == pytest.approx(1.0) and p[1] > 0


@pytest.mark.parametrize("lam", [-0.1, float("nan"), float("inf"), "abc"])
def test_eq8_bad_lambda(lam):
    with pytest.raises(ConfigError, match="lam"):
        soft_balance_probabilities([1, 2], lam)


def test_eq8_bad_counts():
    with pytest.raises(AnnotationError, match=r"image_counts\[1\]"):
        soft_balance_probabilities([1, -2], 0.5)
    with pytest.raises(AnnotationError, match="no class has any image"):
        soft_balance_probabilities([0, 0], 0.5)


# ------------------------------------------------------------------------------------------ class -> images
def test_class_to_images_inverts_and_dedupes():
    indptr, labels = csr([[2, 0], [], [0, 0, 1], [2]])
    cptr, cimg = class_to_images(indptr, labels, 4)
    assert cptr.tolist() == [0, 2, 3, 5, 5]
    assert cimg.tolist() == [0, 2, 2, 0, 3]


@pytest.mark.parametrize(
    "indptr,labels,match",
    [
        ([0, 2, 1], [0, 1], "indptr"),
        ([0, 1, 3], [0, 1], "indptr"),
        ([0, 1, 2], [0, 5], "image 1 has class index 5"),
        ([0, 1, 2], [-1, 0], "image 0 has class index -1"),
    ],
)
def test_bad_csr(indptr, labels, match):
    with pytest.raises(AnnotationError, match=match):
        SoftBalanceSampler(np.array(indptr), np.array(labels), 3, lam=0.5)


# ------------------------------------------------------------------------------------ chi-square goodness of fit
def test_lambda_zero_is_not_the_nonbalance_sampler():
    """At λ = 0 an image is drawn with probability Σ_{c ∈ image} P_n(c)/n_c = |classes(image)| / Σ_j n_j, so an image
    holding 3 classes comes 3x as often as a one-class image; the non-balance sampler shows every image once."""
    (indptr, labels), C = long_tail_table()
    n_images = len(indptr) - 1
    per_image = np.diff(indptr)
    s = SoftBalanceSampler(indptr, labels, C, lam=0.0, num_samples=300_000, seed=2)
    observed = np.bincount(s.epoch_indices(0), minlength=n_images)
    expected = per_image / per_image.sum()
    assert len(set(per_image[per_image > 0].tolist())) > 1  # the table has images with different class counts
    keep = per_image > 0
    assert chisquare(observed[keep], expected[keep] * observed.sum()).pvalue > 1e-3
    uniform = keep / keep.sum()
    assert chisquare(observed[keep], uniform[keep] * observed.sum()).pvalue < 1e-6
    nb = NonBalanceSampler(n_images, seed=2)
    assert np.array_equal(np.sort(nb.epoch_indices(0)), np.arange(n_images))


@pytest.mark.parametrize("lam", [0.0, 0.5, 0.7, 1.0, 1.5])
def test_class_draws_fit_eq8(lam):
    (indptr, labels), C = long_tail_table()
    s = SoftBalanceSampler(indptr, labels, C, lam=lam, num_samples=200_000, seed=1)
    counts = np.diff(class_to_images(indptr, labels, C)[0])
    classes, images = s.draw(0)
    observed = np.bincount(classes, minlength=C)
    p = soft_balance_probabilities(counts, lam)
    assert observed[counts == 0].sum() == 0  # the image-less class is never drawn
    keep = counts > 0
    assert chisquare(observed[keep], p[keep] * len(classes)).pvalue > 1e-3
    # λ=0 is P_n, λ=1 is uniform over classes with images
    if lam == 0.0:
        np.testing.assert_allclose(p, counts / counts.sum())
    if lam == 1.0:
        np.testing.assert_allclose(p[keep], 1 / keep.sum())
    # power check: the same draws are rejected against a different λ
    other = soft_balance_probabilities(counts, lam + 0.2)
    assert chisquare(observed[keep], other[keep] * len(classes)).pvalue < 1e-6
    # every drawn image contains its drawn class
    members = set(zip(labels.tolist(), np.repeat(np.arange(indptr.size - 1), np.diff(indptr)).tolist()))
    assert all((c, i) in members for c, i in zip(classes[:2000].tolist(), images[:2000].tolist()))


def test_images_uniform_within_class():
    (indptr, labels), C = long_tail_table()
    cptr, cimg = class_to_images(indptr, labels, C)
    s = ClassAwareSampler(indptr, labels, C, num_samples=300_000, seed=2)
    classes, images = s.draw(0)
    c = C - 2  # the rarest class with images: a few dozen of them
    members = cimg[cptr[c] : cptr[c + 1]]
    assert 10 < len(members) < 200
    picked = images[classes == c]
    assert np.isin(picked, members).all()
    observed = np.array([(picked == m).sum() for m in members])
    assert chisquare(observed).pvalue > 1e-3


def test_unlabelled_image_never_drawn():
    (indptr, labels), C = long_tail_table()
    _, images = SoftBalanceSampler(indptr, labels, C, lam=1.5, num_samples=100_000).draw(0)
    assert not np.isin(5, images)


# ---------------------------------------------------------------------------------------------- seeds & epochs
@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_seeds_and_epochs(name):
    (indptr, labels), C = long_tail_table(num_images=500)
    kw = {"lam": 0.7} if name == "softbalance" else {}
    a = build_sampler(SamplerSpec(name, **kw), indptr, labels, C, seed=3)
    b = build_sampler(SamplerSpec(name, **kw), indptr, labels, C, seed=3)
    c = build_sampler(SamplerSpec(name, **kw), indptr, labels, C, seed=4)
    assert list(a) == list(b)
    assert list(a) != list(c)
    e0 = list(a)
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(a) == list(b) != e0
    a.set_epoch(0)
    assert list(a) == e0
    assert len(a) == len(e0)


def test_epoch_length_and_nonbalance_is_permutation():
    (indptr, labels), C = long_tail_table(num_images=700)
    assert len(SoftBalanceSampler(indptr, labels, C, lam=0.7)) == 700
    assert len(SoftBalanceSampler(indptr, labels, C, lam=0.7, num_samples=123)) == 123
    nb = build_sampler(SamplerSpec("nonbalance"), indptr, labels, C)
    e = list(nb)
    assert sorted(e) == list(range(700)) and e != list(range(700))


def test_classaware_is_softbalance_lambda_one():
    (indptr, labels), C = long_tail_table(num_images=400)
    ca = ClassAwareSampler(indptr, labels, C, seed=9)
    sb = SoftBalanceSampler(indptr, labels, C, lam=1.0, seed=9)
    assert list(ca) == list(sb)
    assert isinstance(build_sampler(SamplerSpec("classaware"), indptr, labels, C), ClassAwareSampler)


# ---------------------------------------------------------------------------------------------------- shards
@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("world_size", [1, 3, 4])
def test_shards_disjoint_equal_and_cover_epoch(name, world_size):
    (indptr, labels), C = long_tail_table(num_images=1001)
    kw = {"lam": 0.7} if name == "softbalance" else {}
    full = build_sampler(SamplerSpec(name, **kw), indptr, labels, C, seed=5)
    full.set_epoch(2)
    epoch = np.array(list(full))
    shards = []
    for rank in range(world_size):
        s = build_sampler(SamplerSpec(name, **kw), indptr, labels, C, seed=5, rank=rank, world_size=world_size)
        s.set_epoch(2)
        shards.append(np.array(list(s)))
        assert len(shards[-1]) == len(s)
    per = math.ceil(len(epoch) / world_size)
    assert all(len(x) == per for x in shards)
    # positions: rank r holds positions r, r+W, ... of the padded epoch, so they are disjoint by construction;
    # interleaving them back must give the epoch followed by its wrap-around padding
    merged = np.empty(per * world_size, dtype=np.int64)
    for rank, x in enumerate(shards):
        merged[rank::world_size] = x
    np.testing.assert_array_equal(merged[: len(epoch)], epoch)
    np.testing.assert_array_equal(merged[len(epoch) :], epoch[: per * world_size - len(epoch)])
    if name == "nonbalance":
        assert set(np.concatenate(shards).tolist()) == set(range(1001))


def test_shard_function_positions():
    draws = np.arange(10) * 10
    assert shard(draws, 0, 4).tolist() == [0, 40, 80]
    assert shard(draws, 1, 4).tolist() == [10, 50, 90]
    assert shard(draws, 2, 4).tolist() == [20, 60, 0]  # padding wraps to the start
    assert shard(draws, 3, 4).tolist() == [30, 70, 10]
    with pytest.raises(ConfigError, match="rank"):
        shard(draws, 4, 4)


# ----------------------------------------------------------------------------------------------- repeat factor
def hand_example():
    # 8 images, t = 0.5. class 0 in 7/8 images: sqrt(0.5/0.875) < 1 -> r=1; class 1 in 2/8: sqrt(2);
    # class 2 in 1/8: sqrt(4) = 2; class 3 in no image. Image 7 has no labels -> factor 1.
    rows = [[0, 2], [0, 1], [1, 0], [0], [0], [0], [0], []]
    return csr(rows), 4, [2.0, math.sqrt(2), math.sqrt(2), 1, 1, 1, 1, 1]


def test_repeat_factors_by_hand():
    (indptr, labels), C, expected = hand_example()
    np.testing.assert_allclose(repeat_factors(indptr, labels, C, threshold=0.5), expected, rtol=1e-15)
    np.testing.assert_allclose(repeat_factors(indptr, labels, C, threshold=0.0), 1.0)
    # LVIS default t = 0.001 is below every frequency here
    np.testing.assert_allclose(repeat_factors(indptr, labels, C), 1.0)
    # t = 2: class 0 sqrt(2/0.875), class 1 sqrt(8) , class 2 sqrt(16) = 4
    np.testing.assert_allclose(
        repeat_factors(indptr, labels, C, threshold=2.0),
        [4, math.sqrt(8), math.sqrt(8)] + [math.sqrt(2 / 0.875)] * 4 + [1],
    )


def test_repeat_factor_sampler_stochastic_rounding():
    (indptr, labels), C, _ = hand_example()
    s = RepeatFactorSampler(indptr, labels, C, threshold=0.5, seed=0)
    n_epochs, twice = 2000, 0
    for e in range(n_epochs):
        s.set_epoch(e)
        idx = np.array(list(s))
        n = np.bincount(idx, minlength=8)
        assert n[0] == 2 and (n[3:] == 1).all() and set(n[1:3].tolist()) <= {1, 2}
        assert len(s) == len(idx) == n.sum()
        twice += int(n[1] == 2)
    # image 1 appears twice with probability sqrt(2) - 1
    assert binomtest(twice, n_epochs, math.sqrt(2) - 1).pvalue > 1e-3


def test_repeat_factor_bad_threshold():
    (indptr, labels), C, _ = hand_example()
    with pytest.raises(ConfigError, match="threshold"):
        build_sampler(SamplerSpec("repeatfactor", threshold=-1), indptr, labels, C)


# ----------------------------------------------------------------------------------------------- plumbing
def test_sampler_spec_errors():
    (indptr, labels), C, _ = hand_example()
    with pytest.raises(ConfigError, match="unknown sampler"):
        SamplerSpec("balanced")
    with pytest.raises(TypeError, match="lamda"):
        SamplerSpec("softbalance", lam=0.5, lamda=0.5)
    with pytest.raises(ConfigError, match="needs lam"):
        SamplerSpec("softbalance")
    for bad in (-1, float("inf"), float("nan"), "abc"):
        with pytest.raises(ConfigError, match=r"lam = .*finite number >= 0"):
            SamplerSpec("softbalance", lam=bad)
    with pytest.raises(ConfigError, match="num_samples"):
        SamplerSpec("softbalance", lam=0.5, num_samples=0)
    with pytest.raises(ConfigError, match="world_size"):
        build_sampler(SamplerSpec("nonbalance"), indptr, labels, C, world_size=0)
    with pytest.raises(ConfigError, match="epoch"):
        build_sampler(SamplerSpec("nonbalance"), indptr, labels, C).set_epoch(-1)
    with pytest.raises(ConfigError, match="SamplerSpec"):
        build_sampler("softbalance", indptr, labels, C)  # noqa: the name alone is not a spec


def test_an_option_the_sampler_does_not_read_is_an_error():
    with pytest.raises(ConfigError, match="lam is ignored by sampler 'nonbalance'.*use sampler softbalance"):
        SamplerSpec("nonbalance", lam=0.7)
    with pytest.raises(ConfigError, match="threshold is ignored by sampler 'softbalance'.*repeatfactor"):
        SamplerSpec("softbalance", lam=0.7, threshold=0.001)
    assert SamplerSpec("softbalance", lam=1, num_samples=5).options() == {"lam": 1.0, "num_samples": 5}
    assert SamplerSpec("repeatfactor").options() == {}


def test_works_with_dataloader():
    (indptr, labels), C = long_tail_table(num_images=64)
    ds = torch.utils.data.TensorDataset(torch.arange(64))
    s = SoftBalanceSampler(indptr, labels, C, lam=0.7, seed=0, rank=1, world_size=2)
    got = torch.cat([b[0] for b in torch.utils.data.DataLoader(ds, batch_size=8, sampler=s)]).tolist()
    assert got == s.rank_indices().tolist() and len(got) == 32


def test_a_lam_schedule_draws_each_epoch_with_its_own_lam():
    """Epoch e of a schedule draws exactly what a fixed-λ sampler with λ(e) draws at epoch e (same seed)."""
    ip, lb = csr([[0], [0], [0], [0], [1], [1], [2]])
    sched = SoftBalanceSampler(ip, lb, 3, lam_schedule=[[0, 0.0], [2, 1.0]], seed=5)
    for epoch, lam in ((0, 0.0), (1, 0.0), (2, 1.0), (7, 1.0)):
        fixed = SoftBalanceSampler(ip, lb, 3, lam=lam, seed=5)
        assert sched.lam_at(epoch) == lam
        np.testing.assert_array_equal(sched.epoch_indices(epoch), fixed.epoch_indices(epoch))
    spec = SamplerSpec("softbalance", lam_schedule=[[0, 0.0], [2, 1.0]])
    assert spec.lam_schedule == ((0, 0.0), (2, 1.0)) and spec.lam_at(1) == 0.0 and spec.lam_at(3) == 1.0
    assert SamplerSpec("softbalance", lam=0.7).lam_at(4) == 0.7 and SamplerSpec("nonbalance").lam_at(0) is None
    built = build_sampler(spec, ip, lb, 3, seed=5)
    np.testing.assert_array_equal(built.epoch_indices(2), sched.epoch_indices(2))


@pytest.mark.parametrize(
    "bad",
    [[[1, 0.5]], [[0, 0.5], [0, 0.7]], [[0, 0.5], [3, 0.7], [2, 0.1]], [[0, -1.0]], [], [[0.5, 0.1]], "0.7"],
    ids=["starts-late", "repeated", "decreasing", "negative-lam", "empty", "fractional-epoch", "not-a-list"],
)
def test_bad_lam_schedules_are_named(bad):
    with pytest.raises(ConfigError, match="lam"):
        SamplerSpec("softbalance", lam_schedule=bad)


def test_lam_and_a_schedule_are_one_or_the_other():
    with pytest.raises(ConfigError, match="not both"):
        SamplerSpec("softbalance", lam=0.7, lam_schedule=[[0, 0.7]])
    with pytest.raises(ConfigError, match="lam_schedule is ignored by sampler 'classaware'"):
        SamplerSpec("classaware", lam_schedule=[[0, 0.7]])
