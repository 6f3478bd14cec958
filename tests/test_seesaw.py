"""Seesaw Loss (Wang et al., CVPR 2021) against closed forms evaluated element by element in float64.

For a row of class i (eq 4), with S_ij = M_ij C_ij (eq 6) held constant,

    D = Σ_{j≠i} S_ij e^{z_j} + e^{z_i},   L = −log σ̂_i = log D − z_i,
    ∂L/∂z_j = S_ij e^{z_j} / D   (j ≠ i, eq 5),   ∂L/∂z_i = e^{z_i} / D − 1,

M_ij = (N_j / N_i)^p if N_i > N_j else 1 (eq 7, counts clamped at 1), C_ij = (σ_j / σ_i)^q if σ_j > σ_i else 1
(eq 8, σ = softmax over the row). Layout rule of this head: S = 1 on a background row (label 0) and in the
background column 0 of a foreground row. The reference below uses Python floats only.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from lt_models.errors import ConfigError
from lt_models.losses.seesaw import (
    SeesawLoss,
    check_seesaw_p,
    check_seesaw_q,
    log_compensation,
    log_mitigation,
    seesaw_log_factors,
)

C = 6
K = C + 1


def reference(z, labels, counts, p, q):
    """(loss, gradient) of eq 4 / eq 5, element by element; ``counts`` are the N used (after this batch)."""
    n_rows, k = z.shape
    loss, grad = 0.0, torch.zeros(n_rows, k, dtype=torch.float64)
    for n in range(n_rows):
        row = [float(v) for v in z[n]]
        i = int(labels[n])
        top = max(row)
        total = sum(math.exp(v - top) for v in row)
        sigma = [math.exp(v - top) / total for v in row]
        s = [1.0] * k
        if i != 0:
            n_i = max(float(counts[i]), 1.0)
            for j in range(1, k):
                if j == i:
                    continue
                n_j = max(float(counts[j]), 1.0)
                m = (n_j / n_i) ** p if n_i > n_j else 1.0
                c = (sigma[j] / sigma[i]) ** q if sigma[j] > sigma[i] else 1.0
                s[j] = m * c
        d = sum(s[j] * math.exp(row[j] - top) for j in range(k) if j != i) + math.exp(row[i] - top)
        loss += math.log(d) - (row[i] - top)
        for j in range(k):
            grad[n, j] = (math.exp(row[i] - top) / d - 1.0) if j == i else s[j] * math.exp(row[j] - top) / d
    return loss / n_rows, grad / n_rows


def batch(n=40, seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, K, dtype=torch.float64, generator=gen) * scale
    labels = torch.randint(0, K, (n,), generator=gen)
    labels[::3] = 0  # background rows
    return z, labels


# head (1, 2), middle (3, 4), tail (5) and class 6 never seen before this batch (slot 0 = background, unread)
PRIOR = torch.tensor([500.0, 1000.0, 800.0, 60.0, 60.0, 3.0, 0.0], dtype=torch.float64)


def test_matches_eq4_and_eq5_element_by_element():
    z, labels = batch()
    labels[1], labels[2] = 6, 5  # a never-seen class (counted just before the loss) and the tail class
    for p, q in ((0.8, 2.0), (1.5, 0.5), (0.0, 2.0), (0.8, 0.0)):
        loss_fn = SeesawLoss(C, p=p, q=q)
        loss_fn.cum_samples.copy_(PRIOR)
        x = z.clone().requires_grad_()
        loss = loss_fn(x, labels)
        (grad,) = torch.autograd.grad(loss, x)
        counts = PRIOR + torch.bincount(labels, minlength=K).double()  # the batch is counted before its loss
        ref_loss, ref_grad = reference(z, labels, counts, p, q)
        assert loss.item() == pytest.approx(ref_loss, rel=1e-12)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(loss_fn.cum_samples, counts, rtol=0, atol=0)


def test_eval_mode_uses_the_counts_as_they_are():
    z, labels = batch(seed=1)
    loss_fn = SeesawLoss(C).eval()
    loss_fn.cum_samples.copy_(PRIOR)  # class 6 has N = 0: clamped at 1, so a row of class 6 is not mitigated
    labels[4] = 6
    x = z.clone().requires_grad_()
    loss = loss_fn(x, labels)
    (grad,) = torch.autograd.grad(loss, x)
    ref_loss, ref_grad = reference(z, labels, PRIOR, 0.8, 2.0)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-14)


def test_counts_update_only_in_training_forward_with_grad():
    z, labels = batch(seed=2)
    loss_fn = SeesawLoss(C)
    assert loss_fn.cum_samples.dtype == torch.float64 and loss_fn.cum_samples.shape == (K,)
    loss_fn(z, labels)
    once = torch.bincount(labels, minlength=K).double()
    torch.testing.assert_close(loss_fn.cum_samples, once, rtol=0, atol=0)  # background counted in slot 0
    with torch.no_grad():
        loss_fn(z, labels)
    loss_fn.scores(z)
    loss_fn.eval()
    loss_fn(z, labels)
    torch.testing.assert_close(loss_fn.cum_samples, once, rtol=0, atol=0)
    loss_fn.train()
    loss_fn(z, labels)
    torch.testing.assert_close(loss_fn.cum_samples, 2 * once, rtol=0, atol=0)


def test_mitigation_factor_eq7():
    log_n = PRIOR.clamp_min(1.0).log()
    labels = torch.tensor([1, 5, 3, 6])  # head row, tail row, middle row, never-seen row
    m = log_mitigation(log_n, labels, 0.8).exp()
    assert m.shape == (4, K)
    assert torch.equal(m[:, 0], torch.ones(4))  # background column: M_i0 = 1
    # a head-class row mitigates its penalty on rarer classes by (N_j / N_i)^p, never on more frequent ones
    assert m[0, 5].item() == pytest.approx((3 / 1000) ** 0.8, rel=1e-12)
    assert m[0, 3].item() == pytest.approx((60 / 1000) ** 0.8, rel=1e-12)
    assert m[0, 6].item() == pytest.approx((1 / 1000) ** 0.8, rel=1e-12)  # N_6 = 0 is clamped at 1
    assert m[0, 2].item() == pytest.approx((800 / 1000) ** 0.8, rel=1e-12)
    assert m[0, 1].item() == 1.0
    # a tail-class row keeps the full penalty on the more frequent classes; only the unseen class is rarer
    assert torch.equal(m[1, :6], torch.ones(6))
    assert m[1, 6].item() == pytest.approx((1 / 3) ** 0.8, rel=1e-12)
    assert m[2, 4].item() == 1.0  # N_i = N_j: no mitigation
    assert m[2, 5].item() == pytest.approx((3 / 60) ** 0.8, rel=1e-12)
    assert torch.equal(m[3], torch.ones(K))  # an unseen label (eval mode) mitigates nothing
    assert torch.equal(log_mitigation(log_n, labels, 0.0), torch.zeros(4, K))


def test_compensation_factor_eq8():
    z = torch.tensor([[5.0, 0.0, 1.0, 3.0, -2.0, 0.5, 4.0]], dtype=torch.float64)
    sigma = torch.softmax(z, 1)[0]
    x = z.clone().requires_grad_()
    c = log_compensation(x, torch.tensor([2]), 2.0).exp()
    assert not c.requires_grad  # σ is detached: C is a constant in backprop
    assert c[0, 0].item() == 1.0  # background column: C_i0 = 1 although σ_0 > σ_i
    assert c[0, 1].item() == 1.0 and c[0, 2].item() == 1.0 and c[0, 4].item() == 1.0 and c[0, 5].item() == 1.0
    assert c[0, 3].item() == pytest.approx((sigma[3] / sigma[2]).item() ** 2, rel=1e-12)
    assert c[0, 6].item() == pytest.approx((sigma[6] / sigma[2]).item() ** 2, rel=1e-12)
    s = seesaw_log_factors(z, torch.tensor([2]), PRIOR.clamp_min(1).log(), 0.8, 2.0).exp()
    m = log_mitigation(PRIOR.clamp_min(1).log(), torch.tensor([2]), 0.8).exp()
    torch.testing.assert_close(s, m * c, rtol=1e-12, atol=0)  # eq 6


def test_p_q_zero_is_cross_entropy_and_background_rows_are_plain_ce():
    gen = torch.Generator().manual_seed(3)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-6)):
        z = torch.randn(64, K, dtype=dtype, generator=gen) * 4
        labels = torch.randint(0, K, (64,), generator=gen)
        loss_fn = SeesawLoss(C, p=0, q=0)
        loss_fn.cum_samples.copy_(PRIOR)
        a, b = z.clone().requires_grad_(), z.clone().requires_grad_()
        loss, ref = loss_fn(a, labels), F.cross_entropy(b, labels)
        loss.backward()
        ref.backward()
        assert loss.item() == pytest.approx(ref.item(), rel=tol)
        torch.testing.assert_close(a.grad, b.grad, rtol=tol, atol=tol)
        # p, q > 0: a background row is still plain CE (loss and gradient), even beside foreground rows
        loss_fn = SeesawLoss(C)
        loss_fn.cum_samples.copy_(PRIOR)
        bg = torch.zeros(64, dtype=torch.int64)
        assert loss_fn(z, bg).item() == pytest.approx(F.cross_entropy(z, bg).item(), rel=tol)
        labels[:20] = 0
        a, b = z.clone().requires_grad_(), z.clone().requires_grad_()
        loss_fn(a, labels).backward()
        F.cross_entropy(b, labels).backward()
        torch.testing.assert_close(a.grad[:20], b.grad[:20], rtol=tol, atol=tol)
        assert not torch.allclose(a.grad[20:], b.grad[20:])


def test_blocked_cpu_path_matches_the_paper_formulas_on_a_wide_batch():
    """K = 1025: foreground rows go in blocks of 64 to the row workers; a vectorised float64 form of eq 4-8."""
    c, n = 1024, 600
    gen = torch.Generator().manual_seed(4)
    z = torch.randn(n, c + 1, dtype=torch.float64, generator=gen) * 3
    labels = torch.randint(1, c + 1, (n,), generator=gen)
    labels[::4] = 0
    prior = torch.randint(0, 5000, (c + 1,), generator=gen).double()
    loss_fn = SeesawLoss(c)
    loss_fn.cum_samples.copy_(prior)
    x = z.clone().requires_grad_()
    loss = loss_fn(x, labels)
    loss.backward()
    counts = (prior + torch.bincount(labels, minlength=c + 1).double()).clamp_min(1)
    sigma = torch.softmax(z, 1)
    n_i, s_i = counts[labels].unsqueeze(1), sigma.gather(1, labels.unsqueeze(1))
    m = torch.where(n_i > counts, (counts / n_i) ** 0.8, 1.0)
    cc = torch.where(sigma > s_i, (sigma / s_i) ** 2.0, 1.0)
    s = m * cc
    s[:, 0] = 1.0
    s[labels == 0] = 1.0
    s[torch.arange(n), labels] = 1.0
    e = (z - z.max(1, keepdim=True).values).exp() * s
    d = e.sum(1, keepdim=True)
    ref_loss = -(e.gather(1, labels.unsqueeze(1)) / d).log().mean()
    ref_grad = (e / d - F.one_hot(labels, c + 1)) / n
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-12)
    torch.testing.assert_close(x.grad, ref_grad, rtol=1e-9, atol=1e-15)


def test_state_dict_round_trip_restores_counts():
    z, labels = batch(seed=5)
    loss_fn = SeesawLoss(C)
    for _ in range(3):
        loss_fn(z, labels)
    state = loss_fn.state_dict()
    assert list(state) == ["cum_samples"]
    fresh = SeesawLoss(C)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.cum_samples, loss_fn.cum_samples, rtol=0, atol=0)
    assert fresh(z, labels).item() == loss_fn(z, labels).item()  # both count the batch, then agree
    with pytest.raises(RuntimeError):
        SeesawLoss(C + 1).load_state_dict(state)


def test_half_precision_retain_graph_and_extreme_logits(second_backward):
    z, labels = batch(seed=6)
    loss_fn = SeesawLoss(C).eval()
    loss_fn.cum_samples.copy_(PRIOR)
    for dtype in (torch.float16, torch.bfloat16):
        x = z.to(dtype).requires_grad_()
        ref_loss, ref_grad = reference(x.detach().double(), labels, PRIOR, 0.8, 2.0)  # at the rounded logits
        loss = loss_fn(x, labels)
        loss.backward()
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        assert x.grad.dtype == dtype and torch.isfinite(x.grad).all()
        assert loss.item() == pytest.approx(ref_loss, rel=1e-5)  # computed in float32
        # the gradient is rounded to the logits' dtype: 2^-8 (bfloat16) / 2^-11 (float16) relative
        torch.testing.assert_close(x.grad.double(), ref_grad, rtol=1e-2, atol=1e-6)
        assert loss_fn.scores(x.detach()).shape == x.shape
    second_backward(loss_fn, z.float(), labels)
    big = (torch.randint(0, 2, (40, K), generator=torch.Generator().manual_seed(7)) * 2 - 1).float() * 1e4
    x = big.requires_grad_()
    loss = loss_fn(x, labels)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    scores = loss_fn.scores(big.detach())
    assert torch.isfinite(scores).all()
    torch.testing.assert_close(scores.sum(1), torch.ones(40))


def test_range_checks_and_input_validation():
    assert check_seesaw_p(0) == 0.0 and isinstance(check_seesaw_p(1), float)
    assert check_seesaw_q(2) == 2.0 and check_seesaw_p(0.8) == 0.8
    for bad in (-0.1, float("nan"), float("inf"), "0.8", None, True):
        with pytest.raises(ConfigError, match=r"exponent p must be .*>= 0.*0\.8"):
            check_seesaw_p(bad)
        with pytest.raises(ConfigError, match=r"exponent q must be .*>= 0.*2\.0"):
            check_seesaw_q(bad)
    with pytest.raises(ConfigError):
        SeesawLoss(C, p=-1.0)
    with pytest.raises(ConfigError):
        SeesawLoss(C, q=float("inf"))
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ConfigError, match="num_classes"):
            SeesawLoss(bad)
    loss_fn = SeesawLoss(C)
    assert loss_fn.one_label and (loss_fn.p, loss_fn.q) == (0.8, 2.0)
    z = torch.zeros(3, K)
    with pytest.raises(ValueError, match="columns"):
        loss_fn(torch.zeros(3, K + 1), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="int64"):
        loss_fn(z, torch.zeros(3, K))
    with pytest.raises(ValueError, match="0..6"):
        loss_fn(z, torch.tensor([0, 7, 1]))
    torch.testing.assert_close(loss_fn.cum_samples, torch.zeros(K, dtype=torch.float64))  # nothing counted
