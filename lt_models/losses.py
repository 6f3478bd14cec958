"""Classification losses for the RoI box head: the simple baselines, the registry (:data:`LOSSES`, :func:`build_loss`)
and the public names of the paper losses, re-exported from their modules.

Every loss takes ``logits [N, K]`` and multi-hot ``targets [N, K]`` (float 0/1) with K = C + 1 columns, **column 0 is
background** (a background RoI has a 1 in column 0 only; a foreground RoI has a 1 at each of its classes). Every loss
has ``forward(logits, targets) -> scalar`` and ``scores(logits) -> [N, K]`` (the probabilities used at inference).

==================  ==============================================================  ==============================
name                loss                                                            ``scores``
==================  ==============================================================  ==============================
softmax             concurrent-softmax paper eq 1, ``-Σ_i y_i log softmax_i``,       softmax
                    mean over N (= ``F.cross_entropy`` with one label per row)
concurrent_softmax  concurrent-softmax paper eq 3, mean over N                      eq 5
                    (``lt_models.concurrent_softmax``)
bce                 sigmoid BCE summed over the K columns, divided by N             sigmoid
acsl                ACSL eq 5-6 (+ §4.2 background sampling), summed / N            sigmoid
                    (``lt_models.acsl``)
eql                 Equalization Loss, summed / N                                   sigmoid
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

import dataclasses
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lt_models.acsl import ACSL_BACKGROUND_SHARE, FREQUENCY_CODES, ACSLLoss, acsl_ignored, acsl_loss, check_xi
from lt_models.concurrent_softmax import (ILL_CONDITIONED, ConcurrentSoftmaxLoss, check_inputs,
                                          concurrent_softmax_loss, concurrent_softmax_scores, rate_to_csr)
from lt_models.errors import ConfigError, check_spec_options

__all__ = [
    "LOSSES", "LOSS_ARGS", "build_loss", "LossSpec", "LOSS_PARAMS", "LOSS_INPUTS", "check_loss_param",
    "SoftmaxCELoss", "BCELoss", "EQLLoss", "eql_weights", "check_eql_lambda",
    "ConcurrentSoftmaxLoss", "concurrent_softmax_loss", "concurrent_softmax_scores", "rate_to_csr", "ILL_CONDITIONED",
    "ACSLLoss", "acsl_ignored", "acsl_loss", "check_xi", "FREQUENCY_CODES", "ACSL_BACKGROUND_SHARE",
]


# ----------------------------------------------------------------------------------------------------------------
# Baselines: softmax CE (eq 1), sigmoid BCE, EQL
# ----------------------------------------------------------------------------------------------------------------

class SoftmaxCELoss(nn.Module):
    r"""Plain softmax cross-entropy, **eq 1** of "Large-Scale Object Detection in the Wild from Imbalanced Multi-Labels"
    (Peng et al., CVPR 2020): L = −Σ_i y_i log softmax(z)_i, mean over N.

    With one label per row this is ``F.cross_entropy``; a multi-label row sums the log-probabilities of all its
    labels (which then suppress each other: eq 2, the problem eq 3 fixes).
    """

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        check_inputs(logits, targets)
        return F.cross_entropy(logits, targets.to(logits.dtype))

    def scores(self, logits: Tensor) -> Tensor:
        return torch.softmax(logits, dim=1)


class BCELoss(nn.Module):
    """Sigmoid binary cross-entropy on all K channels, summed and divided by N (ACSL's normalisation, so
    ``acsl_loss`` with every weight 1, i.e. nothing ignored, equals this loss exactly)."""

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        check_inputs(logits, targets)
        return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), reduction="sum") / logits.shape[0]

    def scores(self, logits: Tensor) -> Tensor:
        return torch.sigmoid(logits)


def eql_weights(targets: Tensor, tail: Tensor) -> Tensor:
    r"""Equalization Loss weights, "Equalization Loss for Long-Tailed Object Recognition" (Tan et al.,
    CVPR 2020), §3.3 "Equalization Loss Formulation":

        w_j = 1 − E(r) T_λ(f_j) (1 − y_j)

    E(r) = 1 for a foreground RoI (targets[:, 0] == 0), 0 for background; T_λ(f_j) = 1 when class j's image
    frequency f_j < λ (``tail`` [K] bool, False in column 0). (No copy of the paper was at hand to confirm this
    equation's number, so it is not quoted; the formula is the paper's and the official eql.detectron2 code's.)
    """
    foreground = (targets[:, 0] == 0).to(targets.dtype).unsqueeze(1)
    return 1.0 - foreground * tail.to(targets.dtype).unsqueeze(0) * (1.0 - targets)


def check_eql_lambda(lambda_: float) -> float:
    """The tail threshold λ of T_λ in "Equalization Loss for Long-Tailed Object Recognition"
    (Tan et al., CVPR 2020) as a float; ConfigError unless it is a number in the closed interval [0, 1].

    The one definition of λ's valid range. λ is compared with image frequencies f_j in [0, 1]: λ = 0 makes no class
    a tail class, λ = 1 every class missing from some training image.
    """
    try:
        value = float(lambda_)
    except (TypeError, ValueError):
        value = math.nan
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"EQL tail threshold λ (lambda_) must be in the closed interval [0, 1], got {lambda_!r} "
                          "(the paper uses 1.76e-3)")
    return value


class EQLLoss(nn.Module):
    """Equalization Loss, "Equalization Loss for Long-Tailed Object Recognition" (Tan et al., CVPR 2020), sigmoid
    form: L = −Σ_j w_j log p̂_j over the K channels, summed and divided by N as the official eql.detectron2 code.

    ``class_freq``: f_j for each class (len C, contiguous label order) = images containing class j / all training
    images (``dataset.image_counts() / len(dataset)``). ``lambda_``: tail threshold λ in [0, 1], see
    :func:`check_eql_lambda` (paper: 1.76e-3 on LVIS v0.5).
    """

    def __init__(self, class_freq: Sequence[float], lambda_: float = 1.76e-3):
        super().__init__()
        freq = torch.as_tensor(list(class_freq), dtype=torch.float64)
        if freq.dim() != 1 or not bool(((freq >= 0) & (freq <= 1)).all()):
            raise ConfigError("eql class_freq must be a list of per-class image frequencies in [0, 1] (len C)")
        lam = check_eql_lambda(lambda_)
        tail = torch.cat([torch.zeros(1, dtype=torch.bool), freq < lam])
        self.register_buffer("tail", tail, persistent=False)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        check_inputs(logits, targets)
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


# The hyperparameters each loss reads (LossSpec fields besides `name`), and the data-derived inputs it is built with.
LOSS_PARAMS = {"softmax": (), "concurrent_softmax": (), "bce": (), "acsl": ("xi",), "eql": ("eql_lambda",)}
LOSS_INPUTS = {"concurrent_softmax": ("concurrent_rate",), "acsl": ("frequency",), "eql": ("class_freq",)}
_PARAM_CHECKS = {"xi": check_xi, "eql_lambda": check_eql_lambda}
_PARAM_ARGS = {"xi": "xi", "eql_lambda": "lambda_"}  # LossSpec field -> the loss class's argument


def check_loss_param(param: str, value) -> float:
    """The range check of a loss hyperparameter (``xi``: ACSL's ξ, ``eql_lambda``: EQL's λ), by its owner."""
    return _PARAM_CHECKS[param](value)


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """The classification loss of a run: its name and the hyperparameters that loss reads.

    ``xi``: ACSL's threshold ξ (acsl only; default 0.7, the paper's best). ``eql_lambda``: EQL's tail threshold λ
    (eql only; default 1.76e-3). A hyperparameter the named loss does not read is an error, never silently
    ignored. Building a spec checks it, so a ``LossSpec`` that exists is valid.
    """

    name: str = "softmax"
    xi: float | None = None
    eql_lambda: float | None = None

    def __post_init__(self):
        check_spec_options(self, "loss", LOSS_PARAMS, _PARAM_CHECKS)
        if self.name == "acsl" and self.xi is None:
            raise ConfigError("loss 'acsl' needs xi (ACSL's threshold ξ in (0, 1); the paper's best is 0.7)")

    def build(self, **inputs) -> nn.Module:
        """The loss module, given the data-derived ``inputs`` (concurrent_rate, frequency, class_freq); only the
        ones this loss reads (``LOSS_INPUTS``) are used."""
        kwargs = {_PARAM_ARGS[p]: getattr(self, p) for p in LOSS_PARAMS[self.name] if getattr(self, p) is not None}
        kwargs.update({k: inputs[k] for k in LOSS_INPUTS.get(self.name, ())})
        return LOSSES[self.name](**kwargs)
