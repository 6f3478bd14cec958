"""A whole hybrid-schedule study as one Ray Tune sweep.

    ltsweep sweep search_spaces/demo.yaml [--resume] [--force-pretrain] [--storage-path DIR]
    python -m pipelines sweep search_spaces/demo.yaml ...           (the same)
    ray job submit --working-dir . -- python -m pipelines sweep search_spaces/demo.yaml   (on a cluster)

Steps: validate the YAML (pipelines.config.load) -> generate the synthetic benchmark if the config asks for it and it
is absent -> join the Ray cluster (RAY_ADDRESS, as set by `ray job submit`) or start a local Ray -> make sure the
shared stage-1 checkpoint exists (pipelines.tune.stage1: trained once, as a Ray task with a trial's resources) ->
`Tuner` over `pipelines.tune.trainable.train_trial` (each configuration once per training seed, `search.seeds`) with
ASHA (or FIFO), the search space, `max_concurrent_trials`, `with_resources`, `FailureConfig(max_failures)`,
`CheckpointConfig(num_to_keep)`; MLflow (one driver-side callback) and TensorBoard (Tune's TBX logger) -> a summary
table.

Layout under `run.storage_path` (shared storage on a multi-node cluster: NFS, or an object store such as
`s3://bucket/prefix`, which Tune reaches through the same pyarrow filesystem, see pipelines.storage.location):
    <name>/            the Tune experiment (trial dirs with TensorBoard event files, checkpoints, tuner.pkl) and
                       ltsweep_sweep.json (the sweep record: its config and stage-1 checkpoints)
    pretrain/<sha256>/ the shared stage-1 checkpoint (one per training seed)
    mlflow.db          the default MLflow store (sqlite); mlartifacts/ beside it (not on object storage: there
                       run.tracking_uri is required)
`--resume` continues an interrupted sweep of the same name (Tuner.restore): finished trials are kept as they
are, unfinished ones continue from their last checkpoints, errored ones stay errored unless `--resume-errored`
(continue them from their last checkpoint) or `--restart-errored` (train them again) says otherwise.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

from filelock import FileLock
from ray import tune

from lt_models.errors import ConfigError
from pipelines.analysis.summary import SweepSummary, print_summary, summarize
from pipelines.config.experiment import ExperimentConfig
from pipelines.config.identity import stage1_key
from pipelines.config.load import check_dataset, load_experiment_config
from pipelines.storage import location as storage
from pipelines.storage.stage1_cache import Stage1Checkpoint, pretrain_root
from pipelines.tune.callbacks import completed_trials
from pipelines.tune.cluster import init_ray
from pipelines.tune.stage1 import ensure_stage1_per_seed
from pipelines.tune.tuner import (
    Stage1Set,
    build_tuner,
    experiment_path,
    stage1_shas,
    tracking_uri_for,
    tune_experiment_path,
)

log = logging.getLogger(__name__)

RESERVED_NAMES = {"pretrain", "train", "mlartifacts", "mlruns"}


# ---- setup helpers -----------------------------------------------------------------------------------------------


def ensure_dataset(cfg: ExperimentConfig) -> None:
    """Generate the synthetic benchmark where the config expects it (data.synthetic) if it is not there yet; with
    ``search.data_seeds``, each seed's draw."""
    if cfg.search.data_seeds:
        for seed in cfg.seeds:
            ensure_dataset(cfg.with_seed(seed))
        return
    d = cfg.data
    if d.synthetic is not None and not (d.train.is_file() and d.val.is_file()):
        from lt_models.data.synthetic.generate import generate_benchmark

        out = d.train.parent
        out.mkdir(parents=True, exist_ok=True)
        with FileLock(str(out / ".generate.lock")):
            if not d.train.is_file():
                log.info("generating the synthetic %r benchmark in %s", d.synthetic, out)
                generate_benchmark(out, preset=d.synthetic, seed=d.synthetic_seed)
        for key in ("train", "val"):
            if not getattr(d, key).is_file():
                raise ConfigError(
                    f"data.{key}: {getattr(d, key)} is still missing after generating the synthetic "
                    f"benchmark in {out} (it writes train.json and val.json); point data.{key} there"
                )
    check_dataset(cfg.model_copy(update={"data": d.model_copy(update={"synthetic": None})}), cfg.name)


def scheduler_advice(cfg: ExperimentConfig) -> str | None:
    """A line for the user when the scheduler and the seeds work against each other, else None."""
    if cfg.scheduler.type == "asha" and len(cfg.seeds) > 1:
        return (
            f"note: scheduler.type asha judges each trial alone, against other seeds' trials too, so a weak seed "
            f"loses its trials and few configurations keep all {len(cfg.seeds)} seeds to the end; "
            "scheduler.type: asha_configs judges configurations on their mean over seeds (see docs/sweeps.md)"
        )
    return None


# ---- entry points ------------------------------------------------------------------------------------------------


