"""torchvision Faster R-CNN with RoI heads that train on multi-hot targets with a pluggable classification loss.

What differs from stock torchvision (everything else — anchors, RPN, RoIAlign, box coder, NMS — is torchvision's):

* ``MultiLabelRoIHeads`` (a ``torchvision...roi_heads.RoIHeads``): a sampled proposal matched to a merged
  ground-truth object (IoU >= 0.5) gets that object's whole multi-hot row ``target["multi_hot"][j]`` (1 at every
  label of the object, e.g. leaf + parent, or two leaves); every other sampled proposal gets the background row
  ``[1, 0, ..., 0]`` (column 0 is background, torchvision's convention). The rows go unchanged to the
  classification loss from ``lt_models.losses.registry.build_loss`` (softmax CE, concurrent softmax, BCE, ACSL, ...).
* Box regression keeps torchvision's ``fastrcnn_loss`` box term (class-specific smooth-L1, beta 1/9, summed over
  foreground RoIs and divided by the number of sampled RoIs). **Primary-label choice**: by default
  (``box_reg_labels="primary"``) a foreground RoI regresses only in the channel of its object's primary label
  ``target["labels"][j]`` (the one label the dataset picks per merged object, see ``lt_models.data.datasets``). This
  is exactly what a stock detector does when duplicate boxes with different labels are kept as separate
  objects (the matcher assigns each proposal to one of them). ``box_reg_labels="all"`` instead trains every
  label channel of the object towards the same box (useful when a parent class is never anyone's primary label,
  so its regression channel would otherwise stay untrained).
* Inference scores come from the loss's own ``scores(logits)`` (softmax for CE, eq 5 of the concurrent-softmax
  paper for concurrent softmax, sigmoid for BCE/ACSL); torchvision's per-class NMS then keeps the top 300
  detections per image (LVIS practice), with a low score threshold (1e-4).
* Decoupled second stage (ACSL paper §4.2, after Kang et al.): ``decoupled="cls"`` freezes everything except the
  classifier ``roi_heads.box_predictor.cls_score`` (the official ACSL code trains only ``fc_cls``);
  ``decoupled="box_head"`` also trains the RoI box head and the box regressor. Frozen BatchNorm layers stay in eval
  mode even under ``model.train()`` so their running statistics do not drift; the RPN keeps producing training
  proposals. The engine optimises only the losses that still have a gradient.

Backbones (all from scratch unless ``weights`` names a local file; nothing is ever downloaded):
``tiny`` (CPU default: a small ResNet-style body + 64-channel FPN, ~3.8M parameters, 128 px input, small RPN
top-n and 128 sampled RoIs per image), ``resnet18_fpn`` and ``resnet50_fpn`` (the papers' setting: 800/1333 px,
torchvision's ResNet + FPN, 512 RoIs per image). From scratch, every BatchNorm trains (``norm="bn"``); with a
weights file the ResNets default to ``FrozenBatchNorm2d`` as torchvision does for pretrained backbones.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import boxes as box_ops

from lt_models.errors import ConfigError
from lt_models.losses.registry import build_loss
from lt_models.modeling.backbones import PRESETS, build_backbone, check_backbone
from lt_models.modeling.roi_pool import GridRoIAlign

__all__ = [
    "DECOUPLED_MODES",
    "MultiLabelRoIHeads",
    "LTFasterRCNN",
    "build_detector",
    "set_decoupled",
]

DECOUPLED_MODES = (False, "cls", "box_head")

PRESETS["resnet50_fpn"] = dict(PRESETS["resnet18_fpn"])


# ----------------------------------------------------------------------------------------------------------------
# RoI heads
# ----------------------------------------------------------------------------------------------------------------
def _nms_per_class(boxes: Tensor, scores: Tensor, labels: Tensor, iou: float) -> Tensor:
    """torchvision's ``batched_nms`` as it runs above its size limit: ``nms`` class by class, the kept indices by
    score (its offset-per-class shortcut below the limit rounds large coordinates, so a prefix must not take it)."""
    keep = torch.zeros_like(scores, dtype=torch.bool)
    for c in torch.unique(labels):
        idx = torch.where(labels == c)[0]
        keep[idx[box_ops.nms(boxes[idx], scores[idx], iou)]] = True
    kept = torch.where(keep)[0]
    return kept[scores[kept].sort(descending=True)[1]]


def batched_nms_top(boxes: Tensor, scores: Tensor, labels: Tensor, iou: float, top: int) -> Tensor:
    """``torchvision.ops.batched_nms(boxes, scores, labels, iou)[:top]``, run on the best candidates first.

    Greedy NMS keeps or drops a box by the higher-scored boxes of its own class only, so NMS over the k best
    candidates keeps exactly the full run's kept boxes among them; once that keeps ``top`` or more, they are the
    full run's ``top`` best (up to the order of equal scores). With LVIS's score threshold (1e-4) an image of a
    few hundred classes has ~10k candidates and torchvision's per-class loop is most of the inference time; k
    starts at 4 x ``top`` and grows 4-fold until it decides, or is every candidate. Only where torchvision itself
    loops over the classes (over 4,000 coordinates on a CPU, 20,000 on a GPU); below, it runs as is."""
    k = 4 * top
    limit = 4000 if boxes.device.type == "cpu" else 20000
    if top > 0 and scores.numel() > k and boxes.numel() > limit:
        order = scores.argsort(descending=True, stable=True)
        while k < order.numel():
            best = order[:k]
            keep = _nms_per_class(boxes[best], scores[best], labels[best], iou)
            if keep.numel() >= top:
                return best[keep[:top]]
            k *= 4
    return box_ops.batched_nms(boxes, scores, labels, iou)[:top]


class MultiLabelRoIHeads(RoIHeads):
    """torchvision ``RoIHeads`` (box branch only) with multi-hot classification targets and a pluggable loss.

    Args (beyond ``RoIHeads``'s):
        cls_loss: a module with ``forward(logits[N,K], targets[N,K]) -> scalar`` and ``scores(logits) -> [N,K]``;
            one with ``one_label = True`` gets each RoI's primary label (int64 [N], 0 = background) instead of the
            multi-hot rows (``lt_models.losses.registry``).
        box_reg_labels: ``"primary"`` (regress in the channel of ``target["labels"]``, default) or ``"all"``
            (every label of the object's multi-hot row gets the same regression target).

    Targets: each dict needs ``boxes`` [n,4] xyxy float, ``labels`` int64 [n] (primary label, 1..C) and optionally
    ``multi_hot`` float [n,K]; without it the one-hot of ``labels`` is used (single-label data).
    """

    box_predictor: FastRCNNPredictor
    cls_loss: nn.Module

    def __init__(self, *args, cls_loss: nn.Module, box_reg_labels: str = "primary", **kwargs):
        super().__init__(*args, **kwargs)
        if box_reg_labels not in ("primary", "all"):
            raise ConfigError(f"box_reg_labels must be 'primary' or 'all', got {box_reg_labels!r}")
        self.cls_loss = cls_loss
        self.box_reg_labels = box_reg_labels

    def _multi_hot(self, target: dict, num_columns: int) -> torch.Tensor:
        labels = target["labels"]
        if "multi_hot" not in target:
            return F.one_hot(labels, num_columns).to(torch.float32)
        mh = target["multi_hot"]
        if mh.dim() != 2 or mh.shape[0] != labels.shape[0] or mh.shape[1] != num_columns:
            raise ValueError(
                f"target['multi_hot'] must be [n_objects={labels.shape[0]}, K={num_columns}] "
                f"(K = num_classes + 1, column 0 background), got {list(mh.shape)}"
            )
        if labels.numel() and not bool((mh.gather(1, labels[:, None]) > 0).all()):
            raise ValueError("target['multi_hot'] must have a 1 at each object's primary label target['labels']")
        return mh.to(torch.float32)

    def select_multilabel_training_samples(self, proposals, targets, num_columns: int):
        """torchvision's sampling (``select_training_samples``) plus the multi-hot row of every sampled RoI.

        Returns proposals, primary labels (0 = background), regression targets and multi-hot targets, per image.
        """
        proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
        multi_hot = []
        for t, idx, lab in zip(targets, matched_idxs, labels):
            mh = self._multi_hot(t, num_columns)
            if mh.shape[0] == 0:
                rows = mh.new_zeros((idx.shape[0], num_columns))
            else:
                rows = mh[idx].clone()
            bg = lab == 0
            rows[bg] = 0.0
            rows[bg, 0] = 1.0
            multi_hot.append(rows)
        return proposals, labels, regression_targets, multi_hot

    def box_regression_loss(self, box_regression, labels, regression_targets, multi_hot) -> torch.Tensor:
        """torchvision's ``fastrcnn_loss`` box term: smooth-L1 (beta 1/9) of the class-specific deltas, summed over
        the regressed (RoI, class) pairs and divided by the number of sampled RoIs. The pairs are (foreground RoI,
        primary label) for ``box_reg_labels="primary"``; (foreground RoI, each label of its object) for "all"."""
        labels = torch.cat(labels)
        reg_t = torch.cat(regression_targets)
        if self.box_reg_labels == "primary":
            roi = torch.where(labels > 0)[0]
            cls = labels[roi]
        else:
            mh = torch.cat(multi_hot)
            mh = mh * (labels > 0)[:, None]
            mh[:, 0] = 0
            roi, cls = torch.nonzero(mh > 0, as_tuple=True)
        box_regression = box_regression.reshape(box_regression.shape[0], -1, 4)
        loss = F.smooth_l1_loss(box_regression[roi, cls], reg_t[roi], beta=1 / 9, reduction="sum")
        return loss / labels.numel()

    def postprocess_detections(self, class_logits, box_regression, proposals, image_shapes):
        """torchvision's post-processing with scores from ``cls_loss.scores`` instead of a hard-coded softmax."""
        device = class_logits.device
        num_classes = class_logits.shape[-1]
        boxes_per_image = [p.shape[0] for p in proposals]
        pred_boxes = self.box_coder.decode(box_regression, proposals)
        pred_scores = self.cls_loss.scores(class_logits.float())

        all_boxes, all_scores, all_labels = [], [], []
        for boxes, scores, image_shape in zip(
            pred_boxes.split(boxes_per_image, 0), pred_scores.split(boxes_per_image, 0), image_shapes
        ):
            boxes = box_ops.clip_boxes_to_image(boxes, image_shape)
            labels = torch.arange(num_classes, device=device).view(1, -1).expand_as(scores)
            boxes, scores, labels = boxes[:, 1:].reshape(-1, 4), scores[:, 1:].reshape(-1), labels[:, 1:].reshape(-1)
            inds = torch.where(scores > self.score_thresh)[0]
            boxes, scores, labels = boxes[inds], scores[inds], labels[inds]
            keep = box_ops.remove_small_boxes(boxes, min_size=1e-2)
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = batched_nms_top(boxes, scores, labels, self.nms_thresh, self.detections_per_img)
            all_boxes.append(boxes[keep])
            all_scores.append(scores[keep])
            all_labels.append(labels[keep])
        return all_boxes, all_scores, all_labels

    def forward(self, features, proposals, image_shapes, targets=None):
        if self.has_mask() or self.has_keypoint():
            raise NotImplementedError("MultiLabelRoIHeads implements the box branch only")
        num_columns = self.box_predictor.cls_score.out_features
        if self.training:
            if targets is None:
                raise ValueError("targets are required in training mode")
            proposals, labels, regression_targets, multi_hot = self.select_multilabel_training_samples(
                proposals, targets, num_columns
            )

        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)

        if self.training:
            # a one-label loss (conventional softmax, seesaw) trains each RoI on its primary label only
            cls_targets = torch.cat(labels) if getattr(self.cls_loss, "one_label", False) else torch.cat(multi_hot)
            losses = {
                "loss_classifier": self.cls_loss(class_logits.float(), cls_targets),
                "loss_box_reg": self.box_regression_loss(box_regression.float(), labels, regression_targets, multi_hot),
            }
            return [], losses
        boxes, scores, labels = self.postprocess_detections(class_logits, box_regression, proposals, image_shapes)
        return [{"boxes": b, "labels": l, "scores": s} for b, l, s in zip(boxes, labels, scores)], {}


# ----------------------------------------------------------------------------------------------------------------
# The detector
# ----------------------------------------------------------------------------------------------------------------
class LTFasterRCNN(FasterRCNN):
    """A torchvision ``FasterRCNN`` that remembers its decoupled mode and keeps frozen BatchNorm layers in eval
    mode under ``train()`` (their running statistics are part of the frozen representation)."""

    decoupled: str | bool = False
    roi_heads: MultiLabelRoIHeads  # build_detector replaces torchvision's RoIHeads

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.decoupled:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(
                    p.requires_grad for p in m.parameters(recurse=False)
                ):
                    m.eval()
        return self


def set_decoupled(model: LTFasterRCNN, mode: str | bool) -> LTFasterRCNN:
    """Freeze a detector for the decoupled second stage (ACSL paper §4.2).

    ``"cls"``: only ``roi_heads.box_predictor.cls_score`` trains. ``"box_head"``: the RoI box head and the whole
    box predictor (classifier + regressor) train. ``False``: everything trains. Returns the model.
    """
    if mode is True:
        mode = "cls"
    if mode not in DECOUPLED_MODES:
        raise ConfigError(f"decoupled must be one of false, 'cls', 'box_head'; got {mode!r}")
    prefixes: tuple[str, ...]
    if mode == "cls":
        prefixes = ("roi_heads.box_predictor.cls_score.",)
    elif mode == "box_head":
        prefixes = ("roi_heads.box_head.", "roi_heads.box_predictor.")
    else:
        prefixes = ("",)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(prefixes))
    model.decoupled = mode
    model.train(model.training)
    return model


