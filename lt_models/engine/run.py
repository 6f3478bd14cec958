"""One training run's state (`Run`): built from its TrainSpec (`build_run`: seeds, datasets, the detector with its
loss, sampler, loaders, optimizer and schedule, in the order that fixes every random draw) and restored from a
checkpoint when resuming (`resume_run`: weights, optimizer, schedule, RNGs and counters)."""

from __future__ import annotations

import json
import os
import random
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import lt_models.engine.distributed as distributed
from lt_models.data.datasets import LVISDetection, default_image_dir
from lt_models.data.holdout import split_file
from lt_models.data.sampler_spec import build_sampler
from lt_models.data.transforms import RandomHorizontalFlip
from lt_models.engine.build import (
    build_lr_scheduler,
    build_optimizer,
    build_run_loss,
    train_loader,
    val_loader,
)
from lt_models.engine.checkpoint import (
    load_checkpoint,
    load_model_weights,
    restore_rng_state,
)
from lt_models.engine.spec import TrainSpec
from lt_models.errors import AnnotationError, ConfigError
from lt_models.modeling.classifier_switch import switch_classifier
from lt_models.modeling.detector import build_detector, set_decoupled


@dataclass
class Run:
    """What one training run holds while it trains (built by ``build_run``, moved on by ``resume_run`` and ``_fit``)."""

    spec: TrainSpec
    out_dir: Path
    device: torch.device
    rank: int
    world_size: int
    train_ds: Any
    val_ds: Any
    model: torch.nn.Module
    sampler: Any
    train_loader: Any
    val_loader: Any
    optimizer: Any
    scheduler: Any
    scaler: Any
    start_epoch: int = 0
    iteration: int = 0
    images: int = 0
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)  # rotation never touches another run's
    val_ann: str = ""  # the annotation file it evaluates on (the validation file, or its part with val_holdout)

    @property
    def train_buckets(self) -> dict:
        """r/c/f of the evaluation: from the training counts."""
        return dict(zip(self.train_ds.cat_ids, self.train_ds.frequency))


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_datasets(spec: TrainSpec) -> tuple[LVISDetection, LVISDetection, str]:
    """The run's training and validation datasets and the annotation file it evaluates on."""
    common: dict[str, Any] = dict(
        hierarchy_file=spec.hierarchy_file,
        expand_parents=spec.expand_parents,
        skip_invalid=spec.skip_invalid,
        cache_root=spec.annotation_cache,
    )
    train_ds = LVISDetection(
        spec.train_ann,
        spec.train_image_dir,
        train=True,
        transforms=RandomHorizontalFlip() if spec.hflip else None,
        **common,
    )
    val_ann, val_images = validation_source(spec)
    val_ds = LVISDetection(val_ann, val_images, train=False, **common)
    if list(val_ds.cat_ids) != list(train_ds.cat_ids):
        raise AnnotationError(
            f"{spec.val_ann}: its categories differ from {spec.train_ann}'s "
            f"({len(val_ds.cat_ids)} vs {len(train_ds.cat_ids)} ids); both files must list the same "
            "categories"
        )
    return train_ds, val_ds, val_ann


def validation_source(spec: TrainSpec) -> tuple[str, str]:
    """(annotation file, image folder) the run evaluates on: ``val_ann``, or with ``val_holdout`` its part
    ``val_part`` (``lt_models.data.holdout.split_file``, cached beside the annotation stores)."""
    image_dir = str(default_image_dir(spec.val_ann, spec.val_image_dir))
    if spec.val_holdout is None:
        return spec.val_ann, image_dir
    cache = spec.annotation_cache or os.path.join(tempfile.gettempdir(), "ltsweep-holdout")
    return str(split_file(spec.val_ann, spec.val_holdout, spec.holdout_seed, cache)[spec.val_part]), image_dir


