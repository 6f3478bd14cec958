"""Training engine: plain functions in the manner of torchvision's ``references/detection``.

``train(spec, out_dir)`` is the whole training of one run (``lt_models.engine.spec.TrainSpec``: stage 1, stage 2 or
one stage): it builds the dataset, the sampler (``spec.sampler``), the loss (``spec.loss``) and the detector, runs
``train_one_epoch`` per epoch, evaluates with ``evaluate_lvis`` every ``eval_every`` epochs, writes an atomic
checkpoint directory (``lt_models.engine.checkpoint``) and then calls ``on_eval(metrics, checkpoint_dir)`` (the Tune
trainable reports from there). With ``rank`` / ``world_size`` (a process group set up by Ray Train) it is one of
``world_size`` data-parallel processes: DDP, a shard of each epoch per rank, a distributed evaluation and
checkpoints written by rank 0 only (``lt_models.engine.distributed``).

Optimisation: SGD (momentum 0.9, weight decay 1e-4) over the trainable parameters, a per-iteration LR schedule
(linear warm-up from ``warmup_factor`` over ``warmup`` iterations, then x``lr_gamma`` at each epoch in
``lr_steps``), gradient-norm clipping, AMP (float16 autocast + GradScaler) on CUDA. A non-finite loss raises
``NonFiniteLossError`` before ``backward`` (nothing from that step reaches the weights or a checkpoint).
"""
from __future__ import annotations

import json
import math
import random
import sys
import time
import uuid
from bisect import bisect_right
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from lt_models.engine import distributed
from lt_models.atomic import recover_dir
from lt_models.engine.checkpoint import (capture_rng_state, load_checkpoint, load_model_weights, restore_rng_state,
                                  rotate_checkpoints, write_checkpoint_dir)
from lt_models.modeling.detector import build_detector, set_decoupled
from lt_models.errors import AnnotationError, ConfigError
from lt_models.engine.spec import TrainSpec
from lt_models.data.samplers import build_sampler
from lt_models.data.transforms import RandomHorizontalFlip

