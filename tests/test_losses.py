"""Losses against closed forms derived by hand (float64), reductions, stability, ACSL background sampling.

Concurrent softmax, eq 3 of Peng et al. (CVPR 2020), for one row with label set K:

    L = Σ_{k∈K} (log D_k − z_k),   D_k = e^{z_k} + Σ_{j∉K} (1 − r_kj) e^{z_j}

z_i appears in D_k only as e^{z_k} (when i = k) or inside the sum (when i ∉ K), hence

    ∂L/∂z_i = e^{z_i}/D_i − 1 = σ*_i − 1                 (i ∈ K)
    ∂L/∂z_i = e^{z_i} Σ_{k∈K} (1 − r_ki) / D_k            (i ∉ K)

(the paper's eq 4 is the one-label case; note the rate is r_ki, of the label class k to column i). The reference
below evaluates these formulas element by element in log space, independently of the implementation.

ACSL eq 5-7 (Wang et al., CVPR 2021): L = −Σ_i w_i log p̂_i, ∂L/∂z_i = w_i (p_i − y_i), w from eq 6.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from lt_models import losses
from lt_models.errors import ConfigError
from lt_models.losses.acsl import ACSLLoss
from lt_models.losses.concurrent_softmax import ConcurrentSoftmaxLoss
from lt_models.losses.registry import build_loss

K = 7


def rate_matrix(dtype=torch.float64):
    """A hand-made r: hierarchy pairs (3 <-> 4 with rate 1), confusion pairs with partial rates."""
    r = torch.zeros(K, K, dtype=dtype)
    r[1, 2], r[2, 1] = 0.5, 0.3
    r[3, 4], r[4, 3] = 1.0, 1.0
    r[5, 1], r[5, 2], r[5, 6] = 0.2, 0.7, 0.1
    r[6, 3] = 0.4
    return r


def rows_and_targets(dtype=torch.float64):
    """Background, single-label and multi-label rows (labels chosen to hit r's non-zeros both ways)."""
    label_sets = [[0], [0], [1], [5], [3], [6], [1, 2], [3, 4], [5, 6, 1], [2, 6], [4]]
    y = torch.zeros(len(label_sets), K, dtype=dtype)
    for n, labels in enumerate(label_sets):
        y[n, labels] = 1.0
    z = torch.randn(len(label_sets), K, dtype=dtype, generator=torch.Generator().manual_seed(3)) * 3
    return z, y


def eq3_reference(z, y, r):
    """(loss, gradient) of eq 3, element by element from the closed forms in the module docstring."""
    n_rows, k = z.shape
    loss = 0.0
    grad = torch.zeros_like(z)
    for n in range(n_rows):
        labels = [i for i in range(k) if y[n, i] == 1]
        log_d = {}
        for c in labels:
            w = torch.tensor(
                [1.0 if j == c else (0.0 if j in labels else 1.0 - float(r[c, j])) for j in range(k)], dtype=z.dtype
            )
            log_d[c] = torch.logsumexp(z[n] + w.log(), 0)
            loss += float(log_d[c] - z[n, c])
        for i in range(k):
            if i in labels:
                grad[n, i] = torch.exp(z[n, i] - log_d[i]) - 1.0
            else:
                grad[n, i] = sum((1.0 - float(r[c, i])) * torch.exp(z[n, i] - log_d[c]) for c in labels)
    return loss / n_rows, grad / n_rows


def test_concurrent_softmax_matches_eq3_and_hand_derived_gradient():
    z, y = rows_and_targets()
    r = rate_matrix()
    x = z.clone().requires_grad_()
    loss = ConcurrentSoftmaxLoss(r)(x, y)
    loss.backward()
    ref_loss, ref_grad = eq3_reference(z, y, r)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-12)
    torch.testing.assert_close(x.grad, ref_grad, rtol=1e-10, atol=1e-13)


def test_concurrent_softmax_gradcheck_and_sparse_rate():
    z, y = rows_and_targets()
    z, y = z[[0, 2, 7, 8]], y[[0, 2, 7, 8]]  # background, single-label, two multi-label rows
    loss_fn = ConcurrentSoftmaxLoss(rate_matrix().to_sparse())
    assert torch.autograd.gradcheck(lambda a: loss_fn(a, y), (z.clone().requires_grad_(),))


