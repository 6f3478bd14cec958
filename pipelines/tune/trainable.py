"""The Tune function trainable: one stage-2 (or one-stage) trial of a sweep.

A trial
  1. builds its typed run spec from the experiment and its sampled values (`pipelines.config.spec.train_spec`);
  2. starts from its own last checkpoint when Tune retries or resumes it (`tune.get_checkpoint()`), else from
     its seed's shared stage-1 checkpoint (hybrid schedule), else from scratch (one-stage, `stage1: null`);
  3. runs `lt_models.engine.loop.train`, whose `on_eval` hook reports AP, AP50, APr, APc, APf, loss, epoch,
     iteration, images (seen in training so far), seed, pretrain_sha256 and per_class to Tune at every evaluation, with
     the engine's checkpoint dir as the Tune checkpoint (Tune copies it to storage before `report` returns).

With `resources.workers_per_trial` > 1 the trial is the driver of a Ray Train run (`pipelines.tune.workers`):
the engine runs on the workers, each report and checkpoint comes back to this function, which reports it to Tune
just as above, and a retry hands `tune.get_checkpoint()` to every worker.

Torch uses as many threads as the trial has CPUs, and CUDA when Ray gave the trial a GPU (`config.compute`). A
non-finite loss ends the trial with `TrialDivergedError` (the rest of the sweep goes on). A marker file
(`DIVERGED_MARKER`) in the trial's *storage* directory (`<run.storage_path>/<sweep>/<trial dir>`, where Tune keeps
its checkpoints and result.json) makes every later attempt of that trial fail at once instead of re-running the same
divergence: Tune's retries (on any node), `--resume` and `--resume-errored` in a new Ray session. `--restart-errored`
trains it again: Tune gives a restarted trial a new id, hence a new trial directory without the marker.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from ray import tune

from pipelines.config.experiment import ExperimentConfig
from pipelines.config.spec import compute, train_spec
from pipelines.names import RESULT_METRICS
from pipelines.storage import annotation_stores

DIVERGED_MARKER = "DIVERGED.txt"


class TrialDivergedError(RuntimeError):
    """The trial's training loss became NaN/inf (lt_models.engine.loop.NonFiniteLossError)."""


def build_result(metrics: dict[str, Any], pretrain_sha256: str, seed: int) -> dict[str, Any]:
    """The dict reported to Tune from the engine's evaluation metrics."""
    result: dict[str, Any] = {k: float(metrics[k]) for k in RESULT_METRICS if k in metrics}
    result["epoch"] = int(metrics["epoch"])
    result["iteration"] = int(metrics["iteration"])
    result["images"] = int(metrics.get("images", 0))
    result["pretrain_sha256"] = pretrain_sha256
    result["seed"] = int(seed)
    if isinstance(metrics.get("per_class"), dict):  # consumed by pipelines.tracking.callback for per-class artifacts
        result["per_class"] = {str(c): float(ap) for c, ap in metrics["per_class"].items()}
    if isinstance(metrics.get("reliability"), dict):  # the reliability diagram: a trial run's calibration.json
        result["reliability"] = metrics["reliability"]
    return result


def _marker_location() -> tuple[Any, str]:
    """(pyarrow filesystem, path on it) of this trial's divergence marker, in the trial's directory on the run's
    storage (Tune's `StorageContext`: `storage_filesystem` + `trial_fs_path`). That is the shared storage_path on a
    cluster (or whatever filesystem a `pyarrow.fs` URI names), so the marker outlives the node-local working dir and
    the Ray session."""
    storage = tune.get_context().get_storage()
    return storage.storage_filesystem, f"{storage.trial_fs_path.rstrip('/')}/{DIVERGED_MARKER}"


def read_diverged_marker(fs, path: str) -> str | None:
    """The marker's text if the trial diverged in an earlier attempt, else None."""
    from pyarrow import fs as pafs

    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return f.read().decode("utf-8", errors="replace")


