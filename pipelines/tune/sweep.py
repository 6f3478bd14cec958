"""A whole hybrid-schedule study as one Ray Tune sweep.

    python -m pipelines.tune.sweep search_spaces/demo.yaml [--resume] [--force-pretrain] [--storage-path DIR]
    ltsweep sweep search_spaces/demo.yaml ...                       (the same)
    ray job submit --working-dir . -- python -m pipelines.tune.sweep search_spaces/demo.yaml   (on a cluster)

Steps: validate the YAML (pipelines.config.load) -> generate the synthetic benchmark if the config asks for it and it
is absent -> join the Ray cluster (RAY_ADDRESS, as set by `ray job submit`) or start a local Ray -> make sure the
shared stage-1 checkpoint exists (pipelines.tune.stage1: trained once, as a Ray task with a trial's resources) ->
`Tuner` over `pipelines.tune.trainable.train_trial` (each configuration once per training seed, `search.seeds`) with ASHA (or FIFO), the search space, `max_concurrent_trials`,
`with_resources`, `FailureConfig(max_failures)`, `CheckpointConfig(num_to_keep)`; MLflow (one driver-side
callback) and TensorBoard (Tune's TBX logger) -> a summary table.

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

import importlib.util
import logging
import os
import signal
import sys
import threading
from typing import Any, Callable, Optional, Sequence

from filelock import FileLock
from ray import tune

from lt_models.errors import ConfigError
from pipelines.storage import location as storage
from pipelines.tune.callbacks import _tune_callbacks, completed_trials
from pipelines.config.load import ExperimentConfig, check_dataset, load_experiment_config
from pipelines.config.experiment import TIME_ATTRS
from pipelines.tune.stage1 import (Stage1Checkpoint, dataset_fingerprint, ensure_stage1_per_seed, frequency_source,
                               pretrain_root, stage1_key)
from pipelines.analysis.summary import SweepSummary, print_summary, summarize

log = logging.getLogger(__name__)

RESERVED_NAMES = {"pretrain", "train", "mlartifacts", "mlruns"}


# ---- setup helpers -----------------------------------------------------------------------------------------------

def experiment_path(cfg: ExperimentConfig) -> storage.Location:
    return storage.join(cfg.run.storage_path, cfg.name)


def tune_experiment_path(cfg: ExperimentConfig) -> tuple[str, Any]:
    """(path, filesystem) of the Tune experiment as Tuner.restore / can_restore take them (None: local)."""
    root, fs = storage.tune_storage(cfg.run.storage_path)
    return f"{root.rstrip('/')}/{cfg.name}", fs


def tracking_uri_for(cfg: ExperimentConfig) -> str:
    from pipelines.tracking.callback import default_tracking_uri

    return cfg.run.tracking_uri or default_tracking_uri(cfg.run.storage_path)


def ensure_dataset(cfg: ExperimentConfig) -> None:
    """Generate the synthetic benchmark where the config expects it (data.synthetic) if it is not there yet."""
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
                raise ConfigError(f"data.{key}: {getattr(d, key)} is still missing after generating the synthetic "
                                  f"benchmark in {out} (it writes train.json and val.json); point data.{key} there")
    check_dataset(cfg.model_copy(update={"data": d.model_copy(update={"synthetic": None})}), cfg.name)


def init_ray(cfg: ExperimentConfig, include_dashboard: Optional[bool] = None) -> None:
    """Join the cluster in RAY_ADDRESS (set by `ray job submit`), else start a local Ray sized by run.ray_num_cpus."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        ray.init(address="local", num_cpus=cfg.run.ray_num_cpus or os.cpu_count(),
                 include_dashboard=include_dashboard, dashboard_host="127.0.0.1")


def scheduler_advice(cfg: ExperimentConfig) -> Optional[str]:
    """A line for the user when the scheduler and the seeds work against each other, else None."""
    if cfg.scheduler.type == "asha" and len(cfg.seeds) > 1:
        return (f"note: scheduler.type asha judges each trial alone, against other seeds' trials too, so a weak seed "
                f"loses its trials and few configurations keep all {len(cfg.seeds)} seeds to the end; "
                "scheduler.type: asha_configs judges configurations on their mean over seeds (see the README)")
    return None


