"""EQLv2 (lt_models.losses.eqlv2): closed forms element by element in float64, the statistics over consecutive steps,
the background column, state round-trip, no update outside training, low precision, range checks."""

import math

import pytest
import torch
import torch.nn.functional as F

from lt_models.errors import ConfigError
from lt_models.losses.eqlv2 import (
    EQLv2Loss,
    check_eqlv2_alpha,
    check_eqlv2_gamma,
    check_eqlv2_mu,
    eqlv2_loss,
    eqlv2_mapping,
    eqlv2_weights,
)

C = 6
K = C + 1


def batch(seed, n=12, dtype=torch.float64):
    """Background, single-label and multi-label rows; class 1 is frequent (its ratio g grows past μ = 0.3)."""
    gen = torch.Generator().manual_seed(seed)
    label_sets = [[0], [0], [0], [1], [1], [1, 2], [1, 4], [3], [5, 6], [1], [0], [2, 5]][:n]
    y = torch.zeros(len(label_sets), K, dtype=dtype)
    for i, labels in enumerate(label_sets):
        y[i, labels] = 1.0
    z = torch.randn(len(label_sets), K, dtype=dtype, generator=gen) * 2.5
    return z, y


def reference_step(z, y, pos, neg, steps, gamma, mu, alpha):
    """(loss, gradient, new pos, new neg) of one training step, element by element with Python floats.

    Weights: 1 before any statistics; else for class j >= 1 g = pos/(neg + 1e-10), r = 1/(1 + exp(−γ(g − μ))),
    q = 1 + α(1 − r); column 0 has r = q = 1. Loss Σ w BCE / N; gradient w (p − y) / N; the statistics add
    w |p − y| over the positive (negative) entries of each class j >= 1.
    """
    n, k = z.shape
    r, q = [1.0] * k, [1.0] * k
    if steps > 0:
        for j in range(1, k):
            g = float(pos[j - 1]) / (float(neg[j - 1]) + 1e-10)
            r[j] = 1.0 / (1.0 + math.exp(-gamma * (g - mu)))
            q[j] = 1.0 + alpha * (1.0 - r[j])
    loss, grad = 0.0, torch.zeros(n, k, dtype=torch.float64)
    new_pos, new_neg = [float(v) for v in pos], [float(v) for v in neg]
    for i in range(n):
        for j in range(k):
            zij, yij = float(z[i, j]), float(y[i, j])
            p = 1.0 / (1.0 + math.exp(-zij))
            w = q[j] if yij == 1.0 else r[j]
            bce = math.log1p(math.exp(-zij)) if yij == 1.0 else math.log1p(math.exp(zij))
            loss += w * bce
            grad[i, j] = w * (p - yij) / n
            if j > 0:
                if yij == 1.0:
                    new_pos[j - 1] += w * abs(p - 1.0)
                else:
                    new_neg[j - 1] += w * abs(p)
    return loss / n, grad, torch.tensor(new_pos, dtype=torch.float64), torch.tensor(new_neg, dtype=torch.float64)


