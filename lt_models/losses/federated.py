"""Federated loss, from Xingyi Zhou, Vladlen Koltun, Philipp Krähenbühl, "Probabilistic two-stage detection"
(arXiv 2103.07461, 2021) and their LVIS Challenge 2020 technical report (CenterNet2); also the ``use_fed_loss``
option of detectron2's ``FastRCNNOutputLayers`` and of Detic.

Sigmoid binary cross-entropy over a subset S of the C foreground classes, drawn once per training batch: every class
that appears as a label in the batch, plus negative classes sampled without replacement with probability
∝ (image frequency)^0.5 until |S| = ``num_sampled`` (default 50). LVIS is a *federated* dataset: an image is
exhaustively annotated for a few classes only, so a class missing from an image is often unlabeled rather than
absent; training the negative loss of only a few, frequent-leaning classes per batch keeps rare classes from being
suppressed by negatives that may be false.

No equation number or section is quoted: the papers' text was not at hand to confirm one (unconfirmed pointer: the
loss is described in the LVIS Challenge 2020 report and used for the LVIS experiments of arXiv 2103.07461). The rule
and the defaults follow the authors' talk slides ("Negative or unlabeled classes: sampled to apply negative loss;
sample based on frequency") and the reference implementations: CenterNet2 / Detic ``get_fed_loss_inds`` and
detectron2 ``FastRCNNOutputLayers.get_fed_loss_classes`` with ``FED_LOSS_NUM_CLASSES = 50`` and
``FED_LOSS_FREQ_WEIGHT_POWER = 0.5`` (weight = image_count ** 0.5; a frequency is proportional to the count, so
the sampling probabilities are the same).

Inputs follow ``lt_models.losses.registry``: ``logits [N, K]`` and multi-hot ``targets [N, K]`` with column 0 =
background. Classes are columns here: class label c (1..C) is column c. Column 0 is never trained (the reference drops
the background logit from the sigmoid loss), so a background RoI has all-zero targets over S.

Deviations from the reference code: (1) only foreground classes count towards ``num_sampled``; the reference takes
``unique(gt_classes)`` including the background label when the batch has background RoIs, so it keeps one foreground
class fewer (49 of 50). (2) When fewer classes with positive weight are left than draws needed (e.g. many classes
with image frequency 0), all of them are taken and S is smaller than ``num_sampled``, where the reference's
``torch.multinomial`` raises. (3) S is taken from the targets' labels, so a multi-label row contributes all its
classes (the reference has one label per RoI).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral, Real

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lt_models.errors import ConfigError
from lt_models.losses.kernels import check_inputs, compute_dtype, label_pairs

FED_NUM_SAMPLED = 50  # detectron2 FED_LOSS_NUM_CLASSES / CenterNet2 FED_LOSS_NUM_CAT
FED_FREQ_POWER = 0.5  # detectron2 FED_LOSS_FREQ_WEIGHT_POWER / CenterNet2 FED_LOSS_FREQ_WEIGHT


def check_fed_num_classes(value) -> int:
    """The number of classes |S| of the federated loss (Zhou, Koltun, Krähenbühl, "Probabilistic two-stage
    detection", arXiv 2021; LVIS Challenge 2020 report) as an int; ConfigError unless it is an integer >= 1.

    The one definition of its valid range (the reference default is 50). An integral float (50.0) is accepted.
    """
    ok = isinstance(value, Integral) and not isinstance(value, bool)
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        ok, value = True, int(value)
    if not ok or value < 1:
        raise ConfigError(
            f"federated loss num_sampled (number of classes |S| per batch) must be an integer >= 1, "
            f"got {value!r} (the reference default is {FED_NUM_SAMPLED})"
        )
    return int(value)


def check_fed_freq_power(value) -> float:
    """The exponent of the sampling weight (image frequency)^power of the federated loss as a float; ConfigError
    unless it is a finite number >= 0 (the reference default is 0.5; 0 samples the negatives uniformly)."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value < 0:
        raise ConfigError(
            f"federated loss freq_power must be a finite number >= 0, got {value!r} "
            f"(the reference default is {FED_FREQ_POWER})"
        )
    return float(value)


def _check_class_freq(class_freq) -> Tensor:
    """class_freq as a float64 [C] tensor; ConfigError unless it is a non-empty 1-D list of numbers in [0, 1]."""
    try:
        freq = torch.as_tensor(
            class_freq.tolist() if isinstance(class_freq, Tensor) else list(class_freq), dtype=torch.float64
        )
    except (TypeError, ValueError, RuntimeError):
        freq = None
    if freq is None or freq.dim() != 1 or freq.numel() == 0 or not bool(((freq >= 0) & (freq <= 1)).all()):
        raise ConfigError(
            "federated loss class_freq must be a non-empty list of per-class image frequencies in "
            "[0, 1] (len C, contiguous label order 1..C; no default: images containing the class / "
            "all training images)"
        )
    return freq


def federated_classes(
    present: Tensor, weight: Tensor, num_sampled: int, generator: torch.Generator | None = None
) -> Tensor:
    r"""The class subset S of the federated loss (Zhou, Koltun, Krähenbühl, "Probabilistic two-stage detection",
    arXiv 2021, and their LVIS Challenge 2020 report; no equation number confirmed, see the module docstring).

    ``present``: int64 columns (1..C) of the foreground classes that appear as a label in the batch.
    ``weight`` [C]: sampling weight of column c at ``weight[c - 1]``, (image frequency)^0.5 by default.
    Returns the sorted int64 columns of S, on ``present``'s device:

        S = P ∪ R,   P = the present classes,
        R = num_sampled − |P| draws without replacement among the classes not in P, each draw picking class j
            with probability w_j / Σ_{i not yet in S} w_i.

    If |P| >= num_sampled, S = P (nothing is sampled, as in the reference). Column 0 (background) is never in S.
    A class with weight 0 (image frequency 0) is never *sampled*; it is in S only when it is present. When fewer
    classes with positive weight remain than the draws needed, all of them are taken and S is smaller than
    ``num_sampled`` (``torch.multinomial`` without replacement would fail here; the reference would crash).
    Randomness: ``generator`` if given (sampling runs on its device), else torch's global RNG.
    """
    present = torch.unique(present.to(torch.int64))
    need = int(num_sampled) - present.numel()
    if need <= 0:
        return present
    device = generator.device if generator is not None else weight.device
    w = weight.detach().to(device=device, dtype=torch.float64, copy=True)
    w.index_fill_(0, present.to(device) - 1, 0.0)
    take = min(need, int(torch.count_nonzero(w)))
    if take == 0:
        return present
    extra = torch.multinomial(w, take, replacement=False, generator=generator).to(present.device) + 1
    return torch.sort(torch.cat([present, extra])).values


# S up to this share of the K columns: gather the |S| columns; above it: work on the whole N×K matrix (measured on
# CPU at N = 8192, K = 1231, where strided column gathers / scatters of many columns cost more than a full pass).
GATHER_MAX_SHARE = 0.5


class _FederatedBCEFunction(torch.autograd.Function):
    """Sigmoid BCE over the columns S, summed / N; see :func:`federated_loss`."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, cols: Tensor) -> Tensor:
        dtype = compute_dtype(logits)
        n, k = logits.shape
        ctx.logits_dtype, ctx.shape = logits.dtype, (n, k)
        if cols.numel() <= GATHER_MAX_SHARE * k:  # the N×|S| entries only
            z = logits.index_select(1, cols).to(dtype)
            y = targets.index_select(1, cols).to(dtype)
            elem = F.softplus(z).addcmul_(y, z, value=-1.0)  # softplus(z) − y z, elementwise (no cancellation)
            ctx.dense = False
            ctx.save_for_backward(z, y, cols)
            return elem.sum() / n
        # dense: softplus over all of z into the one N×K buffer, − y z at the label entries in S, column sums over S
        z = logits.to(dtype)
        y = targets.to(dtype)
        in_s = torch.zeros(k, dtype=torch.bool, device=z.device).index_fill_(0, cols, True)
        rows, lcols = label_pairs(y)
        keep = torch.nonzero(in_s.index_select(0, lcols)).squeeze(1)
        flat = (rows * k + lcols).index_select(0, keep)
        y_lab = y.reshape(-1).index_select(0, flat)
        buf = F.softplus(z)
        buf.view(-1).index_add_(0, flat, -y_lab * z.reshape(-1).index_select(0, flat))
        col_sums = torch.mv(buf.t(), torch.ones(n, dtype=dtype, device=z.device))
        ctx.dense, ctx.buffer = True, buf  # buf becomes the gradient in backward
        ctx.save_for_backward(z, in_s, flat, y_lab)
        return col_sums.index_select(0, cols).sum() / n

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        r"""∂L/∂z_nj = (sigmoid(z_nj) − y_nj) / N for j ∈ S, 0 for j ∉ S (column 0 included): the derivative of
        softplus(z) − y z is sigmoid(z) − y."""
        n, k = ctx.shape
        if not ctx.dense:
            z, y, cols = ctx.saved_tensors
            part = torch.sigmoid(z).sub_(y).mul_(grad.to(z.dtype) / n)
            out = torch.zeros(n, k, dtype=ctx.logits_dtype, device=z.device)
            return out.index_copy_(1, cols, part.to(ctx.logits_dtype)), None, None
        z, in_s, flat, y_lab = ctx.saved_tensors
        buf = ctx.buffer if ctx.buffer is not None else torch.empty_like(z)
        ctx.buffer = None  # consumed: a second backward (retain_graph=True) writes a new buffer
        scale = grad.to(z.dtype) / n
        torch.sigmoid(z, out=buf)
        buf.mul_(in_s.to(z.dtype) * scale)  # 0 outside S, p / N inside
        buf.view(-1).index_add_(0, flat, y_lab * -scale)  # (p − y) / N at the labels in S
        return buf.to(ctx.logits_dtype), None, None


def federated_loss(logits: Tensor, targets: Tensor, classes: Tensor) -> Tensor:
    r"""Federated loss given the subset S (``classes``, int64 columns in 1..K−1, from :func:`federated_classes`):
    sigmoid BCE over the columns in S, summed over all N rows and divided by N (Zhou, Koltun, Krähenbühl,
    "Probabilistic two-stage detection", arXiv 2021, and their LVIS Challenge 2020 report; no equation number
    confirmed, see the module docstring; reduction as the reference, ``sum(bce · mask) / N``):

        L = (1/N) Σ_n Σ_{j∈S} [softplus(z_nj) − y_nj z_nj],    softplus(z) − y z = −[y log p + (1 − y) log(1 − p)]

    with p = sigmoid(z). Gradient (``_FederatedBCEFunction.backward``): ∂L/∂z_nj = (p_nj − y_nj) / N for j ∈ S and
    0 for j ∉ S (column 0 included). Computed in float32 for half / bfloat16 logits (``compute_dtype``).

    Cost: for |S| <= ``GATHER_MAX_SHARE`` · K only the N×|S| gathered entries are computed and the one N×K buffer
    is the gradient (zeros, filled at S). For a larger S (a batch with many classes present) one pass of softplus
    over N×K writes a buffer that backward turns into the gradient; the labels (targets' non-zeros, which must be
    0/1 there) are handled as sparse entries. In that dense case, half / bfloat16 logits also need a float32 copy.
    """
    n, k = logits.shape
    cols = classes.to(device=logits.device, dtype=torch.int64)
    if cols.dim() != 1 or (cols.numel() and not bool(((cols >= 1) & (cols < k)).all())):
        raise ValueError(
            f"classes must be a 1-D tensor of foreground columns in 1..{k - 1} (column 0, background, is not trained)"
        )
    return _FederatedBCEFunction.apply(logits, targets, torch.unique(cols))


def present_classes(targets: Tensor) -> Tensor:
    """int64 columns (1..K−1) of the foreground classes with a label in some row of ``targets`` [N, K] (0/1)."""
    if targets.dtype in (torch.float32, torch.float64):
        # one BLAS pass: column sums Σ_n y_nj (exact for 0/1 targets below 2^24 rows)
        counts = torch.mv(targets.t(), torch.ones(targets.shape[0], dtype=targets.dtype, device=targets.device))
        hit = counts[1:] != 0
    else:
        hit = targets[:, 1:].amax(0) != 0 if targets.is_floating_point() else targets[:, 1:].any(0)
    return torch.nonzero(hit).squeeze(1) + 1


class FederatedLoss(nn.Module):
    """Federated loss, Zhou, Koltun, Krähenbühl, "Probabilistic two-stage detection" (arXiv 2021) / LVIS Challenge
    2020 report (CenterNet2): per batch the class subset S (:func:`federated_classes`), then sigmoid BCE over S
    summed / N (:func:`federated_loss`). ``scores`` = sigmoid (column 0 is ignored by the detector).

    ``class_freq``: per-class image frequency in [0, 1] (len C, contiguous label order 1..C). ``num_sampled``: |S|,
    an integer >= 1 (:func:`check_fed_num_classes`, default 50 as detectron2 / CenterNet2). ``freq_power``: the
    sampling weight is class_freq ** freq_power (:func:`check_fed_freq_power`, default 0.5). ``generator``: optional
    ``torch.Generator`` for the sampling (default: torch's global RNG). The loss keeps no training state.
    """

    weight: Tensor

    def __init__(
        self,
        class_freq: Sequence[float],
        num_sampled: int = FED_NUM_SAMPLED,
        freq_power: float = FED_FREQ_POWER,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        freq = _check_class_freq(class_freq)
        self.num_sampled = check_fed_num_classes(num_sampled)
        self.freq_power = check_fed_freq_power(freq_power)
        self.generator = generator
        self.register_buffer("weight", freq.pow(self.freq_power), persistent=False)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        check_inputs(logits, targets)
        if logits.shape[1] != self.weight.numel() + 1:
            raise ValueError(
                f"logits have {logits.shape[1]} columns but class_freq lists {self.weight.numel()} "
                "classes; expected K = len(class_freq) + 1"
            )
        with torch.no_grad():
            classes = federated_classes(present_classes(targets), self.weight, self.num_sampled, self.generator)
        return federated_loss(logits, targets, classes)

    def scores(self, logits: Tensor) -> Tensor:
        return torch.sigmoid(logits)
