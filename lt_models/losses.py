"""Classification losses for the RoI box head.

Every loss takes ``logits [N, K]`` and multi-hot ``targets [N, K]`` (float 0/1) with K = C + 1 columns, **column 0 is
background** (a background RoI has a 1 in column 0 only; a foreground RoI has a 1 at each of its classes). Every loss
has ``forward(logits, targets) -> scalar`` and ``scores(logits) -> [N, K]`` (the probabilities used at inference).

==================  ==============================================================  ==============================
name                loss                                                            ``scores``
==================  ==============================================================  ==============================
softmax             concurrent-softmax paper eq 1, ``-Σ_i y_i log softmax_i``,       softmax
                    mean over N (= ``F.cross_entropy`` with one label per row)
concurrent_softmax  concurrent-softmax paper eq 3, mean over N                      eq 5
bce                 sigmoid BCE summed over the K columns, divided by N             sigmoid
acsl                ACSL eq 5-6 (+ §4.2 background sampling), summed / N            sigmoid
eql                 Equalization Loss (Tan et al., CVPR 2020), summed / N           sigmoid
==================  ==============================================================  ==============================

Papers: "Large-Scale Object Detection in the Wild from Imbalanced Multi-Labels" (Peng et al., CVPR 2020) for the
concurrent softmax; "Adaptive Class Suppression Loss for Long-Tail Object Detection" (Wang et al., CVPR 2021) for
ACSL; "Equalization Loss for Long-Tailed Object Recognition" (Tan et al., CVPR 2020) for EQL.

The two paper losses are custom ``torch.autograd.Function`` s with hand-derived backward passes (derivations in
the docstrings; ``tests/test_losses.py`` checks them against autograd-free closed forms in float64). They are built
to cost about as much as ``F.cross_entropy`` / ``F.binary_cross_entropy_with_logits`` on big RoI batches
(``benchmarks/bench_losses.py``): one N×K buffer is allocated in forward and becomes the gradient in backward, and
everything that depends on the labels or on the concurrent-rate matrix r is done on gathered entries only.
"""
from __future__ import annotations

import math
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lt_models.errors import ConfigError

# A concurrent-softmax denominator D_k (normalised by the row's softmax sum) below this value is recomputed exactly
# with a log-sum-exp over the row instead of "1 - (masses of the excluded classes)", which would lose digits.
ILL_CONDITIONED = 1.0 / 32.0


def _check_inputs(logits: Tensor, targets: Tensor) -> None:
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must be [N, K] with K >= 2 (column 0 = background), got {tuple(logits.shape)}")
    if targets.shape != logits.shape:
        raise ValueError(f"targets must be multi-hot [N, K] like logits {tuple(logits.shape)}, got "
                         f"{tuple(targets.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")


def _compute_dtype(logits: Tensor) -> torch.dtype:
    # half / bfloat16 logits (AMP) are computed in float32; the gradient is cast back.
    return logits.dtype if logits.dtype in (torch.float32, torch.float64) else torch.float32


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
        raise ConfigError(f"concurrent_rate must be a square [K, K] tensor (K = classes + 1), got {shape}; "
                          "build it with lt_models.concurrency.concurrent_rate_matrix")
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
        raise ConfigError(f"concurrent_rate[{int(rows[bad])}, {int(cols[bad])}] = {float(vals[bad])} is not a "
                          "rate in [0, 1]")
    for what, mask in (("row 0 (background)", rows == 0), ("column 0 (background)", cols == 0),
                       ("the diagonal", rows == cols)):
        if bool(mask.any()):
            i = int(torch.nonzero(mask)[0])
            raise ConfigError(f"concurrent_rate must be 0 on {what}, but r[{int(rows[i])}, {int(cols[i])}] = "
                              f"{float(vals[i])}; set it to 0")
    crow = torch.zeros(k + 1, dtype=torch.int64)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=k), 0)
    return crow, cols.to(torch.int64), vals


