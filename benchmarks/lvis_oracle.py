"""Compatibility shim that runs lvis-api (PyPI ``lvis`` 0.5.3) on current numpy.

lvis-api is the reference implementation of LVIS AP. ltsweep keeps it as the oracle in tests and as the
anchor in ``benchmarks/bench_eval.py``. Its ``LVISEval.accumulate`` still calls ``np.float``, which numpy
removed in 1.24, so ``LVISEval.run()`` raises ``AttributeError`` on numpy 2.x.

The shim does not change numpy or any other module. It gives ``lvis.eval`` its own numpy proxy object,
which forwards every attribute to the real numpy and adds back ``float`` (the builtin, which is what
``np.float`` always was). It also offers three conveniences:

- ``lvis_from_dict(gt)`` builds an ``LVIS`` object from an in-memory dataset dict. ``LVIS()`` only accepts
  a path.
- ``lvis_api_evaluate(gt, detections)`` runs the whole ``LVISEval`` pipeline for boxes and returns the
  summary plus per-class AP. It deep-copies its inputs, because lvis-api writes ``area``, ``id``,
  ``segmentation`` and ``ignore`` into the dicts it is given.
- ``make_case(seed, ...)`` generates a small seeded LVIS-style case that holds the edge cases on which evaluators
  differ from lvis-api (zero-area detections, ``ignore`` flags, score ties, ...). The tests compare against the
  oracle on it, and ``bench_eval.py`` checks the other evaluators on it.

Per-class AP is not an lvis-api output. Here it is the mean of ``eval["precision"][:, :, k, 0]`` over the
10 IoU thresholds and 101 recall thresholds, or -1 when the category has no ground truth, which is how
detectron2 reports per-category LVIS AP.
"""

from __future__ import annotations

import copy
import json
import logging
import types
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lvis.eval as _lvis_eval
import numpy as np
from lvis import LVIS, LVISEval, LVISResults

__all__ = ["patch_lvis_numpy", "lvis_from_dict", "lvis_api_evaluate", "make_case"]


class _NumpyWithFloat(types.ModuleType):
    """numpy as lvis 0.5.3 expects it: every numpy attribute, plus the removed alias ``float``."""

    float = float  # np.float was an alias of the builtin float (deprecated in 1.20, removed in 1.24)

    def __init__(self) -> None:
        super().__init__("numpy")

    def __getattr__(self, name: str) -> Any:
        return getattr(np, name)


def patch_lvis_numpy() -> None:
    """Give ``lvis.eval`` a numpy that still has ``np.float``. Idempotent; numpy itself is untouched."""
    if not hasattr(_lvis_eval.np, "float"):
        _lvis_eval.np = _NumpyWithFloat()


patch_lvis_numpy()


def lvis_from_dict(gt: Mapping[str, Any]) -> LVIS:
    """An ``lvis.LVIS`` built from a dataset dict (a deep copy; ``LVIS()`` itself only reads paths)."""
    obj = LVIS.__new__(LVIS)
    obj.logger = logging.getLogger("lvis.lvis")
    obj.dataset = copy.deepcopy(dict(gt))
    obj._create_index()
    return obj


def lvis_api_evaluate(
    gt: str | Path | Mapping[str, Any],
    detections: Sequence[Mapping[str, Any]],
    frequency: Mapping[int, str] | Sequence[str] | None = None,
    max_dets: int = 300,
    return_eval: bool = False,
):
    """Run lvis-api's ``LVISEval`` (``iou_type="bbox"``) and return its results plus ``per_class``.

    ``frequency`` overrides each category's ``frequency`` field, given as {cat_id: 'r'|'c'|'f'} or as a list
    aligned with the sorted category ids. With ``return_eval=True`` the ``LVISEval`` object comes back too,
    as ``(results, lvis_eval)``.
    """
    if isinstance(gt, (str, Path)):
        with open(gt) as f:
            gt = json.load(f)
    gt = copy.deepcopy(dict(gt))
    if frequency is not None:
        cat_ids = sorted(c["id"] for c in gt["categories"])
        fmap = dict(frequency) if isinstance(frequency, Mapping) else dict(zip(cat_ids, frequency))
        for c in gt["categories"]:
            c["frequency"] = fmap[c["id"]]
    if len(detections) == 0:
        raise ValueError("lvis-api cannot evaluate an empty detection list (LVISResults reads results[0])")
    lvis_gt = lvis_from_dict(gt)
    with warnings.catch_warnings():  # lvis 0.5.3 calls the deprecated Logger.warn
        warnings.simplefilter("ignore", DeprecationWarning)
        lvis_dt = LVISResults(lvis_gt, copy.deepcopy(list(detections)), max_dets=max_dets)
        ev = LVISEval(lvis_gt, lvis_dt, iou_type="bbox")
        ev.run()
    res: dict[str, Any] = {k: float(v) for k, v in ev.get_results().items()}
    prec = ev.eval["precision"]
    per_class = {}
    for k, cat_id in enumerate(ev.params.cat_ids):
        p = prec[:, :, k, 0]
        p = p[p > -1]
        per_class[int(cat_id)] = float(np.mean(p)) if p.size else -1.0
    res["per_class"] = per_class
    return (res, ev) if return_eval else res


