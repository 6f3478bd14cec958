"""Prediction and scoring of a detector on the validation set: COCO-format detections, then LVIS AP
(``lt_models.evaluation.evaluate_lvis``) or the Open Images challenge AP@0.5 (``evaluate_openimages``)."""

from __future__ import annotations

from typing import cast

import torch
from tqdm.auto import tqdm

import lt_models.engine.distributed as distributed
from lt_models.engine.build import progress_enabled
from lt_models.evaluation import evaluate_lvis, evaluate_openimages


@torch.inference_mode()
def predict(model, data_loader, device, label_to_cat_id, *, progress: bool | None = None) -> list[dict]:
    """Run the detector over ``data_loader`` and return COCO-format results
    ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` in the loader's image coordinates
    (the detector's transform maps boxes back to each input image's size). ``label_to_cat_id[l]`` maps the
    contiguous label ``l`` (1..C) to the dataset's category id."""
    model.eval()
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
    validation images recomputes AP from; it is not sent to the other ranks."""
    preds = predict(model, val_loader, device, val_ds.label_to_cat_id, progress=progress)
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
        return res

    return {**distributed.on_rank0(score, world_size), **held}
