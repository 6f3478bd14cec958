"""Concurrent softmax, from "Large-Scale Object Detection in the Wild from Imbalanced Multi-Labels" (Peng et al.,
CVPR 2020): eq 3 (training loss) with its closed-form gradient (eq 4, generalised to several labels per row), and
eq 5 (scores at inference).

Inputs follow ``lt_models.losses.registry``: ``logits [N, K]`` and multi-hot ``targets [N, K]`` with column 0 =
background. The concurrent-rate matrix r [K, K] is kept as CSR arrays (:func:`rate_to_csr`); everything that depends on
the labels or on r is done on gathered entries only, and one N×K buffer allocated in forward becomes the gradient in
backward. Eq 5 runs over row blocks on a pool of single-threaded workers (``kernels.map_row_blocks``).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from lt_models.errors import ConfigError
from lt_models.losses.kernels import check_inputs, compute_dtype, label_pairs, map_row_blocks, take

# A concurrent-softmax denominator D_k (normalised by the row's softmax sum) below this value is recomputed exactly
# with a log-sum-exp over the row instead of "1 - (masses of the excluded classes)", which would lose digits.
ILL_CONDITIONED = 1.0 / 32.0


# ----------------------------------------------------------------------------------------------------------------
# Concurrent-rate matrix r in CSR form
# ----------------------------------------------------------------------------------------------------------------


def rate_to_csr(rate: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Validate a concurrent-rate matrix r [K, K] (dense or sparse) and return its CSR arrays.

    Returns ``(crow int64 [K+1], col int64 [nnz], val float64 [nnz])``: the non-zeros of row i are
    ``col[crow[i]:crow[i+1]]`` with rates ``val[...]``. Raises ConfigError unless 0 <= r <= 1, row 0, column 0 and
    the diagonal are 0 (background never co-occurs; a class does not suppress itself less than others).
    """
    if not isinstance(rate, Tensor) or rate.dim() != 2 or rate.shape[0] != rate.shape[1]:
        shape = tuple(rate.shape) if isinstance(rate, Tensor) else type(rate).__name__
        raise ConfigError(
            f"concurrent_rate must be a square [K, K] tensor (K = classes + 1), got {shape}; "
            "build it with lt_models.data.rate_matrix.concurrent_rate_matrix"
        )
    k = rate.shape[0]
    sp = rate.detach().to("cpu")
    sp = sp.coalesce() if sp.layout == torch.sparse_coo else sp.to_dense().to_sparse()
    sp = sp.coalesce()
    rows, cols = sp.indices()
    vals = sp.values().to(torch.float64)
    keep = vals != 0
    rows, cols, vals = rows[keep], cols[keep], vals[keep]
    if not bool(torch.isfinite(vals).all()) or bool((vals < 0).any()) or bool((vals > 1).any()):
        bad = int(torch.nonzero(~(torch.isfinite(vals) & (vals >= 0) & (vals <= 1)))[0])
        raise ConfigError(
            f"concurrent_rate[{int(rows[bad])}, {int(cols[bad])}] = {float(vals[bad])} is not a rate in [0, 1]"
        )
    for what, mask in (
        ("row 0 (background)", rows == 0),
        ("column 0 (background)", cols == 0),
        ("the diagonal", rows == cols),
    ):
        if bool(mask.any()):
            i = int(torch.nonzero(mask)[0])
            raise ConfigError(
                f"concurrent_rate must be 0 on {what}, but r[{int(rows[i])}, {int(cols[i])}] = "
                f"{float(vals[i])}; set it to 0"
            )
    crow = torch.zeros(k + 1, dtype=torch.int64)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=k), 0)
    return crow, cols.to(torch.int64), vals