@pytest.mark.parametrize("params", [{}, {"gamma": 3.0, "mu": 0.3, "alpha": 2.0}])
def test_three_steps_match_closed_form(params):
    loss_fn = EQLv2Loss(C, **params)
    gamma, mu, alpha = loss_fn.gamma, loss_fn.mu, loss_fn.alpha
    assert (gamma, mu, alpha) == (params.get("gamma", 12.0), params.get("mu", 0.8), params.get("alpha", 4.0))
    pos, neg = torch.zeros(C, dtype=torch.float64), torch.zeros(C, dtype=torch.float64)
    weights_seen = []
    for step in range(3):
        z, y = batch(10 + step)
        x = z.clone().requires_grad_()
        loss = loss_fn(x, y)
        (grad,) = torch.autograd.grad(loss, x)
        # the reference weighs step t with the statistics of steps 1..t−1 (all weights 1 at the first step)
        ref_loss, ref_grad, pos, neg = reference_step(z, y, pos, neg, step, gamma, mu, alpha)
        assert loss.item() == pytest.approx(ref_loss, rel=1e-12)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(loss_fn.pos_grad, pos, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(loss_fn.neg_grad, neg, rtol=1e-12, atol=1e-15)
        assert int(loss_fn.steps) == step + 1
        weights_seen.append(loss_fn.class_weights())
    r, q = weights_seen[-1]
    assert r[1:].max() > 0.5 > r[1:].min()  # the reweighing is really active: classes on both sides of μ
    torch.testing.assert_close(q[1:], 1 + alpha * (1 - r[1:]))


def test_first_step_is_plain_bce():
    gen = torch.Generator().manual_seed(0)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        z = torch.randn(300, K, dtype=dtype, generator=gen) * 3
        y = F.one_hot(torch.randint(0, K, (300,), generator=gen), K).to(dtype)
        y[::5, 3] = 1.0
        y[::5, 0] = 0.0
        a, b = z.clone().requires_grad_(), z.clone().requires_grad_()
        loss = EQLv2Loss(C)(a, y)
        ref = F.binary_cross_entropy_with_logits(b, y, reduction="sum") / z.shape[0]
        loss.backward()
        ref.backward()
        assert loss.item() == pytest.approx(ref.item(), rel=tol)
        torch.testing.assert_close(a.grad, b.grad, rtol=tol, atol=tol * 1e-2)


def test_equation_functions():
    x = torch.tensor([0.0, 0.8, 2.0], dtype=torch.float64)
    expected = [1 / (1 + math.exp(-12 * (v - 0.8))) for v in (0.0, 0.8, 2.0)]
    torch.testing.assert_close(eqlv2_mapping(x, 12.0, 0.8), torch.tensor(expected, dtype=torch.float64))
    r, q = eqlv2_weights(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.0]), 12.0, 0.8, 4.0)
    assert r[0].item() == pytest.approx(1 / (1 + math.exp(-12 * 0.2)), rel=1e-6)
    assert r[1].item() == pytest.approx(1 / (1 + math.exp(12 * 0.8)), rel=1e-6)  # 0 / (0 + ε) = 0
    torch.testing.assert_close(q, 1 + 4 * (1 - r))
    z, y = batch(1)
    ones = torch.ones(K, dtype=torch.float64)
    assert eqlv2_loss(z, y, ones, ones).item() == pytest.approx(
        (F.binary_cross_entropy_with_logits(z, y, reduction="sum") / z.shape[0]).item(), rel=1e-12
    )


def test_background_column_weight_one_and_no_statistics():
    loss_fn = EQLv2Loss(C)
    for step in range(3):
        z, y = batch(20 + step)
        loss_fn(z.clone().requires_grad_(), y)
    assert loss_fn.pos_grad.shape == (C,) and loss_fn.neg_grad.shape == (C,)
    r, q = loss_fn.class_weights()
    assert r[0] == 1 and q[0] == 1 and (r[1:] != 1).all()
    # column 0's gradient is plain BCE's, and its logits do not touch the statistics
    z, y = batch(30)
    x = z.clone().requires_grad_()
    before = (loss_fn.pos_grad.clone(), loss_fn.neg_grad.clone())
    loss_fn(x, y).backward()
    torch.testing.assert_close(x.grad[:, 0], (torch.sigmoid(z[:, 0]) - y[:, 0]) / z.shape[0], rtol=1e-12, atol=0)
    delta = (loss_fn.pos_grad - before[0], loss_fn.neg_grad - before[1])
    loss_fn.pos_grad.copy_(before[0])
    loss_fn.neg_grad.copy_(before[1])
    loss_fn.steps -= 1
    z2 = z.clone()
    z2[:, 0] = torch.linspace(-9, 9, z.shape[0], dtype=z.dtype)
    loss_fn(z2.requires_grad_(), y)
    torch.testing.assert_close(loss_fn.pos_grad - before[0], delta[0], rtol=0, atol=0)
    torch.testing.assert_close(loss_fn.neg_grad - before[1], delta[1], rtol=0, atol=0)


def test_state_dict_round_trip_resumes_exactly():
    a = EQLv2Loss(C, gamma=5.0, mu=0.4, alpha=3.0)
    for step in range(2):
        z, y = batch(40 + step)
        a(z.clone().requires_grad_(), y)
    state = a.state_dict()
    assert set(state) == {"pos_grad", "neg_grad", "steps"} and state["pos_grad"].dtype == torch.float64
    b = EQLv2Loss(C, gamma=5.0, mu=0.4, alpha=3.0)
    b.load_state_dict(state)
    z, y = batch(50)
    xa, xb = z.clone().requires_grad_(), z.clone().requires_grad_()
    la, lb = a(xa, y), b(xb, y)
    la.backward()
    lb.backward()
    assert la.item() == lb.item()
    assert torch.equal(xa.grad, xb.grad)
    for name in ("pos_grad", "neg_grad", "steps"):
        assert torch.equal(getattr(a, name), getattr(b, name))


