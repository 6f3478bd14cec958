"""A trained detector back from an ltsweep checkpoint directory, for inference outside the training loop (the
registered best model of a sweep, `pipelines.tracking.best_model`).

A checkpoint directory holds ``checkpoint.pt`` and the ``spec.json`` of the run that wrote it. The detector is
rebuilt exactly as the engine built it (backbone, image size, box-regression rule and the classification loss,
whose ``scores`` score the detections: eq 5 of concurrent softmax needs r_ij from the training annotations), then
the checkpoint's weights are loaded. The backbone weights file is not needed again: the checkpoint holds every
weight, and only the BatchNorm kind it implied is kept.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from lt_models.data.datasets import LVISDetection
from lt_models.engine.build import build_run_loss
from lt_models.engine.checkpoint import load_model_weights
from lt_models.engine.spec import TrainSpec
from lt_models.errors import ConfigError
from lt_models.modeling.detector import build_detector


def load_detector(checkpoint_dir: str | Path, shared: dict | None = None) -> tuple[torch.nn.Module, list[int]]:
    """The detector of ``checkpoint_dir`` in eval mode, on the CPU, and ``label_to_cat_id`` (contiguous label l ->
    the dataset's category id; index 0 is the background). ``shared``: the engine's shared loss inputs, if at hand."""
    d = Path(checkpoint_dir)
    spec = checkpoint_spec(d)
    train_ds = LVISDetection(
        spec.train_ann,
        spec.train_image_dir,
        hierarchy_file=spec.hierarchy_file,
        expand_parents=spec.expand_parents,
        train=True,
        skip_invalid=spec.skip_invalid,
    )
    return detector_from(d, spec, train_ds, shared).eval(), list(train_ds.label_to_cat_id)


def checkpoint_spec(checkpoint_dir: str | Path) -> TrainSpec:
    """The ``TrainSpec`` of the run that wrote ``checkpoint_dir`` (its ``spec.json``)."""
    d = Path(checkpoint_dir)
    if not (d / "spec.json").is_file():
        raise ConfigError(f"{str(d)!r} is not an ltsweep checkpoint directory (no spec.json beside checkpoint.pt)")
    return TrainSpec.from_dict(json.loads((d / "spec.json").read_text()))


def detector_from(checkpoint_dir: str | Path, spec: TrainSpec, train_ds, shared: dict | None = None) -> torch.nn.Module:
    """The detector ``spec`` describes (its loss's ``scores`` score the detections), with ``checkpoint_dir``'s
    weights; ``train_ds``: the run's training set (class count, r_ij and frequencies of the loss)."""
    norm = "frozen_bn" if (spec.weights is not None and spec.backbone != "tiny") else "bn"
    model = build_detector(
        train_ds.num_classes,
        spec.backbone,
        build_run_loss(spec, train_ds, shared),
        image_size=spec.image_size,
        norm=norm,
        box_reg_labels=spec.box_reg_labels,
    )
    load_model_weights(Path(checkpoint_dir), model)
    return model


def image_tensor(image: np.ndarray) -> torch.Tensor:
    """An H x W x 3 image (uint8 0-255, or float 0-1) as the detector's C x H x W float tensor."""
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ConfigError(f"an image must be an H x W x 3 array (RGB), got shape {a.shape}")
    t = torch.from_numpy(np.array(a, copy=True)).permute(2, 0, 1)  # a copy: the input may be read-only
    return t.float() / 255.0 if a.dtype == np.uint8 else t.float()


@torch.no_grad()
def detect(model: torch.nn.Module, label_to_cat_id: list[int], image: np.ndarray) -> dict[str, np.ndarray]:
    """Detections on one image: ``boxes`` [n, 4] (x1, y1, x2, y2 in the image's pixels), ``category_ids`` [n] and
    ``scores`` [n], best first."""
    out = model([image_tensor(image)])[0]
    labels = out["labels"].cpu().numpy()
    return {
        "boxes": out["boxes"].float().cpu().numpy(),
        "category_ids": np.asarray(label_to_cat_id, dtype=np.int64)[labels],
        "scores": out["scores"].float().cpu().numpy(),
    }