def _expand_rows(classes: Tensor, crow: Tensor, col: Tensor, val: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """For entries with class ``classes[t]``, list the non-zeros of r's row: ``(entry t, column j, rate r_ij)``."""
    start = crow.index_select(0, classes)
    count = crow.index_select(0, classes + 1) - start
    total = int(count.sum())
    entry = torch.repeat_interleave(torch.arange(classes.numel(), device=classes.device), count, output_size=total)
    first = torch.cumsum(count, 0) - count
    pos = torch.arange(total, device=classes.device) + (start - first).index_select(0, entry)
    return entry, col.index_select(0, pos), val.index_select(0, pos)


# ----------------------------------------------------------------------------------------------------------------
# Concurrent softmax, training: eq 3 (forward) and its gradient (backward)
# ----------------------------------------------------------------------------------------------------------------


def _exact_denominators(
    z_rows: Tensor, free: Tensor, ks: Tensor, crow: Tensor, col: Tensor, val: Tensor, shares: bool = False
) -> tuple[Tensor, Tensor | None]:
    """log D = log Σ_j w_kj e^{z_j} by a log-sum-exp over whole rows, for a few (row, class k) entries.

    ``z_rows`` [F, K] are the rows' logits, ``free`` [F, K] the factors (1 − y_j) (ones for eq 5); the weights are
    w_kj = free_j (1 − r_kj) and w_kk = 1. Returns log D [F] and, with ``shares``, w_kj e^{z_j} / D_k [F, K]
    (formed in log space, so a weight 0 next to a huge logit gives 0, not 0·inf). Used where the cheap
    "1 − excluded mass" form is ill-conditioned.
    """
    w = free.clone()
    entry, j, r = _expand_rows(ks, crow, col, val)
    w[entry, j] = w[entry, j] * (1.0 - r.to(w.dtype))
    w[torch.arange(ks.numel(), device=w.device), ks] = 1.0
    weighted = w.log_().add_(z_rows)
    logd = torch.logsumexp(weighted, dim=1)
    return logd, (weighted.sub_(logd.unsqueeze(1)).exp_() if shares else None)


class _ConcurrentSoftmaxFunction(torch.autograd.Function):
    """Eq 3 forward and its closed-form gradient; see :func:`concurrent_softmax_loss`."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, crow: Tensor, col: Tensor, val: Tensor) -> Tensor:
        dtype = compute_dtype(logits)
        z = logits.to(dtype)
        y = targets.to(dtype)
        n, k = z.shape
        # p_j = e^{z_j} / S with S = Σ_j e^{z_j}; every denominator below is divided by S as well.
        logp = torch.log_softmax(z, dim=1)
        rows, ks = label_pairs(y)
        flat = rows * k + ks
        lp_k = take(logp, flat)
        p_k = lp_k.exp()
        label_mass = torch.zeros(n, dtype=dtype, device=z.device).index_add_(0, rows, p_k)
        # non-zeros j of r's row k, for every label k; (1 - y_j) drops the row's other labels.
        entry, j, r = _expand_rows(ks, crow, col, val)
        tflat = rows.index_select(0, entry) * k + j
        rate = r.to(dtype) * (1.0 - take(y, tflat))
        p_j = take(logp, tflat).exp()
        excluded = torch.zeros(ks.numel(), dtype=dtype, device=z.device).index_add_(0, entry, rate * p_j)
        # D_k / S = p_k + Σ_{j∉K} p_j - Σ_{j∉K} r_kj p_j = p_k + (1 - Σ_{l∈K} p_l) - excluded_k
        d = p_k + (1.0 - label_mass.index_select(0, rows)) - excluded
        exact = torch.nonzero(d < ILL_CONDITIONED).squeeze(1)
        d = d.clamp_min(ILL_CONDITIONED)
        log_sigma = lp_k - d.log()
        weights = None
        if exact.numel():
            ex_rows, ex_ks = rows.index_select(0, exact), ks.index_select(0, exact)
            z_rows = z.index_select(0, ex_rows)
            logd, weights = _exact_denominators(
                z_rows, 1.0 - y.index_select(0, ex_rows), ex_ks, crow, col, val, shares=True
            )  # weights: w_kj e^{z_j} / D_k
            log_sigma.index_copy_(0, exact, take(z, flat.index_select(0, exact)) - logd)
            assert weights is not None  # shares=True: the weights are formed
            weights[torch.arange(exact.numel(), device=z.device), ex_ks] = 0.0  # the label entry is set apart
        ctx.buffer = logp  # becomes the gradient in backward (no second N×K allocation)
        ctx.logits_dtype = logits.dtype
        ctx.save_for_backward(z)
        ctx.pairs = (rows, flat, log_sigma, d, exact, weights, entry, tflat, rate, p_j)
        return -log_sigma.sum() / n

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        r"""Gradient of eq 3 of "Large-Scale Object Detection in the Wild from Imbalanced Multi-Labels"
        (Peng et al., CVPR 2020): the paper's eq 4, generalised to several labels per row.

        Per row, with K the row's label set, L = Σ_{k∈K} (log D_k − z_k) and
        D_k = e^{z_k} + Σ_{j∉K} (1 − r_kj) e^{z_j}. Since z_i enters D_k only through e^{z_k} (i = k) or the sum
        (i ∉ K):

            ∂L/∂z_i = σ*_i − 1                                  for i ∈ K
            ∂L/∂z_i = e^{z_i} Σ_{k∈K} (1 − r_ki) / D_k           for i ∉ K

        (note r_ki: the rate of the *label* class k to the column i). With one label k this is the paper's eq 4,
        e^{z_i}(1 − r_ki)/D_k. Computed as a dense part p_i·A (A = Σ_k S/D_k, one pass over the N×K buffer), the
        label entries overwritten with σ*_k − 1, and a sparse correction −r_ki p_i S/D_k at r's non-zeros.
        """
        (z,) = ctx.saved_tensors
        rows, flat, log_sigma, d, exact, weights, entry, tflat, rate, p_j = ctx.pairs
        buf = ctx.buffer if ctx.buffer is not None else torch.log_softmax(z, dim=1)
        ctx.buffer = None  # consumed: a second backward (retain_graph=True) recomputes it from z
        n = buf.shape[0]
        scale = grad.to(buf.dtype) / n
        inv_d = 1.0 / d
        inv_d.index_fill_(0, exact, 0.0)  # exact pairs bring their own rows (weights)
        a = torch.zeros(n, dtype=buf.dtype, device=buf.device).index_add_(0, rows, inv_d) * scale
        buf.add_(a.abs().log().unsqueeze(1)).exp_()  # p_i · |A · scale|
        if bool(scale < 0):
            buf.neg_()
        flat_buf = buf.view(-1)
        flat_buf.index_copy_(0, flat, (log_sigma.exp() - 1.0) * scale)
        corr = rate * p_j * inv_d.index_select(0, entry)
        keep = torch.nonzero(corr).squeeze(1)
        flat_buf.index_add_(0, tflat.index_select(0, keep), corr.index_select(0, keep) * -scale)
        if weights is not None:
            buf.index_add_(0, rows.index_select(0, exact), weights * scale)
        return buf.to(ctx.logits_dtype), None, None, None, None


def concurrent_softmax_loss(logits: Tensor, targets: Tensor, crow: Tensor, col: Tensor, val: Tensor) -> Tensor:
    r"""Concurrent softmax loss, **eq 3** of "Large-Scale Object Detection in the Wild from Imbalanced Multi-Labels"
    (Peng et al., CVPR 2020), averaged over the N rows.

        L = −Σ_i y_i log σ*_i,    σ*_i = e^{z_i} / (Σ_j (1 − y_j)(1 − r_ij) e^{z_j} + e^{z_i})

    r is given as CSR arrays (:func:`rate_to_csr`). Row 0 / column 0 of r are 0, so a background row (y = e_0) is
    plain softmax cross-entropy, and with r = 0 and one label per row the loss equals ``F.cross_entropy``.
    Computed from ``log_softmax`` (log-sum-exp stable) plus gathers at the labels and at r's non-zeros; a
    denominator that the cheap form would compute by cancellation (D_k/S < 1/32, e.g. when another label of the row
    takes almost all the mass) is recomputed exactly by a log-sum-exp over its row. Backward: see
    ``_ConcurrentSoftmaxFunction.backward`` (eq 4). Targets must be 0/1.
    """
    return _ConcurrentSoftmaxFunction.apply(logits, targets, crow, col, val)


# ----------------------------------------------------------------------------------------------------------------
# Concurrent softmax, inference: eq 5
# ----------------------------------------------------------------------------------------------------------------


def _rate_sparse(crow: Tensor, col: Tensor, val: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    """r as a torch sparse CSR matrix (for eq 5)."""
    k = crow.numel() - 1
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the CSR @ dense product used here is stable
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow.to(device), col.to(device), val.to(device, dtype), (k, k))


def _eq5_rows(z: Tensor, out: Tensor, rate: Tensor) -> Tensor | None:
    """Eq 5 on one block of rows, written into ``out``; returns the block's ill-conditioned entries or None."""
    torch.softmax(z, 1, out=out)
    excluded = (rate @ out.t().contiguous()).t()  # [b, K]: Σ_j r_ij p_j for every class i of every row
    bad = torch.nonzero(excluded > 1.0 - ILL_CONDITIONED) if bool(excluded.max() > 1.0 - ILL_CONDITIONED) else None
    out.div_(excluded.neg_().add_(1.0))
    return bad


def concurrent_softmax_scores(
    logits: Tensor,
    crow: Tensor,
    col: Tensor,
    val: Tensor,
    block_rows: int | None = None,
    rate_cache: dict | None = None,
) -> Tensor:
    r"""Concurrent softmax at inference, **eq 5** of
    "Large-Scale Object Detection in the Wild from Imbalanced Multi-Labels" (Peng et al., CVPR 2020); no gradient.

        σ†_i = e^{z_i} / Σ_j (1 − r_ij) e^{z_j} = p_i / (1 − Σ_j r_ij p_j),    p = softmax(z)

    With r = 0 this is softmax. The subtracted sums are a sparse (CSR) product r·pᵀ computed on blocks of rows
    that stay in cache (on CPU by single-threaded workers, see ``kernels.map_row_blocks``), never N×K×K. Entries whose
    denominator is < 1/32 (a class j with r_ij ≈ 1 taking almost all the mass) are recomputed exactly by a
    log-sum-exp over their row, so ±1e4 logits give exact scores in (0, 1].
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, K], got {tuple(logits.shape)}")
    dtype = compute_dtype(logits)
    with torch.no_grad():
        z = logits.detach().to(dtype)
        if col.numel() == 0:
            return torch.softmax(z, dim=1)
        n, k = z.shape
        key = (str(z.device), dtype)
        cache = {} if rate_cache is None else rate_cache  # sparse copies of r per (device, dtype)
        if key not in cache:
            cache[key] = _rate_sparse(crow, col, val, z.device, dtype)
        rate = cache[key]
        out = torch.empty_like(z)
        bad: list[Tensor]
        if z.device.type == "cpu":
            if block_rows is None:
                block_rows = max(16, (1 << 16) // k)  # ~64 rows for K = 1231: measured best
            blocks = map_row_blocks(lambda s, e: _eq5_rows(z[s:e], out[s:e], rate), n, block_rows)
            bad = [b + torch.tensor([s, 0]) for s, b in blocks]
        else:
            b = _eq5_rows(z, out, rate)
            bad = [] if b is None else [b]
        if bad:
            rows, cls = torch.cat(bad).to(z.device).unbind(1)
            z_rows = z.index_select(0, rows)
            logd, _ = _exact_denominators(
                z_rows, torch.ones_like(z_rows), cls, crow.to(z.device), col.to(z.device), val.to(z.device)
            )
            out[rows, cls] = (z[rows, cls] - logd).exp()
        return out


class ConcurrentSoftmaxLoss(nn.Module):
    """Concurrent softmax, "Large-Scale Object Detection in the Wild from Imbalanced Multi-Labels"
    (Peng et al., CVPR 2020): eq 3 for training (:func:`concurrent_softmax_loss`), eq 5 for ``scores``
    (:func:`concurrent_softmax_scores`).

    ``concurrent_rate``: r [K, K] (dense or sparse, e.g. from ``lt_models.data.rate_matrix.concurrent_rate_matrix``);
    r_ij = share of objects of class i also labelled j; row 0, column 0 and the diagonal are 0. ``None`` means r = 0:
    only the explicit multi-label term (1 − y_j) of eq 3 remains and ``scores`` is plain softmax.
    """

    num_columns: int | None
    crow: Tensor
    col: Tensor
    val: Tensor

    def __init__(self, concurrent_rate: Tensor | None):
        super().__init__()
        if concurrent_rate is None:
            self.num_columns = None
            crow, col, val = torch.zeros(1, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), torch.zeros(0)
        else:
            crow, col, val = rate_to_csr(concurrent_rate)
            self.num_columns = crow.numel() - 1
        self.register_buffer("crow", crow, persistent=False)
        self.register_buffer("col", col, persistent=False)
        self.register_buffer("val", val, persistent=False)
        self._rate_cache: dict = {}  # sparse CSR copies of r per (device, dtype), for eq 5

    def _csr(self, k: int) -> tuple[Tensor, Tensor, Tensor]:
        if self.num_columns is None:
            return torch.zeros(k + 1, dtype=torch.int64, device=self.crow.device), self.col, self.val
        if k != self.num_columns:
            raise ValueError(
                f"logits have {k} columns but concurrent_rate is {self.num_columns}x{self.num_columns}; "
                "both must be K = number of classes + 1"
            )
        return self.crow, self.col, self.val

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        check_inputs(logits, targets)
        return concurrent_softmax_loss(logits, targets, *self._csr(logits.shape[1]))

    def scores(self, logits: Tensor) -> Tensor:
        crow, col, val = self._csr(logits.shape[1])
        return concurrent_softmax_scores(logits, crow, col, val, rate_cache=self._rate_cache)