def test_background_row_is_plain_softmax_and_r0_single_label_is_cross_entropy():
    gen = torch.Generator().manual_seed(0)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        z = torch.randn(64, K, dtype=dtype, generator=gen) * 4
        labels = torch.randint(0, K, (64,), generator=gen)
        labels[:16] = 0  # background rows
        y = F.one_hot(labels, K).to(dtype)
        for r in (torch.zeros(K, K, dtype=dtype), None):
            a, b = z.clone().requires_grad_(), z.clone().requires_grad_()
            loss = ConcurrentSoftmaxLoss(r)(a, y)
            ref = F.cross_entropy(b, labels)
            loss.backward()
            ref.backward()
            assert loss.item() == pytest.approx(ref.item(), rel=tol)
            torch.testing.assert_close(a.grad, b.grad, rtol=tol, atol=tol)
    # background rows stay plain softmax cross-entropy even with a non-zero r (row / column 0 of r are 0)
    zb = torch.randn(5, K, dtype=torch.float64, generator=gen)
    yb = F.one_hot(torch.zeros(5, dtype=torch.int64), K).double()
    assert ConcurrentSoftmaxLoss(rate_matrix())(zb, yb).item() == pytest.approx(
        F.cross_entropy(zb, torch.zeros(5, dtype=torch.int64)).item(), rel=1e-12
    )


def test_ill_conditioned_denominators_are_exact_in_float32():
    """Denominators that are a tiny share of the row mass (a label at +30 next to one at -30, a class whose
    r = 1 parent takes all the mass, labels at -1e4 and +1e4): the exact log-sum-exp path."""
    r = rate_matrix(torch.float32)
    z = torch.tensor(
        [
            [0.0, 30.0, -30.0, -31.0, -29.0, -40.0, -35.0],
            [0.0, -2.0, 1.0, 40.0, -40.0, -3.0, -1.0],
            [-1e4, -1e4, 1e4, -1e4, -1e4, -1e4, -1e4],
        ]
    )
    y = torch.zeros(3, K)
    y[0, [1, 2]] = 1.0  # classes 1 and 2 (rates 0.5 / 0.3 between them): D_2 = e^{z_2} + non-labels
    y[1, [4]] = 1.0  # class 4 whose parent 3 (r = 1) holds all the mass: D_4 = e^{z_4} + the rest
    y[2, [1, 2]] = 1.0  # D_1 is e^{-2e4} of the row mass: exact path next to a label at +1e4
    x = z.clone().requires_grad_()
    loss = ConcurrentSoftmaxLoss(r)(x, y)
    loss.backward()
    ref_loss, ref_grad = eq3_reference(z.double(), y.double(), r.double())
    assert loss.item() == pytest.approx(ref_loss, rel=1e-5)
    torch.testing.assert_close(x.grad[:2].double(), ref_grad[:2], rtol=1e-4, atol=1e-6)
    # float32 resolves logits near 1e4 to ~1e-3, so row 2 can only match to that relative precision
    torch.testing.assert_close(x.grad[2].double(), ref_grad[2], rtol=2e-3, atol=1e-6)
    # row 2: D_1 = e^{-1e4} (1 + 5 non-labels), so σ*_1 = 1/6 and ∂L/∂z_1 = (1/6 − 1) / N
    assert x.grad[2, 1].item() == pytest.approx((1 / 6 - 1) / 3, rel=1e-3)