def test_no_update_in_eval_mode_or_under_no_grad_or_from_scores():
    loss_fn = EQLv2Loss(C)
    z, y = batch(60)
    loss_fn(z.clone().requires_grad_(), y)
    snapshot = {k: v.clone() for k, v in loss_fn.state_dict().items()}

    def unchanged():
        return all(torch.equal(v, loss_fn.state_dict()[k]) for k, v in snapshot.items())

    with torch.no_grad():
        loss_fn(z, y)
    assert unchanged()
    loss_fn.eval()
    x = z.clone().requires_grad_()
    eval_loss = loss_fn(x, y)
    eval_loss.backward()
    loss_fn.scores(z)
    assert unchanged()
    # eval mode still uses the accumulated weights
    r, q = loss_fn.class_weights()
    ref_loss, ref_grad, _, _ = reference_step(z, y, snapshot["pos_grad"], snapshot["neg_grad"], 1, 12.0, 0.8, 4.0)
    assert eval_loss.item() == pytest.approx(ref_loss, rel=1e-12)
    torch.testing.assert_close(x.grad, ref_grad, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(loss_fn.scores(z), torch.sigmoid(z))


def test_gradcheck_and_retain_graph(second_backward):
    loss_fn = EQLv2Loss(C, gamma=3.0, mu=0.3, alpha=2.0)
    for step in range(2):
        z, y = batch(70 + step)
        loss_fn(z.clone().requires_grad_(), y)
    loss_fn.eval()  # fixed weights while gradcheck evaluates the loss many times
    z, y = batch(80)
    assert torch.autograd.gradcheck(lambda a: loss_fn(a, y), (z.clone().requires_grad_(),))
    second_backward(loss_fn, z, y)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_and_extreme_logits_are_finite(dtype):
    loss_fn = EQLv2Loss(C)
    ref_fn = EQLv2Loss(C)
    for step in range(3):
        z, y = batch(90 + step, dtype=torch.float32)
        x = z.to(dtype).requires_grad_()
        xr = z.to(dtype).float().requires_grad_()
        loss, ref = loss_fn(x, y), ref_fn(xr, y)
        loss.backward()
        ref.backward()
        assert x.grad.dtype == dtype and torch.isfinite(loss) and torch.isfinite(x.grad.float()).all()
        assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
        torch.testing.assert_close(x.grad.float(), xr.grad.to(dtype).float())
    gen = torch.Generator().manual_seed(1)
    z = (torch.randint(0, 2, (40, K), generator=gen) * 2 - 1).float() * 1e4
    y = F.one_hot(torch.randint(0, K, (40,), generator=gen), K).float()
    x = z.to(dtype).requires_grad_()
    loss = loss_fn(x, y)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad.float()).all()
    assert torch.isfinite(loss_fn.pos_grad).all() and torch.isfinite(loss_fn.neg_grad).all()
    scores = loss_fn.scores(z)
    assert torch.isfinite(scores).all() and (scores >= 0).all() and (scores <= 1).all()


def test_range_checks_and_shapes():
    assert check_eqlv2_gamma(12) == 12.0 and isinstance(check_eqlv2_gamma(12), float)
    assert check_eqlv2_mu(0) == 0.0 and check_eqlv2_mu(1) == 1.0 and check_eqlv2_mu(0.8) == 0.8
    assert check_eqlv2_alpha(0) == 0.0 and check_eqlv2_alpha(4) == 4.0
    for bad in (0, -1.0, float("nan"), float("inf"), "12", True, None):
        with pytest.raises(ConfigError, match=r"gamma .*> 0 .*default 12"):
            check_eqlv2_gamma(bad)
    for bad in (-0.1, 1.01, float("nan"), float("-inf"), "0.8", False):
        with pytest.raises(ConfigError, match=r"mu .*\[0, 1\] .*default 0.8"):
            check_eqlv2_mu(bad)
    for bad in (-1e-3, float("inf"), float("nan"), "4", True):
        with pytest.raises(ConfigError, match=r"alpha .*>= 0 .*default 4"):
            check_eqlv2_alpha(bad)
    with pytest.raises(ConfigError, match="gamma"):
        EQLv2Loss(C, gamma=0.0)
    with pytest.raises(ConfigError, match="mu"):
        EQLv2Loss(C, mu=2.0)
    with pytest.raises(ConfigError, match="alpha"):
        EQLv2Loss(C, alpha=-1.0)
    for bad in (0, 2.5, True):
        with pytest.raises(ConfigError, match="num_classes"):
            EQLv2Loss(bad)
    with pytest.raises(ValueError, match="num_classes"):
        EQLv2Loss(C)(torch.zeros(2, K + 1), torch.zeros(2, K + 1))
    with pytest.raises(ValueError, match="targets"):
        EQLv2Loss(C)(torch.zeros(2, K), torch.zeros(2, K - 1))
