"""The one road from a config (and a trial's sampled values) to the engine: `train_spec(cfg, stage, trial_config)`
builds the engine's typed `TrainSpec` (with its `SamplerSpec` and `LossSpec`, which `Stage2Config.sampler_spec()` and
`loss_spec()` build) for stage 1, for a trial's stage 2, or for a one-stage run; `compute(cfg)` is the one choice
of device and CPU threads for a run."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from lt_models.engine.spec import STAGE1_SAMPLER, TrainSpec
from lt_models.errors import ConfigError
from pipelines.config.experiment import ExperimentConfig
from pipelines.config.sections import ScheduleConfig
from pipelines.storage import annotation_stores


def compute(cfg: ExperimentConfig, *, whole_machine: bool = False, worker: bool = False) -> tuple[str, int]:
    """(device, CPU threads) of one run. In a Ray trial or the stage-1 task: the trial's `cpus_per_trial` threads,
    and CUDA when the trial was given a GPU and one is visible. `worker`: one Ray Train worker of a multi-worker
    trial (`resources.workers_per_trial` > 1): `cpus_per_worker` threads, CUDA when `gpus_per_worker` is 1 (the
    worker then takes the exact device from Ray Train). `whole_machine` (`ltsweep train`, no Ray): every core for a
    CPU run."""
    import torch

    r = cfg.resources
    gpus, cpus = (r.gpus_per_worker, r.cpus_per_worker) if worker else (r.gpus_per_trial, r.cpus_per_trial)
    threads = max(1, int(cpus))
    if whole_machine:
        return "auto", (os.cpu_count() or 1) if gpus == 0 else threads
    if worker:  # decided for the workers by their driver, which may run on a node without a GPU (a CPU head node)
        return ("cuda" if gpus > 0 else "cpu"), threads
    return ("cuda" if gpus > 0 and torch.cuda.is_available() else "cpu"), threads


def train_spec(
    cfg: ExperimentConfig,
    stage: Literal["stage1", "stage2", "one_stage"],
    trial_config: dict[str, Any] | None = None,
    *,
    device: str = "auto",
    num_threads: int = 1,
    eval_every: int | None = None,
    progress: bool | None = False,
) -> TrainSpec:
    """The engine's TrainSpec for one stage. Stage 1 is the shared recipe (non-balance + `stage1.loss`, all layers);
    stage 2 and one-stage runs train `cfg.stage2` with the trial's sampled values applied (a Tune trial config).
    progress: tqdm bars (None = only on a terminal; False in trials, whose output goes to Ray's logs)."""
    s: ScheduleConfig
    decoupled: bool | Literal["cls", "box_head"]
    cfg = cfg.for_trial(trial_config)  # search.data_seeds: the trial's seed's data draw
    if stage == "stage1":
        if cfg.stage1 is None:
            raise ConfigError("stage1 is null in this config; there is no stage-1 schedule to train")
        s, sampler, loss, decoupled = cfg.stage1, STAGE1_SAMPLER, cfg.stage1.loss_spec(), False
    else:
        s = cfg.stage2_for_trial(trial_config or {})
        sampler, loss, decoupled = s.sampler_spec(), s.loss_spec(), s.decoupled
    d = cfg.data
    return TrainSpec(
        train_ann=str(d.train),
        val_ann=str(d.val),
        train_image_dir=_str(d.image_dir),
        val_image_dir=_str(d.val_image_dir),
        hierarchy_file=_str(d.hierarchy),
        expand_parents=d.expand_parents,
        hierarchy_rate=d.hierarchy_rate,
        skip_invalid=d.skip_invalid,
        annotation_cache=str(annotation_stores.cache_dir(cfg.run.storage_path)),
        stage=stage,
        backbone=cfg.model.backbone,
        image_size=cfg.model.image_size,
        weights=_str(cfg.model.weights),
        sampler=sampler,
        loss=loss,
        decoupled=decoupled,
        epochs=s.epochs,
        batch_size=s.batch_size,
        lr=s.lr,
        warmup=s.warmup,
        lr_steps=tuple(s.lr_steps),
        grad_clip=s.grad_clip,
        eval_every=eval_every or cfg.eval.every,
        seed=cfg.trial_seed(trial_config),
        num_threads=num_threads,
        device=device,
        workers=s.workers,
        progress=progress,
        eval_metric=cfg.eval.metric,
        replicates=0 if stage == "stage1" else cfg.report.replicates,
        val_holdout=d.holdout,
        holdout_seed=d.holdout_seed,
        val_part="heldout" if d.evaluate_on == "holdout" else "select",
    )


def _str(p: Path | None) -> str | None:
    return None if p is None else str(p)
