"""Federated loss (Zhou, Koltun, Krähenbühl, "Probabilistic two-stage detection", arXiv 2021 / LVIS Challenge 2020
report): the class-subset rule and the loss against hand computations, independent of the implementation.

Subset rule: S = present classes ∪ (num_sampled − |present|) draws without replacement, each draw picking class j among
those not yet in S with probability w_j / Σ w (w = image frequency^0.5). For two draws from nothing present,

    P(j ∈ S) = p_j + Σ_{i≠j} p_i · w_j / (W − w_i),    p_i = w_i / W,  W = Σ_i w_i.

Loss given S, for p = sigmoid(z):  L = (1/N) Σ_n Σ_{j∈S} −[y log p + (1 − y) log(1 − p)],
∂L/∂z_nj = (p_nj − y_nj)/N for j ∈ S, 0 elsewhere (column 0 included).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from lt_models.errors import ConfigError
from lt_models.losses import federated
from lt_models.losses.federated import (
    FederatedLoss,
    check_fed_freq_power,
    check_fed_num_classes,
    federated_classes,
    federated_loss,
    present_classes,
)

C = 8
K = C + 1
FREQ = [0.9, 0.5, 0.01, 0.2, 0.04, 0.3, 0.6, 0.09]


def batch(dtype=torch.float64, seed=3):
    """Background rows, single-label rows and multi-label rows."""
    label_sets = [[0], [0], [1], [5], [3], [6, 2], [0], [7, 8, 1], [4], [0]]
    y = torch.zeros(len(label_sets), K, dtype=dtype)
    for n, labels in enumerate(label_sets):
        y[n, labels] = 1.0
    z = torch.randn(len(label_sets), K, dtype=dtype, generator=torch.Generator().manual_seed(seed)) * 3
    return z, y


def reference(z, y, subset):
    """(loss, gradient) from the closed forms, element by element in float64."""
    n_rows, k = z.shape
    loss, grad = 0.0, torch.zeros(n_rows, k, dtype=torch.float64)
    for n in range(n_rows):
        for j in subset:
            p = 1.0 / (1.0 + math.exp(-float(z[n, j])))
            t = float(y[n, j])
            loss -= t * math.log(p) + (1.0 - t) * math.log(1.0 - p)
            grad[n, j] = (p - t) / n_rows
    return loss / n_rows, grad


def loss_and_grad(fn, z, *args):
    x = z.clone().requires_grad_()
    loss = fn(x, *args)
    (g,) = torch.autograd.grad(loss, x)
    return loss, g


# ---- the subset rule ------------------------------------------------------------------------------------------


def test_subset_keeps_present_classes_has_num_sampled_classes_and_no_background():
    weight = torch.tensor(FREQ, dtype=torch.float64).sqrt()
    gen = torch.Generator().manual_seed(0)
    for trial in range(200):
        present = torch.randperm(C, generator=gen)[: trial % 5] + 1
        m = 1 + trial % C
        s = federated_classes(present, weight, m, gen)
        assert set(present.tolist()) <= set(s.tolist())
        assert s.numel() == max(m, present.numel()) and s.unique().numel() == s.numel()
        assert s.dtype == torch.int64 and bool(((s >= 1) & (s <= C)).all())  # never column 0
        assert s.tolist() == sorted(s.tolist())
    # at least num_sampled classes present: S is exactly the present classes, nothing is drawn
    present = torch.tensor([2, 5, 7, 7])
    state = gen.get_state()
    assert federated_classes(present, weight, 3, gen).tolist() == [2, 5, 7]
    assert torch.equal(gen.get_state(), state)


def test_first_draw_is_proportional_to_sqrt_frequency_among_absent_classes():
    weight = torch.tensor(FREQ, dtype=torch.float64).sqrt()
    present = torch.tensor([1, 7])  # the two most frequent classes are present and cannot be drawn again
    gen = torch.Generator().manual_seed(1)
    trials = 20000
    counts = torch.zeros(K)
    for _ in range(trials):
        s = federated_classes(present, weight, 3, gen)
        counts[s] += 1
    assert counts[1] == counts[7] == trials and counts[0] == 0
    w = [0.0 if c + 1 in (1, 7) else math.sqrt(f) for c, f in enumerate(FREQ)]
    for c in range(1, K):
        if c in (1, 7):
            continue
        p = w[c - 1] / sum(w)
        sigma = math.sqrt(p * (1 - p) / trials)
        assert abs(counts[c].item() / trials - p) < 5 * sigma


def test_two_draws_without_replacement_match_hand_inclusion_probabilities():
    freq = [0.81, 0.25, 0.04, 0.49]
    w = [math.sqrt(f) for f in freq]  # 0.9, 0.5, 0.2, 0.7
    total = sum(w)
    inclusion = [w[j] / total + sum(w[i] / total * w[j] / (total - w[i]) for i in range(4) if i != j) for j in range(4)]
    loss = FederatedLoss(freq, num_sampled=2, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(loss.weight, torch.tensor(w, dtype=torch.float64), rtol=0, atol=1e-15)
    trials = 20000
    counts = torch.zeros(5)
    for _ in range(trials):
        counts[federated_classes(torch.zeros(0, dtype=torch.int64), loss.weight, 2, loss.generator)] += 1
    assert counts.sum() == 2 * trials and counts[0] == 0
    for j in range(4):
        p = inclusion[j]
        assert abs(counts[j + 1].item() / trials - p) < 5 * math.sqrt(p * (1 - p) / trials)


def test_seeded_generator_reproduces_the_subset():
    weight = torch.tensor(FREQ, dtype=torch.float64).sqrt()
    present = torch.tensor([3])
    a = [federated_classes(present, weight, 4, g).tolist() for g in [torch.Generator().manual_seed(7)] * 5]
    b = [federated_classes(present, weight, 4, g).tolist() for g in [torch.Generator().manual_seed(7)] * 5]
    assert a == b


def test_zero_frequency_classes_are_never_sampled_but_kept_when_present():
    freq = [0.0, 0.3, 0.0, 0.0, 0.5, 0.0, 0.0, 0.0]
    weight = torch.tensor(freq, dtype=torch.float64).sqrt()
    gen = torch.Generator().manual_seed(4)
    for _ in range(50):
        s = federated_classes(torch.tensor([3]), weight, 6, gen)  # 5 draws wanted, only 2 classes can be drawn
        assert s.tolist() == [2, 3, 5]
    assert (
        federated_classes(torch.zeros(0, dtype=torch.int64), torch.zeros(C, dtype=torch.float64), 50, gen).numel() == 0
    )
    # the module with every class at frequency 0 and only background rows: empty S, zero loss and gradient
    z, y = batch()
    y = torch.zeros_like(y)
    y[:, 0] = 1.0
    loss, g = loss_and_grad(FederatedLoss([0.0] * C, generator=gen), z, y)
    assert loss.item() == 0.0 and not g.any()


def test_present_classes_reads_every_label_of_multi_hot_rows():
    _, y = batch()
    expected = [1, 2, 3, 4, 5, 6, 7, 8]
    for t in (y, y.float(), y.half(), y.bool()):
        assert present_classes(t).tolist() == expected
    assert present_classes(y[:2]).tolist() == []  # background rows only: column 0 is not a class
    assert present_classes(y[[5, 7]]).tolist() == [1, 2, 6, 7, 8]


# ---- the loss -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("share", [0.0, 1.0])  # force the dense (whole-matrix) path / the gathered-columns path
def test_loss_and_gradient_match_closed_form_for_a_fixed_subset(share, monkeypatch):
    monkeypatch.setattr(federated, "GATHER_MAX_SHARE", share)
    z, y = batch()
    for subset in ([1, 2, 5, 6], [3], list(range(1, K)), [2, 4, 8]):  # [2, 4, 8] leaves out some labels too
        loss, g = loss_and_grad(federated_loss, z, y, torch.tensor(subset))
        ref_loss, ref_grad = reference(z, y, subset)
        assert loss.item() == pytest.approx(ref_loss, rel=1e-12)
        torch.testing.assert_close(g, ref_grad, rtol=1e-10, atol=1e-14)
        outside = [j for j in range(K) if j not in subset]
        assert not g[:, outside].any() and not g[:, 0].any()


def test_module_matches_closed_form_on_the_subset_it_draws():
    z, y = batch()
    weight = torch.tensor(FREQ, dtype=torch.float64).sqrt()
    for m in (1, 5, 9):
        subset = federated_classes(present_classes(y), weight, m, torch.Generator().manual_seed(11)).tolist()
        module = FederatedLoss(FREQ, num_sampled=m, generator=torch.Generator().manual_seed(11))
        loss, g = loss_and_grad(module, z, y)
        ref_loss, ref_grad = reference(z, y, subset)
        assert loss.item() == pytest.approx(ref_loss, rel=1e-12)
        torch.testing.assert_close(g, ref_grad, rtol=1e-10, atol=1e-14)


def test_num_sampled_at_least_c_is_bce_over_all_foreground_columns():
    z, y = batch()
    for m in (C, C + 1, 1000):
        loss, g = loss_and_grad(FederatedLoss(FREQ, num_sampled=m), z, y)
        ref, ref_g = loss_and_grad(
            lambda x: F.binary_cross_entropy_with_logits(x[:, 1:], y[:, 1:], reduction="sum") / x.shape[0], z
        )
        assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
        torch.testing.assert_close(g, ref_g, rtol=1e-12, atol=1e-15)
        assert not g[:, 0].any()


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_gradcheck_and_second_backward(share, monkeypatch):
    monkeypatch.setattr(federated, "GATHER_MAX_SHARE", share)
    z, y = batch()
    subset = torch.tensor([1, 4, 6, 7])
    assert torch.autograd.gradcheck(lambda a: federated_loss(a, y, subset), (z.clone().requires_grad_(),))
    x = z.clone().requires_grad_()
    loss = federated_loss(x, y.t().contiguous().t(), subset)  # non-contiguous targets
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, x)  # the dense path's buffer was consumed by the first backward
    torch.testing.assert_close(g1, g2, rtol=0, atol=0)
    torch.testing.assert_close(g1, reference(z, y, subset.tolist())[1], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("share", [0.0, 1.0])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_finite_and_close_to_float32(dtype, share, monkeypatch):
    monkeypatch.setattr(federated, "GATHER_MAX_SHARE", share)
    gen = torch.Generator().manual_seed(5)
    z, y = batch(torch.float32)
    big = (torch.randint(0, 2, (40, K), generator=gen) * 2 - 1).float() * 1e4
    ybig = F.one_hot(torch.randint(0, K, (40,), generator=gen), K).float()
    for logits, targets in ((z, y), (big, ybig)):
        subset = torch.arange(1, K)
        loss, g = loss_and_grad(federated_loss, logits.to(dtype), targets.to(dtype), subset)
        ref, ref_g = loss_and_grad(federated_loss, logits.to(dtype).float(), targets, subset)
        assert loss.dtype == torch.float32 and g.dtype == dtype
        assert torch.isfinite(loss) and torch.isfinite(g).all()
        assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
        torch.testing.assert_close(g.float(), ref_g, rtol=1e-2, atol=1e-3)
    module = FederatedLoss(FREQ, num_sampled=3)
    loss, g = loss_and_grad(module, big.to(dtype), ybig.to(dtype))
    assert torch.isfinite(loss) and torch.isfinite(g).all() and g.dtype == dtype and not g[:, 0].any()
    scores = module.scores(big.to(dtype))
    assert torch.isfinite(scores).all() and (scores >= 0).all() and (scores <= 1).all()


def test_scores_are_sigmoid():
    z, _ = batch()
    torch.testing.assert_close(FederatedLoss(FREQ).scores(z), torch.sigmoid(z))


# ---- range checks ---------------------------------------------------------------------------------------------


def test_num_sampled_range():
    assert check_fed_num_classes(50) == 50 and check_fed_num_classes(1) == 1 and check_fed_num_classes(7.0) == 7
    for bad in (0, -3, 2.5, "50", True, None, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="num_sampled.*integer >= 1.*50"):
            check_fed_num_classes(bad)
    with pytest.raises(ConfigError, match="num_sampled"):
        FederatedLoss(FREQ, num_sampled=0)


def test_freq_power_range():
    assert check_fed_freq_power(0.5) == 0.5 and check_fed_freq_power(0) == 0.0
    for bad in (-0.1, float("nan"), float("inf"), "0.5", None, True):
        with pytest.raises(ConfigError, match="freq_power.*0.5"):
            check_fed_freq_power(bad)
    # power 0: every class (frequency 0 included) has weight 1, i.e. uniform sampling
    assert FederatedLoss([0.0, 0.5], freq_power=0).weight.tolist() == [1.0, 1.0]


def test_class_freq_and_input_checks():
    for bad in ([], [1.2, 0.1], [-0.1], [[0.1, 0.2]], "abc", [float("nan")], None, 3):
        with pytest.raises(ConfigError, match="class_freq.*\\[0, 1\\]"):
            FederatedLoss(bad)
    assert FederatedLoss(torch.tensor(FREQ)).weight.numel() == C
    z, y = batch()
    with pytest.raises(ValueError, match="columns"):
        FederatedLoss(FREQ[:-1])(z, y)
    with pytest.raises(ValueError, match="targets"):
        FederatedLoss(FREQ)(z, y[:, :-1])
    for bad in ([0, 2], [K], [-1]):
        with pytest.raises(ValueError, match="foreground columns"):
            federated_loss(z, y, torch.tensor(bad))
