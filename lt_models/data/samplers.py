"""Image samplers for long-tail detection training: non-balance, soft-balance(λ), class-aware (repeat-factor, the
LVIS baseline, is in ``lt_models.data.repeat_factor``).

Every sampler is a ``torch.utils.data.Sampler`` that yields dataset indices (0-based image positions). They are
built from the flat label table ``LVISDetection.label_csr()`` returns:

    indptr  int64 [n_images + 1]   image i owns labels[indptr[i]:indptr[i+1]]
    labels  int64 [nnz]            0-based class indices (contiguous label - 1) present in the image

Internally the table is inverted into a class -> images CSR with numpy (``class_to_images``), so an Open
Images-sized table (1.7M images, 12M labels) is indexed in well under a second and one epoch of 1.7M draws is a
handful of vectorised numpy calls (see ``benchmarks/bench_sampler.py``). No per-class Python lists.

Epochs and seeds. Every sampler derives the epoch's draws from ``numpy.random.default_rng([seed, epoch])``: the
same (seed, epoch) gives the same epoch on every rank and every run, and different epochs differ. Call
``set_epoch(e)`` before each epoch (as with ``torch.utils.data.DistributedSampler``); without it every epoch
repeats epoch 0.

Distributed sharding. The epoch's draws do not depend on ``world_size``. Each rank computes the whole epoch and
keeps positions ``rank, rank + world_size, ...`` of it (``shard``). When the epoch length is not a multiple of
``world_size`` the epoch is padded by wrap-around (its first draws are repeated), exactly like
``DistributedSampler(drop_last=False)``: shards are disjoint as positions, equal in size
(``ceil(len / world_size)``), and together they are the whole epoch plus at most ``world_size - 1`` repeated
draws. Padding instead of dropping keeps the non-balance guarantee that every image is seen each epoch.
"""

from __future__ import annotations

import math

import numpy as np
import torch.utils.data

from lt_models.errors import AnnotationError, ConfigError

__all__ = [
    "soft_balance_probabilities",
    "class_to_images",
    "shard",
    "NonBalanceSampler",
    "SoftBalanceSampler",
    "ClassAwareSampler",
]

_CSR_FIX = "build them with LVISDetection.label_csr() (indptr [n_images+1], labels = 0-based class indices)"


# ----------------------------------------------------------------------------------------------------------------
# The paper's equation
# ----------------------------------------------------------------------------------------------------------------
def soft_balance_probabilities(image_counts, lam: float) -> np.ndarray:
    """Soft-balance class sampling probabilities P*_s, eq 8 of the concurrent-softmax paper.

    Paper: "Large-Scale Object Detection in the Wild from Imbalanced Multi-Labels" (Peng et al., CVPR 2020,
    the concurrent-softmax paper), §4.2, eq 6-8. With n_i the number of images containing class i and
    P_n(i) = n_i / Σ_j n_j (non-balance), P_a(i) = 1/C = α P_n(i) with α = 1/(C P_n(i)) (eq 6, class-aware),

        P_s(i)  = α^λ P_n(i) = P_a(i)^λ P_n(i)^(1-λ)          (eq 7)
        P*_s(i) = P_s(i) / Σ_j P_s(j)  ∝  P_n(i)^(1-λ)        (eq 8)

    λ = 1 gives the uniform 1/C (class-aware), λ > 1 over-samples the tail beyond class-aware (the paper tries
    1.5). λ = 0 gives P_n, the paper's *approximation* of non-balance: drawing a class by its image share and then
    one of its images makes an image's chance grow with the number of classes it holds, so it is not the
    non-balance sampler (every image once per epoch, ``NonBalanceSampler``, the first row of the paper's Table 3).
    Computed in log space, so extreme counts or λ do not overflow.

    Classes with zero images get probability exactly 0 and are never drawn, for every λ (a literal reading of
    eq 7 would give them 0^0 = 1 at λ = 1 and infinity for λ > 1, but such a class has no image to draw); the
    remaining classes are normalised among themselves, so at λ = 1 each class with images gets 1/C', C' the
    number of such classes.

    Args:
        image_counts: [C] non-negative numbers of images per class (``LVISDetection.image_counts()``).
        lam: the balance exponent λ ≥ 0.
    Returns:
        float64 [C], summing to 1.
    Raises:
        ConfigError: λ negative or not a finite number.  AnnotationError: counts negative/not 1-D, or no class has
        images.
    """
    lam = check_lam(lam)
    counts = np.asarray(image_counts, dtype=np.float64)
    if counts.ndim != 1 or counts.size == 0:
        raise AnnotationError(
            f"image_counts: expected a non-empty 1-D array of per-class image counts, got shape "
            f"{counts.shape}; pass LVISDetection.image_counts()"
        )
    if not np.all(np.isfinite(counts)) or np.any(counts < 0):
        bad = int(np.flatnonzero(~np.isfinite(counts) | (counts < 0))[0])
        raise AnnotationError(
            f"image_counts[{bad}] = {counts[bad]}: counts must be finite and >= 0; pass LVISDetection.image_counts()"
        )
    present = counts > 0
    if not present.any():
        raise AnnotationError(
            "image_counts: no class has any image, so there is nothing to sample; "
            "check that the annotation file has annotations"
        )
    # log P_s(i) = (1-λ) log n_i + const; the constants (Σ n_j, C^-λ) cancel in eq 8.
    log_ps = (1.0 - lam) * np.log(counts[present])
    ps = np.exp(log_ps - log_ps.max())
    probs = np.zeros_like(counts)
    probs[present] = ps / ps.sum()
    return probs