def run_sweep(
    cfg: ExperimentConfig,
    *,
    resume: bool = False,
    errored: str | None = None,
    force_pretrain: bool = False,
    trainable_fn: Callable | None = None,
    callbacks: Sequence[Any] = (),
    verbose: int = 0,
    progress: bool = True,
    include_dashboard: bool | None = None,
    register: bool = True,
    model_name: str | None = None,
) -> SweepSummary:
    """Run (or, with resume, continue) the sweep described by cfg and return its summary.

    At the end the best checkpoint is logged on the sweep's MLflow run and registered as ``model_name`` (default
    the sweep's name; ``register=False``: logged, not registered), unless the sweep was interrupted
    (:mod:`pipelines.tracking.best_model`).

    trainable_fn: a stand-in for pipelines.tune.trainable.train_trial with the same signature (tests wrap it to inject
    faults); callbacks: extra Tune callbacks (a resumed sweep gets back the original ones from tuner.pkl);
    verbose: Tune's own output (0 = quiet); progress: one line per evaluation from ProgressPrinter."""
    shown = _check_start(cfg, resume, errored, force_pretrain)
    ensure_dataset(cfg)
    # num_to_keep forces an experiment snapshot per checkpoint; on toy data that is every few seconds, and Tune
    # would warn about it at each one
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    advice = scheduler_advice(cfg)
    if advice:
        print(advice, flush=True)
    init_ray(cfg, include_dashboard=include_dashboard)
    if resume:
        stage1 = _stage1_of_existing_sweep(cfg)
    else:
        stage1 = ensure_stage1_per_seed(
            cfg, force=force_pretrain, tracking_uri=tracking_uri_for(cfg), sweep_name=cfg.name
        )
        _write_sweep_record(cfg, stage1)
    tuner = build_tuner(
        cfg,
        stage1,
        resume=resume,
        errored=errored,
        trainable_fn=trainable_fn,
        callbacks=callbacks,
        verbose=verbose,
        progress=progress,
    )
    handler_before = signal.getsignal(signal.SIGINT)
    results = _fit_with_startup_heap_frozen(tuner)
    interrupted = _tune_was_interrupted(handler_before)
    summary = summarize(
        cfg,
        results,
        stage1,
        resumed=resume,
        experiment_path=shown,
        tracking_uri=tracking_uri_for(cfg),
        interrupted=interrupted,
        completed=completed_trials(cfg.name) if interrupted else None,
    )
    summary.experiment_id = _experiment_id(summary)
    if not interrupted:
        from pipelines.tracking.best_model import log_best_model_safely

        summary.model = log_best_model_safely(cfg, summary, results, register=register, name=model_name)
    return summary


def _check_start(cfg: ExperimentConfig, resume: bool, errored: str | None, force_pretrain: bool) -> str:
    """Refuse a sweep that cannot start (a reserved name, bad flags, an existing sweep without --resume or a missing
    one with it) before anything runs; returns where the sweep lives, for messages."""
    if cfg.name in RESERVED_NAMES:
        raise ConfigError(
            f"name: {cfg.name!r} is reserved (it is a directory under run.storage_path); rename the sweep"
        )
    if errored is not None and not resume:
        raise ConfigError(
            f"--{errored}-errored needs --resume (it says what a resumed sweep does with its errored trials)"
        )
    tracking_uri_for(cfg)  # object storage without run.tracking_uri: say so before anything starts
    storage.check_storage(cfg.run.storage_path)  # creates a local one; an unreachable store or bucket: one line
    path, fs = tune_experiment_path(cfg)
    shown = storage.display(experiment_path(cfg))
    if resume:
        if force_pretrain:
            raise ConfigError(
                "--force-pretrain cannot be combined with --resume: the sweep's trials already started "
                "from its stage-1 checkpoint; start a new sweep to retrain stage 1"
            )
        if not tune.Tuner.can_restore(path, storage_filesystem=fs):
            raise ConfigError(
                f"--resume: there is no restorable sweep at {shown}; run without --resume to start "
                f"sweep {cfg.name!r} (or check run.storage_path / --storage-path)"
            )
    elif tune.Tuner.can_restore(path, storage_filesystem=fs):
        raise ConfigError(
            f"sweep {cfg.name!r} already exists at {shown}; pass --resume to continue it, or give it "
            "a new name (name: in the YAML) or another --storage-path"
        )
    return shown


def _experiment_id(summary: SweepSummary) -> str | None:
    """The sweep's MLflow experiment id (for the UI link the summary prints), or None if the store cannot say."""
    from pipelines.mlflow_io.client import open_store

    try:
        exp = open_store(summary.tracking_uri).get_experiment_by_name(summary.name)
    except Exception:
        return None
    return None if exp is None else exp.experiment_id


def _fit_with_startup_heap_frozen(tuner: tune.Tuner):
    """``tuner.fit()`` with the objects made so far (Ray's, MLflow's, torch's modules and the config) moved out of
    the cyclic garbage collector's view for the sweep (``gc.freeze``) and given back after it: they stay alive
    throughout, yet each full collection walked them again. Measured inside ``fit`` on the driver of a 300-trial
    ``benchmarks/bench_driver.py`` sweep: 0.64 s of collections with one of 0.38 s, against 0.33 s and at most
    0.05 s frozen."""
    gc.collect()
    gc.freeze()
    try:
        return tuner.fit()
    finally:
        gc.unfreeze()


