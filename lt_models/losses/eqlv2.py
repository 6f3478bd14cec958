"""Equalization Loss v2, "Equalization Loss v2: A New Gradient Balance Approach for Long-tailed Object Detection"
(Tan et al., CVPR 2021): the gradient guided reweighing of sigmoid BCE. Each class j keeps the accumulated magnitude
of its positive and negative gradients; their ratio g_j sets a weight r_j on the negative entries of class j and
q_j on its positive entries (:func:`eqlv2_mapping`, :func:`eqlv2_weights`), the weighted BCE is the loss
(:func:`eqlv2_loss`), and every training forward adds the weighted gradient magnitudes of its batch to the
statistics (:func:`eqlv2_gradient_statistics`). :func:`check_eqlv2_gamma`, :func:`check_eqlv2_mu` and
:func:`check_eqlv2_alpha` own the valid ranges of γ, μ and α.

Equation numbers: the paper text was not available to us, so the formulas are cited by the part of the method section
they belong to (the gradient guided reweighing mechanism); their equation numbers are unconfirmed. The formulas and
defaults were checked against the official code (tztztztztz/eqlv2, ``mmdet/models/losses/eqlv2.py``).

Inputs follow ``lt_models.losses.registry``: ``logits [N, K]`` and multi-hot ``targets [N, K]`` with column 0 =
background (the reference keeps background last). The background column always has weight 1 and collects no statistics.
"""

from __future__ import annotations

import math
from numbers import Real

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lt_models.errors import ConfigError
from lt_models.losses.kernels import check_inputs, compute_dtype, label_pairs

EQLV2_DEFAULTS = {"gamma": 12.0, "mu": 0.8, "alpha": 4.0}
RATIO_EPS = 1e-10  # added to the accumulated negative gradient in g_j = pos_j / (neg_j + eps), as in the reference


# ----------------------------------------------------------------------------------------------------------------
# Range checks
# ----------------------------------------------------------------------------------------------------------------