# ----------------------------------------------------------------------------------------------------------------
# Label-table helpers
# ----------------------------------------------------------------------------------------------------------------
def check_lam_schedule(schedule) -> tuple[tuple[int, float], ...]:
    """The one check of a soft-balance λ schedule: ``[[epoch, λ], ...]``, λ from that epoch on (epochs count from 0,
    the number of epochs already trained); the first entry at epoch 0, epochs strictly increasing, each λ checked by
    :func:`check_lam`."""
    fix = "a λ schedule is [[epoch, λ], ...] with the first at epoch 0 and epochs increasing, e.g. [[0, 0.0], [2, 0.7]]"
    try:
        pairs = [(e, check_lam(v)) for e, v in schedule]
    except (TypeError, ValueError):
        raise ConfigError(f"lam_schedule = {schedule!r}: {fix}") from None
    epochs = [e for e, _ in pairs]
    if (
        not pairs
        or any(isinstance(e, bool) or not isinstance(e, (int, np.integer)) for e in epochs)
        or epochs[0] != 0
        or any(b <= a for a, b in zip(epochs, epochs[1:]))
    ):
        raise ConfigError(f"lam_schedule = {schedule!r}: {fix}")
    return tuple((int(e), lam) for e, lam in pairs)


def lam_at(schedule: tuple[tuple[int, float], ...], epoch: int) -> float:
    """λ of ``schedule`` (checked by :func:`check_lam_schedule`) for the epoch with index ``epoch``."""
    return next(v for e, v in reversed(schedule) if e <= epoch)


def check_lam(lam) -> float:
    """The one range check of soft-balance λ (eq 8): a finite number >= 0."""
    fix = "the soft-balance λ must be a finite number >= 0 (0 = P_n, 1 = class-aware, > 1 favours the tail further)"
    try:
        lam_f = float(lam)
    except (TypeError, ValueError):
        raise ConfigError(f"lam = {lam!r}: {fix}") from None
    if not (math.isfinite(lam_f) and lam_f >= 0):
        raise ConfigError(f"lam = {lam!r}: {fix}")
    return lam_f