__all__ = [
    "NonFiniteLossError",
    "pick_device",
    "build_optimizer",
    "build_lr_scheduler",
    "train_one_epoch",
    "predict",
    "shared_loss_inputs",
    "evaluate",
    "train",
]


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN/inf. Raised before backward/step, so no weights were touched by that step."""

    def __init__(self, iteration: int, epoch: int, losses: dict[str, float], lr: float):
        self.iteration, self.epoch, self.losses, self.lr = iteration, epoch, losses, lr
        parts = ", ".join(f"{k}={v:.4g}" for k, v in losses.items())
        super().__init__(f"non-finite training loss at iteration {iteration} (epoch {epoch}, lr {lr:.4g}): {parts}. "
                         "No optimizer step or checkpoint was made from it; lower lr, lengthen warmup or set "
                         "grad_clip")

    def __reduce__(self):  # picklable: a Ray Train worker's divergence travels to the trial as itself
        return type(self), (self.iteration, self.epoch, self.losses, self.lr)


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device = {device!r} but CUDA is not available here; use 'auto' or 'cpu'")
    return dev


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
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: _lr_factor(it, warmup, warmup_factor, ms, gamma))


def _to_device(images, targets, device):
    images = [img.to(device, non_blocking=True) for img in images]
    targets = [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()}
               for t in targets]
    return images, targets


def _progress_enabled(progress: bool | None) -> bool:
    return sys.stderr.isatty() if progress is None else bool(progress)


def train_one_epoch(model, optimizer, data_loader, device, epoch: int, *, scheduler=None, scaler=None,
                    grad_clip: float | None = None, iteration: int = 0, progress: bool | None = None,
                    max_iters: int | None = None, world_size: int = 1) -> dict:
    """One pass over ``data_loader`` (batches of ``(images, targets)``).

    The optimised loss is the sum of the detector's losses that carry a gradient (in decoupled mode the frozen
    RPN / box-regression losses are still computed and reported but not optimised). ``iteration`` is the global
    iteration count at the start (for messages). Returns mean losses and timing:
    ``{"loss", <each loss>, "iterations", "images", "time", "data_time", "loader_wait_fraction", "img_per_s"}``.
    With ``world_size`` > 1 (``model`` in DDP, one shard per rank), ``loss`` is the mean over the ranks (a
    non-finite loss on any rank stops every rank) and ``images`` / ``img_per_s`` count all ranks' images.
    """
    model.train()
    use_amp = scaler is not None and device.type == "cuda"
    sums: dict[str, float] = {}
    n_iter = n_img = 0
    data_time = 0.0
    t_start = t_last = time.perf_counter()
    bar = tqdm(data_loader, desc=f"epoch {epoch}", disable=not _progress_enabled(progress), leave=False,
               dynamic_ncols=True, mininterval=1.0)
    for images, targets in bar:
        data_time += time.perf_counter() - t_last
        images, targets = _to_device(images, targets, device)
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
            loss_dict = model(images, targets)
        loss = sum(v.float() for v in loss_dict.values() if v.requires_grad)
        if not torch.is_tensor(loss):
            raise ConfigError("no loss carries a gradient: nothing to train (check `decoupled`)")
        values = {k: float(v.detach()) for k, v in loss_dict.items()}
        loss_value = distributed.mean_over_ranks(float(loss.detach()), world_size)
        if not math.isfinite(loss_value):
            raise NonFiniteLossError(iteration + n_iter, epoch, {"loss": loss_value, **values},
                                     optimizer.param_groups[0]["lr"])
        optimizer.zero_grad(set_to_none=True)
        if use_amp:
            scaler.scale(loss).backward()
            if grad_clip is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(
                    [p for g in optimizer.param_groups for p in g["params"]], grad_clip)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(
                    [p for g in optimizer.param_groups for p in g["params"]], grad_clip)
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        sums["loss"] = sums.get("loss", 0.0) + loss_value
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + v
        n_iter += 1
        n_img += len(images)
        if n_iter % 10 == 0:
            bar.set_postfix(loss=f"{sums['loss'] / n_iter:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2g}")
        t_last = time.perf_counter()
        if max_iters is not None and n_iter >= max_iters:
            break
    bar.close()
    n_img = int(distributed.sum_over_ranks(n_img, world_size))
    elapsed = time.perf_counter() - t_start
    out = {k: v / max(n_iter, 1) for k, v in sums.items()}
    out.update(iterations=n_iter, images=n_img, time=elapsed, data_time=data_time,
               loader_wait_fraction=data_time / elapsed if elapsed > 0 else 0.0,
               img_per_s=n_img / elapsed if elapsed > 0 else 0.0)
    return out


@torch.inference_mode()
def predict(model, data_loader, device, label_to_cat_id, *, progress: bool | None = None) -> list[dict]:
    """Run the detector over ``data_loader`` and return COCO-format results
    ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` in the loader's image coordinates
    (the detector's transform maps boxes back to each input image's size). ``label_to_cat_id[l]`` maps the
    contiguous label ``l`` (1..C) to the dataset's category id."""
    model.eval()
    results: list[dict] = []
    for images, targets in tqdm(data_loader, desc="predict", disable=not _progress_enabled(progress), leave=False):
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
                results.append({"image_id": image_id, "category_id": int(label_to_cat_id[label]),
                                "bbox": [round(c, 2) for c in box], "score": round(score, 5)})
    return results


# ----------------------------------------------------------------------------------------------------------------
# One training run
# ----------------------------------------------------------------------------------------------------------------
def shared_loss_inputs(train_ann: str, hierarchy_file: str | None, hierarchy_rate: float,
                       inputs: Iterable[str], skip_invalid: bool = False, store=None) -> dict:
    """The costly loss inputs that every run on the same training data shares, computed once: the
    concurrent-rate matrix r_ij (``lt_models.data.rate_matrix``) when ``inputs`` (the union of ``LossSpec.inputs`` of
    the runs) names ``concurrent_rate`` (concurrent softmax in training, or eq 5 scores). A sweep computes them on
    the driver and hands them to each trial's ``train(..., shared=...)``. ``store``: the training set's annotation
    store (`lt_models.data.store`), whose merged objects r_ij then counts instead of reading ``train_ann`` again."""
    if "concurrent_rate" not in set(inputs):
        return {}
    from lt_models.data.rate_matrix import concurrent_rate_matrix

    return {"concurrent_rate": concurrent_rate_matrix(train_ann if store is None else store, hierarchy=hierarchy_file,
                                                      hierarchy_rate=hierarchy_rate, skip_invalid=skip_invalid)}


def build_loss(spec: TrainSpec, train_ds, shared: dict | None):
    """``spec.loss`` with the data its equation needs: r_ij (shared), the r/c/f buckets, the class frequencies,
    the number of classes."""
    if shared is None or ("concurrent_rate" in spec.loss.inputs and "concurrent_rate" not in shared):
        shared = shared_loss_inputs(spec.train_ann, spec.hierarchy_file, spec.hierarchy_rate, spec.loss.inputs,
                                    spec.skip_invalid, store=train_ds.store)
    return spec.loss.build(concurrent_rate=shared.get("concurrent_rate"), frequency=list(train_ds.frequency),
                           class_freq=(train_ds.image_counts() / max(len(train_ds), 1)).tolist(),
                           num_classes=train_ds.num_classes)


def _loader(dataset, batch_size, sampler, workers, device):
    from lt_models.data.datasets import collate_detection
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                                       collate_fn=collate_detection, pin_memory=device.type == "cuda",
                                       persistent_workers=False)


def _val_loader(dataset, spec: TrainSpec, device, rank: int, world_size: int):
    """The validation loader: every image in order, or (``world_size`` > 1) this rank's share of the very same
    batches (``distributed.eval_batches``)."""
    if world_size == 1:
        return _loader(dataset, spec.batch_size, torch.utils.data.SequentialSampler(dataset), spec.workers, device)
    from lt_models.data.datasets import collate_detection
    batches = distributed.eval_batches(len(dataset), spec.batch_size, rank, world_size)
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=spec.workers,
                                       collate_fn=collate_detection, pin_memory=device.type == "cuda")


def evaluate(model, val_loader, val_ds, val_ann, device, progress=None, frequency=None, metric: str = "lvis",
             hierarchy: str | None = None, world_size: int = 1) -> dict:
    """Predict on the validation loader and score with ``lt_models.evaluation.evaluate_lvis`` (``metric="lvis"``)
    or ``evaluate_openimages`` (``"openimages"``: the challenge AP@0.5 with the class ``hierarchy``, reported as
    both AP and AP50). ``frequency`` ({category id: 'r'/'c'/'f'}) overrides the validation file's buckets;
    ``train`` passes the training set's, so APr/APc/APf always bucket classes by their training frequency.
    With ``world_size`` > 1 every rank predicts its share of the batches (``_val_loader``), rank 0 scores all
    detections in single-process order and every rank returns its metrics."""
    from lt_models.evaluation import evaluate_lvis, evaluate_openimages
    dets = predict(model, val_loader, device, val_ds.label_to_cat_id, progress=progress)
    if world_size > 1:
        position = {int(i): k for k, i in enumerate(val_ds.image_ids)}
        dets = distributed.gather_in_order(dets, lambda d: position[d["image_id"]], world_size)

    def score() -> dict:
        if metric == "openimages":
            return evaluate_openimages(val_ann, dets, hierarchy, frequency=frequency)
        return evaluate_lvis(val_ann, dets, frequency=frequency)

    return distributed.on_rank0(score, world_size)


def train(spec: TrainSpec, out_dir: str | Path, *, init_checkpoint: str | Path | None = None,
          resume_checkpoint: str | Path | None = None, on_eval: Callable[[dict, Path | None], None] | None = None,
          shared: dict | None = None, rank: int = 0, world_size: int = 1) -> dict:
    """Train one run per ``spec``; write checkpoints under ``out_dir``; return the last evaluation's metrics.

    init_checkpoint: model weights to start from (hybrid stage 2 starts from the stage-1 checkpoint; only the
        model is restored — optimizer, schedule and warm-up start fresh).
    resume_checkpoint: a checkpoint written by a previous call with the same spec: restores everything
        (model, optimizer, scheduler, RNGs, epoch/iteration) and continues exactly.
    shared: ``shared_loss_inputs(...)`` computed once by the caller (a sweep's driver); computed here if absent.
    on_eval(metrics, checkpoint_dir): called after each evaluation once ``checkpoint_dir`` is complete on disk.
        metrics: AP, AP50, APr, APc, APf (floats, -1 where a bucket has no class), loss (mean optimised training
        loss of the last epoch), epoch (epochs completed), iteration (optimizer steps so far), images (training
        images seen so far), per_class
        ({category_id: AP}), plus the rest of ``evaluate_lvis``'s keys.
    rank, world_size: this process's place among ``world_size`` data-parallel processes (torch.distributed already
        initialised, e.g. by Ray Train). Every rank gets the same metrics; only rank 0 writes checkpoints (holding
        the unwrapped model, the same format as a single process's), rotates them and gets ``checkpoint_dir`` in
        ``on_eval``. ``on_eval`` is called on every rank (Ray Train's report is collective), with
        ``checkpoint_dir=None`` on the others; pass None where nothing should be reported. Each rank must get its
        own ``out_dir`` and its own local copy of ``resume_checkpoint``.

    Checkpoint directories are ``out_dir/checkpoint_epoch{e:04d}`` (checkpoint.pt, metrics.json, spec.json,
    run.json); only this run's newest ``spec.keep_checkpoints`` are kept (older ones are removed after ``on_eval``
    returns; checkpoints of other runs in ``out_dir`` are left alone). What a killed earlier run left half-written in
    ``out_dir`` is cleaned up first (``lt_models.atomic.recover_dir``).
    """
    spec.validate()
    distributed.check_process_group(rank, world_size)
    if spec.stage == "stage2" and init_checkpoint is None and resume_checkpoint is None:
        raise ConfigError("stage2 starts from the stage-1 checkpoint: pass init_checkpoint (or resume_checkpoint)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for line in recover_dir(out_dir):  # what a kill of an earlier run left behind
        print(f"ltsweep: {line}", file=sys.stderr)
    device = pick_device(spec.device)
    threads_before = torch.get_num_threads()
    if spec.num_threads is not None:
        torch.set_num_threads(spec.num_threads)
    try:
        return _train(spec, out_dir, device, init_checkpoint, resume_checkpoint, on_eval, shared, rank, world_size)
    finally:
        torch.set_num_threads(threads_before)


def _train(spec, out_dir, device, init_checkpoint, resume_checkpoint, on_eval, shared, rank, world_size) -> dict:
    from lt_models.data.datasets import LVISDetection

    random.seed(spec.seed)
    np.random.seed(spec.seed)
    torch.manual_seed(spec.seed)

    train_ds = LVISDetection(spec.train_ann, spec.train_image_dir, hierarchy_file=spec.hierarchy_file,
                             expand_parents=spec.expand_parents, train=True, skip_invalid=spec.skip_invalid,
                             transforms=RandomHorizontalFlip() if spec.hflip else None, cache_root=spec.annotation_cache)
    val_ds = LVISDetection(spec.val_ann, spec.val_image_dir, hierarchy_file=spec.hierarchy_file,
                           expand_parents=spec.expand_parents, train=False, skip_invalid=spec.skip_invalid,
                           cache_root=spec.annotation_cache)
    if list(val_ds.cat_ids) != list(train_ds.cat_ids):
        raise AnnotationError(f"{spec.val_ann}: its categories differ from {spec.train_ann}'s "
                              f"({len(val_ds.cat_ids)} vs {len(train_ds.cat_ids)} ids); both files must list the same "
                              "categories")
    num_classes = train_ds.num_classes
    train_buckets = dict(zip(train_ds.cat_ids, train_ds.frequency))  # r/c/f of the evaluation: training counts

    model = build_detector(num_classes, spec.backbone, build_loss(spec, train_ds, shared),
                           image_size=spec.image_size, weights=spec.weights, box_reg_labels=spec.box_reg_labels)
    if init_checkpoint is not None and resume_checkpoint is None:
        init_extra = load_model_weights(init_checkpoint, model)
        from lt_models.modeling.classifier_switch import switch_classifier  # softmax stage 1 -> sigmoid-type stage-2 loss
        switch_classifier(model, init_extra)
    set_decoupled(model, spec.decoupled)
    model.to(device)
    if world_size > 1:  # same initial weights on every rank; then each rank flips and samples on its own stream
        seed = distributed.rank_seed(spec.seed, rank)
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    indptr, labels = train_ds.label_csr()
    sampler = build_sampler(spec.sampler, indptr, labels, num_classes, seed=spec.seed, rank=rank,
                            world_size=world_size)
    train_loader = _loader(train_ds, spec.batch_size, sampler, spec.workers, device)
    val_loader = _val_loader(val_ds, spec, device, rank, world_size)
    iters_per_epoch = len(train_loader)
    if iters_per_epoch == 0:
        raise ConfigError(f"{spec.train_ann}: no training images to sample")

    optimizer = build_optimizer(model, spec.lr, spec.momentum, spec.weight_decay)
    scheduler = build_lr_scheduler(optimizer, spec.warmup, spec.warmup_factor,
                                   [s * iters_per_epoch for s in spec.lr_steps], spec.lr_gamma)
    scaler = torch.amp.GradScaler("cuda") if (spec.amp and device.type == "cuda") else None

    start_epoch, iteration, images = 0, 0, 0
    run_id = uuid.uuid4().hex  # this run's checkpoints (rotation never touches another run's in out_dir)
    if resume_checkpoint is not None:
        state = load_checkpoint(resume_checkpoint, model, optimizer, scheduler, scaler)
        start_epoch, iteration = state["epoch"], state["iteration"]
        images = int(state["extra"].get("images", 0))
        run_id = state["extra"].get("run_id") or run_id
        rank_rng = state["extra"].get("rank_rng")
        if world_size > 1 and isinstance(rank_rng, list) and len(rank_rng) == world_size:
            restore_rng_state(rank_rng[rank])  # each rank continues its own RNG stream
        if start_epoch >= spec.epochs:  # nothing left to train: hand back the checkpoint's own evaluation
            ckpt_dir = Path(resume_checkpoint)
            ckpt_dir = ckpt_dir if ckpt_dir.is_dir() else ckpt_dir.parent
            saved = ckpt_dir / "metrics.json"
            metrics = json.loads(saved.read_text()) if saved.is_file() else {"epoch": start_epoch,
                                                                              "iteration": iteration}
            return dict(metrics, checkpoint_dir=str(ckpt_dir))

    ddp = distributed.wrap(model, device, world_size)  # `model` stays the unwrapped detector (checkpoints, eval)
    spec_dict = spec.to_dict()
    extra = {"num_classes": num_classes, "cat_ids": [int(c) for c in train_ds.cat_ids], "backbone": spec.backbone,
             "stage": spec.stage}
    metrics: dict = {}
    last_loss = float("nan")
    for epoch in range(start_epoch, spec.epochs):
        sampler.set_epoch(epoch)
        stats = train_one_epoch(ddp, optimizer, train_loader, device, epoch, scheduler=scheduler, scaler=scaler,
                                grad_clip=spec.grad_clip, iteration=iteration, progress=spec.progress,
                                world_size=world_size)
        iteration += stats["iterations"]
        images += stats["images"]
        last_loss = stats["loss"]
        done = epoch + 1
        if done % spec.eval_every != 0 and done != spec.epochs:
            continue
        distributed.sync_buffers(model, world_size)  # every rank evaluates rank 0's model, the checkpointed one
        res = evaluate(model, val_loader, val_ds, spec.val_ann, device, progress=spec.progress,
                       frequency=train_buckets, metric=spec.eval_metric, hierarchy=spec.hierarchy_file,
                       world_size=world_size)
        metrics = {k: v for k, v in res.items()}
        metrics.update(loss=last_loss, epoch=done, iteration=iteration, images=images,
                       train_img_per_s=stats["img_per_s"], loader_wait_fraction=stats["loader_wait_fraction"])
        ckpt_extra = dict(extra, images=images, run_id=run_id)
        if world_size > 1:
            ckpt_extra["rank_rng"] = distributed.gather(capture_rng_state(), world_size)
        ckpt_dir = distributed.on_rank0(lambda: write_checkpoint_dir(
            out_dir, f"checkpoint_epoch{done:04d}", model, optimizer, scheduler, scaler, epoch=done,
            iteration=iteration, metrics=metrics, spec=spec_dict, extra=ckpt_extra), world_size)
        if on_eval is not None:
            on_eval(metrics, ckpt_dir if rank == 0 else None)
        if rank == 0:
            rotate_checkpoints(out_dir, run_id, spec.keep_checkpoints)
        metrics = dict(metrics, checkpoint_dir=str(ckpt_dir) if rank == 0 else None)
    return metrics
