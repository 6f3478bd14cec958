"""Classification losses for the RoI box head: the simple baselines, the registry (:data:`LOSSES`, :func:`build_loss`),
the inference-score override (:class:`RescoredLoss`) and the typed :class:`LossSpec`; the paper losses live in their
own modules and are re-exported here.

Inputs: ``logits [N, K]`` with K = C + 1 columns, **column 0 is background**. A multi-hot loss takes ``targets
[N, K]`` (float 0/1: a background RoI has a 1 in column 0 only, a foreground RoI a 1 at each of its classes). A
one-label loss (class attribute ``one_label = True``: softmax, seesaw) takes ``labels`` int64 [N], each RoI's
primary label (0 = background), the label box regression uses. Every loss has ``forward(logits, targets|labels)
-> scalar`` and ``scores(logits) -> [N, K]`` (the probabilities used at inference).

==================  ==========================================================  =========  =====================
name                loss (module)                                               scores     searchable
==================  ==========================================================  =========  =====================
softmax             conventional softmax CE on the primary label (eq 1)         softmax
softmax_multihot    softmax CE on the multi-hot row (eq 1, gradient eq 2)       softmax
concurrent_softmax  concurrent softmax eq 3 (``lt_models.losses.concurrent_softmax``)  eq 5
bce                 sigmoid BCE                                                 sigmoid
acsl                ACSL eq 5-6 (``lt_models.losses.acsl``)                            sigmoid    xi
eql                 Equalization Loss                                           sigmoid    eql_lambda
seesaw              Seesaw loss (``lt_models.losses.seesaw``)                          softmax    seesaw_p, seesaw_q
eqlv2               EQLv2 (``lt_models.losses.eqlv2``)                                 sigmoid    eqlv2_gamma/mu/alpha
federated           federated loss (``lt_models.losses.federated``)                    sigmoid    fed_num_classes
==================  ==========================================================  =========  =====================

Softmax-type losses are means over N; sigmoid-type losses are sums over the entries divided by N. The README's
loss table names each paper. ``benchmarks/bench_losses.py`` times every custom loss against ``F.cross_entropy`` /
``F.binary_cross_entropy_with_logits``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lt_models.losses.acsl import ACSL_BACKGROUND_SHARE, FREQUENCY_CODES, ACSLLoss, acsl_ignored, acsl_loss, check_xi
from lt_models.losses.concurrent_softmax import (ILL_CONDITIONED, ConcurrentSoftmaxLoss, check_inputs,
                                          concurrent_softmax_loss, concurrent_softmax_scores, rate_to_csr)
from lt_models.losses.eqlv2 import EQLv2Loss, check_eqlv2_alpha, check_eqlv2_gamma, check_eqlv2_mu
from lt_models.errors import ConfigError, check_spec_options
from lt_models.losses.federated import FederatedLoss, check_fed_num_classes
from lt_models.losses.seesaw import SeesawLoss, check_seesaw_p, check_seesaw_q

__all__ = [
    "LOSSES", "LOSS_ARGS", "build_loss", "LossSpec", "LOSS_PARAMS", "LOSS_INPUTS", "check_loss_param", "loss_inputs",
    "SCORES", "check_scores", "RescoredLoss", "check_labels",
    "SoftmaxCELoss", "MultiHotSoftmaxLoss", "BCELoss", "EQLLoss", "eql_weights", "check_eql_lambda",
    "ConcurrentSoftmaxLoss", "concurrent_softmax_loss", "concurrent_softmax_scores", "rate_to_csr", "ILL_CONDITIONED",
    "ACSLLoss", "acsl_ignored", "acsl_loss", "check_xi", "FREQUENCY_CODES", "ACSL_BACKGROUND_SHARE",
    "SeesawLoss", "check_seesaw_p", "check_seesaw_q", "EQLv2Loss", "check_eqlv2_gamma", "check_eqlv2_mu",
    "check_eqlv2_alpha", "FederatedLoss", "check_fed_num_classes",
]


# ----------------------------------------------------------------------------------------------------------------
# Baselines: softmax CE (eq 1), multi-hot softmax (eq 2), sigmoid BCE, EQL
# ----------------------------------------------------------------------------------------------------------------

class SoftmaxCELoss(nn.Module):
    r"""Conventional softmax cross-entropy, **eq 1** of "Large-Scale Object Detection in the Wild from Imbalanced
    Multi-Labels" (Peng et al., CVPR 2020) with one label per RoI: L = −log softmax(z)_t, mean over N.

    t is the RoI's *primary* label (0 = background), the label that box regression uses: "in the conventional
    object detection training scheme, each bounding box is assigned only one label during training ignoring other
    ground-truth labels" (§4.1). ``one_label = True``: the RoI head passes ``labels`` int64 [N], not the multi-hot
    rows. This is ``F.cross_entropy``, the loss of a stock torchvision / detectron2 Faster R-CNN.
    """

    one_label = True

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        check_labels(logits, labels)
        return F.cross_entropy(logits, labels)

    def scores(self, logits: Tensor) -> Tensor:
        return torch.softmax(logits, dim=1)


class MultiHotSoftmaxLoss(nn.Module):
    r"""Softmax cross-entropy on the multi-hot row, the case that **eq 2** of "Large-Scale Object Detection in the
    Wild from Imbalanced Multi-Labels" (Peng et al., CVPR 2020) criticises: eq 1, L = −Σ_i y_i log softmax(z)_i,
    with every label of the object set, mean over N.

    For a row with m labels (set K) the gradient is eq 2: ∂L/∂z_i = mσ_i − 1 for i ∈ K, mσ_i for i ∉ K, so once
    mσ_i > 1 a true label is pushed *down*: the labels suppress each other. Kept to rerun the paper's Table 1; the
    conventional baseline is ``softmax`` (one label per RoI), the fix is ``concurrent_softmax`` (eq 3).
    """

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        check_inputs(logits, targets)
        return F.cross_entropy(logits, targets.to(logits.dtype))

    def scores(self, logits: Tensor) -> Tensor:
        return torch.softmax(logits, dim=1)


def check_labels(logits: Tensor, labels: Tensor) -> None:
    """Raise ValueError unless ``logits`` is floating [N, K] (K >= 2) and ``labels`` int64 [N] in 0..K-1 (the
    inputs of a one-label loss: each RoI's primary label, 0 = background)."""
    if logits.dim() != 2 or logits.shape[1] < 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be floating [N, K] with K >= 2 (column 0 = background), got "
                         f"{tuple(logits.shape)} {logits.dtype}")
    if labels.dim() != 1 or labels.shape[0] != logits.shape[0] or labels.dtype != torch.int64:
        raise ValueError(f"a one-label loss takes labels int64 [N={logits.shape[0]}] (each RoI's primary label, "
                         f"0 = background), got {tuple(labels.shape)} {labels.dtype}")


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
    "softmax_multihot": MultiHotSoftmaxLoss,
    "concurrent_softmax": ConcurrentSoftmaxLoss,
    "bce": BCELoss,
    "acsl": ACSLLoss,
    "eql": EQLLoss,
    "seesaw": SeesawLoss,
    "eqlv2": EQLv2Loss,
    "federated": FederatedLoss,
}
LOSS_ARGS = {
    "softmax": (),
    "softmax_multihot": (),
    "concurrent_softmax": ("concurrent_rate",),
    "bce": (),
    "acsl": ("xi", "frequency", "generator"),
    "eql": ("class_freq", "lambda_"),
    "seesaw": ("num_classes", "p", "q"),
    "eqlv2": ("num_classes", "gamma", "mu", "alpha"),
    "federated": ("class_freq", "num_sampled", "freq_power", "generator"),
}


