"""GridRoIAlign (grid_sample) against torchvision's MultiScaleRoIAlign (roi_align), outputs and gradients, and the
detector's prefix NMS against torchvision's batched_nms."""

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops import boxes as box_ops

from lt_models.modeling.detector import batched_nms_top
from lt_models.modeling.roi_pool import GridRoIAlign, roi_align_grid


def _features(n_images: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sizes = {"0": 16, "1": 8, "2": 4}  # strides 8, 16, 32 of a 128 px input
    return {
        k: torch.randn(n_images, 5, s, s, generator=g, dtype=torch.float64, requires_grad=True)
        for k, s in sizes.items()
    }


def _boxes(n_images: int, per_image: list[int], seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in per_image[:n_images]:
        xy = torch.rand(k, 2, generator=g, dtype=torch.float64) * 120
        wh = torch.rand(k, 2, generator=g, dtype=torch.float64) ** 2 * 128 + 0.2  # from sub-pixel to whole-image
        b = torch.cat([xy, (xy + wh).clamp(max=128.0)], dim=1)
        if k >= 3:  # boxes on the image's edges, and the whole image
            b[0] = torch.tensor([0.0, 0.0, 5.0, 128.0])
            b[1] = torch.tensor([120.0, 0.0, 128.0, 128.0])
            b[2] = torch.tensor([0.0, 0.0, 128.0, 128.0])
        out.append(b)
    return out


@pytest.mark.parametrize("sampling_ratio", [1, 2])
@pytest.mark.parametrize("per_image", [[40, 25, 3], [30, 0, 12]])
def test_grid_roi_align_matches_torchvision(sampling_ratio, per_image):
    feats, boxes, shapes = _features(3), _boxes(3, per_image), [(128, 128)] * 3
    names = ["0", "1", "2"]
    ref = MultiScaleRoIAlign(names, 7, sampling_ratio, canonical_scale=36)
    new = GridRoIAlign(names, 7, sampling_ratio, canonical_scale=36)
    a, b = ref(feats, boxes, shapes), new(feats, boxes, shapes)
    assert b.shape == a.shape == (sum(per_image), 5, 7, 7)
    torch.testing.assert_close(b, a, rtol=0, atol=1e-12)
    levels = ref.map_levels(boxes)
    assert len(set(levels.tolist())) == 3  # every level pooled something
    grad_out = torch.randn_like(a)
    ga = torch.autograd.grad(a, list(feats.values()), grad_out)
    gb = torch.autograd.grad(b, list(feats.values()), grad_out)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(y, x, rtol=0, atol=1e-12)


def test_roi_align_grid_one_level_and_out_of_range_samples():
    from torchvision.ops import roi_align

    feat = torch.randn(1, 3, 6, 9, dtype=torch.float64)
    # a box partly outside the feature map (samples beyond -1 read 0, as roi_align's) and a degenerate one
    boxes = torch.tensor(
        [[-20.0, -12.0, 10.0, 30.0], [3.0, 3.0, 3.0, 3.0], [0.0, 0.0, 36.0, 24.0]], dtype=torch.float64
    )
    for ratio in (1, 3):
        want = roi_align(feat, [boxes], 4, spatial_scale=0.25, sampling_ratio=ratio, aligned=False)
        got = roi_align_grid(feat[0], boxes, 4, 0.25, ratio)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert roi_align_grid(feat[0], boxes[:0], 4, 0.25, 1).shape == (0, 3, 4, 4)


def test_grid_roi_align_rejects_an_adaptive_ratio():
    with pytest.raises(ValueError, match="fixed ratio"):
        GridRoIAlign(["0"], 7, 0)


def _candidates(n: int, classes: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 100
    boxes = torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 30 + 1], dim=1)
    scores = torch.randperm(n, generator=g).float() / n + 1e-3  # distinct scores
    labels = torch.randint(0, classes, (n,), generator=g)
    return boxes, scores, labels


@pytest.mark.parametrize(
    "n,classes,top", [(5000, 40, 300), (5000, 3, 300), (800, 30, 1000), (3000, 200, 50), (100, 5, 0)]
)
def test_prefix_nms_equals_batched_nms(n, classes, top):
    boxes, scores, labels = _candidates(n, classes, seed=n + top)
    want = box_ops.batched_nms(boxes, scores, labels, 0.5)[:top]
    got = batched_nms_top(boxes, scores, labels, 0.5, top)
    assert torch.equal(got, want)


def test_prefix_nms_takes_the_per_class_path_that_torchvision_takes_for_the_full_set():
    """Over 4,000 coordinates torchvision runs NMS class by class; below, it offsets each class's boxes by
    class x (largest coordinate + 1), which rounds in float32. Two boxes of class 300 with IoU 0.50025 (one
    suppresses the other at 0.5) become IoU 0.5 once offset (both kept): a 40-box prefix must still decide as the
    1,100-box set does."""
    boxes, scores, labels = _candidates(1100, 30, seed=7)
    boxes[0] = torch.tensor([1000.0, 1000.0, 1001.0, 1001.0])  # the largest coordinate: offsets of 300 x 1002
    boxes[1], boxes[2] = torch.tensor([0.0, 0.0, 10.0, 10.0]), torch.tensor([0.0, 0.0, 10.0, 19.99])
    labels[1] = labels[2] = 300
    scores[0], scores[1], scores[2] = 2.0, 1.9, 1.8  # all three among the best 40
    want = box_ops.batched_nms(boxes, scores, labels, 0.5)[:10]
    assert 1 in want and 2 not in want  # the per-class path suppresses the second box
    best = scores.argsort(descending=True)[:40]
    assert 2 in best[box_ops.batched_nms(boxes[best], scores[best], labels[best], 0.5)]  # the offset path keeps it
    assert torch.equal(batched_nms_top(boxes, scores, labels, 0.5, 10), want)
