"""The classifier at the switch from a softmax-type stage 1 to a sigmoid-type stage 2 (hybrid schedule).

Stage 1 always trains with a softmax-type loss (``lt_models.engine.spec.STAGE1_LOSSES``: conventional softmax CE or
concurrent softmax). A softmax classifier's logits are only defined up to a common shift per row: softmax(z + c) =
softmax(z), so training never pins their absolute level, and sigmoid(z_j) of a stage-1 classifier is arbitrary (on the
demo benchmark about 0.4 on the negative entries of training RoIs, where a sigmoid classifier should say ~0). A
sigmoid-type stage 2 (bce, acsl, eql, eqlv2, federated: the losses whose ``scores`` is the elementwise sigmoid)
that starts from those weights begins with a BCE about 5x that of a well-initialised sigmoid classifier and a
gradient into the backbone 10-30x that of the stage-1 loss, and a short all-layer stage 2 does not recover from it
(``benchmarks/bench_acsl_switch.py``).

:func:`background_relative_classifier` converts the stage-1 classifier in closed form so that its sigmoid scores are
what the softmax model already says (see its docstring); :func:`switch_classifier` applies it exactly where it is
needed: a run that starts from a stage-1 checkpoint (``init_checkpoint``, never on resume) with a sigmoid-type loss.
``lt_models.engine.run.build_run`` calls it right after loading the stage-1 weights.

Alternatives measured on the demo study (seeds 0 and 1, ACSL ξ = 0.7, all layers; softmax 0.219 / 0.250 AP): no
conversion 0.124 / 0.095; this conversion 0.204 / 0.224; a fresh sigmoid classifier with the prior-probability
bias of "Focal Loss for Dense Object Detection" (Lin et al., ICCV 2017, §4.1: b = −log((1 − π)/π), π = 0.01, weights
N(0, 0.01²)), discarding the stage-1 classifier, 0.145 / 0.175; the decoupled classifier-only stage 2 of the ACSL
paper (§4.2) without conversion 0.160 (seed 0). The decoupled mode stays a choice of the run (``decoupled``); the
conversion applies to it as well.

What the official ACSL code does (CASIA-IVA-Lab/ACSL, ``configs/acsl/faster_rcnn_r50_fpn_1x_lvis_tunefc_acsl.py``
and ``tools/train.py``): its box head writes the focal-loss prior bias into ``fc_cls`` when it is built, but the
config's ``load_from`` then loads the whole softmax baseline checkpoint, ``fc_cls`` included (same shape, 1,231
outputs), so the prior is overwritten and the stage-1 softmax classifier is kept as is, without a conversion.
``selectp = 1`` freezes every parameter but ``fc_cls``, which trains for 12 epochs at lr 0.02 (steps at 8 and 11,
500 warm-up iterations). The conversion here is ltsweep's own addition, not the official recipe.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch
from torch import Tensor, nn

from lt_models.modeling.detector import LTFasterRCNN

__all__ = ["AUTO_SWITCH", "background_relative_classifier", "is_sigmoid_loss", "needs_switch", "switch_classifier"]

# Set to False only to measure the schedule without the conversion (benchmarks/bench_acsl_switch.py does, for its
# "before" arm); training code leaves it on.
AUTO_SWITCH = True


@torch.no_grad()
def background_relative_classifier(cls_score: nn.Linear) -> None:
    r"""Re-express a softmax classifier in background-relative logits, in place: W'_j = W_j − W_0 and
    b'_j = b_j − b_0 for every row j (column 0 = background), so z'_j = z_j − z_0 and z'_0 = 0.

    Under the softmax model p_j = e^{z_j} / Σ_k e^{z_k}, so e^{z'_j} = p_j / p_0 and

        sigmoid(z'_j) = p_j / (p_j + p_0)        (j ≥ 1),

    the probability of class j against background alone, which the stage-1 classifier already estimates: near 0 on
    a background RoI (p_0 ≈ 1) and near 1 for the RoI's own class. This is the baseline-category (reference-category)
    parametrisation of the multinomial logit model with background as the baseline: softmax logits are identified
    only up to a common shift, and fixing z_0 = 0 picks the one representative whose remaining logits are log odds
    against background (Agresti, "Categorical Data Analysis", Wiley, 2nd ed. 2002, the chapter on logit models for
    multinomial responses, baseline-category logits; the section number is unconfirmed here). The softmax scores
    are unchanged (softmax(z') = softmax(z)). Column 0 becomes the constant 0 (sigmoid 1/2): "background vs. every
    class" is not a linear function of the features under the softmax model, so there is no exact linear
    conversion for it; it receives no gradient to the features at the start (W'_0 = 0) and trains from there.
    """
    w, b = cls_score.weight, cls_score.bias
    w.sub_(w[0:1].clone())
    if b is not None:
        b.sub_(b[0:1].clone())


def is_sigmoid_loss(loss: nn.Module, num_columns: int = 3) -> bool:
    """True when the loss that *trains* the classifier is sigmoid-type: its ``scores`` is the elementwise sigmoid
    (bce, acsl, eql, eqlv2, federated in ``lt_models.losses.registry.LOSSES``). A ``RescoredLoss`` is judged by the loss
    it wraps (its training loss), not by its inference scores. Decided by evaluating ``scores`` on a fixed probe of
    ``num_columns`` columns (pass the classifier's K: a loss with a fixed class count checks it)."""
    from lt_models.losses.registry import RescoredLoss

    inner = loss.loss if isinstance(loss, RescoredLoss) else loss
    buffers = list(inner.buffers())
    device = buffers[0].device if buffers else torch.device("cpu")
    probe = torch.linspace(-3.0, 3.0, 2 * num_columns, device=device).reshape(2, num_columns)
    with torch.no_grad():
        # every classification loss has scores(); nn.Module types an undeclared attribute as Tensor | Module
        scores = cast("Callable[[Tensor], Tensor]", inner.scores)(probe)
    return tuple(scores.shape) == tuple(probe.shape) and bool(torch.allclose(scores, torch.sigmoid(probe)))


def needs_switch(model: LTFasterRCNN, checkpoint_extra: dict | None) -> bool:
    """Whether a run that has just loaded ``init_checkpoint`` weights (``checkpoint_extra``: the checkpoint's
    ``extra``, returned by ``lt_models.engine.checkpoint.load_model_weights``) must convert its classifier: the
    checkpoint is a stage-1 checkpoint (always softmax-type, ``engine.spec.STAGE1_LOSSES``) and the run's classification
    loss is sigmoid-type. Checkpoints of other stages are left alone (their classifier may already be a sigmoid one)."""
    if not AUTO_SWITCH or (checkpoint_extra or {}).get("stage") != "stage1":
        return False
    cls_score = model.roi_heads.box_predictor.cls_score
    return is_sigmoid_loss(model.roi_heads.cls_loss, cls_score.out_features)


def switch_classifier(model: LTFasterRCNN, checkpoint_extra: dict | None) -> bool:
    """Convert ``model.roi_heads.box_predictor.cls_score`` with :func:`background_relative_classifier` when
    :func:`needs_switch` says so; return whether it did. Call it only after loading ``init_checkpoint`` weights,
    never after a resume (a resumed checkpoint's classifier is already the stage-2 one)."""
    if not needs_switch(model, checkpoint_extra):
        return False
    background_relative_classifier(model.roi_heads.box_predictor.cls_score)
    return True