def _tune_was_interrupted(handler_before) -> bool:
    """Did Tune's fit end because it caught Ctrl+C (SIGINT) or SIGUSR1? Tune installs its own SIGINT handler for
    the run and puts the previous one back only when that handler fires; its handler sets a threading.Event. So:
    the previous handler back in place, or Tune's handler with its event set, means the run was interrupted."""
    if threading.current_thread() is not threading.main_thread() or os.environ.get("TUNE_DISABLE_SIGINT_HANDLER"):
        return False  # Tune installed no handler here, so there is nothing to read
    handler = signal.getsignal(signal.SIGINT)
    if handler is handler_before:
        return True
    for cell in getattr(handler, "__closure__", None) or ():
        if isinstance(cell.cell_contents, threading.Event):
            return cell.cell_contents.is_set()
    return False


SWEEP_RECORD = "ltsweep_sweep.json"


def _write_sweep_record(cfg: ExperimentConfig, stage1: Stage1Set) -> None:
    """<storage>/<name>/ltsweep_sweep.json (whole or not at all, also on object storage): read by --resume and
    `ltsweep confirm`."""
    storage.write_json(
        storage.join(experiment_path(cfg), SWEEP_RECORD),
        {
            "config_fingerprint": cfg.fingerprint(),
            "stage1_sha256": stage1_shas(stage1),
            "config": cfg.model_dump(mode="json"),
        },
        indent=2,
    )


def _stage1_of_existing_sweep(cfg: ExperimentConfig) -> Stage1Set:
    """The stage-1 checkpoints a sweep started with (one per seed): resumed trials and the ones still pending must
    share them, even if the training code or data changed meanwhile (then their keys would differ)."""
    record_file = storage.join(experiment_path(cfg), SWEEP_RECORD)
    if not storage.is_file(record_file):
        raise ConfigError(
            f"--resume: {storage.display(record_file)} is missing, so the stage-1 checkpoint this sweep "
            "started from is unknown; start a new sweep instead"
        )
    record = storage.read_json(record_file)
    if record["config_fingerprint"] != cfg.fingerprint():
        raise ConfigError(
            f"--resume: the config of sweep {cfg.name!r} changed since it started (only run.* may "
            "differ); resume with the original YAML or start a new sweep under another name"
        )
    shas = record["stage1_sha256"]
    if shas is None:
        return None
    if isinstance(shas, str):  # a record written before seeds were repeats: the config's own seed
        shas = {str(cfg.seed): shas}
    out = {}
    for seed, sha in shas.items():
        ckpt_path = storage.join(pretrain_root(cfg.run.storage_path), sha)
        if not storage.is_file(storage.join(ckpt_path, "meta.json")):
            raise ConfigError(
                f"--resume: the sweep's stage-1 checkpoint {storage.display(ckpt_path)} (seed {seed}) is "
                "gone; start a new sweep"
            )
        if sha != stage1_key(cfg.with_seed(int(seed))):
            log.warning(
                "the training code or data changed since sweep %r started; its trials keep using its "
                "stage-1 checkpoint %s (seed %s)",
                cfg.name,
                sha[:12],
                seed,
            )
        meta = storage.read_json(storage.join(ckpt_path, "meta.json"))
        out[int(seed)] = Stage1Checkpoint(
            sha, ckpt_path, trained=False, metrics=meta.get("metrics", {}), seconds=float(meta.get("seconds", 0.0))
        )
    return out


def apply_run_overrides(
    cfg: ExperimentConfig, storage_path: str | os.PathLike | None = None, tracking_uri: str | None = None
) -> ExperimentConfig:
    update = {}
    if storage_path is not None:  # a directory (made absolute) or an object-store URI (as it is)
        loc = storage.as_location(storage_path)  # a str only for a URI, else a Path
        update["storage_path"] = loc if storage.is_uri(loc) else cast(Path, loc).expanduser().resolve()
    if tracking_uri is not None:
        update["tracking_uri"] = tracking_uri
    return cfg.model_copy(update={"run": cfg.run.model_copy(update=update)}) if update else cfg


def run_sweep_from_file(
    config: str | Path,
    resume: bool = False,
    force_pretrain: bool = False,
    storage_path: str | os.PathLike | None = None,
    tracking_uri: str | None = None,
    overrides: list[str] | None = None,
    errored: str | None = None,
    register: bool = True,
    model_name: str | None = None,
) -> SweepSummary:
    """`ltsweep sweep` / `python -m pipelines sweep`: load (with `a.b=value` overrides), run, print the summary."""
    cfg = load_experiment_config(config, overrides)
    cfg = apply_run_overrides(cfg, storage_path, tracking_uri)
    summary = run_sweep(
        cfg, resume=resume, errored=errored, force_pretrain=force_pretrain, register=register, model_name=model_name
    )
    print_summary(summary)
    return summary
