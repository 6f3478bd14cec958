"""Prediction and scoring of a detector on the validation set: COCO-format detections, then LVIS AP
(``lt_models.evaluation.evaluate_lvis``) with AP-fixed, AP-pool and the calibration of the scores
(``lt_models.evaluation.large_vocab``, ``calibration``), or the Open Images challenge AP@0.5
(``evaluate_openimages``)."""

from __future__ import annotations

from typing import cast

import torch
from tqdm.auto import tqdm

import lt_models.engine.distributed as distributed
from lt_models.engine.build import progress_enabled
from lt_models.evaluation import evaluate_lvis, evaluate_openimages
from lt_models.evaluation.calibration import calibration
from lt_models.evaluation.large_vocab import PREDICT_DETS_PER_IMAGE, evaluate_fixed
from lt_models.evaluation.tide import tide_errors, tide_metrics


@torch.inference_mode()
def predict(
    model, data_loader, device, label_to_cat_id, *, progress: bool | None = None, dets_per_image: int | None = None
) -> list[dict]:
    """Run the detector over ``data_loader`` and return COCO-format results
    ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` in the loader's image coordinates
    (the detector's transform maps boxes back to each input image's size). ``label_to_cat_id[l]`` maps the
    contiguous label ``l`` (1..C) to the dataset's category id. ``dets_per_image``: keep up to this many
    detections per image in this pass (default: the detector's own cap)."""
    model.eval()
    heads = getattr(model, "module", model).roi_heads
    cap = heads.detections_per_img
    heads.detections_per_img = dets_per_image or cap
    try:
        return _predict(model, data_loader, device, label_to_cat_id, progress)
    finally:
        heads.detections_per_img = cap


def _predict(model, data_loader, device, label_to_cat_id, progress: bool | None) -> list[dict]:
    results: list[dict] = []
    for images, targets in tqdm(data_loader, desc="predict", disable=not progress_enabled(progress), leave=False):
        images = [img.to(device, non_blocking=True) for img in images]
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=device.type == "cuda"):
            outputs = model(images)
        for out, t in zip(outputs, targets):
            image_id = int(t["image_id"])
            boxes = out["boxes"].float().cpu()
            if boxes.numel() == 0:
                continue
            xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
            for box, label, score in zip(xywh, out["labels"].tolist(), out["scores"].float().cpu().tolist()):
                results.append(
                    {
                        "image_id": image_id,
                        "category_id": int(label_to_cat_id[label]),
                        "bbox": [round(c, 2) for c in box],
                        "score": round(score, 5),
                    }
                )
    return results


def evaluate(
    model,
    val_loader,
    val_ds,
    val_ann,
    device,
    progress=None,
    frequency=None,
    metric: str = "lvis",
    hierarchy: str | None = None,
    world_size: int = 1,
    keep_matches: bool = False,
) -> dict:
    """Predict on the validation loader and score with ``lt_models.evaluation.evaluate_lvis`` (``metric="lvis"``)
    or ``evaluate_openimages`` (``"openimages"``: the challenge AP@0.5 with the class ``hierarchy``, reported as
    both AP and AP50). ``frequency`` ({category id: 'r'/'c'/'f'}) overrides the validation file's buckets;
    ``train`` passes the training set's, so APr/APc/APf always bucket classes by their training frequency.
    With ``world_size`` > 1 every rank predicts its share of the batches (``build.val_loader``), rank 0 scores all
    detections in single-process order and every rank returns its metrics. ``keep_matches`` (LVIS AP): rank 0's
    result also holds ``matches``, the matching (``lt_models.evaluation.matches.Matches``) that the bootstrap over
    validation images recomputes AP from; it is not sent to the other ranks.

    LVIS AP comes with AP-fixed and AP-pool (``lt_models.evaluation.large_vocab``), the calibration of the scores
    per bucket (``ECE``, ``ECEr`` … and ``reliability``, ``lt_models.evaluation.calibration``) and TIDE's error
    breakdown per bucket (``dAP_Cls``, ``dAP_Cls_r`` …, ``lt_models.evaluation.tide``). The pass
    keeps up to ``PREDICT_DETS_PER_IMAGE`` detections per image so that AP-fixed sees more than LVIS AP's 300; LVIS
    AP itself keeps the 300 best per image, which are the detector's own 300."""
    dets_per_image = PREDICT_DETS_PER_IMAGE if metric == "lvis" else None
    preds = predict(model, val_loader, device, val_ds.label_to_cat_id, progress=progress, dets_per_image=dets_per_image)
    dets: list[dict] | None = preds  # None on the ranks > 0 after the gather
    if world_size > 1:
        position = {int(i): k for k, i in enumerate(val_ds.image_ids)}
        dets = distributed.gather_in_order(preds, lambda d: position[d["image_id"]], world_size)

    held: dict = {}

    def score() -> dict:
        assert dets is not None  # score runs on rank 0 only, which holds the gathered detections
        if metric == "openimages":
            # TrainSpec requires hierarchy_file for "openimages"; a None here fails inside evaluate_openimages as before
            return evaluate_openimages(val_ann, dets, cast("str", hierarchy), frequency=frequency)
        res = evaluate_lvis(val_ann, dets, frequency=frequency, keep_matches=keep_matches)
        if "matches" in res:
            held["matches"] = res.pop("matches")
        fixed = evaluate_fixed(val_ann, dets, frequency=frequency)
        cal = calibration(fixed.pop("matches_fixed"))
        errors = tide_metrics(tide_errors(val_ann, dets, frequency=frequency))
        return {**res, **fixed, **cal, **errors}

    return {**distributed.on_rank0(score, world_size), **held}