def max_concurrent(cfg: ExperimentConfig) -> Optional[int]:
    """How many trials run at once (None: as many as Tune can start): ``search.max_concurrent_trials``, capped for
    multi-worker trials at the number whose drivers and workers the Ray cluster holds together
    (`train_workers.concurrent_trials_cap`, counted on the nodes alive now; on an autoscaling cluster start the
    nodes first). Without the cap Tune starts a driver for every CPU and the drivers starve the workers."""
    from pipelines.tune.workers import concurrent_trials_cap

    wanted, fit = cfg.search.max_concurrent_trials, concurrent_trials_cap(cfg)
    if fit is None or (wanted is not None and wanted <= fit):
        return wanted
    r = cfg.resources
    print(f"note: at most {fit} trial(s) at a time: the Ray cluster holds {fit} x (a driver and "
          f"{r.workers_per_trial} workers of {r.cpus_per_worker:g} CPU / {r.gpus_per_worker:g} GPU)"
          + (f"; search.max_concurrent_trials = {wanted} is lowered to {fit}" if wanted is not None else ""),
          flush=True)
    return fit


def _scheduler(cfg: ExperimentConfig, limit: Optional[int]):
    """The trial scheduler; `limit`: trials running at once (`max_concurrent`), which asha_configs applies."""
    if cfg.scheduler.type == "fifo":
        return None
    s = cfg.scheduler
    if s.type == "asha_configs":
        from pipelines.tune.asha import ConfigASHA

        return ConfigASHA(metric=s.metric, mode=s.mode, time_attr=TIME_ATTRS[s.time_attr],
                          max_t=s.max_t or cfg.evals_per_trial, grace_period=s.grace_period,
                          reduction_factor=s.reduction_factor, seeds=cfg.seeds,
                          max_running=limit, default_seed=cfg.seed)
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr=TIME_ATTRS[s.time_attr], max_t=s.max_t or cfg.evals_per_trial,
                         grace_period=s.grace_period, reduction_factor=s.reduction_factor)


def _search_alg(cfg: ExperimentConfig, limit: Optional[int]):
    """The search algorithm; `limit`: trials running at once (`max_concurrent`)."""
    if cfg.search.algorithm == "optuna":
        if importlib.util.find_spec("optuna") is None:
            raise ConfigError(f"{cfg.name}: search.algorithm is 'optuna' but the optuna package is not installed; "
                              "`pip install optuna` or set search.algorithm: basic")
        from ray.tune.search.optuna import OptunaSearch

        from pipelines.config.space import optuna_space

        # define-by-run: the conditional space (ξ only for ACSL, ...) as Optuna suggestions; no Tune param_space
        return OptunaSearch(space=optuna_space(cfg.space), metric=cfg.scheduler.metric, mode=cfg.scheduler.mode,
                            seed=cfg.search.seed)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # Tune ignores TuneConfig.max_concurrent_trials for a variant generator: it takes the limit itself. It counts
    # paused trials as running, so under asha_configs (which pauses trials at rungs) the scheduler applies it.
    limit = 0 if cfg.scheduler.type == "asha_configs" else limit or 0
    return BasicVariantGenerator(random_state=cfg.search.seed, max_concurrent=limit)


def _shared_objects(cfg: ExperimentConfig) -> dict[str, Any]:
    """Read-only objects every trial needs (the engine's shared loss inputs: r_ij when some trial may use
    concurrent softmax or eq 5 scores), computed once here and shipped through Ray's object store
    (tune.with_parameters). The training and validation annotation stores (`lt_models.data.store`) are built here
    first, once (and published to object storage), so trials only map them (`pipelines.storage.annotation_stores`)."""
    from lt_models.engine.loop import shared_loss_inputs
    from pipelines.storage.annotation_stores import build_and_publish

    d = cfg.data
    stores = build_and_publish(cfg.run.storage_path, d)
    return shared_loss_inputs(str(d.train), None if d.hierarchy is None else str(d.hierarchy), d.hierarchy_rate,
                              cfg.loss_inputs(), d.skip_invalid, store=stores[0])