def _expand_rows(classes: Tensor, crow: Tensor, col: Tensor, val: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """For entries with class ``classes[t]``, list the non-zeros of r's row: ``(entry t, column j, rate r_ij)``."""
    start = crow.index_select(0, classes)
    count = crow.index_select(0, classes + 1) - start
    total = int(count.sum())
    entry = torch.repeat_interleave(torch.arange(classes.numel(), device=classes.device), count,
                                    output_size=total)
    first = torch.cumsum(count, 0) - count
    pos = torch.arange(total, device=classes.device) + (start - first).index_select(0, entry)
    return entry, col.index_select(0, pos), val.index_select(0, pos)


# ----------------------------------------------------------------------------------------------------------------
# Concurrent softmax, training: eq 3 (forward) and its gradient (backward)
# ----------------------------------------------------------------------------------------------------------------

def _take(t: Tensor, flat: Tensor) -> Tensor:
    """t.view(-1)[flat]; index_select is much cheaper than advanced indexing on CPU."""
    return t.reshape(-1).index_select(0, flat)


def _label_pairs(y: Tensor) -> tuple[Tensor, Tensor]:
    """(row, column) of every non-zero entry of a 0/1 target matrix.

    One matrix-vector pass instead of ``nonzero`` over N×K. With L a row's label set, code = Σ_{l∈L} (l + 1).
    If m = code − 1 is itself a label, Σ_{l∈L, l≠m} (l + 1) = 0, so L = {m}: "y[code − 1] = 1" holds exactly for the
    single-label rows. The other rows with labels (multi-label) go through ``nonzero`` on just those rows.
    """
    n, k = y.shape
    if y.dtype != torch.float64 and k * (k + 1) // 2 >= 1 << 24:  # codes would not be exact in float32
        return torch.nonzero(y, as_tuple=True)
    code = torch.mv(y, torch.arange(1, k + 1, dtype=y.dtype, device=y.device))
    cand = code.round().clamp(1, k).to(torch.int64) - 1
    rows_all = torch.arange(n, device=y.device)
    single = (_take(y, rows_all * k + cand) == 1) & (code == cand + 1)
    rows = torch.nonzero(single).squeeze(1)
    cols = cand.index_select(0, rows)
    multi = torch.nonzero(~single & (code != 0)).squeeze(1)
    if multi.numel():
        sub_rows, sub_cols = torch.nonzero(y.index_select(0, multi), as_tuple=True)
        rows = torch.cat([rows, multi.index_select(0, sub_rows)])
        cols = torch.cat([cols, sub_cols])
    return rows, cols


def _exact_denominators(z_rows: Tensor, free: Tensor, ks: Tensor, crow: Tensor, col: Tensor, val: Tensor,
                        shares: bool = False) -> tuple[Tensor, Tensor | None]:
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
        dtype = _compute_dtype(logits)
        z = logits.to(dtype)
        y = targets.to(dtype)
        n, k = z.shape
        # p_j = e^{z_j} / S with S = Σ_j e^{z_j}; every denominator below is divided by S as well.
        logp = torch.log_softmax(z, dim=1)
        rows, ks = _label_pairs(y)
        flat = rows * k + ks
        lp_k = _take(logp, flat)
        p_k = lp_k.exp()
        label_mass = torch.zeros(n, dtype=dtype, device=z.device).index_add_(0, rows, p_k)
        # non-zeros j of r's row k, for every label k; (1 - y_j) drops the row's other labels.
        entry, j, r = _expand_rows(ks, crow, col, val)
        tflat = rows.index_select(0, entry) * k + j
        rate = r.to(dtype) * (1.0 - _take(y, tflat))
        p_j = _take(logp, tflat).exp()
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
            logd, weights = _exact_denominators(z_rows, 1.0 - y.index_select(0, ex_rows), ex_ks, crow, col, val,
                                                shares=True)  # weights: w_kj e^{z_j} / D_k
            log_sigma.index_copy_(0, exact, _take(z, flat.index_select(0, exact)) - logd)
            weights[torch.arange(exact.numel(), device=z.device), ex_ks] = 0.0  # the label entry is set apart
        ctx.buffer = logp  # becomes the gradient in backward (no second N×K allocation)
        ctx.logits_dtype = logits.dtype
        ctx.save_for_backward(z)
        ctx.pairs = (rows, flat, log_sigma, d, exact, weights, entry, tflat, rate, p_j)
        return -log_sigma.sum() / n

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        r"""Gradient of eq 3 (the paper's eq 4, generalised to several labels per row).

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
    r"""Concurrent softmax loss, Peng et al. CVPR 2020, **eq 3**, averaged over the N rows.

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


_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _forget_pools_after_fork() -> None:
    """A forked child (e.g. a DataLoader worker) has none of the parent's threads: start fresh pools there."""
    global _POOLS_LOCK
    _POOLS.clear()
    _POOLS_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_forget_pools_after_fork)