@pytest.mark.parametrize("name", ["concurrent_softmax", "acsl", "softmax_multihot", "bce"])
def test_stability_at_plus_minus_1e4(name):
    gen = torch.Generator().manual_seed(1)
    z = (torch.randint(0, 2, (40, K), generator=gen) * 2 - 1).float() * 1e4
    labels = torch.randint(0, K, (40,), generator=gen)
    y = F.one_hot(labels, K).float()
    y[::4, 3] = 1.0
    y[::4, 0] = 0.0
    kwargs = {
        "concurrent_softmax": {"concurrent_rate": rate_matrix(torch.float32)},
        "acsl": {"xi": 0.7, "frequency": list("rcfrcf")},
    }.get(name, {})
    loss_fn = build_loss(name, **kwargs)
    x = z.clone().requires_grad_()
    loss = loss_fn(x, y)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    scores = loss_fn.scores(z)
    assert torch.isfinite(scores).all() and (scores >= 0).all() and (scores <= 1).all()
    if name == "concurrent_softmax":
        ref_loss, ref_grad = eq3_reference(z.double(), y.double(), rate_matrix())
        assert loss.item() == pytest.approx(ref_loss, rel=1e-6)
        torch.testing.assert_close(x.grad.double(), ref_grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(scores.double(), eq5_reference(z.double(), rate_matrix()), rtol=1e-5, atol=1e-7)


def eq5_reference(z, r):
    """σ†_i = e^{z_i} / Σ_j (1 − r_ij) e^{z_j}, in log space."""
    log_den = torch.logsumexp(z.unsqueeze(1) + torch.log1p(-r).unsqueeze(0), dim=2)  # [N, K(i), K(j)] -> [N, K]
    return torch.exp(z - log_den)


def test_eq5_scores_match_formula_reduce_to_softmax_and_block_path_agrees():
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(3000, K, dtype=torch.float64, generator=gen) * 3
    r = rate_matrix()
    loss_fn = ConcurrentSoftmaxLoss(r)
    ref = eq5_reference(z, r)
    torch.testing.assert_close(loss_fn.scores(z), ref, rtol=1e-12, atol=1e-15)
    # many small row blocks, spread over the worker threads
    crow, col, val = losses.rate_to_csr(r)
    threads = torch.get_num_threads()
    torch.testing.assert_close(
        losses.concurrent_softmax_scores(z, crow, col, val, block_rows=16), ref, rtol=1e-12, atol=1e-15
    )
    assert torch.get_num_threads() == threads  # the single-threaded workers leave the caller's setting alone
    torch.testing.assert_close(
        ConcurrentSoftmaxLoss(torch.zeros(K, K)).scores(z), torch.softmax(z, 1), rtol=1e-12, atol=1e-15
    )
    torch.testing.assert_close(ConcurrentSoftmaxLoss(None).scores(z), torch.softmax(z, 1))


def test_eq5_dominant_parent_is_exact_in_float32():
    r = rate_matrix(torch.float32)
    z = torch.tensor([[0.0, -1.0, 0.0, 45.0, 1.0, -2.0, 0.5], [0.0, 60.0, -20.0, 0.0, 0.0, 0.0, 0.0]])
    scores = ConcurrentSoftmaxLoss(r).scores(z)
    # class 4's only excluded class is 3 (r = 1), so σ†_4 = e^{z_4} / (everything but class 3)
    torch.testing.assert_close(scores.double(), eq5_reference(z.double(), r.double()), rtol=1e-5, atol=1e-8)
    assert 0.2 < scores[0, 4] < 1.0


def test_retain_graph_second_backward_and_half_precision(second_backward):
    z, y = rows_and_targets(torch.float32)
    for loss_fn in (ConcurrentSoftmaxLoss(rate_matrix(torch.float32)), ACSLLoss(0.5)):
        second_backward(loss_fn, z, y)
        xb = z.to(torch.bfloat16).requires_grad_()
        loss_fn(xb, y).backward()
        assert xb.grad.dtype == torch.bfloat16 and torch.isfinite(xb.grad.float()).all()


# ------------------------------------------------------------------------------------------------------------
# ACSL
# ------------------------------------------------------------------------------------------------------------


def acsl_reference(z, y, xi):
    """(loss, gradient, w) of ACSL eq 5-7 without background sampling, written out element by element."""
    p = torch.sigmoid(z)
    w = torch.zeros_like(z)
    for n in range(z.shape[0]):
        if y[n, 0] == 1:
            w[n] = 1.0  # background row: every channel
        else:
            for i in range(z.shape[1]):
                w[n, i] = 1.0 if (y[n, i] == 1 or p[n, i] >= xi) else 0.0
    p_hat = torch.where(y == 1, p, 1 - p)
    loss = -(w * torch.log(p_hat)).sum() / z.shape[0]
    grad = torch.where(y == 1, p - 1, w * p) / z.shape[0]  # eq 7
    return loss, grad, w


def test_acsl_matches_eq5_to_eq7_on_background_single_and_multi_label_rows():
    z, y = rows_and_targets()
    xi = 0.6
    x = z.clone().requires_grad_()
    loss = ACSLLoss(xi)(x, y)
    loss.backward()
    ref_loss, ref_grad, ref_w = acsl_reference(z, y, xi)
    assert 0 < ref_w.mean() < 1  # the threshold really removes some channels
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-12)
    torch.testing.assert_close(x.grad, ref_grad, rtol=1e-12, atol=1e-14)
    assert torch.equal(~losses.acsl_ignored(z, y, xi), ref_w.bool())