Stage1Set = Optional[dict[int, Stage1Checkpoint]]  # a sweep's stage-1 checkpoint of each training seed


def _stage1_shas(stage1: Stage1Set) -> Optional[dict[str, str]]:
    return None if stage1 is None else {str(seed): ckpt.sha256 for seed, ckpt in stage1.items()}


def sweep_params(cfg: ExperimentConfig, stage1: Stage1Set) -> dict[str, Any]:
    """The sweep's config as logged on the MLflow parent run."""
    d = cfg.model_dump(mode="json", exclude={"space", "train"})
    d["space"] = {k: {p.kind: list(p.args)} for k, p in cfg.space.items()}
    d["dataset_fingerprint"] = dataset_fingerprint(cfg)
    d["frequency_source"] = frequency_source(cfg)
    d["pretrain_sha256"] = _stage1_shas(stage1) or ""
    d["metric"], d["mode"] = cfg.scheduler.metric, cfg.scheduler.mode
    d["max_evaluations"] = cfg.evals_per_trial  # a full-length trial's evaluations (max_t may count images)
    return d


def build_trainable(cfg: ExperimentConfig, stage1: Stage1Set, trainable_fn: Optional[Callable] = None):
    """`train_trial` (or a stand-in with its signature) bound to the experiment, the stage-1 checkpoint of each
    seed and the shared objects with tune.with_parameters, and given a trial's resources with tune.with_resources."""
    from pipelines.tune.trainable import train_trial, trial_resources

    stage1_ref = None if stage1 is None else {
        str(seed): {"sha256": c.sha256, "checkpoint_dir": str(c.checkpoint_dir)} for seed, c in stage1.items()}
    fn = tune.with_parameters(trainable_fn or train_trial, experiment=cfg, stage1=stage1_ref,
                              shared=_shared_objects(cfg))
    return tune.with_resources(fn, trial_resources(cfg))


def build_tuner(cfg: ExperimentConfig, stage1: Stage1Set, *, resume: bool = False, errored: Optional[str] = None,
                trainable_fn: Optional[Callable] = None, callbacks: Sequence[Any] = (), verbose: int = 0,
                progress: bool = True):
    from pipelines.tracking.callback import MLflowSweepCallback

    trainable = build_trainable(cfg, stage1, trainable_fn)
    if resume:
        # The original RunConfig (callbacks included) and search state come back from tuner.pkl. Finished trials
        # stay as they are, unfinished ones continue from their last checkpoint, errored ones are not retried.
        # errored: None = keep errored trials as they are; "resume" = continue them from their last checkpoint;
        # "restart" = train them again from scratch
        path, fs = tune_experiment_path(cfg)
        return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, storage_filesystem=fs,
                                  resume_errored=errored == "resume", restart_errored=errored == "restart")
    storage_path, fs = storage.tune_storage(cfg.run.storage_path)
    limit = max_concurrent(cfg)
    mlflow_cb = MLflowSweepCallback(tracking_uri_for(cfg), cfg.name, sweep_params(cfg, stage1), cfg.searched_keys(),
                                    val_annotations=str(cfg.data.val))
    return tune.Tuner(
        trainable,
        param_space=cfg.param_space() if cfg.search.algorithm == "basic" else None,
        tune_config=tune.TuneConfig(
            metric=cfg.scheduler.metric, mode=cfg.scheduler.mode, scheduler=_scheduler(cfg, limit),
            search_alg=_search_alg(cfg, limit), num_samples=cfg.search.num_samples,
            max_concurrent_trials=limit if cfg.search.algorithm == "optuna" else None,
            # a finished trial's worker process (torch already imported) runs the next one; not for multi-worker
            # trials, whose process must end with the trial so that its Ray Train run goes down with it
            reuse_actors=not cfg.resources.distributed),
        run_config=tune.RunConfig(
            name=cfg.name, storage_path=storage_path, storage_filesystem=fs,
            failure_config=tune.FailureConfig(max_failures=cfg.run.max_failures),
            # keep each trial's best evaluations by the sweep's metric (Tune also always keeps the latest, which a
            # retry resumes from), so the best epoch survives num_to_keep
            checkpoint_config=tune.CheckpointConfig(num_to_keep=cfg.run.checkpoints_to_keep,
                                                    checkpoint_score_attribute=cfg.scheduler.metric,
                                                    checkpoint_score_order=cfg.scheduler.mode),
            callbacks=[mlflow_cb, *_tune_callbacks(cfg.evals_per_trial, cfg.searched_keys(), progress, cfg.name),
                       *callbacks],
            verbose=verbose),
    )