def write_diverged_marker(fs, path: str, text: str) -> None:
    """Write the marker whole or not at all: a temp file beside it, then a move (a rename on local storage and NFS;
    object stores have no partial objects anyway)."""
    parent, name = path.rsplit("/", 1)
    fs.create_dir(parent, recursive=True)
    tmp = f"{parent}/.{name}.tmp"
    with fs.open_output_stream(tmp) as f:
        f.write(text.encode("utf-8"))
    fs.move(tmp, path)


def train_trial(
    config: dict[str, Any],
    experiment: ExperimentConfig,
    stage1: dict[str, dict[str, str]] | None = None,
    shared: dict[str, Any] | None = None,
) -> None:
    """Tune function trainable. `config`: the trial's sampled stage-2 values and its training `seed` (a Tune trial
    config); the rest comes through `tune.with_parameters`: `experiment` (the validated config), `stage1`
    ({seed: {"sha256", "checkpoint_dir"}}: the shared stage-1 checkpoint of each seed, or None for one-stage
    trials) and `shared` ({seed: the engine's `shared_loss_inputs` of that seed's data}, computed once by the
    driver and put in Ray's object store)."""
    from lt_models.engine import loop as engine

    # one "Checkpoint successfully created" INFO line per report is noise next to the driver's progress lines
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    workdir = Path.cwd()  # Tune runs each trial in its own (node-local) working directory
    marker_fs, marker = _marker_location()
    diverged = read_diverged_marker(marker_fs, marker)
    if diverged is not None:  # an earlier attempt diverged: the same settings would diverge again
        raise TrialDivergedError(diverged)

    workers = experiment.resources.distributed
    device, threads = compute(experiment, worker=workers)
    spec = train_spec(
        experiment, "stage2" if stage1 is not None else "one_stage", config, device=device, num_threads=threads
    )
    annotation_stores.fetch(experiment.run.storage_path, spec)  # object storage: this node's copy of the stores
    seed = experiment.trial_seed(config)
    mine = stage1[str(seed)] if stage1 is not None else None  # this seed's own stage 1
    shared = (shared or {}).get(str(seed))  # its data's shared loss inputs (computed here if absent)
    sha = mine["sha256"] if mine is not None else ""

    def report(metrics: dict[str, Any], checkpoint: tune.Checkpoint) -> None:
        tune.report(build_result(metrics, sha, seed), checkpoint=checkpoint)

    def on_eval(metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:  # a Path: this process is rank 0
        # ignore: Ray annotates from_directory as returning ray.train's Checkpoint; it returns cls, a tune.Checkpoint
        report(metrics, tune.Checkpoint.from_directory(str(checkpoint_dir)))  # type: ignore[arg-type]

    out_dir = workdir / "ltsweep_train"
    shutil.rmtree(out_dir, ignore_errors=True)  # leftovers of a failed attempt; Tune holds the real checkpoints
    try:
        own = tune.get_checkpoint()
        if workers:  # the trial drives a Ray Train run; the workers restore `own` or stage 1 themselves
            from pipelines.tune.workers import train_on_workers

            storage = tune.get_context().get_storage()
            train_on_workers(
                experiment,
                spec,
                storage_path=storage.trial_fs_path,
                storage_filesystem=storage.storage_filesystem,
                resume=own,
                shared=shared,
                init_checkpoint=mine["checkpoint_dir"] if mine is not None and own is None else None,
                on_eval=report,
            )
        elif own is not None:  # a retry (FailureConfig) or a resumed sweep: continue exactly where it left off
            with own.as_directory() as ckpt_dir:
                engine.train(spec, out_dir, resume_checkpoint=ckpt_dir, on_eval=on_eval, shared=shared)
        else:
            from pipelines.storage.stage1_cache import local_stage1  # object storage: a node-local copy of stage 1

            init = local_stage1(mine["checkpoint_dir"]) if mine is not None else None
            engine.train(spec, out_dir, init_checkpoint=init, on_eval=on_eval, shared=shared)
    except engine.NonFiniteLossError as exc:
        msg = (
            f"trial {tune.get_context().get_trial_name()} with {config} diverged: {exc}. The sweep goes on "
            "without it; to keep such settings, lower stage2.lr or raise stage2.warmup."
        )
        write_diverged_marker(marker_fs, marker, msg)
        raise TrialDivergedError(msg) from None
