"""What one training run is built from: the device, the optimizer, the LR schedule, the run's loss with its data
inputs, and the data loaders.

Optimisation: SGD (momentum 0.9, weight decay 1e-4) over the trainable parameters, and a per-iteration LR schedule
(linear warm-up from ``warmup_factor`` over ``warmup`` iterations, then x``lr_gamma`` at each epoch in
``lr_steps``).
"""

from __future__ import annotations

import sys
from bisect import bisect_right
from collections.abc import Iterable

import torch

import lt_models.engine.distributed as distributed
from lt_models.data.datasets import collate_detection
from lt_models.data.rate_matrix import concurrent_rate_matrix
from lt_models.engine.spec import TrainSpec
from lt_models.errors import ConfigError


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device = {device!r} but CUDA is not available here; use 'auto' or 'cpu'")
    return dev


def progress_enabled(progress: bool | None) -> bool:
    """Progress bars: on a terminal by default (``None``), or as ``progress`` says."""
    return sys.stderr.isatty() if progress is None else bool(progress)


# ----------------------------------------------------------------------------------------------------------------
# Optimisation
# ----------------------------------------------------------------------------------------------------------------
def build_optimizer(model: torch.nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 1e-4):
    """SGD over the parameters that require grad (all, or only the classifier in decoupled mode)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters (check `decoupled`)")
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def _lr_factor(it: int, warmup: int, warmup_factor: float, milestones: list[int], gamma: float) -> float:
    f = gamma ** bisect_right(milestones, it)
    if it < warmup:
        alpha = it / warmup
        f *= warmup_factor * (1 - alpha) + alpha
    return f


def build_lr_scheduler(optimizer, warmup: int, warmup_factor: float, milestones: list[int], gamma: float = 0.1):
    """Per-iteration schedule: linear warm-up over ``warmup`` iterations, then x``gamma`` at each milestone
    (iterations). Stepped after every optimizer step, so its state (``last_epoch`` = iterations) resumes exactly."""
    ms = sorted(int(m) for m in milestones)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: _lr_factor(it, warmup, warmup_factor, ms, gamma))


# ----------------------------------------------------------------------------------------------------------------
# The run's loss
# ----------------------------------------------------------------------------------------------------------------
def shared_loss_inputs(
    train_ann: str,
    hierarchy_file: str | None,
    hierarchy_rate: float,
    inputs: Iterable[str],
    skip_invalid: bool = False,
    store=None,
) -> dict:
    """The costly loss inputs that every run on the same training data shares, computed once: the
    concurrent-rate matrix r_ij (``lt_models.data.rate_matrix``) when ``inputs`` (the union of ``LossSpec.inputs``
    of the runs) names ``concurrent_rate`` (concurrent softmax in training, or eq 5 scores). A sweep computes them
    on the driver and hands them to each trial's ``train(..., shared=...)``. ``store``: the training set's
    annotation store (`lt_models.data.store`), whose merged objects r_ij then counts instead of reading
    ``train_ann`` again."""
    if "concurrent_rate" not in set(inputs):
        return {}
    return {
        "concurrent_rate": concurrent_rate_matrix(
            train_ann if store is None else store,
            hierarchy=hierarchy_file,
            hierarchy_rate=hierarchy_rate,
            skip_invalid=skip_invalid,
        )
    }


def build_run_loss(spec: TrainSpec, train_ds, shared: dict | None):
    """``spec.loss`` built with the data its equation needs (``LossSpec.build``): r_ij (shared), the r/c/f buckets,
    the class frequencies, the number of classes."""
    if shared is None or ("concurrent_rate" in spec.loss.inputs and "concurrent_rate" not in shared):
        shared = shared_loss_inputs(
            spec.train_ann,
            spec.hierarchy_file,
            spec.hierarchy_rate,
            spec.loss.inputs,
            spec.skip_invalid,
            store=train_ds.store,
        )
    return spec.loss.build(
        concurrent_rate=shared.get("concurrent_rate"),
        frequency=list(train_ds.frequency),
        class_freq=(train_ds.image_counts() / max(len(train_ds), 1)).tolist(),
        num_classes=train_ds.num_classes,
    )


# ----------------------------------------------------------------------------------------------------------------
# Data loaders
# ----------------------------------------------------------------------------------------------------------------
def train_loader(dataset, batch_size: int, sampler, workers: int, device: torch.device):
    """Batches of ``(images, targets)`` in the order ``sampler`` draws."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_detection,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )


def val_loader(dataset, spec: TrainSpec, device: torch.device, rank: int, world_size: int):
    """The validation loader: every image in order, or (``world_size`` > 1) this rank's share of the very same
    batches (``distributed.eval_batches``)."""
    if world_size == 1:
        sampler = torch.utils.data.SequentialSampler(dataset)
        return train_loader(dataset, spec.batch_size, sampler, spec.workers, device)
    batches = distributed.eval_batches(len(dataset), spec.batch_size, rank, world_size)
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=spec.workers,
        collate_fn=collate_detection,
        pin_memory=device.type == "cuda",
    )
