"""Detector: multi-hot RoI targets, box regression, loss-driven scores, decoupled freezing, backbones."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.roi_heads import fastrcnn_loss

from lt_models.data.datasets import LVISDetection, collate_detection
from lt_models.engine.build import build_optimizer
from lt_models.engine.loop import train_one_epoch
from lt_models.errors import ConfigError
from lt_models.losses.registry import build_loss
from lt_models.modeling.backbones import TinyBody
from lt_models.modeling.detector import MultiLabelRoIHeads, build_detector, set_decoupled

pytestmark = pytest.mark.usefixtures("one_thread")

# categories: 1 leaf_a, 2 leaf_b, 3 leaf_c, 4 parent (of leaf_a)
CATS = [{"id": i, "name": n, "frequency": "f"} for i, n in enumerate(["leaf_a", "leaf_b", "leaf_c", "parent"], 1)]


def _write_merge_dataset(root) -> str:
    """One 128x128 image: object A annotated leaf_a + parent (identical box), object B annotated leaf_b + leaf_c
    (boxes with IoU > 0.95), object C plain leaf_c."""
    (root / "images").mkdir()
    Image.fromarray(np.full((128, 128, 3), 90, np.uint8)).save(root / "images" / "a.png")
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 30]},
        {"id": 2, "image_id": 1, "category_id": 4, "bbox": [10, 10, 40, 30]},
        {"id": 3, "image_id": 1, "category_id": 2, "bbox": [70, 60, 40, 50]},
        {"id": 4, "image_id": 1, "category_id": 3, "bbox": [70, 60, 40, 49.5]},
        {"id": 5, "image_id": 1, "category_id": 3, "bbox": [15, 80, 30, 30]},
    ]
    for a in anns:
        a["area"] = a["bbox"][2] * a["bbox"][3]
    data = {
        "images": [
            {
                "id": 1,
                "file_name": "a.png",
                "width": 128,
                "height": 128,
                "neg_category_ids": [],
                "not_exhaustive_category_ids": [],
            }
        ],
        "annotations": anns,
        "categories": CATS,
    }
    path = root / "train.json"
    path.write_text(json.dumps(data))
    return str(path)


class Recorder(torch.nn.Module):
    """Wraps a loss and keeps a copy of every (logits, targets) it is called with."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.one_label = getattr(inner, "one_label", False)
        self.calls = []

    def forward(self, logits, targets):
        self.calls.append((logits.detach().clone(), targets.detach().clone()))
        return self.inner(logits, targets)

    def scores(self, logits):
        return self.inner.scores(logits)


def test_build_tiny_is_a_small_fasterrcnn():
    model = build_detector(30)
    assert isinstance(model, FasterRCNN)
    assert isinstance(model.roi_heads, MultiLabelRoIHeads)
    n = sum(p.numel() for p in model.parameters())
    assert 2e6 < n < 8e6, n
    assert model.transform.min_size == (128,) and model.transform.max_size == 213
    assert model.roi_heads.detections_per_img == 300 and model.roi_heads.score_thresh <= 1e-3
    assert model.roi_heads.box_predictor.cls_score.out_features == 31  # K = C + 1, column 0 background
    model.eval()
    with torch.no_grad():
        out = model([torch.rand(3, 128, 128), torch.rand(3, 100, 120)])
    assert len(out) == 2
    for o, (h, w) in zip(out, [(128, 128), (100, 120)]):
        assert len(o["boxes"]) <= 300
        assert o["labels"].min().item() >= 1 if len(o["labels"]) else True
        if len(o["boxes"]):  # boxes are in the input image's coordinates
            assert o["boxes"][:, 2].max() <= w + 1e-3 and o["boxes"][:, 3].max() <= h + 1e-3