def check_csr(indptr, labels, num_classes) -> tuple[np.ndarray, np.ndarray, int]:
    """Validate the image -> classes CSR and return (indptr int64, labels int64, num_classes)."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ConfigError(f"num_classes = {num_classes!r}: must be a positive int (the dataset's C)")
    num_classes = int(num_classes)
    indptr = np.asarray(indptr)
    labels = np.asarray(labels)
    if indptr.ndim != 1 or indptr.size < 1 or not np.issubdtype(indptr.dtype, np.integer):
        raise AnnotationError(
            f"indptr: expected a 1-D integer array of length n_images+1, got "
            f"shape {indptr.shape} dtype {indptr.dtype}; {_CSR_FIX}"
        )
    if labels.ndim != 1 or not (np.issubdtype(labels.dtype, np.integer) or labels.size == 0):
        raise AnnotationError(
            f"labels: expected a 1-D integer array, got shape {labels.shape} dtype {labels.dtype}; {_CSR_FIX}"
        )
    indptr = indptr.astype(np.int64, copy=False)
    labels = labels.astype(np.int64, copy=False)
    if indptr[0] != 0 or indptr[-1] != labels.size:
        raise AnnotationError(
            f"indptr: must start at 0 and end at len(labels) = {labels.size}, got "
            f"{int(indptr[0])} .. {int(indptr[-1])}; {_CSR_FIX}"
        )
    steps = np.diff(indptr)
    if steps.size and steps.min() < 0:
        i = int(np.argmin(steps))
        raise AnnotationError(
            f"indptr: decreases at image {i} ({int(indptr[i])} -> {int(indptr[i + 1])}); "
            f"it must be non-decreasing; {_CSR_FIX}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        k = int(np.flatnonzero((labels < 0) | (labels >= num_classes))[0])
        img = int(np.searchsorted(indptr, k, side="right") - 1)
        raise AnnotationError(
            f"labels: image {img} has class index {int(labels[k])}, outside 0..{num_classes - 1}; "
            f"labels are 0-based (contiguous label - 1); {_CSR_FIX}"
        )
    return indptr, labels, num_classes


def class_to_images(indptr, labels, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Invert the image -> classes CSR into a class -> images CSR, vectorised (no per-class Python lists).

    Returns ``(class_indptr int64 [C+1], class_images int32|int64 [nnz'])``: the images containing class c are
    ``class_images[class_indptr[c]:class_indptr[c+1]]``, ascending. A class listed twice for one image counts
    once (an image either contains the class or not), so ``np.diff(class_indptr)`` is the per-class image
    count n_i of eq 8.
    """
    indptr, labels, num_classes = check_csr(indptr, labels, num_classes)
    num_images = indptr.size - 1
    if num_images >= 2**32:
        raise AnnotationError(f"indptr: {num_images} images; the class index supports fewer than 2**32 images")
    # Pack each (class, image) pair into one uint64 (class in the high 32 bits) and sort: the keys come out
    # grouped by class with images ascending, and a duplicated pair is two equal neighbours. One in-place
    # sort of nnz integers (~0.2 s for 12M) beats argsort + gather in time and memory.
    key = labels.astype(np.uint64)
    key <<= np.uint64(32)
    key |= np.repeat(np.arange(num_images, dtype=np.uint32), np.diff(indptr))
    key.sort()
    counts = np.bincount(labels, minlength=num_classes)
    dup = key[1:] == key[:-1]
    if dup.any():
        counts -= np.bincount((key[1:][dup] >> np.uint64(32)).astype(np.int64), minlength=num_classes)
        key = key[np.concatenate([[True], ~dup])]
    img_dtype = np.int32 if num_images < 2**31 else np.int64
    key &= np.uint64(0xFFFFFFFF)  # in place: keep the image half
    class_images = key.astype(img_dtype)
    class_indptr = np.zeros(num_classes + 1, dtype=np.int64)
    np.cumsum(counts, out=class_indptr[1:])
    return class_indptr, class_images


def check_num_samples(num_samples) -> int:
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
        raise ConfigError(
            f"num_samples = {num_samples!r}: the epoch length must be an int >= 1 (default: the number of images)"
        )
    return int(num_samples)


def shard(draws: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Rank ``rank``'s share of one epoch's draws: positions rank, rank+world_size, ... of the epoch padded by
    wrap-around to a multiple of world_size (as ``DistributedSampler(drop_last=False)``). Every shard has
    ``ceil(len(draws) / world_size)`` entries."""
    rank, world_size = _check_rank(rank, world_size)
    n = len(draws)
    per_rank = -(-n // world_size)
    total = per_rank * world_size
    if total > n:
        draws = np.concatenate([draws, np.resize(draws, total - n)])
    return draws[rank:total:world_size]


def _check_rank(rank, world_size) -> tuple[int, int]:
    if isinstance(world_size, bool) or not isinstance(world_size, (int, np.integer)) or world_size < 1:
        raise ConfigError(f"world_size = {world_size!r}: must be an int >= 1 (the number of training processes)")
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 0 <= rank < world_size:
        raise ConfigError(f"rank = {rank!r}: must be an int in 0..world_size-1 = 0..{int(world_size) - 1}")
    return int(rank), int(world_size)


def _check_epoch(epoch) -> int:
    if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
        raise ConfigError(f"epoch = {epoch!r}: must be an int >= 0")
    return int(epoch)


# ----------------------------------------------------------------------------------------------------------------
# Samplers
# ----------------------------------------------------------------------------------------------------------------
class _EpochSampler(torch.utils.data.Sampler[int]):
    """Shared plumbing: seed, epoch, rank/world_size sharding. Subclasses implement ``epoch_indices(epoch)``."""

    def __init__(self, seed: int = 0, rank: int = 0, world_size: int = 1):
        super().__init__()
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ConfigError(f"seed = {seed!r}: must be an int >= 0")
        self.seed = int(seed)
        self.rank, self.world_size = _check_rank(rank, world_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose draws the next ``iter()`` yields (call before each epoch)."""
        self.epoch = _check_epoch(epoch)

    def _rng(self, epoch: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, _check_epoch(epoch)])

    def epoch_indices(self, epoch: int | None = None) -> np.ndarray:
        """All ranks' image indices of one epoch (default: the current epoch), before sharding."""
        raise NotImplementedError

    def rank_indices(self, epoch: int | None = None) -> np.ndarray:
        """This rank's image indices of one epoch (default: the current epoch)."""
        return shard(self.epoch_indices(epoch), self.rank, self.world_size)

    def __iter__(self):
        return iter(self.rank_indices().tolist())