def build_detector(
    num_classes: int,
    backbone: str = "tiny",
    cls_loss: nn.Module | None = None,
    image_size: int | None = None,
    weights: str | Path | None = None,
    decoupled: str | bool = False,
    *,
    norm: str | None = None,
    box_reg_labels: str = "primary",
    score_thresh: float = 1e-4,
    detections_per_img: int = 300,
    **overrides,
) -> LTFasterRCNN:
    """Build a Faster R-CNN for ``num_classes`` foreground classes (K = num_classes + 1 logits, column 0 background).

    Args:
        num_classes: C, the number of foreground classes.
        backbone: ``tiny`` | ``resnet18_fpn`` | ``resnet50_fpn``.
        cls_loss: the classification loss module (``LossSpec.build(...)``: its ``forward`` trains the classifier on
            multi-hot rows, its ``scores`` score detections); default conventional softmax CE.
        image_size: shorter input edge; default 128 for tiny, 800 for the ResNet presets. The longer edge is
            capped at ``image_size * 1333 / 800``.
        weights: optional local backbone state dict (loaded with ``torch.load(weights_only=True)``); never
            downloads. ResNet weights are usually ImageNet classification weights (then ``norm`` defaults to
            ``frozen_bn``, as torchvision does for pretrained backbones).
        decoupled: False | "cls" | "box_head" (see ``set_decoupled``).
        norm: ``bn`` (trainable BatchNorm; default from scratch) or ``frozen_bn``.
        box_reg_labels: ``primary`` (default) or ``all``: which class channels regress a multi-label object's box.
        score_thresh / detections_per_img: inference filtering (LVIS practice: 1e-4 and 300).
        **overrides: any other ``torchvision FasterRCNN`` keyword (e.g. ``rpn_post_nms_top_n_test``).
    """
    check_backbone(backbone)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive int, got {num_classes!r}")
    preset = dict(PRESETS[backbone])
    image_size = int(image_size or preset.pop("image_size"))
    preset.pop("image_size", None)
    fpn_channels = preset.pop("fpn_channels")
    representation_size = preset.pop("representation_size")
    sampling_ratio = preset.pop("sampling_ratio")
    if norm is None:
        norm = "frozen_bn" if (weights is not None and backbone != "tiny") else "bn"

    body = build_backbone(backbone, weights, fpn_channels, norm)
    anchor_gen, roi_pool = _anchors_and_pool(backbone, image_size, sampling_ratio)
    box_head = TwoMLPHead(fpn_channels * 7 * 7, representation_size)
    box_predictor = FastRCNNPredictor(representation_size, num_classes + 1)

    kwargs = dict(
        preset,
        min_size=image_size,
        max_size=round(image_size * 1333 / 800),
        rpn_anchor_generator=anchor_gen,
        box_roi_pool=roi_pool,
        box_head=box_head,
        box_predictor=box_predictor,
        box_score_thresh=score_thresh,
        box_detections_per_img=detections_per_img,
    )
    kwargs.update(overrides)
    model = LTFasterRCNN(body, num_classes=None, **kwargs)

    if cls_loss is None:
        cls_loss = build_loss("softmax")
    model.roi_heads = _multilabel_heads(model.roi_heads, kwargs, cls_loss, box_reg_labels)
    model.num_classes = num_classes
    model.backbone_name = backbone
    set_decoupled(model, decoupled)
    return model