def build_loss(name: str, **kwargs) -> nn.Module:
    """Loss by name with its constructor arguments (``LOSS_ARGS``): softmax, softmax_multihot, bce (none),
    concurrent_softmax (concurrent_rate), acsl (xi, frequency, generator), eql (class_freq, lambda_), seesaw
    (num_classes, p, q), eqlv2 (num_classes, gamma, mu, alpha), federated (class_freq, num_sampled, freq_power,
    generator). Unknown names or keyword arguments raise ConfigError."""
    if name not in LOSSES:
        raise ConfigError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
    unknown = sorted(set(kwargs) - set(LOSS_ARGS[name]))
    if unknown:
        allowed = ", ".join(LOSS_ARGS[name]) or "none"
        raise ConfigError(f"loss {name!r} does not take {', '.join(unknown)} (its arguments: {allowed})")
    return LOSSES[name](**kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Inference scores independent of the training loss (concurrent-softmax paper, Table 2)
# ----------------------------------------------------------------------------------------------------------------
SCORES = ("loss", "softmax", "concurrent", "sigmoid")


def check_scores(value) -> str:
    """The inference scores of a run: ``loss`` (the training loss's own), ``softmax``, ``concurrent`` (eq 5 of the
    concurrent-softmax paper) or ``sigmoid``; ConfigError otherwise."""
    if value not in SCORES:
        raise ConfigError(f"scores = {value!r}: choose one of {', '.join(SCORES)} (loss = the training loss's own "
                          "scores; concurrent = eq 5 of the concurrent-softmax paper)")
    return value


class RescoredLoss(nn.Module):
    """A training loss whose inference ``scores`` come from another rule (``scores`` = softmax | concurrent |
    sigmoid), as in Table 2 of the concurrent-softmax paper (softmax or concurrent softmax in training x in testing).
    Training is the wrapped loss's, unchanged."""

    def __init__(self, loss: nn.Module, scores: str, concurrent_rate: Tensor | None = None):
        super().__init__()
        self.loss = loss
        self.one_label = getattr(loss, "one_label", False)
        self.rule = check_scores(scores)
        if self.rule == "concurrent":
            if concurrent_rate is None:
                raise ConfigError("scores 'concurrent' (eq 5) needs the concurrent-rate matrix r_ij of the training "
                                  "data; pass concurrent_rate")
            self.eq5 = ConcurrentSoftmaxLoss(concurrent_rate)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        return self.loss(logits, targets)

    def scores(self, logits: Tensor) -> Tensor:
        if self.rule == "concurrent":
            return self.eq5.scores(logits)
        if self.rule == "sigmoid":
            return torch.sigmoid(logits)
        if self.rule == "softmax":
            return torch.softmax(logits, dim=1)
        return self.loss.scores(logits)


# ----------------------------------------------------------------------------------------------------------------
# The typed loss spec: a run's loss, its hyperparameters and its scores
# ----------------------------------------------------------------------------------------------------------------
# The hyperparameters each loss reads (LossSpec fields besides `name` and `scores`), and the data-derived inputs it
# is built with.
LOSS_PARAMS = {
    "softmax": (), "softmax_multihot": (), "concurrent_softmax": (), "bce": (), "acsl": ("xi",),
    "eql": ("eql_lambda",), "seesaw": ("seesaw_p", "seesaw_q"), "eqlv2": ("eqlv2_gamma", "eqlv2_mu", "eqlv2_alpha"),
    "federated": ("fed_num_classes",),
}
LOSS_INPUTS = {"concurrent_softmax": ("concurrent_rate",), "acsl": ("frequency",), "eql": ("class_freq",),
               "seesaw": ("num_classes",), "eqlv2": ("num_classes",), "federated": ("class_freq",)}
_PARAM_CHECKS = {"xi": check_xi, "eql_lambda": check_eql_lambda, "seesaw_p": check_seesaw_p,
                 "seesaw_q": check_seesaw_q, "eqlv2_gamma": check_eqlv2_gamma, "eqlv2_mu": check_eqlv2_mu,
                 "eqlv2_alpha": check_eqlv2_alpha, "fed_num_classes": check_fed_num_classes}
# LossSpec field -> the loss class's argument
_PARAM_ARGS = {"xi": "xi", "eql_lambda": "lambda_", "seesaw_p": "p", "seesaw_q": "q", "eqlv2_gamma": "gamma",
               "eqlv2_mu": "mu", "eqlv2_alpha": "alpha", "fed_num_classes": "num_sampled"}


def check_loss_param(param: str, value):
    """The range check of a loss hyperparameter (``xi``: ACSL's ξ, ``eql_lambda``: EQL's λ, ``seesaw_p`` /
    ``seesaw_q``, ``eqlv2_gamma`` / ``eqlv2_mu`` / ``eqlv2_alpha``, ``fed_num_classes``), by its owner."""
    return _PARAM_CHECKS[param](value)


def loss_inputs(name: str, scores: str = "loss") -> tuple[str, ...]:
    """The data-derived inputs that a loss with these scores is built from (concurrent_rate, frequency,
    class_freq, num_classes)."""
    extra = ("concurrent_rate",) if scores == "concurrent" and name != "concurrent_softmax" else ()
    return LOSS_INPUTS.get(name, ()) + extra


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """The classification loss of a run: its name, its inference scores and the hyperparameters that loss reads.

    ``scores``: ``loss`` (default: the loss's own) | ``softmax`` | ``concurrent`` | ``sigmoid`` (see
    :class:`RescoredLoss`). ``xi``: ACSL's threshold ξ (acsl only; 0.7, the paper's best). ``eql_lambda``: EQL's
    tail threshold λ (eql; default 1.76e-3). ``seesaw_p`` / ``seesaw_q``: Seesaw's mitigation / compensation
    exponents (seesaw; 0.8 / 2.0). ``eqlv2_gamma`` / ``eqlv2_mu`` / ``eqlv2_alpha``: EQLv2's mapping function and
    positive-weight factor (eqlv2; 12 / 0.8 / 4). ``fed_num_classes``: the federated loss's number of classes per
    batch (federated; 50). A hyperparameter the named loss does not read is an error, never silently ignored.
    Building a spec checks it, so a ``LossSpec`` that exists is valid.
    """

    name: str = "softmax"
    scores: str = "loss"
    xi: float | None = None
    eql_lambda: float | None = None
    seesaw_p: float | None = None
    seesaw_q: float | None = None
    eqlv2_gamma: float | None = None
    eqlv2_mu: float | None = None
    eqlv2_alpha: float | None = None
    fed_num_classes: int | None = None

    def __post_init__(self):
        check_spec_options(self, "loss", LOSS_PARAMS, _PARAM_CHECKS)
        check_scores(self.scores)
        if self.name == "acsl" and self.xi is None:
            raise ConfigError("loss 'acsl' needs xi (ACSL's threshold ξ in (0, 1); the paper's best is 0.7)")

    @property
    def inputs(self) -> tuple[str, ...]:
        return loss_inputs(self.name, self.scores)

    def build(self, **inputs) -> nn.Module:
        """The loss module, given the data-derived ``inputs`` (concurrent_rate, frequency, class_freq,
        num_classes); only the ones this loss and its scores read (``self.inputs``) are used."""
        kwargs = {_PARAM_ARGS[p]: getattr(self, p) for p in LOSS_PARAMS[self.name] if getattr(self, p) is not None}
        kwargs.update({k: inputs[k] for k in LOSS_INPUTS.get(self.name, ())})
        loss = LOSSES[self.name](**kwargs)
        if self.scores == "loss":
            return loss
        return RescoredLoss(loss, self.scores, inputs.get("concurrent_rate"))
