"""The baseline classification losses: conventional softmax CE on the primary label (concurrent-softmax paper eq 1),
softmax CE on the multi-hot row (eq 1, gradient eq 2), sigmoid BCE, and the Equalization Loss (EQL).

Inputs as in ``lt_models.losses.registry``: ``logits [N, K]`` with column 0 = background."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lt_models.errors import ConfigError
from lt_models.losses.kernels import check_inputs


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
        raise ValueError(
            f"logits must be floating [N, K] with K >= 2 (column 0 = background), got "
            f"{tuple(logits.shape)} {logits.dtype}"
        )
    if labels.dim() != 1 or labels.shape[0] != logits.shape[0] or labels.dtype != torch.int64:
        raise ValueError(
            f"a one-label loss takes labels int64 [N={logits.shape[0]}] (each RoI's primary label, "
            f"0 = background), got {tuple(labels.shape)} {labels.dtype}"
        )


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
        raise ConfigError(
            f"EQL tail threshold λ (lambda_) must be in the closed interval [0, 1], got {lambda_!r} "
            "(the paper uses 1.76e-3)"
        )
    return value


class EQLLoss(nn.Module):
    """Equalization Loss, "Equalization Loss for Long-Tailed Object Recognition" (Tan et al., CVPR 2020), sigmoid
    form: L = −Σ_j w_j log p̂_j over the K channels, summed and divided by N as the official eql.detectron2 code.

    ``class_freq``: f_j for each class (len C, contiguous label order) = images containing class j / all training
    images (``dataset.image_counts() / len(dataset)``). ``lambda_``: tail threshold λ in [0, 1], see
    :func:`check_eql_lambda` (paper: 1.76e-3 on LVIS v0.5).
    """

    tail: Tensor

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
            raise ValueError(
                f"logits have {logits.shape[1]} columns but class_freq lists {self.tail.numel() - 1} "
                "classes; expected K = len(class_freq) + 1"
            )
        y = targets.to(logits.dtype)
        w = eql_weights(y, self.tail)
        return F.binary_cross_entropy_with_logits(logits, y, weight=w, reduction="sum") / logits.shape[0]

    def scores(self, logits: Tensor) -> Tensor:
        return torch.sigmoid(logits)
