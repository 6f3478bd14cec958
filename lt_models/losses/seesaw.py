"""Seesaw Loss, "Seesaw Loss for Long-Tailed Instance Segmentation" (Wang et al., CVPR 2021): eq 4 (the loss,
:func:`seesaw_loss`), eq 5 (its gradient, ``_SeesawFunction.backward``), eq 6 (S = M · C,
:func:`seesaw_log_factors`), eq 7 (mitigation, :func:`log_mitigation`) and eq 8 (compensation,
:func:`log_compensation`). :func:`check_seesaw_p` / :func:`check_seesaw_q` own the valid ranges of the exponents
(paper §4.1 and the official mmdetection ``SeesawLoss``: p = 0.8, q = 2.0).

A one-label loss (``one_label = True``): ``forward(logits [N, K], labels int64 [N])`` with K = C + 1 columns,
**column 0 = background**, label 0 = a background RoI; ``scores(logits)`` = softmax over the K columns.

Layout difference from the paper. The paper (§3.3, "Objectness Branch") and mmdetection score background with a
separate two-way objectness branch and apply Seesaw Loss to the C foreground classes of foreground RoIs only
(detection score = σ_class · σ_obj), because against the ubiquitous background class every foreground class looks
rare and would be mitigated. This head has a single K-way softmax instead, so the seesaw factors act among the C
foreground classes only:

* a background row (label 0) uses S_0j = 1, i.e. plain softmax cross-entropy;
* a foreground row of class i uses S_i0 = 1 for the background column (no mitigation, no compensation against
  background) and eq 6-8 for every foreground column j.

Running counts N (eq 7): the persistent buffer ``cum_samples`` (float64, length K, indexed by label) accumulates the
labels of every training batch before that batch's loss is computed, as the official code does. Background RoIs are
counted into slot 0, which no factor reads (mmdetection likewise counts them into a slot it never reads). Counts
are clamped at 1 before use (as the official code does), so a class never seen yet acts like a class seen once:
a label class i with N_i > 1 mitigates it by (1 / N_i)^p, and an unseen *label* class (possible only in eval mode)
is not mitigated towards anything.

Other deviation: eq 8 is used as written, C_ij = (σ_j / σ_i)^q; the official code divides by max(σ_i, 1e-2)
("eps"), which caps the compensation when σ_i < 0.01. σ is normalised over K columns here and over C in the official
code; the ratio σ_j / σ_i = e^{z_j − z_i} does not depend on that.

Inputs are validated here (one-label interface); half / bfloat16 logits are computed in float32
(``compute_dtype``) and the gradient is cast back.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor, nn

from lt_models.errors import ConfigError
from lt_models.losses.kernels import compute_dtype, map_row_blocks

DEFAULT_P = 0.8  # paper §4.1 ("hyper-parameter p = 0.8, q = 2") and mmdetection SeesawLoss(p=0.8, q=2.0)
DEFAULT_Q = 2.0


def _check_exponent(value, name: str, role: str, default: float) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not ok or not math.isfinite(float(value)) or float(value) < 0.0:
        raise ConfigError(
            f"Seesaw {role} exponent {name} must be a finite number >= 0, got {value!r} "
            f"(the paper's default is {default})"
        )
    return float(value)


def check_seesaw_p(value) -> float:
    """The exponent p of the mitigation factor, eq 7 of "Seesaw Loss for Long-Tailed Instance Segmentation"
    (Wang et al., CVPR 2021), as a float; ConfigError unless it is a finite number >= 0 (paper default 0.8).
    p = 0 turns mitigation off (M = 1)."""
    return _check_exponent(value, "p", "mitigation", DEFAULT_P)


def check_seesaw_q(value) -> float:
    """The exponent q of the compensation factor, eq 8 of "Seesaw Loss for Long-Tailed Instance Segmentation"
    (Wang et al., CVPR 2021), as a float; ConfigError unless it is a finite number >= 0 (paper default 2.0).
    q = 0 turns compensation off (C = 1)."""
    return _check_exponent(value, "q", "compensation", DEFAULT_Q)


# ----------------------------------------------------------------------------------------------------------------
# The factors: eq 7, eq 8, eq 6 (log space, for the foreground rows only)
# ----------------------------------------------------------------------------------------------------------------


def log_mitigation(log_counts: Tensor, labels: Tensor, p: float) -> Tensor:
    r"""log of the mitigation factor, **eq 7** of "Seesaw Loss for Long-Tailed Instance Segmentation"
    (Wang et al., CVPR 2021), for rows of foreground classes ``labels`` [F] (each >= 1):

        M_ij = (N_j / N_i)^p  if N_i > N_j,  else 1     ⇔   log M_ij = p · min(0, log N_j − log N_i)

    ``log_counts`` [K] = log max(N, 1) (slot 0 is not read). Returns [F, K] with column 0 (background) = 0, i.e.
    M_i0 = 1 (the layout rule of the module docstring). Constant w.r.t. the logits.
    """
    row = log_counts.index_select(0, labels).unsqueeze(1)
    out = torch.sub(log_counts.unsqueeze(0), row).clamp_max_(0.0).mul_(p)
    out[:, 0] = 0.0
    return out


def log_compensation(z: Tensor, labels: Tensor, q: float) -> Tensor:
    r"""log of the compensation factor, **eq 8** of "Seesaw Loss for Long-Tailed Instance Segmentation"
    (Wang et al., CVPR 2021), for foreground rows ``z`` [F, K] with labels [F] (each >= 1):

        C_ij = (σ_j / σ_i)^q  if σ_j > σ_i,  else 1     ⇔   log C_ij = q · max(0, z_j − z_i)

    since log σ_j − log σ_i = z_j − z_i for σ = softmax(z) (so no softmax is formed). Column 0 (background) = 0,
    i.e. C_i0 = 1. Computed without gradient (the paper's σ is the detached prediction).
    """
    with torch.no_grad():
        z = z.detach()
        out = torch.sub(z, z.gather(1, labels.unsqueeze(1))).clamp_min_(0.0).mul_(q)
        out[:, 0] = 0.0
    return out


def seesaw_log_factors(z: Tensor, labels: Tensor, log_counts: Tensor, p: float, q: float) -> Tensor:
    r"""log S_ij = log M_ij + log C_ij, **eq 6** (S_ij = M_ij · C_ij) of "Seesaw Loss for Long-Tailed Instance
    Segmentation" (Wang et al., CVPR 2021), for foreground rows ``z`` [F, K] with labels [F] (each >= 1).

    M from :func:`log_mitigation` (eq 7), C from :func:`log_compensation` (eq 8); log S_ii = 0 and log S_i0 = 0.
    Detached: S is a constant in backprop.
    """
    out = log_compensation(z, labels, q)
    if p != 0.0:
        out.add_(log_mitigation(log_counts.to(out.dtype), labels, p))
    return out


# ----------------------------------------------------------------------------------------------------------------
# The loss: eq 4 (forward) and eq 5 (backward)
# ----------------------------------------------------------------------------------------------------------------


def _seesaw_log_probs(z: Tensor, labels: Tensor, log_counts: Tensor, p: float, q: float) -> Tensor:
    """log_softmax(z + log S) row by row [N, K]: plain log_softmax on background rows (S = 1), eq 6 factors on the
    foreground rows (about a quarter of a RoI batch), overwritten in the one N×K buffer.

    On CPU the foreground rows go in blocks of ~64 rows (about 300 KB, cache-resident) to the single-threaded
    row workers of ``lt_models.losses.concurrent_softmax`` (dynamic balancing: a dozen small ops per block instead of a
    dozen passes over a [F, K] matrix, each of which stalls when another process holds a core). Rows are
    independent, so the result does not depend on the blocking.
    """
    buf = torch.log_softmax(z, dim=1)
    if p == 0.0 and q == 0.0:
        return buf  # S = 1 everywhere: softmax cross-entropy
    fg = torch.nonzero(labels > 0).squeeze(1)
    fg_labels = labels.index_select(0, fg)

    def rows(start: int, stop: int) -> None:
        index, lab = fg[start:stop], fg_labels[start:stop]
        zf = z.index_select(0, index)
        w = seesaw_log_factors(zf, lab, log_counts, p, q).add_(zf)
        buf.index_copy_(0, index, torch.log_softmax(w, dim=1))

    if z.device.type == "cpu":
        map_row_blocks(rows, fg.numel(), max(16, (1 << 16) // z.shape[1]))
    elif fg.numel():
        rows(0, fg.numel())
    return buf


class _SeesawFunction(torch.autograd.Function):
    """Eq 4 forward, eq 5 backward; see :func:`seesaw_loss`."""

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, log_counts: Tensor, p: float, q: float) -> Tensor:
        z = logits.detach().to(compute_dtype(logits))
        n, k = z.shape
        buf = _seesaw_log_probs(z, labels, log_counts, p, q)
        flat = torch.arange(n, device=z.device) * k + labels
        loss = -buf.view(-1).index_select(0, flat).sum() / n
        ctx.buffer = buf  # log σ̃, becomes the gradient in backward (no second N×K allocation)
        ctx.logits_dtype = logits.dtype
        ctx.params = (p, q)
        ctx.save_for_backward(z, labels, log_counts, flat)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        r"""Gradient of eq 4, **eq 5** of "Seesaw Loss for Long-Tailed Instance Segmentation" (Wang et al.,
        CVPR 2021), with S held constant. For a row of class i, D = Σ_{j≠i} S_ij e^{z_j} + e^{z_i} and
        L = log D − z_i, so

            ∂L/∂z_j = S_ij e^{z_j} / D = S_ij (e^{z_j} / e^{z_i}) σ̂_i     (j ≠ i; the paper's eq 5)
            ∂L/∂z_i = e^{z_i} / D − 1 = σ̂_i − 1

        i.e. ∂L/∂z = σ̃ − y with σ̃ = softmax(z + log S) (S_ii = 1), the exp of the forward buffer; all / N.
        """
        z, labels, log_counts, flat = ctx.saved_tensors
        buf = ctx.buffer
        ctx.buffer = None  # consumed: a second backward (retain_graph=True) recomputes it
        if buf is None:
            buf = _seesaw_log_probs(z, labels, log_counts, *ctx.params)
        buf.exp_()
        buf.view(-1).index_add_(0, flat, torch.full_like(flat, -1, dtype=buf.dtype))
        buf.mul_(grad.to(buf.dtype) / z.shape[0])
        return buf.to(ctx.logits_dtype), None, None, None, None


def seesaw_loss(logits: Tensor, labels: Tensor, log_counts: Tensor, p: float, q: float) -> Tensor:
    r"""Seesaw Loss, **eq 4** of "Seesaw Loss for Long-Tailed Instance Segmentation" (Wang et al., CVPR 2021),
    averaged over the N rows (like ``F.cross_entropy``):

        L = −Σ_i y_i log σ̂_i,    σ̂_i = e^{z_i} / (Σ_{j≠i} S_ij e^{z_j} + e^{z_i})

    with y the one-hot of ``labels`` [N] and S from :func:`seesaw_log_factors` (eq 6; S = 1 on background rows).
    Since log S_ii = 0, −log σ̂_i = −log_softmax(z + log S)_i: a log-sum-exp over the shifted logits, stable for
    any logits. ``log_counts`` [K] = log max(N, 1) of the running class counts. Backward:
    ``_SeesawFunction.backward`` (eq 5). With p = q = 0 no factor is formed and this is ``F.cross_entropy(logits,
    labels)`` (the same formula; equal up to the order of float rounding).
    """
    return _SeesawFunction.apply(logits, labels, log_counts, p, q)


class SeesawLoss(nn.Module):
    """Seesaw Loss, "Seesaw Loss for Long-Tailed Instance Segmentation" (Wang et al., CVPR 2021): eq 4
    (:func:`seesaw_loss`) with the eq 6-8 factors among the foreground classes; ``scores`` = softmax over K.

    ``num_classes``: C, the foreground classes (logits have K = C + 1 columns, column 0 = background).
    ``p``, ``q``: the exponents of eq 7 / eq 8 (finite, >= 0; paper 0.8 / 2.0), see :func:`check_seesaw_p`,
    :func:`check_seesaw_q`. Persistent buffer ``cum_samples`` [K] float64: the RoI labels counted so far (updated
    in ``forward`` in training mode with grad enabled, before the loss of that batch; slot 0 = background, unread).
    """

    one_label = True
    num_classes: int
    p: float
    q: float
    cum_samples: Tensor

    def __init__(self, num_classes: int, p: float = DEFAULT_P, q: float = DEFAULT_Q):
        super().__init__()
        if not isinstance(num_classes, numbers.Integral) or isinstance(num_classes, bool) or num_classes < 1:
            raise ConfigError(
                f"Seesaw num_classes must be an integer >= 1 (C foreground classes; the logits have "
                f"C + 1 columns), got {num_classes!r}"
            )
        self.num_classes = int(num_classes)
        self.p = check_seesaw_p(p)
        self.q = check_seesaw_q(q)
        self.register_buffer("cum_samples", torch.zeros(self.num_classes + 1, dtype=torch.float64))

    def _check(self, logits: Tensor, labels: Tensor) -> None:
        k = self.num_classes + 1
        if logits.dim() != 2 or logits.shape[1] != k or not logits.is_floating_point():
            raise ValueError(
                f"logits must be floating [N, {k}] (num_classes + 1 columns, column 0 = background), "
                f"got {logits.dtype} {tuple(logits.shape)}"
            )
        if labels.dtype != torch.int64 or labels.shape != logits.shape[:1]:
            raise ValueError(
                f"labels must be int64 [{logits.shape[0]}] (one primary label per row), got "
                f"{labels.dtype} {tuple(labels.shape)}"
            )
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= k):
            raise ValueError(
                f"labels must be in 0..{k - 1} (0 = background), got {int(labels.min())}..{int(labels.max())}"
            )

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        self._check(logits, labels)
        if self.training and torch.is_grad_enabled():
            with torch.no_grad():
                counts = torch.bincount(labels, minlength=self.num_classes + 1)
                self.cum_samples.add_(counts.to(self.cum_samples))
        log_counts = self.cum_samples.clamp_min(1.0).log().to(logits.device, compute_dtype(logits))
        return seesaw_loss(logits, labels, log_counts, self.p, self.q)

    def scores(self, logits: Tensor) -> Tensor:
        return torch.softmax(logits, dim=1)