def _anchors_and_pool(backbone: str, image_size: int, sampling_ratio: int):
    """The anchor generator and the RoIAlign pooler of a backbone at ``image_size``."""
    scale = image_size / 800.0
    anchor_sizes: tuple[tuple[int, ...], ...]
    if backbone == "tiny":
        # strides 8, 16, 32, 64 (max-pool level) at 128 px: two sizes per level cover objects of ~8 to ~128 px
        anchor_sizes = ((8, 16), (24, 32), (48, 64), (96, 128))
        featmaps = ["0", "1", "2"]
    else:
        anchor_sizes = tuple((round(s * scale),) for s in (32, 64, 128, 256, 512))
        featmaps = ["0", "1", "2", "3"]
    anchor_gen = AnchorGenerator(anchor_sizes, ((0.5, 1.0, 2.0),) * len(anchor_sizes))
    # The canonical RoI-to-level mapping (224 px -> level 4) is defined at 800 px; scale it with the input size.
    roi_pool = GridRoIAlign(
        featmaps, output_size=7, sampling_ratio=sampling_ratio, canonical_scale=max(1, round(224 * scale))
    )
    return anchor_gen, roi_pool


def _multilabel_heads(old: RoIHeads, kwargs: dict, cls_loss: nn.Module, box_reg_labels: str) -> MultiLabelRoIHeads:
    """torchvision's RoI heads of ``old`` (the same pooler, box head and predictor) as ``MultiLabelRoIHeads``."""
    return MultiLabelRoIHeads(
        old.box_roi_pool,
        old.box_head,
        old.box_predictor,
        kwargs.get("box_fg_iou_thresh", 0.5),
        kwargs.get("box_bg_iou_thresh", 0.5),
        kwargs["box_batch_size_per_image"],
        kwargs.get("box_positive_fraction", 0.25),
        kwargs.get("bbox_reg_weights"),
        old.score_thresh,
        old.nms_thresh,
        old.detections_per_img,
        cls_loss=cls_loss,
        box_reg_labels=box_reg_labels,
    )
