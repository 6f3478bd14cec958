"""Each run's bootstrap replicates of the validation images, as the statistics of
:mod:`pipelines.analysis.evidence` take them.

The engine writes ``replicates.npz`` beside every checkpoint it evaluates with LVIS AP (``report.replicates`` draws
of the validation images; ``lt_models.evaluation.bootstrap``): the AP, APr, APc and APf of each draw. Every run
draws with the same seed, so the draws of runs on the same validation set are the same: comparisons are paired
image by image. The sweep's driver reads them from each trial's last Tune checkpoint (local or object storage), the
MLflow writer logs them on each trial run, and ``ltsweep compare`` reads them back from there.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from lt_models.evaluation.bootstrap import REPLICATES_FILE, read_replicates

log = logging.getLogger(__name__)
METRICS = ("AP", "AP50", "APr", "APc", "APf")


def from_bytes(data: bytes) -> dict[str, Any]:
    """The replicates of a ``replicates.npz``'s bytes: {metric: ndarray [R]}, plus ``seed`` and ``n_images``."""
    arrays = read_replicates(data)
    return {k: (v if k in METRICS else int(v)) for k, v in arrays.items()}


def file_of(checkpoint) -> bytes | None:
    """The bytes of the replicates file beside a Tune checkpoint (``path`` on its ``filesystem``), or None when it
    has none (another metric than LVIS AP, ``report.replicates: 0``, a run of an older ltsweep)."""
    if checkpoint is None:
        return None
    try:
        with checkpoint.filesystem.open_input_file(f"{checkpoint.path}/{REPLICATES_FILE}") as fh:
            return fh.read()
    except (FileNotFoundError, OSError) as exc:
        log.debug("no bootstrap replicates at %s: %s", checkpoint.path, exc)
        return None


def from_checkpoint(checkpoint) -> dict[str, Any] | None:
    """The replicates beside a Tune checkpoint, or None (see :func:`file_of`)."""
    data = file_of(checkpoint)
    return None if data is None else from_bytes(data)


def metric_of(reps: Mapping[str, Any] | None, metric: str) -> np.ndarray | None:
    """One metric's replicates, or None."""
    if not reps or metric not in METRICS:
        return None
    return reps.get(metric)
