"""A checkpoint evaluated again, outside its training run: other inference scores, several metrics, one pass.

The concurrent-softmax paper's Table 2 crosses the training loss with the inference scores (softmax or concurrent
softmax, eq 5, in training x in testing): the scores need no retraining, only another evaluation of the trained
detector. ``evaluate_checkpoint`` rebuilds the run's datasets (the same validation images, or the same held-out part)
and its detector with the checkpoint's weights, swaps the scores when asked, predicts once, and scores the
detections under each metric: LVIS AP (with the matching, for the bootstrap and for AP over a label set:
``Matches.select``) and the Open Images challenge AP@0.5 with the class hierarchy. Buckets come from the training
counts, as in training. With the run's own scores and thread count it reproduces the run's reported metrics.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from lt_models.engine.build import val_loader
from lt_models.engine.inference import checkpoint_spec, detector_from
from lt_models.engine.run import build_datasets
from lt_models.engine.spec import EVAL_METRICS
from lt_models.engine.validation import predict
from lt_models.errors import ConfigError
from lt_models.evaluation import evaluate_lvis, evaluate_openimages
from lt_models.losses.registry import check_scores


def evaluate_checkpoint(
    checkpoint_dir: str | Path,
    *,
    scores: str | None = None,
    metrics: tuple[str, ...] = ("lvis",),
    expand_detections: bool = False,
    progress: bool | None = None,
) -> dict[str, dict]:
    """{metric: result} of ``checkpoint_dir``'s detector on its run's validation data, on the CPU.

    ``scores``: None (the run's own) or a rule of ``lt_models.losses.registry.SCORES`` (``softmax``,
    ``concurrent``: eq 5 with r_ij of the training data, ``sigmoid``, ``loss``). ``metrics``: any of ``lvis``
    (evaluate_lvis's result with ``matches``) and ``openimages`` (needs the run's hierarchy file; with
    ``expand_detections`` every detection also counts for each ancestor class, so that the hierarchy is expanded
    alike for a loss that predicts one label per box and for one that also predicts the parents)."""
    unknown = [m for m in metrics if m not in EVAL_METRICS]
    if unknown or not metrics:
        raise ConfigError(f"metrics = {list(metrics)!r}: choose among {', '.join(EVAL_METRICS)}")
    spec = checkpoint_spec(checkpoint_dir)
    if scores is not None:
        spec = dataclasses.replace(spec, loss=dataclasses.replace(spec.loss, scores=check_scores(scores)))
    if "openimages" in metrics and not spec.hierarchy_file:
        raise ConfigError(f"{checkpoint_dir}: the run has no hierarchy_file, which the Open Images AP needs")
    train_ds, val_ds, val_ann = build_datasets(spec)
    model = detector_from(checkpoint_dir, spec, train_ds).eval()
    device = torch.device("cpu")
    loader = val_loader(val_ds, spec, device, 0, 1)
    detections = predict(model, loader, device, val_ds.label_to_cat_id, progress=progress)
    buckets = dict(zip(train_ds.cat_ids, train_ds.frequency))
    out: dict[str, dict] = {}
    for metric in metrics:
        if metric == "lvis":
            out[metric] = evaluate_lvis(val_ann, detections, frequency=buckets, keep_matches=True)
        else:
            out[metric] = evaluate_openimages(
                val_ann, detections, str(spec.hierarchy_file), expand_detections=expand_detections, frequency=buckets
            )
    return out