def make_case(
    seed=0,
    n_img=60,
    n_cat=25,
    max_obj=12,
    dets_per_img=(0, 60),
    freq=None,
    score_decimals=2,
    area_field="box",
    with_ignore=True,
    first_ann_id=1,
):
    """A random LVIS-style ground-truth dict and COCO-results detections that hold the cases where evaluators
    tend to differ from lvis-api: non-contiguous category ids (5, 8, 11, ...), federated fields (neg_category_ids,
    not_exhaustive_category_ids), several detections per object, exact copies of gt boxes (IoU 1), zero-area
    detections (about 1%; lvis-api drops them), objects of every area range, overlapping neighbours, ``ignore``
    flags on about 5% of gt boxes (``with_ignore``), ``area`` fields that differ from the box area
    (``area_field="mask"``), scores rounded to ``score_decimals`` (ties), images without detections (about 10%),
    and empty frequency buckets (``freq``). The detections come shuffled. ``first_ann_id`` is the first annotation
    id (0 shows an lvis-api quirk: a match to gt id 0 counts as a false positive there). Shared by the tests
    (test_evaluation and others) and ``benchmarks/bench_eval.py``'s edge-case check."""
    rng = np.random.default_rng(seed)
    cat_ids = [5 + 3 * k for k in range(n_cat)]
    freq = freq or [["r", "c", "f"][k % 3] for k in range(n_cat)]
    cats = [
        {"id": c, "name": f"cat{c}", "frequency": f, "image_count": 3 + 40 * (n_cat - k)}
        for k, (c, f) in enumerate(zip(cat_ids, freq))
    ]
    p = 1.0 / (np.arange(n_cat) + 1.0)
    p /= p.sum()
    images, anns, dets = [], [], []
    aid = first_ann_id
    for i in range(n_img):
        img_id = 1000 + 7 * i
        W, H = 640, 480
        img_gts, present = [], set()
        for _ in range(int(rng.integers(0, max_obj + 1))):
            c = int(rng.choice(cat_ids, p=p))
            s = float(rng.choice([12, 24, 40, 70, 120, 200]))  # small, medium and large objects
            w, h = (float(np.round(s * rng.uniform(0.6, 1.4), 1)) for _ in range(2))
            x, y = float(np.round(rng.uniform(0, W - w), 1)), float(np.round(rng.uniform(0, H - h), 1))
            if rng.random() < 0.1 and img_gts:  # an overlapping neighbour
                x, y, w, h = img_gts[-1]["bbox"]
                x += 2.0
            area = w * h if area_field == "box" else float(np.round(w * h * rng.uniform(0.5, 1.0), 2))
            a = {"id": aid, "image_id": img_id, "category_id": c, "bbox": [x, y, w, h], "area": area}
            if with_ignore and rng.random() < 0.05:
                a["ignore"] = 1
            aid += 1
            anns.append(a)
            img_gts.append(a)
            present.add(c)
        absent = [c for c in cat_ids if c not in present]
        neg = sorted(rng.choice(absent, size=min(len(absent), int(rng.integers(0, 6))), replace=False).tolist())
        nel = sorted(c for c in present if rng.random() < 0.2)
        images.append(
            {"id": img_id, "width": W, "height": H, "neg_category_ids": neg, "not_exhaustive_category_ids": nel}
        )
        if rng.random() < 0.1:
            continue  # an image without detections
        for _ in range(int(rng.integers(dets_per_img[0], dets_per_img[1] + 1))):
            if rng.random() < 0.55 and img_gts:  # near an object, usually with its class
                gtb = img_gts[int(rng.integers(len(img_gts)))]
                x, y, w, h = gtb["bbox"]
                j = rng.normal(0, 0.08, 4) * [w, h, w, h]
                box = [x + j[0], y + j[1], max(w + j[2], 0.5), max(h + j[3], 0.5)]
                c = gtb["category_id"] if rng.random() < 0.8 else int(rng.choice(cat_ids))
                if rng.random() < 0.05:
                    box = list(gtb["bbox"])  # IoU exactly 1
            else:  # background, often on a verified-negative class
                c = int(rng.choice(neg)) if (neg and rng.random() < 0.5) else int(rng.choice(cat_ids))
                s = float(rng.choice([10, 30, 60, 150]))
                box = [
                    rng.uniform(0, W - s),
                    rng.uniform(0, H - s),
                    s * rng.uniform(0.5, 1.5),
                    s * rng.uniform(0.5, 1.5),
                ]
            if rng.random() < 0.01:
                box[2] = 0.0  # zero area: lvis-api drops it
            dets.append(
                {
                    "image_id": img_id,
                    "category_id": c,
                    "bbox": [float(v) for v in box],
                    "score": float(np.round(rng.random(), score_decimals)),
                }
            )
    dets = [dets[k] for k in rng.permutation(len(dets))]
    return {"images": images, "annotations": anns, "categories": cats}, dets