def test_acsl_with_nothing_ignored_equals_bce_and_bce_baseline():
    # eq 5 with every weight 1 (no class suppressed) is plain sigmoid BCE summed over K, divided by N
    gen = torch.Generator().manual_seed(4)
    z = torch.randn(1, K, dtype=torch.float64, generator=gen)
    y = torch.zeros(1, K, dtype=torch.float64)
    y[0, 3] = 1.0
    a, b = z.clone().requires_grad_(), z.clone().requires_grad_()
    loss = losses.acsl_loss(a, y, torch.zeros_like(y, dtype=torch.bool))
    ref = F.binary_cross_entropy_with_logits(b, y, reduction="sum")
    loss.backward()
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    torch.testing.assert_close(a.grad, b.grad)
    zz, yy = rows_and_targets()
    nothing = torch.zeros_like(yy, dtype=torch.bool)
    assert losses.acsl_loss(zz, yy, nothing).item() == pytest.approx(build_loss("bce")(zz, yy).item(), rel=1e-12)


def test_acsl_background_sampling_shares_and_reproducibility():
    frequency = ["r"] * 10 + ["c"] * 10 + ["f"] * 10
    columns = {f: [i + 1 for i, c in enumerate(frequency) if c == f] for f in "rcf"}
    n_bg, n_fg = 12345, 500
    k = len(frequency) + 1
    y = torch.zeros(n_bg + n_fg, k)
    y[:n_bg, 0] = 1.0
    y[n_bg:, 5] = 1.0
    z = torch.full((n_bg + n_fg, k), -3.0)  # below xi everywhere: foreground rows keep only their label
    w = ~losses.acsl_ignored(z, y, 0.7, frequency, generator=torch.Generator().manual_seed(0))
    bg = w[:n_bg]
    assert bg[:, 0].all() and bg[:, columns["f"]].all()
    for code, share in (("r", 0.01), ("c", 0.1)):
        block = bg[:, columns[code]]
        rows = block.any(1)
        assert torch.equal(block.all(1), rows)  # a chosen background row covers the whole group (official code)
        assert math.floor(share * n_bg) <= int(rows.sum()) <= math.ceil(share * n_bg)
    assert w[n_bg:].sum() == n_fg and w[n_bg:, 5].all()  # foreground rows: label only, no background sampling
    # small batches: stochastic rounding keeps the expected share (int(0.01 * 150) = 1 would give 0.67%)
    gen = torch.Generator().manual_seed(1)
    small_y, small_z = y[:150], z[:150]
    shares = [
        (~losses.acsl_ignored(small_z, small_y, 0.7, frequency, generator=gen))[:, columns["r"][0]].float().mean()
        for _ in range(100)
    ]
    mean = float(torch.stack(shares).mean())
    assert abs(mean - 0.01) < 4 * math.sqrt(0.5 * 0.5 / 100) / 150  # Bernoulli(0.5) extra row per draw
    # reproducible: same generator seed, or the global RNG after torch.manual_seed
    a = losses.acsl_ignored(z, y, 0.7, frequency, generator=torch.Generator().manual_seed(7))
    b = losses.acsl_ignored(z, y, 0.7, frequency, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    torch.manual_seed(3)
    c = losses.acsl_ignored(z, y, 0.7, frequency)
    torch.manual_seed(3)
    assert torch.equal(c, losses.acsl_ignored(z, y, 0.7, frequency))
    # without frequency every background row suppresses every class
    assert not losses.acsl_ignored(z, y, 0.7)[:n_bg].any()


# ------------------------------------------------------------------------------------------------------------
# Baselines, build_loss, errors
# ------------------------------------------------------------------------------------------------------------


def test_softmax_is_conventional_cross_entropy_on_the_primary_label():
    """A two-label RoI under `softmax`: exactly single-label CE on its primary label t, L = log Σ_j e^{z_j} − z_t,
    ∂L/∂z_i = (σ_i − [i = t]) / N; the second label is a negative like any other column."""
    z, y = rows_and_targets()
    primary = torch.tensor([0, 0, 1, 5, 3, 6, 2, 4, 6, 2, 4])  # one of each row's labels (rows 6-9 have 2-3 labels)
    assert bool((y.gather(1, primary[:, None]) == 1).all()) and int((y.sum(1) > 1).sum()) == 4
    loss_fn = build_loss("softmax")
    assert loss_fn.one_label
    x = z.clone().requires_grad_()
    loss = loss_fn(x, primary)
    (grad,) = torch.autograd.grad(loss, x)
    n = z.shape[0]
    ref_loss = sum(math.log(sum(math.exp(float(v)) for v in z[i])) - float(z[i, primary[i]]) for i in range(n)) / n
    ref_grad = torch.softmax(z, 1)
    ref_grad[torch.arange(n), primary] -= 1.0
    assert loss.item() == pytest.approx(ref_loss, rel=1e-12)
    torch.testing.assert_close(grad, ref_grad / n, rtol=1e-12, atol=1e-15)
    assert loss.item() == pytest.approx(F.cross_entropy(z, primary).item(), rel=1e-15)
    torch.testing.assert_close(loss_fn.scores(z), torch.softmax(z, 1))
    with pytest.raises(ValueError, match="one-label loss takes labels int64"):
        loss_fn(z, y)


def test_softmax_multihot_is_eq1_on_every_label_with_the_eq2_gradient():
    """`softmax_multihot` keeps the former softmax numbers: L = −Σ_i y_i log σ_i per row, and the gradient of a row
    with m labels is eq 2: mσ_i − 1 for a label, mσ_i otherwise (divided by N for the mean)."""
    z, y = rows_and_targets()
    loss_fn = build_loss("softmax_multihot")
    assert not getattr(loss_fn, "one_label", False)
    x = z.clone().requires_grad_()
    loss = loss_fn(x, y)
    (grad,) = torch.autograd.grad(loss, x)
    n = z.shape[0]
    sigma = torch.softmax(z, 1)
    ref_loss = -sum(math.log(float(sigma[i, j])) for i in range(n) for j in range(K) if y[i, j] == 1) / n
    m = y.sum(1, keepdim=True)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-12)
    torch.testing.assert_close(grad, (m * sigma - y) / n, rtol=1e-12, atol=1e-15)
    # the labels suppress each other: with m = 2, a label with σ > 1/2 is pushed down
    row = 7  # labels {3, 4}
    assert m[row].item() == 2
    z2 = z[row : row + 1].clone()
    z2[0, 3] = 20.0
    (g2,) = torch.autograd.grad(loss_fn(z2.requires_grad_(), y[row : row + 1]), z2)
    assert g2[0, 3] > 0  # gradient descent lowers the logit of a true label