# ---- entry points ------------------------------------------------------------------------------------------------

def run_sweep(cfg: ExperimentConfig, *, resume: bool = False, errored: Optional[str] = None,
              force_pretrain: bool = False,
              trainable_fn: Optional[Callable] = None, callbacks: Sequence[Any] = (), verbose: int = 0,
              progress: bool = True, include_dashboard: Optional[bool] = None, register: bool = True,
              model_name: Optional[str] = None) -> SweepSummary:
    """Run (or, with resume, continue) the sweep described by cfg and return its summary.

    At the end the best checkpoint is logged on the sweep's MLflow run and registered as ``model_name`` (default
    the sweep's name; ``register=False``: logged, not registered), unless the sweep was interrupted
    (:mod:`pipelines.tracking.best_model`).

    trainable_fn: a stand-in for pipelines.tune.trainable.train_trial with the same signature (tests wrap it to inject
    faults); callbacks: extra Tune callbacks (a resumed sweep gets back the original ones from tuner.pkl);
    verbose: Tune's own output (0 = quiet); progress: one line per evaluation from ProgressPrinter."""
    if cfg.name in RESERVED_NAMES:
        raise ConfigError(f"name: {cfg.name!r} is reserved (it is a directory under run.storage_path); rename the sweep")
    if errored is not None and not resume:
        raise ConfigError(f"--{errored}-errored needs --resume (it says what a resumed sweep does with its errored "
                          "trials)")
    tracking_uri_for(cfg)  # object storage without run.tracking_uri: say so before anything starts
    storage.check_storage(cfg.run.storage_path)  # creates a local one; an unreachable store or bucket: one line
    path, fs = tune_experiment_path(cfg)
    shown = storage.display(experiment_path(cfg))
    if resume:
        if force_pretrain:
            raise ConfigError("--force-pretrain cannot be combined with --resume: the sweep's trials already started "
                              "from its stage-1 checkpoint; start a new sweep to retrain stage 1")
        if not tune.Tuner.can_restore(path, storage_filesystem=fs):
            raise ConfigError(f"--resume: there is no restorable sweep at {shown}; run without --resume to start "
                              f"sweep {cfg.name!r} (or check run.storage_path / --storage-path)")
    elif tune.Tuner.can_restore(path, storage_filesystem=fs):
        raise ConfigError(f"sweep {cfg.name!r} already exists at {shown}; pass --resume to continue it, or give it "
                          "a new name (name: in the YAML) or another --storage-path")
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
        stage1 = ensure_stage1_per_seed(cfg, force=force_pretrain, tracking_uri=tracking_uri_for(cfg),
                                        sweep_name=cfg.name)
        _write_sweep_record(cfg, stage1)
    tuner = build_tuner(cfg, stage1, resume=resume, errored=errored, trainable_fn=trainable_fn, callbacks=callbacks,
                        verbose=verbose, progress=progress)
    handler_before = signal.getsignal(signal.SIGINT)
    results = tuner.fit()
    interrupted = _tune_was_interrupted(handler_before)
    summary = summarize(cfg, results, stage1, resumed=resume, experiment_path=shown,
                        tracking_uri=tracking_uri_for(cfg), interrupted=interrupted,
                        completed=completed_trials(cfg.name) if interrupted else None)
    summary.experiment_id = _experiment_id(summary)
    if not interrupted:
        from pipelines.tracking.best_model import log_best_model_safely

        summary.model = log_best_model_safely(cfg, summary, results, register=register, name=model_name)
    return summary


