"""Adaptive Class Suppression Loss, "Adaptive Class Suppression Loss for Long-Tail Object Detection" (Wang et al.,
CVPR 2021): eq 6 (the weights, :func:`acsl_ignored`, with the background sampling of §4.2), eq 5 (the loss,
:func:`acsl_loss`) and eq 7 (its gradient, ``_WeightedBCEFunction.backward``). :func:`check_xi` owns the valid range
of the threshold ξ.

Inputs follow ``lt_models.losses.registry``: ``logits [N, K]`` and multi-hot ``targets [N, K]`` with column 0 =
background.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lt_models.errors import ConfigError
from lt_models.losses.kernels import check_inputs, compute_dtype, label_pairs

FREQUENCY_CODES = ("r", "c", "f")
ACSL_BACKGROUND_SHARE = {"r": 0.01, "c": 0.1, "f": 1.0}


def check_xi(xi: float) -> float:
    """The threshold ξ of eq 6 of "Adaptive Class Suppression Loss for Long-Tail Object Detection"
    (Wang et al., CVPR 2021) as a float; ConfigError unless it is a number in the open interval (0, 1).

    The one definition of ξ's valid range (the paper's best value is 0.7). Inside it the logit threshold
    log(ξ / (1 − ξ)) of :func:`acsl_ignored` is finite.
    """
    if not isinstance(xi, (int, float)) or not 0.0 < float(xi) < 1.0:
        raise ConfigError(f"ACSL threshold ξ (xi) must be in the open interval (0, 1), got {xi!r}")
    return float(xi)


def _frequency_columns(frequency: Sequence[str]) -> dict[str, Tensor]:
    """Class columns (label + 1) of each LVIS frequency group 'r' / 'c' / 'f'; ConfigError on an unknown code."""
    codes = list(frequency)
    for i, f in enumerate(codes):
        if f not in FREQUENCY_CODES:
            raise ConfigError(
                f"frequency[{i}] = {f!r} (class label {i + 1}); expected one of 'r', 'c', 'f' "
                "(LVIS rare/common/frequent)"
            )
    return {f: torch.tensor([i + 1 for i, c in enumerate(codes) if c == f], dtype=torch.int64) for f in FREQUENCY_CODES}


def _random_count(expected: float, generator: torch.Generator | None) -> int:
    """floor(expected) + Bernoulli(frac(expected)): an integer with the right expectation."""
    base = math.floor(expected)
    return base + int(torch.rand((), generator=generator) < expected - base)


def acsl_ignored(
    logits: Tensor,
    targets: Tensor,
    xi: float,
    frequency: Sequence[str] | dict | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""ACSL weights, **eq 6** of "Adaptive Class Suppression Loss for Long-Tail Object Detection"
    (Wang et al., CVPR 2021), plus the background rule of §4.2 / the official code.

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
    ``xi`` must pass :func:`check_xi` (ConfigError otherwise).
    """
    xi = check_xi(xi)
    k = logits.shape[1]
    with torch.no_grad():
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
        rows, cols = label_pairs(targets.to(compute_dtype(logits)))
        ignored.view(-1).index_fill_(0, rows * k + cols, False)
    return ignored


class _WeightedBCEFunction(torch.autograd.Function):
    """Σ w · BCE(z, y) / N for a 0/1 weight mask that covers every target; see :func:`acsl_loss`."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, ignored: Tensor) -> Tensor:
        dtype = compute_dtype(logits)
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
        r"""**Eq 7** of "Adaptive Class Suppression Loss for Long-Tail Object Detection" (Wang et al., CVPR 2021):
        ∂L/∂z_i = p_i − 1 for a label i, w_i p_i otherwise, i.e. w_i (p_i − y_i); all / N."""
        z, y, ignored = ctx.saved_tensors
        buf = ctx.buffer if ctx.buffer is not None else torch.empty_like(z)
        ctx.buffer = None  # consumed: a second backward (retain_graph=True) writes a new buffer
        torch.sigmoid(z, out=buf)
        buf.sub_(y)
        buf.masked_fill_(ignored, 0.0)
        buf.mul_(grad.to(buf.dtype) / z.shape[0])
        return buf.to(ctx.logits_dtype), None, None


def acsl_loss(logits: Tensor, targets: Tensor, ignored: Tensor) -> Tensor:
    r"""ACSL, **eq 5** of "Adaptive Class Suppression Loss for Long-Tail Object Detection" (Wang et al.,
    CVPR 2021): L = −Σ_i w_i log p̂_i over all K sigmoid channels, summed over the rows and divided by N as the
    official code does (p̂_i = p_i for a label, 1 − p_i otherwise; p = sigmoid(z)).

    ``ignored`` is the complement of the eq-6 weights from :func:`acsl_ignored` (it must be False wherever
    targets ≠ 0). Gradient (eq 7) in ``_WeightedBCEFunction.backward``. With every weight 1 (``ignored`` all False)
    this equals ``F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / N``.
    """
    return _WeightedBCEFunction.apply(logits, targets, ignored)


class ACSLLoss(nn.Module):
    """Adaptive Class Suppression Loss, "Adaptive Class Suppression Loss for Long-Tail Object Detection" (Wang et al.,
    CVPR 2021): eq 6 weights (:func:`acsl_ignored`) and eq 5 loss (:func:`acsl_loss`). ``scores`` = sigmoid.

    ``xi``: ξ in the open interval (0, 1), see :func:`check_xi` (paper's best 0.7). ``frequency``: 'r'/'c'/'f' per
    class (len C, contiguous label order) to sample background rows 1% / 10% / 100% per group; ``None`` = every
    background row suppresses every class.
    ``generator``: optional CPU ``torch.Generator`` for the background sampling (default: global RNG).
    """

    def __init__(self, xi: float, frequency: Sequence[str] | None = None, generator: torch.Generator | None = None):
        super().__init__()
        self.xi = check_xi(xi)
        self.frequency = None if frequency is None else list(frequency)
        self._columns = None if self.frequency is None else _frequency_columns(self.frequency)
        self.generator = generator

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        check_inputs(logits, targets)
        if self.frequency is not None and logits.shape[1] != len(self.frequency) + 1:
            raise ValueError(
                f"logits have {logits.shape[1]} columns but frequency lists {len(self.frequency)} "
                "classes; expected K = len(frequency) + 1"
            )
        ignored = acsl_ignored(logits, targets, self.xi, self._columns, self.generator)
        return acsl_loss(logits, targets, ignored)

    def scores(self, logits: Tensor) -> Tensor:
        return torch.sigmoid(logits)