def test_eql_weights():
    # EQL: tail classes (f < lambda) 2 and 5 lose their negative terms on foreground rows only
    z, y = rows_and_targets()
    freq = [0.5, 1e-4, 0.2, 0.3, 1e-3, 0.9]
    eql = build_loss("eql", class_freq=freq, lambda_=1.76e-3)
    w = torch.ones_like(z)
    fg = y[:, 0] == 0
    for j in (2, 5):
        w[fg, j] = y[fg, j]
    expected = (F.binary_cross_entropy_with_logits(z, y, reduction="none") * w).sum() / z.shape[0]
    assert eql(z, y).item() == pytest.approx(expected.item(), rel=1e-12)
    torch.testing.assert_close(eql.scores(z), torch.sigmoid(z))


def test_scores_are_chosen_independently_of_the_training_loss():
    """Table 2 of the concurrent-softmax paper: softmax / concurrent softmax in training x in testing."""
    z, y = rows_and_targets()
    r = rate_matrix()
    primary = torch.tensor([0, 0, 1, 5, 3, 6, 2, 4, 6, 2, 4])
    plain = losses.LossSpec("softmax").build()
    eq5 = losses.LossSpec("softmax", scores="concurrent").build(concurrent_rate=r)
    assert eq5.one_label and losses.LossSpec("softmax", scores="concurrent").inputs == ("concurrent_rate",)
    assert eq5(z, primary).item() == plain(z, primary).item()  # training unchanged
    torch.testing.assert_close(eq5.scores(z), eq5_reference(z, r), rtol=1e-12, atol=1e-15)
    conc = losses.LossSpec("concurrent_softmax", scores="softmax").build(concurrent_rate=r)
    assert conc(z, y).item() == ConcurrentSoftmaxLoss(r)(z, y).item()
    torch.testing.assert_close(conc.scores(z), torch.softmax(z, 1))
    sig = losses.LossSpec("concurrent_softmax", scores="sigmoid").build(concurrent_rate=r)
    torch.testing.assert_close(sig.scores(z), torch.sigmoid(z))
    assert losses.LossSpec("concurrent_softmax", scores="concurrent").inputs == ("concurrent_rate",)
    with pytest.raises(ConfigError, match="needs the concurrent-rate matrix"):
        losses.LossSpec("softmax", scores="concurrent").build()
    with pytest.raises(ConfigError, match="scores = 'focal'"):
        losses.LossSpec("softmax", scores="focal")