def _row_pool(n_threads: int) -> ThreadPoolExecutor:
    """``n_threads`` worker threads whose torch ops run single-threaded.

    Intra-op parallelism splits every op statically over the OpenMP threads, so a long sequence of small ops stalls
    whenever another process holds one of the cores. Workers that take row blocks from a queue balance dynamically
    instead. OpenMP's and MKL's thread counts are per thread, so ``torch.set_num_threads(1)`` in a worker leaves the
    caller's setting alone; the process-wide default it also overwrites is restored before returning.
    """
    with _POOLS_LOCK:
        pool = _POOLS.get(n_threads)
        if pool is None:
            barrier = threading.Barrier(n_threads + 1)

            def single_threaded() -> None:
                torch.get_num_threads()  # torch's lazy per-thread init first, so it cannot undo the next line
                torch.set_num_threads(1)
                barrier.wait()

            pool = ThreadPoolExecutor(n_threads, thread_name_prefix="ltsweep-rows", initializer=single_threaded)
            for _ in range(n_threads):
                pool.submit(int)
            barrier.wait()
            torch.set_num_threads(n_threads)
            _POOLS[n_threads] = pool
    return pool


def _map_row_blocks(fn: Callable[[int, int], Tensor | None], n_rows: int, block: int) -> list[tuple[int, Tensor]]:
    """Call ``fn(start, stop)`` on consecutive row blocks (in parallel on CPU); collect non-None results."""
    starts = list(range(0, n_rows, block))
    n_threads = torch.get_num_threads()
    if n_threads <= 1 or len(starts) < 4:
        results = [(s, fn(s, min(s + block, n_rows))) for s in starts]
    else:
        per_task = max(1, len(starts) // (8 * n_threads))

        def task(group: list[int]) -> list[tuple[int, Tensor | None]]:
            return [(s, fn(s, min(s + block, n_rows))) for s in group]

        pool = _row_pool(n_threads)
        futures = [pool.submit(task, starts[i:i + per_task]) for i in range(0, len(starts), per_task)]
        results = [item for f in futures for item in f.result()]
    return [(s, r) for s, r in results if r is not None]


def concurrent_softmax_scores(logits: Tensor, crow: Tensor, col: Tensor, val: Tensor,
                              block_rows: int | None = None, rate_cache: dict | None = None) -> Tensor:
    r"""Concurrent softmax at inference, Peng et al. CVPR 2020, **eq 5** (no gradient).

        σ†_i = e^{z_i} / Σ_j (1 − r_ij) e^{z_j} = p_i / (1 − Σ_j r_ij p_j),    p = softmax(z)

    With r = 0 this is softmax. The subtracted sums are a sparse (CSR) product r·pᵀ computed on blocks of rows
    that stay in cache (on CPU by single-threaded workers, see ``_row_pool``), never N×K×K. Entries whose
    denominator is < 1/32 (a class j with r_ij ≈ 1 taking almost all the mass) are recomputed exactly by a
    log-sum-exp over their row, so ±1e4 logits give exact scores in (0, 1].
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, K], got {tuple(logits.shape)}")
    dtype = _compute_dtype(logits)
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
        if z.device.type == "cpu":
            if block_rows is None:
                block_rows = max(16, (1 << 16) // k)  # ~64 rows for K = 1231: measured best
            bad = _map_row_blocks(lambda s, e: _eq5_rows(z[s:e], out[s:e], rate), n, block_rows)
            bad = [b + torch.tensor([s, 0]) for s, b in bad]
        else:
            b = _eq5_rows(z, out, rate)
            bad = [] if b is None else [b]
        if bad:
            rows, cls = torch.cat(bad).to(z.device).unbind(1)
            z_rows = z.index_select(0, rows)
            logd, _ = _exact_denominators(z_rows, torch.ones_like(z_rows), cls, crow.to(z.device),
                                          col.to(z.device), val.to(z.device))
            out[rows, cls] = (z[rows, cls] - logd).exp()
        return out


class ConcurrentSoftmaxLoss(nn.Module):
    """Concurrent softmax (Peng et al., CVPR 2020): eq 3 for training, eq 5 for ``scores``.

    ``concurrent_rate``: r [K, K] (dense or sparse, e.g. from ``lt_models.concurrency.concurrent_rate_matrix``);
    r_ij = share of objects of class i also labelled j; row 0, column 0 and the diagonal are 0. ``None`` means r = 0:
    only the explicit multi-label term (1 − y_j) of eq 3 remains and ``scores`` is plain softmax.
    """

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
            raise ValueError(f"logits have {k} columns but concurrent_rate is {self.num_columns}x{self.num_columns}; "
                             "both must be K = number of classes + 1")
        return self.crow, self.col, self.val

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        _check_inputs(logits, targets)
        return concurrent_softmax_loss(logits, targets, *self._csr(logits.shape[1]))

    def scores(self, logits: Tensor) -> Tensor:
        crow, col, val = self._csr(logits.shape[1])
        return concurrent_softmax_scores(logits, crow, col, val, rate_cache=self._rate_cache)


# ----------------------------------------------------------------------------------------------------------------
# ACSL: eq 6 (weights, + background sampling of §4.2) and eq 5 / eq 7 (loss and gradient)
# ----------------------------------------------------------------------------------------------------------------

FREQUENCY_CODES = ("r", "c", "f")
ACSL_BACKGROUND_SHARE = {"r": 0.01, "c": 0.1, "f": 1.0}


def _frequency_columns(frequency: Sequence[str]) -> dict[str, Tensor]:
    codes = list(frequency)
    for i, f in enumerate(codes):
        if f not in FREQUENCY_CODES:
            raise ConfigError(f"frequency[{i}] = {f!r} (class label {i + 1}); expected one of 'r', 'c', 'f' "
                              "(LVIS rare/common/frequent)")
    return {f: torch.tensor([i + 1 for i, c in enumerate(codes) if c == f], dtype=torch.int64)
            for f in FREQUENCY_CODES}


def _random_count(expected: float, generator: torch.Generator | None) -> int:
    """floor(expected) + Bernoulli(frac(expected)): an integer with the right expectation."""
    base = math.floor(expected)
    return base + int(torch.rand((), generator=generator) < expected - base)


def acsl_ignored(logits: Tensor, targets: Tensor, xi: float, frequency: Sequence[str] | dict | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
    r"""ACSL weights, Wang et al. CVPR 2021, **eq 6**, plus the background rule of §4.2 / the official code.

    Returns the complement of the weight mask: a bool [N, K] that is True where w_i = 0 (no gradient). Foreground
    row (targets[:, 0] == 0) with ground-truth classes K:

        w_i = 1 if i ∈ K;   1 if i ∉ K and p_i ≥ ξ;   0 if i ∉ K and p_i < ξ         (p_i = sigmoid(z_i))

    p_i ≥ ξ is evaluated as z_i ≥ log(ξ / (1 − ξ)) (the same set up to float rounding at the boundary; one
    comparison, no sigmoid). Background row (targets[:, 0] == 1): w = 1 in column 0; without ``frequency`` also 1
    on every class; with ``frequency`` ('r'/'c'/'f' per class, len C) 1 on every frequent class, and on all rare
    (common) classes for a random 1% (10%) of the background rows, drawn without replacement as in the official
    implementation (CASIA-IVA-Lab/ACSL, ``mmdet/models/losses/acsl.py``), which samples background *rows* per class
    group. It takes int(share · n_bg) rows; we round stochastically (floor + Bernoulli of the remainder), so the
    expected share is exactly 1% / 10% also for small RoI batches (int(0.01 · 96) = 0 would never suppress rare
    classes). Randomness: ``generator`` (a CPU ``torch.Generator``) if given, else torch's global RNG, so
    ``torch.manual_seed`` makes runs reproducible. Every ground-truth entry (targets ≠ 0) gets weight 1.
    """
    n, k = logits.shape
    with torch.no_grad():
        if xi <= 0:
            ignored = torch.zeros(n, k, dtype=torch.bool, device=logits.device)
        elif xi >= 1:
            ignored = torch.ones(n, k, dtype=torch.bool, device=logits.device)
        else:
            ignored = torch.lt(logits.detach(), math.log(xi / (1.0 - xi)))
        bg = torch.nonzero(targets[:, 0] > 0).squeeze(1)
        if bg.numel():
            if frequency is None:
                ignored[bg] = False
            else:
                columns = frequency if isinstance(frequency, dict) else _frequency_columns(frequency)
                base = torch.ones(k, dtype=torch.bool, device=ignored.device)
                base[0] = False
                base[columns["f"].to(ignored.device)] = False
                ignored[bg] = base
                for code in ("r", "c"):
                    cols = columns[code].to(ignored.device)
                    m = _random_count(ACSL_BACKGROUND_SHARE[code] * bg.numel(), generator)
                    if m and cols.numel():
                        chosen = bg[torch.randperm(bg.numel(), generator=generator)[:m].to(ignored.device)]
                        ignored[chosen.unsqueeze(1), cols.unsqueeze(0)] = False
        rows, cols = _label_pairs(targets.to(_compute_dtype(logits)))
        ignored.view(-1).index_fill_(0, rows * k + cols, False)
    return ignored


class _WeightedBCEFunction(torch.autograd.Function):
    """Σ w · BCE(z, y) / N for a 0/1 weight mask that covers every target; see :func:`acsl_loss`."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, ignored: Tensor) -> Tensor:
        dtype = _compute_dtype(logits)
        z = logits.to(dtype)
        y = targets.to(dtype)
        n = z.shape[0]
        # −[y log p + (1 − y) log(1 − p)] = softplus(z) − y z, elementwise (no cancellation across the sum)
        buf = F.softplus(z)
        buf.masked_fill_(ignored, 0.0)
        buf.addcmul_(y, z, value=-1.0)  # y = 0 wherever w = 0, so w (softplus − y z) = w softplus − y z
        loss = buf.sum() / n
        ctx.buffer = buf  # becomes the gradient in backward
        ctx.logits_dtype = logits.dtype
        ctx.save_for_backward(z, y, ignored)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        r"""ACSL **eq 7**: ∂L/∂z_i = p_i − 1 for a label i, w_i p_i otherwise, i.e. w_i (p_i − y_i); all / N."""
        z, y, ignored = ctx.saved_tensors
        buf = ctx.buffer if ctx.buffer is not None else torch.empty_like(z)
        ctx.buffer = None  # consumed: a second backward (retain_graph=True) writes a new buffer
        torch.sigmoid(z, out=buf)
        buf.sub_(y)
        buf.masked_fill_(ignored, 0.0)
        buf.mul_(grad.to(buf.dtype) / z.shape[0])
        return buf.to(ctx.logits_dtype), None, None


def acsl_loss(logits: Tensor, targets: Tensor, ignored: Tensor) -> Tensor:
    r"""ACSL, Wang et al. CVPR 2021, **eq 5**: L = −Σ_i w_i log p̂_i over all K sigmoid channels, summed over the
    rows and divided by N as the official code does (p̂_i = p_i for a label, 1 − p_i otherwise; p = sigmoid(z)).

    ``ignored`` is the complement of the eq-6 weights from :func:`acsl_ignored` (it must be False wherever
    targets ≠ 0). Gradient (eq 7) in ``_WeightedBCEFunction.backward``. With ξ = 0 and no frequency sampling every
    weight is 1 and this equals ``F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / N``.
    """
    return _WeightedBCEFunction.apply(logits, targets, ignored)


class ACSLLoss(nn.Module):
    """Adaptive Class Suppression Loss (Wang et al., CVPR 2021). ``scores`` = sigmoid.

    ``xi``: ξ in [0, 1] (paper's best 0.7). ``frequency``: 'r'/'c'/'f' per class (len C, contiguous label order) to
    sample background rows 1% / 10% / 100% per group; ``None`` = every background row suppresses every class.
    ``generator``: optional CPU ``torch.Generator`` for the background sampling (default: global RNG).
    """

    def __init__(self, xi: float, frequency: Sequence[str] | None = None,
                 generator: torch.Generator | None = None):
        super().__init__()
        if not isinstance(xi, (int, float)) or not 0.0 <= float(xi) <= 1.0:
            raise ConfigError(f"acsl xi = {xi!r} must be a number in [0, 1] (the paper uses 0.7)")
        self.xi = float(xi)
        self.frequency = None if frequency is None else list(frequency)
        self._columns = None if frequency is None else _frequency_columns(self.frequency)
        self.generator = generator

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        _check_inputs(logits, targets)
        if self.frequency is not None and logits.shape[1] != len(self.frequency) + 1:
            raise ValueError(f"logits have {logits.shape[1]} columns but frequency lists {len(self.frequency)} "
                             "classes; expected K = len(frequency) + 1")
        ignored = acsl_ignored(logits, targets, self.xi, self._columns, self.generator)
        return acsl_loss(logits, targets, ignored)

    def scores(self, logits: Tensor) -> Tensor:
        return torch.sigmoid(logits)


# ----------------------------------------------------------------------------------------------------------------
# Baselines: softmax CE (eq 1), sigmoid BCE, EQL
# ----------------------------------------------------------------------------------------------------------------

class SoftmaxCELoss(nn.Module):
    r"""Plain softmax cross-entropy, concurrent-softmax paper **eq 1**: L = −Σ_i y_i log softmax(z)_i, mean over N.

    With one label per row this is ``F.cross_entropy``; a multi-label row sums the log-probabilities of all its
    labels (which then suppress each other: eq 2, the problem eq 3 fixes).
    """

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        _check_inputs(logits, targets)
        return F.cross_entropy(logits, targets.to(logits.dtype))

    def scores(self, logits: Tensor) -> Tensor:
        return torch.softmax(logits, dim=1)


class BCELoss(nn.Module):
    """Sigmoid binary cross-entropy on all K channels, summed and divided by N (ACSL's normalisation, so ACSL with
    ξ = 0 and no background sampling equals this loss exactly)."""

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        _check_inputs(logits, targets)
        return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), reduction="sum") / logits.shape[0]

    def scores(self, logits: Tensor) -> Tensor:
        return torch.sigmoid(logits)


