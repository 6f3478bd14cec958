"""The typed sampler of a run (`SamplerSpec`: the sampler's name and the options it reads, each range-checked by
`check_sampler_option`) and `build_sampler`, which turns it into one of the samplers of `lt_models.data.samplers`."""

from __future__ import annotations

import dataclasses

import torch.utils.data

from lt_models.data.repeat_factor import RepeatFactorSampler, check_threshold
from lt_models.data.samplers import (
    ClassAwareSampler,
    NonBalanceSampler,
    SoftBalanceSampler,
    check_csr,
    check_lam,
    check_lam_schedule,
    check_num_samples,
    lam_at,
)
from lt_models.errors import ConfigError, check_spec_options

SAMPLERS = {
    "nonbalance": NonBalanceSampler,
    "softbalance": SoftBalanceSampler,
    "classaware": ClassAwareSampler,
    "repeatfactor": RepeatFactorSampler,
}


# The options each sampler reads (SamplerSpec fields besides `name`).
SAMPLER_OPTIONS = {
    "nonbalance": (),
    "softbalance": ("lam", "num_samples", "lam_schedule"),
    "classaware": ("num_samples",),
    "repeatfactor": ("threshold",),
}


_CHECKS = {
    "lam": check_lam,
    "num_samples": check_num_samples,
    "threshold": check_threshold,
    "lam_schedule": check_lam_schedule,
}


def check_sampler_option(option: str, value):
    """The range check of a sampler option (``lam``, ``num_samples``, ``threshold``, ``lam_schedule``), by its
    owner."""
    return _CHECKS[option](value)


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """How a run draws its training images: the sampler's name and the options that sampler reads.

    ``lam``: soft-balance λ of eq 8 (softbalance only), or ``lam_schedule``: λ per epoch, ``((epoch, λ), ...)``
    (one of the two is required there). ``num_samples``: images drawn per epoch
    (softbalance, classaware; default the number of images). ``threshold``: repeat-factor t (repeatfactor only;
    default 0.001, as LVIS). An option the named sampler does not read is an error, never silently ignored.
    Building a spec checks it, so a ``SamplerSpec`` that exists is valid.
    """

    name: str = "nonbalance"
    lam: float | None = None
    num_samples: int | None = None
    threshold: float | None = None
    lam_schedule: tuple[tuple[int, float], ...] | None = None

    def __post_init__(self):
        check_spec_options(self, "sampler", SAMPLER_OPTIONS, _CHECKS)
        if self.name == "softbalance" and (self.lam is None) == (self.lam_schedule is None):
            raise ConfigError(
                "sampler 'softbalance' needs lam (λ >= 0, e.g. 0.7) or lam_schedule ([[epoch, λ], ...]), not both"
            )

    def lam_at(self, epoch: int) -> float | None:
        """The soft-balance λ of the epoch with index ``epoch`` (None for the other samplers)."""
        if self.lam_schedule is not None:
            return lam_at(self.lam_schedule, epoch)
        return self.lam

    def options(self) -> dict:
        """The options that are set, as keyword arguments of the sampler class."""
        return {k: getattr(self, k) for k in SAMPLER_OPTIONS[self.name] if getattr(self, k) is not None}


def build_sampler(
    spec: SamplerSpec, indptr, labels, num_classes: int, *, seed: int = 0, rank: int = 0, world_size: int = 1
) -> torch.utils.data.Sampler:
    """The sampler ``spec`` describes, over the ``label_csr()`` arrays, drawing from (seed, epoch), sharded to
    ``rank`` of ``world_size``."""
    if not isinstance(spec, SamplerSpec):
        raise ConfigError(
            f"build_sampler takes a SamplerSpec, got {type(spec).__name__}; e.g. SamplerSpec('softbalance', lam=0.7)"
        )
    common = dict(seed=seed, rank=rank, world_size=world_size)
    if spec.name == "nonbalance":
        check_csr(indptr, labels, num_classes)
        return NonBalanceSampler(len(indptr) - 1, **common)
    return SAMPLERS[spec.name](indptr, labels, num_classes, **spec.options(), **common)
