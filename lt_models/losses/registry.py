"""Classification losses for the RoI box head: the simple baselines, the registry (:data:`LOSSES`, :func:`build_loss`),
the inference-score override (:class:`RescoredLoss`) and the typed :class:`LossSpec`. The baselines live in
``baselines``, each paper loss in its own module; ``lt_models.losses`` re-exports the public names.

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
from collections.abc import Callable
from typing import cast

import torch
from torch import Tensor, nn

from lt_models.errors import ConfigError, check_spec_options
from lt_models.losses.acsl import ACSLLoss, check_xi
from lt_models.losses.baselines import BCELoss, EQLLoss, MultiHotSoftmaxLoss, SoftmaxCELoss, check_eql_lambda
from lt_models.losses.concurrent_softmax import (
    ConcurrentSoftmaxLoss,
)
from lt_models.losses.eqlv2 import EQLv2Loss, check_eqlv2_alpha, check_eqlv2_gamma, check_eqlv2_mu
from lt_models.losses.federated import FederatedLoss, check_fed_num_classes
from lt_models.losses.seesaw import SeesawLoss, check_seesaw_p, check_seesaw_q

__all__ = [
    "LOSSES",
    "LOSS_ARGS",
    "LOSS_INPUTS",
    "LOSS_PARAMS",
    "SCORES",
    "LossSpec",
    "RescoredLoss",
    "build_loss",
    "check_loss_param",
    "check_scores",
    "loss_inputs",
]


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
        raise ConfigError(
            f"scores = {value!r}: choose one of {', '.join(SCORES)} (loss = the training loss's own "
            "scores; concurrent = eq 5 of the concurrent-softmax paper)"
        )
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
                raise ConfigError(
                    "scores 'concurrent' (eq 5) needs the concurrent-rate matrix r_ij of the training "
                    "data; pass concurrent_rate"
                )
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
        # every loss of the registry has scores(); nn.Module types an undeclared attribute as Tensor | Module
        return cast("Callable[[Tensor], Tensor]", self.loss.scores)(logits)


# ----------------------------------------------------------------------------------------------------------------
# The typed loss spec: a run's loss, its hyperparameters and its scores
# ----------------------------------------------------------------------------------------------------------------
# The hyperparameters each loss reads (LossSpec fields besides `name` and `scores`), and the data-derived inputs it
# is built with.
LOSS_PARAMS = {
    "softmax": (),
    "softmax_multihot": (),
    "concurrent_softmax": (),
    "bce": (),
    "acsl": ("xi",),
    "eql": ("eql_lambda",),
    "seesaw": ("seesaw_p", "seesaw_q"),
    "eqlv2": ("eqlv2_gamma", "eqlv2_mu", "eqlv2_alpha"),
    "federated": ("fed_num_classes",),
}
LOSS_INPUTS = {
    "concurrent_softmax": ("concurrent_rate",),
    "acsl": ("frequency",),
    "eql": ("class_freq",),
    "seesaw": ("num_classes",),
    "eqlv2": ("num_classes",),
    "federated": ("class_freq",),
}
_PARAM_CHECKS = {
    "xi": check_xi,
    "eql_lambda": check_eql_lambda,
    "seesaw_p": check_seesaw_p,
    "seesaw_q": check_seesaw_q,
    "eqlv2_gamma": check_eqlv2_gamma,
    "eqlv2_mu": check_eqlv2_mu,
    "eqlv2_alpha": check_eqlv2_alpha,
    "fed_num_classes": check_fed_num_classes,
}
# LossSpec field -> the loss class's argument
_PARAM_ARGS = {
    "xi": "xi",
    "eql_lambda": "lambda_",
    "seesaw_p": "p",
    "seesaw_q": "q",
    "eqlv2_gamma": "gamma",
    "eqlv2_mu": "mu",
    "eqlv2_alpha": "alpha",
    "fed_num_classes": "num_sampled",
}


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
