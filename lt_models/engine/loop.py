"""The training loop: plain functions in the manner of torchvision's ``references/detection``.

``train(spec, out_dir)`` is the whole training of one run (``lt_models.engine.spec.TrainSpec``: stage 1, stage 2 or
one stage). It builds the run (``build_run``: the datasets, the detector with ``spec.loss``, the sampler
``spec.sampler``, the loaders and the optimizer), restores a checkpoint when resuming (``resume_run``), then runs
``train_one_epoch`` per epoch, evaluates every ``eval_every`` epochs (``lt_models.engine.validation``), writes an
atomic checkpoint directory (``lt_models.engine.checkpoint``) and then calls ``on_eval(metrics, checkpoint_dir)``
(the Tune trainable reports from there). With ``rank`` / ``world_size`` (a process group set up by Ray Train) it is
one of ``world_size`` data-parallel processes: DDP, a shard of each epoch per rank, a distributed evaluation and
checkpoints written by rank 0 only (``lt_models.engine.distributed``).

Gradient-norm clipping and AMP (float16 autocast + GradScaler) on CUDA. A non-finite loss raises
``NonFiniteLossError`` before ``backward`` (nothing from that step reaches the weights or a checkpoint).
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

import lt_models.engine.distributed as distributed
from lt_models.atomic import recover_dir
from lt_models.engine.build import (
    pick_device,
    progress_enabled,
)
from lt_models.engine.checkpoint import (
    capture_rng_state,
    rotate_checkpoints,
    write_checkpoint_dir,
)
from lt_models.engine.run import Run, build_run, resume_run
from lt_models.engine.spec import TrainSpec
from lt_models.engine.validation import evaluate
from lt_models.errors import ConfigError
from lt_models.evaluation.bootstrap import REPLICATES_FILE, save_replicates
from lt_models.evaluation.matches import MATCHES_FILE, Matches

OnEval = Callable[[dict, "Path | None"], None]


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN/inf. Raised before backward/step, so no weights were touched by that step."""

    def __init__(self, iteration: int, epoch: int, losses: dict[str, float], lr: float):
        self.iteration, self.epoch, self.losses, self.lr = iteration, epoch, losses, lr
        parts = ", ".join(f"{k}={v:.4g}" for k, v in losses.items())
        super().__init__(
            f"non-finite training loss at iteration {iteration} (epoch {epoch}, lr {lr:.4g}): {parts}. "
            "No optimizer step or checkpoint was made from it; lower lr, lengthen warmup or set "
            "grad_clip"
        )

    def __reduce__(self):  # picklable: a Ray Train worker's divergence travels to the trial as itself
        return type(self), (self.iteration, self.epoch, self.losses, self.lr)


