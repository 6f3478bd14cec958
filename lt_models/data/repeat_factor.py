"""Repeat-factor sampling, the LVIS baseline (Gupta et al., CVPR 2019, §5; detectron2's
``RepeatFactorTrainingSampler``), over the same label table and epoch plumbing as ``lt_models.data.samplers``."""

from __future__ import annotations

import math

import numpy as np

from lt_models.data.samplers import _EpochSampler, check_csr, class_to_images
from lt_models.errors import ConfigError

__all__ = ["repeat_factors", "RepeatFactorSampler", "check_threshold"]


def repeat_factors(indptr, labels, num_classes: int, threshold: float = 0.001) -> np.ndarray:
    """Per-image repeat factors of repeat-factor sampling (LVIS paper, Gupta et al. CVPR 2019, §5 / detectron2's
    ``RepeatFactorTrainingSampler.repeat_factors_from_category_frequency``).

    f(c) = fraction of the n_images images that contain class c, r(c) = max(1, sqrt(t / f(c))), and an image's
    factor is the max of r(c) over its classes. Images without labels get 1 (detectron2: ``max(..., default=1)``);
    classes without images never enter an image's max. ``threshold`` t = 0 gives factor 1 everywhere.

    Returns float64 [n_images].
    """
    t = check_threshold(threshold)
    indptr, labels, num_classes = check_csr(indptr, labels, num_classes)
    num_images = indptr.size - 1
    class_indptr, _ = class_to_images(indptr, labels, num_classes)
    freq = np.diff(class_indptr) / max(num_images, 1)
    with np.errstate(divide="ignore"):
        class_rep = np.where(freq > 0, np.maximum(1.0, np.sqrt(t / np.where(freq > 0, freq, 1.0))), 1.0)
    factors = np.ones(num_images, dtype=np.float64)
    nonempty = np.diff(indptr) > 0
    if nonempty.any():
        # Empty images own no labels, so the segments between consecutive non-empty starts are exactly the
        # labels of each non-empty image.
        factors[nonempty] = np.maximum.reduceat(class_rep[labels], indptr[:-1][nonempty])
    return factors


def check_threshold(threshold) -> float:
    try:
        t = float(threshold)
    except (TypeError, ValueError):
        raise ConfigError(
            f"threshold = {threshold!r}: the repeat-factor threshold t must be a number >= 0 (LVIS uses 0.001)"
        ) from None
    if not math.isfinite(t) or t < 0:
        raise ConfigError(
            f"threshold = {threshold!r}: the repeat-factor threshold t must be a finite number >= 0 (LVIS uses 0.001)"
        )
    return t


class RepeatFactorSampler(_EpochSampler):
    """Repeat-factor sampling (LVIS / detectron2 ``RepeatFactorTrainingSampler``), a baseline.

    Image i has factor r_i (``repeat_factors``); each epoch it appears floor(r_i) times plus once more with
    probability frac(r_i) (stochastic rounding, drawn per epoch), and the epoch is shuffled. The epoch length
    therefore varies around Σ r_i from epoch to epoch; ``len()`` is that of the current epoch.
    """

    def __init__(
        self,
        indptr,
        labels,
        num_classes: int,
        threshold: float = 0.001,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        super().__init__(seed, rank, world_size)
        self.threshold = check_threshold(threshold)
        self.factors = repeat_factors(indptr, labels, num_classes, self.threshold)
        self._int_part = np.floor(self.factors).astype(np.int64)
        self._frac_part = self.factors - self._int_part
        self._cache: tuple[int, np.ndarray] | None = None

    def epoch_indices(self, epoch: int | None = None) -> np.ndarray:
        epoch = self.epoch if epoch is None else int(epoch)
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        rng = self._rng(epoch)
        reps = self._int_part + (rng.random(len(self.factors)) < self._frac_part)
        indices = rng.permutation(np.repeat(np.arange(len(self.factors)), reps))
        self._cache = (epoch, indices)
        return indices

    def __len__(self) -> int:
        return -(-len(self.epoch_indices()) // self.world_size)