def test_multi_hot_targets_reach_the_loss_unchanged(tmp_path):
    ds = LVISDetection(_write_merge_dataset(tmp_path))
    image, target = ds[0]
    rows = {tuple(r.tolist()) for r in target["multi_hot"]}
    expected = {
        (0.0, 1.0, 0.0, 0.0, 1.0),  # leaf_a + parent
        (0.0, 0.0, 1.0, 1.0, 0.0),  # two leaves
        (0.0, 0.0, 0.0, 1.0, 0.0),  # plain leaf_c
    }
    assert rows == expected  # the dataset merged the duplicates

    torch.manual_seed(0)
    model = build_detector(ds.num_classes, cls_loss=build_loss("softmax_multihot"))
    rec = Recorder(model.roi_heads.cls_loss)
    model.roi_heads.cls_loss = rec
    model.train()
    model([image], [target])
    assert len(rec.calls) == 1
    _, y = rec.calls[0]
    assert y.shape == (model.roi_heads.fg_bg_sampler.batch_size_per_image, 5)
    seen = {tuple(r.tolist()) for r in y}
    background = (1.0, 0.0, 0.0, 0.0, 0.0)
    # every RoI row is either background or exactly one object's multi-hot row, and all objects are present
    # (the ground-truth boxes are added to the proposals, so each object has a matching RoI)
    assert seen <= expected | {background}
    assert expected <= seen and background in seen
    assert ((y[:, 0] == 1) == (y[:, 1:].sum(1) == 0)).all()


def test_softmax_trains_a_two_label_roi_on_its_primary_label_only(tmp_path):
    """The default loss (conventional softmax) gets each RoI's primary label, the one box regression uses: a
    two-label object's RoI has exactly the loss and gradient of single-label cross-entropy on that label."""
    ds = LVISDetection(_write_merge_dataset(tmp_path))
    image, target = ds[0]
    assert (target["multi_hot"].sum(1) == 2).sum() == 2  # two objects carry two labels
    torch.manual_seed(0)
    model = build_detector(ds.num_classes)
    assert model.roi_heads.cls_loss.one_label
    rec = Recorder(model.roi_heads.cls_loss)
    model.roi_heads.cls_loss = rec
    model.train()
    losses = model([image], [target])
    ((z, t),) = rec.calls
    assert t.dtype == torch.int64 and t.shape == (z.shape[0],)
    assert set(t.unique().tolist()) == {0} | set(target["labels"].tolist())  # background + the objects' primaries
    assert losses["loss_classifier"].item() == pytest.approx(torch.nn.functional.cross_entropy(z, t).item(), rel=1e-6)
    x = z.double().requires_grad_()
    (grad,) = torch.autograd.grad(build_loss("softmax")(x, t), x)
    expected = torch.softmax(x.detach(), 1)
    expected[torch.arange(len(t)), t] -= 1.0
    torch.testing.assert_close(grad, expected / len(t))


def test_box_regression_uses_primary_label_like_torchvision():
    torch.manual_seed(0)
    model = build_detector(4)
    heads = model.roi_heads
    n, k = 12, 5
    box_regression = torch.randn(n, 4 * k)
    labels = [torch.tensor([0, 1, 4, 0, 2, 3]), torch.tensor([1, 0, 0, 2, 0, 0])]
    reg_t = [torch.randn(6, 4), torch.randn(6, 4)]
    mh = torch.zeros(n, k)
    mh[torch.arange(n), torch.cat(labels)] = 1
    mh[2, 1] = 1  # the RoI with primary label 4 also carries label 1
    mh = list(mh.split(6))
    ours = heads.box_regression_loss(box_regression, labels, reg_t, mh)
    ref = fastrcnn_loss(torch.randn(n, k), box_regression, labels, reg_t)[1]
    torch.testing.assert_close(ours, ref)
    # "all": the extra label adds its own term, same target box
    heads.box_reg_labels = "all"
    extra = (
        torch.nn.functional.smooth_l1_loss(box_regression.view(n, k, 4)[2, 1], reg_t[0][2], beta=1 / 9, reduction="sum")
        / n
    )
    torch.testing.assert_close(heads.box_regression_loss(box_regression, labels, reg_t, mh), ref + extra)


class FixedScores(torch.nn.Module):
    def __init__(self, table):
        super().__init__()
        self.table = table

    def scores(self, logits):
        return self.table


