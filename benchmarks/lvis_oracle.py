"""Compatibility shim that runs lvis-api (PyPI ``lvis`` 0.5.3) on current numpy.

lvis-api is the reference implementation of LVIS AP. ltsweep keeps it as the oracle in tests and as the
anchor in ``benchmarks/bench_eval.py``. Its ``LVISEval.accumulate`` still calls ``np.float``, which numpy
removed in 1.24, so ``LVISEval.run()`` raises ``AttributeError`` on numpy 2.x.

The shim does not change numpy or any other module. It gives ``lvis.eval`` its own numpy proxy object,
which forwards every attribute to the real numpy and adds back ``float`` (the builtin, which is what
``np.float`` always was). It also offers two conveniences:

- ``lvis_from_dict(gt)`` builds an ``LVIS`` object from an in-memory dataset dict. ``LVIS()`` only accepts
  a path.
- ``lvis_api_evaluate(gt, detections)`` runs the whole ``LVISEval`` pipeline for boxes and returns the
  summary plus per-class AP. It deep-copies its inputs, because lvis-api writes ``area``, ``id``,
  ``segmentation`` and ``ignore`` into the dicts it is given.

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

__all__ = ["patch_lvis_numpy", "lvis_from_dict", "lvis_api_evaluate"]


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