def _experiment_id(summary: SweepSummary) -> Optional[str]:
    """The sweep's MLflow experiment id (for the UI link the summary prints), or None if the store cannot say."""
    from pipelines.mlflow_io.client import open_store

    try:
        exp = open_store(summary.tracking_uri).get_experiment_by_name(summary.name)
    except Exception:  # noqa: BLE001 - only a link in the printout depends on it
        return None
    return None if exp is None else exp.experiment_id


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
    storage.write_json(storage.join(experiment_path(cfg), SWEEP_RECORD),
                       {"config_fingerprint": cfg.fingerprint(), "stage1_sha256": _stage1_shas(stage1),
                        "config": cfg.model_dump(mode="json")}, indent=2)


def _stage1_of_existing_sweep(cfg: ExperimentConfig) -> Stage1Set:
    """The stage-1 checkpoints a sweep started with (one per seed): resumed trials and the ones still pending must
    share them, even if the training code or data changed meanwhile (then their keys would differ)."""
    record_file = storage.join(experiment_path(cfg), SWEEP_RECORD)
    if not storage.is_file(record_file):
        raise ConfigError(f"--resume: {storage.display(record_file)} is missing, so the stage-1 checkpoint this sweep "
                          "started from is unknown; start a new sweep instead")
    record = storage.read_json(record_file)
    if record["config_fingerprint"] != cfg.fingerprint():
        raise ConfigError(f"--resume: the config of sweep {cfg.name!r} changed since it started (only run.* may "
                          "differ); resume with the original YAML or start a new sweep under another name")
    shas = record["stage1_sha256"]
    if shas is None:
        return None
    if isinstance(shas, str):  # a record written before seeds were repeats: the config's own seed
        shas = {str(cfg.seed): shas}
    out = {}
    for seed, sha in shas.items():
        ckpt_path = storage.join(pretrain_root(cfg.run.storage_path), sha)
        if not storage.is_file(storage.join(ckpt_path, "meta.json")):
            raise ConfigError(f"--resume: the sweep's stage-1 checkpoint {storage.display(ckpt_path)} (seed {seed}) is "
                              "gone; start a new sweep")
        if sha != stage1_key(cfg.with_seed(int(seed))):
            log.warning("the training code or data changed since sweep %r started; its trials keep using its "
                        "stage-1 checkpoint %s (seed %s)", cfg.name, sha[:12], seed)
        meta = storage.read_json(storage.join(ckpt_path, "meta.json"))
        out[int(seed)] = Stage1Checkpoint(sha, ckpt_path, trained=False, metrics=meta.get("metrics", {}),
                                          seconds=float(meta.get("seconds", 0.0)))
    return out


def apply_run_overrides(cfg: ExperimentConfig, storage_path: Optional[os.PathLike] = None,
                        tracking_uri: Optional[str] = None) -> ExperimentConfig:
    update = {}
    if storage_path is not None:  # a directory (made absolute) or an object-store URI (as it is)
        loc = storage.as_location(storage_path)
        update["storage_path"] = loc if storage.is_uri(loc) else loc.expanduser().resolve()
    if tracking_uri is not None:
        update["tracking_uri"] = tracking_uri
    return cfg.model_copy(update={"run": cfg.run.model_copy(update=update)}) if update else cfg


def run_sweep_from_file(config: os.PathLike, resume: bool = False, force_pretrain: bool = False,
                        storage_path: Optional[os.PathLike] = None, tracking_uri: Optional[str] = None,
                        overrides: Optional[list[str]] = None, errored: Optional[str] = None,
                        register: bool = True, model_name: Optional[str] = None) -> SweepSummary:
    """`ltsweep sweep` / `python -m pipelines.tune.sweep`: load (with `a.b=value` overrides), run, print the summary."""
    cfg = load_experiment_config(config, overrides)
    cfg = apply_run_overrides(cfg, storage_path, tracking_uri)
    summary = run_sweep(cfg, resume=resume, errored=errored, force_pretrain=force_pretrain, register=register,
                        model_name=model_name)
    print_summary(summary)
    return summary


if __name__ == "__main__":  # `python -m pipelines.tune.sweep CONFIG ...` is `ltsweep sweep CONFIG ...` (one CLI)
    from pipelines.cli import main

    sys.exit(main(["sweep", *sys.argv[1:]]))
