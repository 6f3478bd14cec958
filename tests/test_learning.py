"""A real learning check: the tiny detector learns the synthetic demo benchmark on a CPU in a couple of minutes.

Frequent-class AP50 is computed with ``evaluate_lvis`` on the val annotations restricted to the categories whose
``frequency`` is 'f' (their annotations and federated negative / not-exhaustive lists) and on the detections of
those categories. LVIS AP is computed per category and then averaged, so this is the mean AP@0.5 over the frequent
categories (the only difference from slicing a full evaluation is that the top-300-per-image cap then counts only
frequent-class detections).
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from lt_models.data.datasets import LVISDetection, collate_detection
from lt_models.data.synthetic.generate import generate_benchmark
from lt_models.engine.checkpoint import load_model_weights
from lt_models.engine.loop import train
from lt_models.engine.spec import TrainSpec
from lt_models.engine.validation import predict
from lt_models.evaluation import evaluate_lvis
from lt_models.modeling.detector import build_detector


def frequent_ap50(gt: dict, detections: list[dict]) -> float:
    keep = {c["id"] for c in gt["categories"] if c["frequency"] == "f"}
    sub = copy.deepcopy(gt)
    sub["categories"] = [c for c in sub["categories"] if c["id"] in keep]
    sub["annotations"] = [a for a in sub["annotations"] if a["category_id"] in keep]
    for img in sub["images"]:
        img["neg_category_ids"] = [c for c in img.get("neg_category_ids", []) if c in keep]
        img["not_exhaustive_category_ids"] = [c for c in img.get("not_exhaustive_category_ids", []) if c in keep]
    return evaluate_lvis(sub, [d for d in detections if d["category_id"] in keep])["AP50"]


@pytest.mark.slow
def test_tiny_detector_learns_the_demo_benchmark(tmp_path, one_thread):
    data = tmp_path / "demo"
    generate_benchmark(data, "demo", seed=0)
    gt = json.loads((data / "val.json").read_text())
    assert sum(c["frequency"] == "f" for c in gt["categories"]) >= 3

    # One thread: the step is small and partly serial (torchvision's CPU RoIAlign backward), and one thread is immune
    # to other processes (Ray daemons, other tests) competing for the cores, which slow OpenMP steps several-fold.
    # stage 1 of the demo schedule, shortened: non-balance + softmax CE, 2 epochs at batch 8 (~126 iterations)
    spec = TrainSpec(
        train_ann=str(data / "train.json"),
        val_ann=str(data / "val.json"),
        backbone="tiny",
        epochs=2,
        batch_size=8,
        lr=0.02,
        warmup=50,
        lr_steps=(),
        eval_every=2,
        seed=0,
        num_threads=1,
        progress=False,
    )
    metrics = train(spec, tmp_path / "run")
    n_train = len(LVISDetection(data / "train.json"))
    assert metrics["epoch"] == 2 and metrics["iteration"] == 2 * math.ceil(n_train / 8)

    val = LVISDetection(data / "val.json", train=False)
    model = build_detector(val.num_classes, "tiny")
    load_model_weights(metrics["checkpoint_dir"], model)
    loader = torch.utils.data.DataLoader(val, batch_size=8, collate_fn=collate_detection)
    dets = predict(model, loader, torch.device("cpu"), val.label_to_cat_id, progress=False)
    ap50_f = frequent_ap50(gt, dets)
    # the restored checkpoint predicts what train() evaluated (both with one thread: the same float sums)
    assert evaluate_lvis(gt, dets)["AP"] == pytest.approx(metrics["AP"], abs=1e-9)
    assert ap50_f >= 0.3, f"frequent-class AP50 {ap50_f:.3f} (overall AP50 {metrics['AP50']:.3f})"
    # an untrained detector is nowhere near: the threshold measures learning
    untrained = predict(
        build_detector(val.num_classes, "tiny"), loader, torch.device("cpu"), val.label_to_cat_id, progress=False
    )
    assert frequent_ap50(gt, untrained) < 0.1