def eql_weights(targets: Tensor, tail: Tensor) -> Tensor:
    r"""Equalization Loss weights, Tan et al. CVPR 2020, §3.3 ("Equalization Loss Formulation"):

        w_j = 1 − E(r) T_λ(f_j) (1 − y_j)

    E(r) = 1 for a foreground RoI (targets[:, 0] == 0), 0 for background; T_λ(f_j) = 1 when class j's image
    frequency f_j < λ (``tail`` [K] bool, False in column 0). (The EQL PDF is not in shared/papers, so the equation
    number is not quoted; the formula is the one of the paper and of the official eql.detectron2 code.)
    """
    foreground = (targets[:, 0] == 0).to(targets.dtype).unsqueeze(1)
    return 1.0 - foreground * tail.to(targets.dtype).unsqueeze(0) * (1.0 - targets)


class EQLLoss(nn.Module):
    """Equalization Loss (Tan et al., "Equalization Loss for Long-Tailed Object Recognition", CVPR 2020), sigmoid
    form: L = −Σ_j w_j log p̂_j over the K channels, summed and divided by N as the official eql.detectron2 code.

    ``class_freq``: f_j for each class (len C, contiguous label order) = images containing class j / all training
    images (``dataset.image_counts() / len(dataset)``). ``lambda_``: tail threshold λ (paper: 1.76e-3 on LVIS v0.5).
    """

    def __init__(self, class_freq: Sequence[float], lambda_: float = 1.76e-3):
        super().__init__()
        freq = torch.as_tensor(list(class_freq), dtype=torch.float64)
        if freq.dim() != 1 or not bool(((freq >= 0) & (freq <= 1)).all()):
            raise ConfigError("eql class_freq must be a list of per-class image frequencies in [0, 1] (len C)")
        if not 0.0 <= float(lambda_) <= 1.0:
            raise ConfigError(f"eql lambda_ = {lambda_!r} must be in [0, 1] (the paper uses 1.76e-3)")
        tail = torch.cat([torch.zeros(1, dtype=torch.bool), freq < float(lambda_)])
        self.register_buffer("tail", tail, persistent=False)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        _check_inputs(logits, targets)
        if logits.shape[1] != self.tail.numel():
            raise ValueError(f"logits have {logits.shape[1]} columns but class_freq lists {self.tail.numel() - 1} "
                             "classes; expected K = len(class_freq) + 1")
        y = targets.to(logits.dtype)
        w = eql_weights(y, self.tail)
        return F.binary_cross_entropy_with_logits(logits, y, weight=w, reduction="sum") / logits.shape[0]

    def scores(self, logits: Tensor) -> Tensor:
        return torch.sigmoid(logits)


LOSSES = {
    "softmax": SoftmaxCELoss,
    "concurrent_softmax": ConcurrentSoftmaxLoss,
    "bce": BCELoss,
    "acsl": ACSLLoss,
    "eql": EQLLoss,
}
LOSS_ARGS = {
    "softmax": (),
    "concurrent_softmax": ("concurrent_rate",),
    "bce": (),
    "acsl": ("xi", "frequency", "generator"),
    "eql": ("class_freq", "lambda_"),
}


def build_loss(name: str, **kwargs) -> nn.Module:
    """Loss by name: softmax, concurrent_softmax (concurrent_rate), bce, acsl (xi, frequency, generator),
    eql (class_freq, lambda_). Unknown names or keyword arguments raise ConfigError."""
    if name not in LOSSES:
        raise ConfigError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
    unknown = sorted(set(kwargs) - set(LOSS_ARGS[name]))
    if unknown:
        allowed = ", ".join(LOSS_ARGS[name]) or "none"
        raise ConfigError(f"loss {name!r} does not take {', '.join(unknown)} (its arguments: {allowed})")
    return LOSSES[name](**kwargs)