def _to_device(images, targets, device):
    images = [img.to(device, non_blocking=True) for img in images]
    targets = [
        {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets
    ]
    return images, targets


def _step(loss, optimizer, scaler, grad_clip: float | None) -> None:
    """backward, optional gradient-norm clipping, optimizer step (through the GradScaler under AMP)."""
    optimizer.zero_grad(set_to_none=True)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if scaler is not None:
        scaler.scale(loss).backward()
        if grad_clip is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()


def train_one_epoch(
    model,
    optimizer,
    data_loader,
    device,
    epoch: int,
    *,
    scheduler=None,
    scaler=None,
    grad_clip: float | None = None,
    iteration: int = 0,
    progress: bool | None = None,
    max_iters: int | None = None,
    world_size: int = 1,
) -> dict:
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
    bar = tqdm(
        data_loader,
        desc=f"epoch {epoch}",
        disable=not progress_enabled(progress),
        leave=False,
        dynamic_ncols=True,
        mininterval=1.0,
    )
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
            raise NonFiniteLossError(
                iteration + n_iter, epoch, {"loss": loss_value, **values}, optimizer.param_groups[0]["lr"]
            )
        _step(loss, optimizer, scaler if use_amp else None, grad_clip)
        if scheduler is not None:
            scheduler.step()
        for k, v in {"loss": loss_value, **values}.items():
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
    out.update(
        iterations=n_iter,
        images=n_img,
        time=elapsed,
        data_time=data_time,
        loader_wait_fraction=data_time / elapsed if elapsed > 0 else 0.0,
        img_per_s=n_img / elapsed if elapsed > 0 else 0.0,
    )
    return out


# ----------------------------------------------------------------------------------------------------------------
# One training run
# ----------------------------------------------------------------------------------------------------------------
def train(
    spec: TrainSpec,
    out_dir: str | Path,
    *,
    init_checkpoint: str | Path | None = None,
    resume_checkpoint: str | Path | None = None,
    on_eval: OnEval | None = None,
    shared: dict | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> dict:
    """Train one run per ``spec``; write checkpoints under ``out_dir``; return the last evaluation's metrics.

    init_checkpoint: model weights to start from (hybrid stage 2 starts from the stage-1 checkpoint; only the
        model is restored — optimizer, schedule and warm-up start fresh).
    resume_checkpoint: a checkpoint written by a previous call with the same spec: restores everything
        (model, optimizer, scheduler, RNGs, epoch/iteration) and continues exactly.
    shared: ``build.shared_loss_inputs(...)`` computed once by the caller (a sweep's driver); computed here if
        absent.
    on_eval(metrics, checkpoint_dir): called after each evaluation once ``checkpoint_dir`` is complete on disk.
        metrics: AP, AP50, APr, APc, APf (floats, -1 where a bucket has no class), loss (mean optimised training
        loss of the last epoch), epoch (epochs completed), iteration (optimizer steps so far), images (training
        images seen so far), per_class ({category_id: AP}), plus the rest of ``evaluate_lvis``'s keys.
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
    threads_before = torch.get_num_threads()
    if spec.num_threads is not None:
        torch.set_num_threads(spec.num_threads)
    try:
        init = init_checkpoint if resume_checkpoint is None else None  # a resumed run has its own weights
        run = build_run(spec, out_dir, pick_device(spec.device), init, shared, rank, world_size)
        if resume_checkpoint is not None:
            finished = resume_run(run, resume_checkpoint)
            if finished is not None:
                return finished
        return _fit(run, on_eval)
    finally:
        torch.set_num_threads(threads_before)


def _fit(run: Run, on_eval: OnEval | None) -> dict:
    """The epochs from ``run.start_epoch`` on, with an evaluation and a checkpoint every ``eval_every`` epochs and
    after the last."""
    spec = run.spec
    ddp = distributed.wrap(run.model, run.device, run.world_size)  # run.model stays unwrapped (checkpoints, eval)
    metrics: dict = {}
    for epoch in range(run.start_epoch, spec.epochs):
        run.sampler.set_epoch(epoch)
        stats = train_one_epoch(
            ddp,
            run.optimizer,
            run.train_loader,
            run.device,
            epoch,
            scheduler=run.scheduler,
            scaler=run.scaler,
            grad_clip=spec.grad_clip,
            iteration=run.iteration,
            progress=spec.progress,
            world_size=run.world_size,
        )
        run.iteration += stats["iterations"]
        run.images += stats["images"]
        done = epoch + 1
        if done % spec.eval_every == 0 or done == spec.epochs:
            metrics = _evaluate_and_checkpoint(run, done, stats, on_eval)
    return metrics


def _evaluate_and_checkpoint(run: Run, done: int, stats: dict, on_eval: OnEval | None) -> dict:
    """Evaluate after epoch ``done``, write its checkpoint directory (rank 0), call ``on_eval``, rotate."""
    spec, world_size = run.spec, run.world_size
    distributed.sync_buffers(run.model, world_size)  # every rank evaluates rank 0's model, the checkpointed one
    res = evaluate(
        run.model,
        run.val_loader,
        run.val_ds,
        run.val_ann,
        run.device,
        progress=spec.progress,
        frequency=run.train_buckets,
        metric=spec.eval_metric,
        hierarchy=spec.hierarchy_file,
        world_size=world_size,
        keep_matches=spec.eval_metric == "lvis",
    )
    matches = res.pop("matches", None)  # rank 0: the matching, kept beside the checkpoint for the bootstrap
    metrics = dict(res)
    metrics.update(
        loss=stats["loss"],
        epoch=done,
        iteration=run.iteration,
        images=run.images,
        train_img_per_s=stats["img_per_s"],
        loader_wait_fraction=stats["loader_wait_fraction"],
    )
    # the hyperparameters the last epoch trained with: a λ schedule or a PBT sweep changes them between epochs
    lam = spec.sampler.lam_at(done - 1)
    if lam is not None:
        metrics["lam"] = lam
    if spec.loss.xi is not None:
        metrics["xi"] = spec.loss.xi
    extra = {
        "num_classes": run.train_ds.num_classes,
        "cat_ids": [int(c) for c in run.train_ds.cat_ids],
        "backbone": spec.backbone,
        "stage": spec.stage,
        "images": run.images,
        "run_id": run.run_id,
    }
    if world_size > 1:
        extra["rank_rng"] = distributed.gather(capture_rng_state(), world_size)
    ckpt_dir = distributed.on_rank0(
        lambda: write_checkpoint_dir(
            run.out_dir,
            f"checkpoint_epoch{done:04d}",
            run.model,
            run.optimizer,
            run.scheduler,
            run.scaler,
            epoch=done,
            iteration=run.iteration,
            metrics=metrics,
            spec=spec.to_dict(),
            extra=extra,
            files=_evaluation_files(matches, spec.replicates, spec.num_threads or os.cpu_count() or 1),
        ),
        world_size,
    )
    if on_eval is not None:
        on_eval(metrics, ckpt_dir if run.rank == 0 else None)
    if run.rank == 0:
        rotate_checkpoints(run.out_dir, run.run_id, spec.keep_checkpoints)
    return dict(metrics, checkpoint_dir=str(ckpt_dir) if run.rank == 0 else None)


def _evaluation_files(matches: Matches | None, replicates: int, threads: int) -> dict | None:
    """The checkpoint's evaluation files: the matching and (``replicates`` > 0) the bootstrap replicates, computed
    with the run's CPU threads."""
    if matches is None:
        return None
    files: dict[str, Callable[[Path], object]] = {MATCHES_FILE: matches.save}
    if replicates > 0:
        files[REPLICATES_FILE] = lambda path: save_replicates(path, matches, replicates, threads=threads)
    return files