def test_loss_spec_params_belong_to_their_loss():
    assert losses.LossSpec("seesaw", seesaw_p=0.5).seesaw_p == 0.5
    with pytest.raises(ConfigError, match="seesaw_q is ignored by loss 'eqlv2'"):
        losses.LossSpec("eqlv2", seesaw_q=1.0)
    with pytest.raises(ConfigError, match="must be an integer >= 1"):
        losses.LossSpec("federated", fed_num_classes=0)
    for name, params in losses.LOSS_PARAMS.items():
        assert name in losses.LOSSES and set(params) <= set(losses.registry._PARAM_CHECKS)


def test_build_loss_names_and_errors():
    assert isinstance(build_loss("concurrent_softmax", concurrent_rate=rate_matrix()), ConcurrentSoftmaxLoss)
    assert isinstance(build_loss("acsl", xi=0.7, frequency=list("rcfrcf")), ACSLLoss)
    with pytest.raises(ConfigError, match="unknown loss 'focal'"):
        build_loss("focal")
    with pytest.raises(ConfigError, match="does not take frequency"):
        build_loss("bce", frequency=list("rcf"))
    with pytest.raises(ConfigError, match="xi"):
        build_loss("acsl", xi=1.5)
    with pytest.raises(ConfigError, match=r"frequency\[1\] = 'x'"):
        ACSLLoss(0.7, frequency=["r", "x"])
    bad = rate_matrix()
    bad[2, 2] = 0.5
    with pytest.raises(ConfigError, match="diagonal"):
        ConcurrentSoftmaxLoss(bad)
    bad = rate_matrix()
    bad[0, 3] = 0.1
    with pytest.raises(ConfigError, match="row 0"):
        ConcurrentSoftmaxLoss(bad)
    bad = rate_matrix()
    bad[1, 3] = 1.5
    with pytest.raises(ConfigError, match=r"concurrent_rate\[1, 3\] = 1.5"):
        ConcurrentSoftmaxLoss(bad)
    with pytest.raises(ValueError, match="columns"):
        ConcurrentSoftmaxLoss(rate_matrix())(torch.zeros(2, K + 1), torch.zeros(2, K + 1))