def test_inference_scores_come_from_the_loss():
    model = build_detector(3)
    heads = model.roi_heads
    table = torch.tensor([[0.9, 0.05, 0.7, 0.0], [0.1, 0.3, 0.0, 0.8]])
    heads.cls_loss = FixedScores(table)
    proposals = [torch.tensor([[10.0, 10, 50, 50], [60, 60, 100, 100]])]
    boxes, scores, labels = heads.postprocess_detections(torch.zeros(2, 4), torch.zeros(2, 16), proposals, [(128, 128)])
    got = sorted(zip(scores[0].tolist(), labels[0].tolist()), reverse=True)
    # column 0 (background) never becomes a detection; every foreground score above the threshold does
    assert [label for _, label in got] == [3, 2, 1, 1]
    assert [s for s, _ in got] == pytest.approx([0.8, 0.7, 0.3, 0.05])
    # the real losses: sigmoid for ACSL / BCE, softmax for CE
    logits = torch.randn(5, 4)
    torch.testing.assert_close(
        build_detector(3, cls_loss=build_loss("acsl", xi=0.7)).roi_heads.cls_loss.scores(logits), torch.sigmoid(logits)
    )


def _step_batches(ds, n):
    batch = collate_detection([ds[0]])
    return [batch] * n


@pytest.mark.parametrize("mode", ["cls", "box_head"])
def test_decoupled_step_changes_only_the_classifier(tmp_path, mode):
    ds = LVISDetection(_write_merge_dataset(tmp_path))
    torch.manual_seed(0)
    model = build_detector(ds.num_classes, decoupled=mode)
    allowed = (
        ("roi_heads.box_predictor.cls_score.",)
        if mode == "cls"
        else ("roi_heads.box_head.", "roi_heads.box_predictor.")
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = build_optimizer(model, lr=0.05)
    stats = train_one_epoch(model, opt, _step_batches(ds, 2), torch.device("cpu"), 0, progress=False)
    assert stats["iterations"] == 2
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "nothing trained"
    assert all(k.startswith(allowed) for k in changed), sorted(changed)
    assert "roi_heads.box_predictor.cls_score.weight" in changed
    # frozen BatchNorm layers stayed in eval mode under train(): running stats did not move
    assert not any("running_mean" in k or "running_var" in k for k in changed)
    assert model.training and not model.backbone.body.stem[1].training


def test_decoupled_off_trains_everything(tmp_path):
    ds = LVISDetection(_write_merge_dataset(tmp_path))
    torch.manual_seed(0)
    model = build_detector(ds.num_classes)
    set_decoupled(model, "cls")
    set_decoupled(model, False)
    assert all(p.requires_grad for p in model.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_one_epoch(
        model, build_optimizer(model, lr=0.05), _step_batches(ds, 1), torch.device("cpu"), 0, progress=False
    )
    after = model.state_dict()
    assert not torch.equal(before["backbone.body.stem.0.weight"], after["backbone.body.stem.0.weight"])
    assert not torch.equal(before["backbone.body.stem.1.running_mean"], after["backbone.body.stem.1.running_mean"])


def test_backbone_weights_come_from_a_local_file_only(tmp_path):
    body = TinyBody()
    with torch.no_grad():
        for p in body.parameters():
            p.fill_(0.125)
    path = tmp_path / "tiny_body.pt"
    torch.save(body.state_dict(), path)
    model = build_detector(3, weights=str(path))
    assert torch.all(model.backbone.body.layer1[0].conv1.weight == 0.125)
    partial = {k: v for k, v in body.state_dict().items() if not k.startswith("layer4")}
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(ConfigError, match="layer4"):
        build_detector(3, weights=str(tmp_path / "partial.pt"))
    with pytest.raises(ConfigError, match="does not exist"):
        build_detector(3, weights=str(tmp_path / "missing.pt"))
    torch.save({"unrelated": torch.zeros(3)}, tmp_path / "bad.pt")
    with pytest.raises(ConfigError, match="missing or have another shape"):
        build_detector(3, weights=str(tmp_path / "bad.pt"))


def test_resnet_presets_build_offline_at_paper_scale():
    model = build_detector(5, backbone="resnet18_fpn")
    assert model.transform.min_size == (800,) and model.transform.max_size == 1333
    assert model.roi_heads.fg_bg_sampler.batch_size_per_image == 512
    assert isinstance(model.backbone.body.bn1, torch.nn.BatchNorm2d)  # from scratch: trainable BN
    with pytest.raises(ConfigError, match="unknown backbone"):
        build_detector(5, backbone="vgg")
    with pytest.raises(ConfigError, match="decoupled"):
        build_detector(5, decoupled="everything")
    with pytest.raises(ConfigError, match="unknown loss"):
        build_loss("focal")