class NonBalanceSampler(_EpochSampler):
    """Non-balance sampling: every image once per epoch in a seeded random order (sampling without
    replacement), the stage-1 sampler of the paper's hybrid schedule; class c is then drawn with P_o(c) = n_c/N."""

    def __init__(self, num_images: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        super().__init__(seed, rank, world_size)
        if isinstance(num_images, bool) or not isinstance(num_images, (int, np.integer)) or num_images < 1:
            raise AnnotationError(f"num_images = {num_images!r}: the dataset must have at least one image")
        self.num_images = int(num_images)

    def epoch_indices(self, epoch: int | None = None) -> np.ndarray:
        return self._rng(self.epoch if epoch is None else epoch).permutation(self.num_images)

    def __len__(self) -> int:
        return -(-self.num_images // self.world_size)


class SoftBalanceSampler(_EpochSampler):
    """Soft-balance sampling (concurrent-softmax paper §4.2): each draw picks a class from P*_s (eq 8,
    ``soft_balance_probabilities``), then an image uniformly among the images containing that class.

    Draws are with replacement. ``num_samples`` (the epoch length, over all ranks) defaults to the number of
    images. Images without labels and classes without images are never drawn. λ = 1 is class-aware sampling
    (``ClassAwareSampler``); λ > 1 is allowed. λ is one number (``lam``) or a schedule over epochs
    (``lam_schedule``, :func:`check_lam_schedule`): each epoch draws with its own λ.
    """

    def __init__(
        self,
        indptr,
        labels,
        num_classes: int,
        lam: float | None = None,
        num_samples: int | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        lam_schedule=None,
    ):
        super().__init__(seed, rank, world_size)
        if (lam is None) == (lam_schedule is None):
            raise ConfigError("soft-balance sampling needs lam (λ >= 0) or lam_schedule ([[epoch, λ], ...]), not both")
        self.lam_schedule = check_lam_schedule(lam_schedule) if lam_schedule is not None else ((0, check_lam(lam)),)
        self.class_indptr, self.class_images = class_to_images(indptr, labels, num_classes)
        self.num_classes = int(num_classes)
        self.num_images = len(indptr) - 1
        self.class_counts = np.diff(self.class_indptr)
        self._probabilities: dict[float, np.ndarray] = {}
        self.lam = self.lam_at(0)
        self.probabilities = self.probabilities_at(0)
        if num_samples is None:
            num_samples = self.num_images
        self.num_samples = check_num_samples(num_samples)

    def lam_at(self, epoch: int) -> float:
        """λ of the epoch with index ``epoch``."""
        return lam_at(self.lam_schedule, epoch)

    def probabilities_at(self, epoch: int) -> np.ndarray:
        """P*_s (eq 8) of the epoch with index ``epoch``, computed once per λ."""
        lam = self.lam_at(epoch)
        if lam not in self._probabilities:
            self._probabilities[lam] = soft_balance_probabilities(self.class_counts, lam)
        return self._probabilities[lam]

    def draw(self, epoch: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """One epoch's draws over all ranks: ``(classes int64 [num_samples], images int32 [num_samples])``, where
        ``classes[k]`` is the class drawn from P*_s and ``images[k]`` the image drawn uniformly within it."""
        epoch = self.epoch if epoch is None else epoch
        rng = self._rng(epoch)
        n = self.num_samples
        # Class: n i.i.d. draws from P*_s, generated as multinomial counts in a uniformly random order (the same
        # distribution as n categorical draws, ~3x faster than inverse-CDF search). Zero-probability classes
        # get count 0.
        counts = rng.multinomial(n, self.probabilities_at(epoch))
        classes = rng.permutation(np.repeat(np.arange(self.num_classes), counts))
        # Image: uniform offset within the class's CSR segment.
        start = self.class_indptr[classes]
        count = self.class_counts[classes]
        offset = np.minimum((rng.random(n) * count).astype(np.int64), count - 1)
        return classes, self.class_images[start + offset]

    def epoch_indices(self, epoch: int | None = None) -> np.ndarray:
        return self.draw(epoch)[1]

    def __len__(self) -> int:
        return -(-self.num_samples // self.world_size)


class ClassAwareSampler(SoftBalanceSampler):
    """Class-aware sampling (Shen et al., ECCV 2016): soft-balance with λ = 1, every class with images equally
    likely, then an image uniformly within the class."""

    def __init__(
        self,
        indptr,
        labels,
        num_classes: int,
        num_samples: int | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        super().__init__(
            indptr, labels, num_classes, lam=1.0, num_samples=num_samples, seed=seed, rank=rank, world_size=world_size
        )