def build_run(
    spec: TrainSpec,
    out_dir: Path,
    device: torch.device,
    init_checkpoint,
    shared: dict | None,
    rank: int,
    world_size: int,
) -> Run:
    """Seeds, datasets, the detector (from ``init_checkpoint``'s weights when given), sampler, loaders and
    optimizer, in the order that fixes every random draw of the run."""
    _seed_all(spec.seed)
    train_ds, val_ds, val_ann = build_datasets(spec)
    model = build_detector(
        train_ds.num_classes,
        spec.backbone,
        build_run_loss(spec, train_ds, shared),
        image_size=spec.image_size,
        weights=spec.weights,
        box_reg_labels=spec.box_reg_labels,
    )
    if init_checkpoint is not None:
        switch_classifier(model, load_model_weights(init_checkpoint, model))  # softmax stage 1 -> sigmoid stage 2
    set_decoupled(model, spec.decoupled)
    model.to(device)
    if world_size > 1:  # same initial weights on every rank; then each rank flips and samples on its own stream
        _seed_all(distributed.rank_seed(spec.seed, rank))
    indptr, labels = train_ds.label_csr()
    sampler = build_sampler(
        spec.sampler, indptr, labels, train_ds.num_classes, seed=spec.seed, rank=rank, world_size=world_size
    )
    loader = train_loader(train_ds, spec.batch_size, sampler, spec.workers, device)
    val = val_loader(val_ds, spec, device, rank, world_size)
    if len(loader) == 0:
        raise ConfigError(f"{spec.train_ann}: no training images to sample")
    optimizer = build_optimizer(model, spec.lr, spec.momentum, spec.weight_decay)
    scheduler = build_lr_scheduler(
        optimizer, spec.warmup, spec.warmup_factor, [s * len(loader) for s in spec.lr_steps], spec.lr_gamma
    )
    scaler = torch.amp.GradScaler("cuda") if (spec.amp and device.type == "cuda") else None
    return Run(
        spec,
        out_dir,
        device,
        rank,
        world_size,
        train_ds,
        val_ds,
        model,
        sampler,
        loader,
        val,
        optimizer,
        scheduler,
        scaler,
        val_ann=val_ann,
    )


def _apply_base_lr(run: Run) -> None:
    """A resume with a new ``spec.lr`` (a PBT exploit that perturbed the learning rate) goes on at the same point of
    the schedule with the new base lr; with the checkpoint's own lr nothing changes."""
    sched, lr = run.scheduler, float(run.spec.lr)
    if all(b == lr for b in sched.base_lrs):
        return
    sched.base_lrs = [lr] * len(sched.base_lrs)
    for group, factor in zip(run.optimizer.param_groups, sched.lr_lambdas):
        group["initial_lr"] = lr
        group["lr"] = lr * factor(sched.last_epoch)


def resume_run(run: Run, resume_checkpoint: str | Path) -> dict | None:
    """Restore model, optimizer, schedule, RNGs and counters from ``resume_checkpoint``; the checkpoint's own
    evaluation when nothing is left to train, else None."""
    state = load_checkpoint(resume_checkpoint, run.model, run.optimizer, run.scheduler, run.scaler)
    run.start_epoch, run.iteration = state["epoch"], state["iteration"]
    _apply_base_lr(run)
    run.images = int(state["extra"].get("images", 0))
    run.run_id = state["extra"].get("run_id") or run.run_id
    rank_rng = state["extra"].get("rank_rng")
    if run.world_size > 1 and isinstance(rank_rng, list) and len(rank_rng) == run.world_size:
        restore_rng_state(rank_rng[run.rank])  # each rank continues its own RNG stream
    if run.start_epoch < run.spec.epochs:
        return None
    ckpt_dir = Path(resume_checkpoint)
    ckpt_dir = ckpt_dir if ckpt_dir.is_dir() else ckpt_dir.parent
    saved = ckpt_dir / "metrics.json"
    metrics = (
        json.loads(saved.read_text()) if saved.is_file() else {"epoch": run.start_epoch, "iteration": run.iteration}
    )
    return dict(metrics, checkpoint_dir=str(ckpt_dir))
