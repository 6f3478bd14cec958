"""`ltsweep train CONFIG.yaml [--set key=value ...] [--out DIR]`: one training run without Tune, evaluated.

The config is a sweep YAML (pipelines.config); its `space:` is ignored and stage 2 uses the fixed `stage2:`
values (override them with `--set stage2.lam=0.5`). `train.stage` picks what runs:

  hybrid (default)  stage 1 from the shared content-addressed cache (trained first if absent, exactly as a sweep
                    would), then stage 2 from it; with `stage1: null`, one stage from scratch
  stage1            only the non-balance stage 1, into OUT/stage1 (not the shared cache)
  stage2            only stage 2, from `train.init_checkpoint` (or from the shared stage-1 cache)

Outputs in OUT (default <storage_path>/train/<name>): the engine's checkpoint dirs, per_class_ap.csv and
result.json (the returned summary).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from lt_models.errors import ConfigError
from pipelines.config import ExperimentConfig, to_train_spec
from pipelines.pretrain import ensure_stage1

SUMMARY_KEYS = ("AP", "AP50", "AP75", "APr", "APc", "APf", "loss", "epoch", "iteration")


def run_train(cfg: ExperimentConfig, out_dir: Optional[os.PathLike] = None) -> dict[str, Any]:
    """Run the training `cfg.train.stage` asks for; return {stage, out_dir, checkpoint, metrics, ...}."""
    from lt_models import engine

    out = Path(out_dir) if out_dir is not None else Path(cfg.run.storage_path) / "train" / cfg.name
    out.mkdir(parents=True, exist_ok=True)
    threads = os.cpu_count() if cfg.resources.gpus_per_trial == 0 else max(1, int(cfg.resources.cpus_per_trial))
    stage = cfg.train.stage
    summary: dict[str, Any] = {"name": cfg.name, "stage": stage, "out_dir": str(out)}

    if stage == "stage1":
        spec = to_train_spec(cfg, "stage1", num_threads=threads, device="auto", progress=None)
        metrics = engine.train(spec, out / "stage1")
    else:
        init = cfg.train.init_checkpoint if stage == "stage2" else None
        if init is None and cfg.stage1 is not None:
            ck = ensure_stage1(cfg, use_ray=False)
            init = ck.checkpoint_dir
            summary["stage1"] = {"sha256": ck.sha256, "checkpoint": str(ck.checkpoint_dir), "trained": ck.trained,
                                 "AP": ck.metrics.get("AP")}
        if init is None and stage == "stage2":
            raise ConfigError(f"{cfg.name}: train.stage is stage2 but there is no stage-1 checkpoint (stage1 is null); "
                              "set train.init_checkpoint or train.stage: hybrid")
        which = "stage2" if init is not None else "one_stage"
        spec = to_train_spec(cfg, which, num_threads=threads, device="auto", progress=None)
        metrics = engine.train(spec, out / which, init_checkpoint=init)
        summary["stage"] = which if stage == "hybrid" else stage

    summary["checkpoint"] = metrics.get("checkpoint_dir")
    summary["metrics"] = {k: metrics[k] for k in SUMMARY_KEYS if k in metrics}
    if isinstance(metrics.get("per_class"), dict):
        from lt_models.evaluation import write_per_class_csv

        write_per_class_csv(metrics, str(cfg.data.val), out / "per_class_ap.csv")
        summary["per_class_csv"] = str(out / "per_class_ap.csv")
    tmp = out / ".result.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2, default=str))
    os.replace(tmp, out / "result.json")
    return summary
