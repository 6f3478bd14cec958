"""The Tune function trainable: one stage-2 (or one-stage) trial of a sweep.

A trial
  1. builds its typed run spec from the experiment and its sampled values (`pipelines.config.train_spec`);
  2. starts from its own last checkpoint when Tune retries or resumes it (`tune.get_checkpoint()`), else from
     its seed's shared stage-1 checkpoint (hybrid schedule), else from scratch (one-stage, `stage1: null`);
  3. runs `lt_models.engine.train`, whose `on_eval` hook reports AP, AP50, APr, APc, APf, loss, epoch,
     iteration, images (seen in training so far), seed, pretrain_sha256 and per_class to Tune at every evaluation, with the engine's checkpoint dir as
     the Tune checkpoint (Tune copies it to storage before `report` returns).

Torch uses as many threads as the trial has CPUs, and CUDA when Ray gave the trial a GPU (`config.compute`). A
non-finite loss
ends the trial with `TrialDivergedError` (the rest of the sweep goes on); a marker in the trial's
working dir makes Tune's retries of that trial fail at once instead of re-running the same divergence.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, Optional

from ray import tune

from pipelines.config import ExperimentConfig, compute, train_spec
from pipelines.schema import RESULT_METRICS

DIVERGED_MARKER = "DIVERGED.txt"


class TrialDivergedError(RuntimeError):
    """The trial's training loss became NaN/inf (lt_models.engine.NonFiniteLossError)."""


def trial_resources(cfg: ExperimentConfig) -> dict[str, float]:
    """Resources of one trial (and of the stage-1 task), for `tune.with_resources`."""
    return {"cpu": cfg.resources.cpus_per_trial, "gpu": cfg.resources.gpus_per_trial}


def build_result(metrics: dict[str, Any], pretrain_sha256: str, seed: int) -> dict[str, Any]:
    """The dict reported to Tune from the engine's evaluation metrics."""
    result: dict[str, Any] = {k: float(metrics[k]) for k in RESULT_METRICS if k in metrics}
    result["epoch"] = int(metrics["epoch"])
    result["iteration"] = int(metrics["iteration"])
    result["images"] = int(metrics.get("images", 0))
    result["pretrain_sha256"] = pretrain_sha256
    result["seed"] = int(seed)
    if isinstance(metrics.get("per_class"), dict):  # consumed by pipelines.tracking for per-class artifacts
        result["per_class"] = {str(c): float(ap) for c, ap in metrics["per_class"].items()}
    return result


def train_trial(config: dict[str, Any], experiment: ExperimentConfig, stage1: Optional[dict[str, str]] = None,
                shared: Optional[dict[str, Any]] = None) -> None:
    """Tune function trainable. `config`: the trial's sampled stage-2 values and its training `seed` (a Tune trial
    config); the rest comes through `tune.with_parameters`: `experiment` (the validated config), `stage1`
    ({seed: {"sha256", "checkpoint_dir"}}: the shared stage-1 checkpoint of each seed, or None for one-stage
    trials) and `shared` (the engine's
    `shared_loss_inputs`, computed once by the driver and put in Ray's object store)."""
    from lt_models import engine

    # one "Checkpoint successfully created" INFO line per report is noise next to the driver's progress lines
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    workdir = Path.cwd()  # Tune runs each trial in its own working directory
    marker = workdir / DIVERGED_MARKER
    if marker.is_file():
        raise TrialDivergedError(marker.read_text())

    device, threads = compute(experiment)
    spec = train_spec(experiment, "stage2" if stage1 is not None else "one_stage", config, device=device,
                      num_threads=threads)
    seed = experiment.trial_seed(config)
    mine = stage1[str(seed)] if stage1 is not None else None  # this seed's own stage 1
    sha = mine["sha256"] if mine is not None else ""

    def on_eval(metrics: dict[str, Any], checkpoint_dir: Path) -> None:
        tune.report(build_result(metrics, sha, seed), checkpoint=tune.Checkpoint.from_directory(str(checkpoint_dir)))

    out_dir = workdir / "ltsweep_train"
    shutil.rmtree(out_dir, ignore_errors=True)  # leftovers of a failed attempt; Tune holds the real checkpoints
    try:
        own = tune.get_checkpoint()
        if own is not None:  # a retry (FailureConfig) or a resumed sweep: continue exactly where it left off
            with own.as_directory() as ckpt_dir:
                engine.train(spec, out_dir, resume_checkpoint=ckpt_dir, on_eval=on_eval, shared=shared)
        else:
            init = mine["checkpoint_dir"] if mine is not None else None
            engine.train(spec, out_dir, init_checkpoint=init, on_eval=on_eval, shared=shared)
    except engine.NonFiniteLossError as exc:
        msg = (f"trial {tune.get_context().get_trial_name()} with {config} diverged: {exc}. The sweep goes on "
               "without it; to keep such settings, lower stage2.lr or raise stage2.warmup.")
        marker.write_text(msg)
        raise TrialDivergedError(msg) from None
