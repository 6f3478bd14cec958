"""`ltsweep train CONFIG.yaml [--set key=value ...] [--out DIR]`: one training run without Tune, evaluated.

The config is a sweep YAML (pipelines.config.load); its `space:` is ignored and stage 2 uses the fixed `stage2:`
values (override them with `--set stage2.lam=0.5`). `train.stage` picks what runs:

  hybrid (default)  stage 1 from the shared content-addressed cache (trained first if absent, exactly as a sweep
                    would), then stage 2 from it; with `stage1: null`, one stage from scratch
  stage1            only the non-balance stage 1, into OUT/stage1 (not the shared cache)
  stage2            only stage 2, from `train.init_checkpoint` (or from the shared stage-1 cache)

Outputs in OUT (default <storage_path>/train/<name>): the engine's checkpoint dirs, per_class_ap.csv and
result.json (the returned summary).

With `resources.workers_per_trial` > 1 the run trains on that many Ray Train workers, exactly as a sweep's trial
would (`pipelines.tune.workers`; `batch_size` per worker, `lr` for the total batch), on the Ray cluster in
RAY_ADDRESS (`ray job submit`) or a local one; OUT then holds its last checkpoint as `<stage>/checkpoint`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from lt_models.atomic import write_json_atomic
from lt_models.errors import ConfigError
from pipelines.config.experiment import ExperimentConfig
from pipelines.config.spec import compute, train_spec
from pipelines.names import TRAIN_SUMMARY_METRICS
from pipelines.storage.location import node_local_dir  # object storage: `ltsweep train` writes to a node-local dir
from pipelines.storage.stage1_cache import local_stage1
from pipelines.tune.stage1 import ensure_stage1
from pipelines.tune.sweep import ensure_dataset


def run_train(cfg: ExperimentConfig, out_dir: os.PathLike | None = None) -> dict[str, Any]:
    """Run the training `cfg.train.stage` asks for; return {stage, out_dir, checkpoint, metrics, ...}."""
    cfg = cfg.with_seed(cfg.seed)  # search.data_seeds: the seed's own draw of the data
    ensure_dataset(cfg)
    out = Path(out_dir) if out_dir is not None else node_local_dir(cfg.run.storage_path) / "train" / cfg.name
    out.mkdir(parents=True, exist_ok=True)
    # one process: the whole machine; several workers: each worker's share (its device comes from Ray Train)
    device, threads = compute(cfg, worker=True) if cfg.resources.distributed else compute(cfg, whole_machine=True)
    stage = cfg.train.stage
    summary: dict[str, Any] = {"name": cfg.name, "stage": stage, "out_dir": str(out)}

    if stage == "stage1":
        spec = train_spec(cfg, "stage1", device=device, num_threads=threads, progress=None)
        metrics = _train(cfg, spec, out / "stage1")
    else:
        init: str | Path | None = cfg.train.init_checkpoint if stage == "stage2" else None
        if init is None and cfg.stage1 is not None:
            ck = ensure_stage1(cfg, use_ray=False)
            assert ck is not None  # cfg.stage1 is set, so ensure_stage1 returns a checkpoint
            # several workers (maybe on other nodes) read stage 1 where it is stored; one process, a local copy
            init = str(ck.checkpoint_dir) if cfg.resources.distributed else local_stage1(str(ck.checkpoint_dir))
            summary["stage1"] = {
                "sha256": ck.sha256,
                "checkpoint": str(ck.checkpoint_dir),
                "trained": ck.trained,
                "AP": ck.metrics.get("AP"),
            }
        if init is None and stage == "stage2":
            raise ConfigError(
                f"{cfg.name}: train.stage is stage2 but there is no stage-1 checkpoint (stage1 is null); "
                "set train.init_checkpoint or train.stage: hybrid"
            )
        which: Literal["stage2", "one_stage"] = "stage2" if init is not None else "one_stage"
        spec = train_spec(cfg, which, device=device, num_threads=threads, progress=None)
        metrics = _train(cfg, spec, out / which, init)
        summary["stage"] = which if stage == "hybrid" else stage

    summary["checkpoint"] = metrics.get("checkpoint_dir")
    summary["metrics"] = {k: metrics[k] for k in TRAIN_SUMMARY_METRICS if k in metrics}
    if isinstance(metrics.get("per_class"), dict):
        from lt_models.evaluation import write_per_class_csv

        write_per_class_csv(metrics, str(cfg.data.val), out / "per_class_ap.csv")
        summary["per_class_csv"] = str(out / "per_class_ap.csv")
    write_json_atomic(out / "result.json", summary, indent=2, default=str)
    return summary


def _train(cfg: ExperimentConfig, spec, out_dir: Path, init: str | Path | None = None) -> dict[str, Any]:
    """`engine.train(spec, out_dir)`, or with several workers the same run as a Ray Train run whose last checkpoint
    is copied to out_dir/checkpoint (its uploads go to a scratch dir on `run.storage_path`, which every node of a
    cluster reaches, removed at the end)."""
    if not cfg.resources.distributed:
        from lt_models.engine import loop as engine

        return engine.train(spec, out_dir, init_checkpoint=init)
    from pipelines.storage import location as storage
    from pipelines.tune.cluster import ensure_ray
    from pipelines.tune.workers import train_into

    ensure_ray()
    metrics = train_into(
        cfg,
        spec,
        out_dir / "checkpoint",
        init_checkpoint=init,
        scratch_under=str(storage.join(cfg.run.storage_path, "train")),
    )
    return {**metrics, "checkpoint_dir": str(out_dir / "checkpoint")}