def _number(value) -> float | None:
    """``value`` as a finite float, or None if it is not a finite real number (bools are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        return None
    return float(value)


def check_eqlv2_gamma(gamma: float) -> float:
    """γ, the steepness of the EQLv2 mapping function f (:func:`eqlv2_mapping`), as a float; ConfigError unless it
    is a finite number > 0 (paper's default 12). γ = 0 would make every weight constant (r = 1/2)."""
    value = _number(gamma)
    if value is None or value <= 0.0:
        raise ConfigError(f"EQLv2 gamma (γ) must be a finite number > 0 (paper's default 12), got {gamma!r}")
    return value


def check_eqlv2_mu(mu: float) -> float:
    """μ, the centre of the EQLv2 mapping function f (:func:`eqlv2_mapping`), as a float; ConfigError unless it is a
    finite number in [0, 1] (paper's default 0.8).

    μ is the gradient ratio g at which the negative weight is r = f(μ) = 1/2. The ratio g_j = pos_j / neg_j is ≥ 0
    and the mechanism's goal is a balanced class, g_j → 1; a μ above 1 would keep down-weighting the negatives (and
    up-weighting the positives) of classes that are already balanced, so the range stops at 1. (The paper's
    ablation values of μ could not be confirmed here; the default 0.8 is the paper's and the official code's.)
    """
    value = _number(mu)
    if value is None or not 0.0 <= value <= 1.0:
        raise ConfigError(f"EQLv2 mu (μ) must be a finite number in [0, 1] (paper's default 0.8), got {mu!r}")
    return value


def check_eqlv2_alpha(alpha: float) -> float:
    """α, the factor of the EQLv2 positive weight q = 1 + α (1 − r) (:func:`eqlv2_weights`), as a float;
    ConfigError unless it is a finite number ≥ 0 (paper's default 4). α = 0 leaves positives unweighted."""
    value = _number(alpha)
    if value is None or value < 0.0:
        raise ConfigError(f"EQLv2 alpha (α) must be a finite number >= 0 (paper's default 4), got {alpha!r}")
    return value


# ----------------------------------------------------------------------------------------------------------------
# The equations
# ----------------------------------------------------------------------------------------------------------------


def eqlv2_mapping(x: Tensor, gamma: float, mu: float) -> Tensor:
    r"""The mapping function of "Equalization Loss v2: A New Gradient Balance Approach for Long-tailed Object
    Detection" (Tan et al., CVPR 2021), gradient guided reweighing (method section; equation number unconfirmed):

        f(x) = 1 / (1 + exp(−γ (x − μ)))

    evaluated as ``sigmoid(γ (x − μ))`` (no overflow for large γ |x − μ|)."""
    return torch.sigmoid(gamma * (x - mu))


def eqlv2_weights(
    pos_grad: Tensor, neg_grad: Tensor, gamma: float, mu: float, alpha: float, eps: float = RATIO_EPS
) -> tuple[Tensor, Tensor]:
    r"""Per-class weights of "Equalization Loss v2: A New Gradient Balance Approach for Long-tailed Object
    Detection" (Tan et al., CVPR 2021), gradient guided reweighing (method section; equation number unconfirmed):

        g_j = pos_j / (neg_j + ε),    r_j = f(g_j),    q_j = 1 + α (1 − r_j)

    r_j weighs the negative entries of class j, q_j its positive entries; f is :func:`eqlv2_mapping`; pos / neg
    are the accumulated gradient magnitudes of :func:`eqlv2_gradient_statistics`; ε = 1e-10 as in the official
    code. Returns ``(r, q)`` with the dtype of the statistics (float64 in :class:`EQLv2Loss`).
    """
    neg_w = eqlv2_mapping(pos_grad / (neg_grad + eps), gamma, mu)
    return neg_w, 1.0 + alpha * (1.0 - neg_w)


def eqlv2_gradient_statistics(
    pos_sum_p: Tensor, neg_sum_p: Tensor, neg_w: Tensor, pos_w: Tensor
) -> tuple[Tensor, Tensor]:
    r"""One batch's increment of the gradient statistics of "Equalization Loss v2: A New Gradient Balance Approach
    for Long-tailed Object Detection" (Tan et al., CVPR 2021), the accumulated positive / negative gradients of the
    gradient guided reweighing (method section; equation number unconfirmed):

        Δpos_j = Σ_{i: y_ij = 1} |∂L_i/∂z_ij| = q_j Σ_{i: y_ij = 1} (1 − p_ij)
        Δneg_j = Σ_{i: y_ij = 0} |∂L_i/∂z_ij| = r_j Σ_{i: y_ij = 0} p_ij

    i.e. the gradient magnitudes of the *weighted* per-RoI loss L_i (the official code: |p − y| times the weight,
    summed over the RoIs of the batch, without the 1/N of the reduction). Takes the column sums
    Σ_{y=1} (1 − p) and Σ_{y=0} p and the weights (r, q) of this step; returns (Δpos, Δneg).
    """
    return pos_w * pos_sum_p, neg_w * neg_sum_p


class _EQLv2Function(torch.autograd.Function):
    """Σ w · BCE(z, y) / N with row-vector weights and the column sums for the statistics; see :func:`eqlv2_loss`.

    Returns ``(loss, Σ_{y=1} (1 − p) [K], Σ_{y=0} p [K])`` (the last two float64 and only filled when ``collect``).
    One N×K buffer: softplus(z) for the loss, then p = sigmoid(z), which becomes the gradient in backward.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, neg_w: Tensor, pos_w: Tensor, collect: bool):
        dtype = compute_dtype(logits)
        z = logits.to(dtype)
        n, k = z.shape
        r = neg_w.to(z.device, dtype)
        q = pos_w.to(z.device, dtype)
        rows, cols = label_pairs(targets.to(dtype))
        flat = rows * k + cols
        z_lab = z.reshape(-1).index_select(0, flat)
        r_lab, q_lab = r.index_select(0, cols), q.index_select(0, cols)
        # Σ_ij w_ij BCE_ij = Σ_ij r_j softplus(z_ij) + Σ_labels [q_j softplus(−z_ij) − r_j softplus(z_ij)]
        buf = F.softplus(z)
        sp_lab = buf.reshape(-1).index_select(0, flat)
        total = torch.mv(buf, r).sum() + (q_lab * F.softplus(-z_lab) - r_lab * sp_lab).sum()
        pos_sum = torch.zeros(k, dtype=torch.float64, device=z.device)
        neg_sum = torch.zeros(k, dtype=torch.float64, device=z.device)
        if ctx.needs_input_grad[0] or collect:
            torch.sigmoid(z, out=buf)
            if collect:  # Σ_{y=1} (1 − p) from σ(−z) (no cancellation); Σ_{y=0} p with the label entries zeroed
                pos_sum.index_add_(0, cols, torch.sigmoid(-z_lab).to(torch.float64))
                buf.view(-1).index_fill_(0, flat, 0.0)  # backward overwrites the label entries anyway
                neg_sum.add_(buf.sum(0))
            ctx.buffer = buf  # p; becomes the gradient in backward
        else:
            ctx.buffer = None
        ctx.logits_dtype = logits.dtype
        ctx.save_for_backward(z, r, flat, q_lab, z_lab)
        ctx.mark_non_differentiable(pos_sum, neg_sum)
        return total / n, pos_sum, neg_sum

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor, _pos: Tensor, _neg: Tensor):
        r"""Gradient of the EQLv2 loss (:func:`eqlv2_loss`): the weights do not depend on z, so

            ∂L/∂z_ij = w_ij (p_ij − y_ij) / N:  r_j p_ij / N  (y_ij = 0),  −q_j σ(−z_ij) / N  (y_ij = 1)

        computed as p times the row vector r·grad/N over the whole buffer, the label entries then overwritten."""
        z, r, flat, q_lab, z_lab = ctx.saved_tensors
        buf = ctx.buffer if ctx.buffer is not None else torch.sigmoid(z)
        ctx.buffer = None  # consumed: a second backward (retain_graph=True) recomputes p from z
        scale = grad.to(buf.dtype) / z.shape[0]
        buf.mul_(r * scale)
        buf.view(-1).index_copy_(0, flat, -q_lab * torch.sigmoid(-z_lab) * scale)
        return buf.to(ctx.logits_dtype), None, None, None, None


def eqlv2_loss(logits: Tensor, targets: Tensor, neg_w: Tensor, pos_w: Tensor) -> Tensor:
    r"""The EQLv2 loss of "Equalization Loss v2: A New Gradient Balance Approach for Long-tailed Object Detection"
    (Tan et al., CVPR 2021): sigmoid BCE on every column with the positive gradients of class j scaled by q_j and
    its negative gradients by r_j (gradient guided reweighing, method section; equation number unconfirmed). As a
    loss (the official code's form):

        L = (1/N) Σ_i Σ_j w_ij BCE(z_ij, y_ij),   w_ij = q_j y_ij + r_j (1 − y_ij)

    with ``neg_w`` = r [K] and ``pos_w`` = q [K] (:func:`eqlv2_weights`; 1 in the background column). With r = q = 1
    this is ``F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / N``. Targets must be 0/1.
    Gradient: ``_EQLv2Function.backward``.
    """
    return _EQLv2Function.apply(logits, targets, neg_w, pos_w, False)[0]


# ----------------------------------------------------------------------------------------------------------------
# The module
# ----------------------------------------------------------------------------------------------------------------


class EQLv2Loss(nn.Module):
    """Equalization Loss v2, "Equalization Loss v2: A New Gradient Balance Approach for Long-tailed Object Detection"
    (Tan et al., CVPR 2021): :func:`eqlv2_loss` with the weights of :func:`eqlv2_weights`. ``scores`` = sigmoid.

    ``num_classes`` = C (logits have K = C + 1 columns, column 0 = background). ``gamma`` / ``mu`` / ``alpha``: γ, μ
    (the mapping function f) and α (q = 1 + α (1 − r)); paper's defaults 12 / 0.8 / 4, ranges in
    :func:`check_eqlv2_gamma`, :func:`check_eqlv2_mu`, :func:`check_eqlv2_alpha`.

    State (persistent float64 / int64 buffers, saved with the checkpoint): ``pos_grad`` [C] and ``neg_grad`` [C], the
    accumulated positive / negative gradient magnitudes of classes 1..C, and ``steps``, the number of batches they
    hold. Before the first update (``steps == 0``) every weight is 1, i.e. the loss is plain BCE. A forward updates
    the state after computing the loss, with this batch's weights, only in training mode with grad enabled.
    """

    pos_grad: Tensor
    neg_grad: Tensor
    steps: Tensor

    def __init__(
        self,
        num_classes: int,
        gamma: float = EQLV2_DEFAULTS["gamma"],
        mu: float = EQLV2_DEFAULTS["mu"],
        alpha: float = EQLV2_DEFAULTS["alpha"],
    ):
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ConfigError(
                f"EQLv2 num_classes must be an integer >= 1 (the number of classes C, without "
                f"background), got {num_classes!r}"
            )
        self.num_classes = num_classes
        self.gamma = check_eqlv2_gamma(gamma)
        self.mu = check_eqlv2_mu(mu)
        self.alpha = check_eqlv2_alpha(alpha)
        self.register_buffer("pos_grad", torch.zeros(num_classes, dtype=torch.float64))
        self.register_buffer("neg_grad", torch.zeros(num_classes, dtype=torch.float64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, gamma={self.gamma}, mu={self.mu}, alpha={self.alpha}"

    def class_weights(self) -> tuple[Tensor, Tensor]:
        """(r, q), each float64 [K]: the negative and positive weight of every column for the next forward;
        column 0 (background) is 1 in both, and all are 1 before the first statistics update."""
        neg_w = torch.ones(self.num_classes + 1, dtype=torch.float64, device=self.pos_grad.device)
        pos_w = neg_w.clone()
        if int(self.steps) > 0:
            neg_w[1:], pos_w[1:] = eqlv2_weights(self.pos_grad, self.neg_grad, self.gamma, self.mu, self.alpha)
        return neg_w, pos_w

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        check_inputs(logits, targets)
        if logits.shape[1] != self.num_classes + 1:
            raise ValueError(
                f"logits have {logits.shape[1]} columns but EQLv2Loss was built for num_classes = "
                f"{self.num_classes}; expected K = num_classes + 1 = {self.num_classes + 1}"
            )
        neg_w, pos_w = self.class_weights()
        collect = self.training and torch.is_grad_enabled()
        loss, pos_sum, neg_sum = _EQLv2Function.apply(logits, targets, neg_w, pos_w, collect)
        if collect:
            with torch.no_grad():
                d_pos, d_neg = eqlv2_gradient_statistics(
                    pos_sum, neg_sum, neg_w.to(pos_sum.device), pos_w.to(pos_sum.device)
                )
                self.pos_grad += d_pos[1:].to(self.pos_grad.device)
                self.neg_grad += d_neg[1:].to(self.neg_grad.device)
                self.steps += 1
        return loss

    def scores(self, logits: Tensor) -> Tensor:
        return torch.sigmoid(logits)
