"""The Tuner of a sweep: the trainable bound to the experiment, its stage-1 checkpoints and the shared objects;
the scheduler (ASHA, asha_configs, PBT or FIFO), the search algorithm, the callbacks and the run config."""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Callable, Sequence
from typing import Any

from ray import tune

from lt_models.errors import ConfigError
from pipelines.config.experiment import ExperimentConfig, canonical_json
from pipelines.config.identity import dataset_fingerprint, frequency_source
from pipelines.config.sections import POPULATION_SCHEDULERS, TIME_ATTRS
from pipelines.storage import location as storage
from pipelines.storage.stage1_cache import Stage1Checkpoint
from pipelines.tune.callbacks import tune_callbacks
from pipelines.tune.cluster import max_concurrent


def experiment_path(cfg: ExperimentConfig) -> storage.Location:
    return storage.join(cfg.run.storage_path, cfg.name)


def tune_experiment_path(cfg: ExperimentConfig) -> tuple[str, Any]:
    """(path, filesystem) of the Tune experiment as Tuner.restore / can_restore take them (None: local)."""
    root, fs = storage.tune_storage(cfg.run.storage_path)
    return f"{root.rstrip('/')}/{cfg.name}", fs


def tracking_uri_for(cfg: ExperimentConfig) -> str:
    from pipelines.mlflow_io.client import default_tracking_uri

    return cfg.run.tracking_uri or default_tracking_uri(cfg.run.storage_path)


def _scheduler(cfg: ExperimentConfig, limit: int | None):
    """The trial scheduler; `limit`: trials running at once (`max_concurrent`), which asha_configs applies."""
    if cfg.scheduler.type == "fifo":
        return None
    s = cfg.scheduler
    if s.type in POPULATION_SCHEDULERS:
        from pipelines.tune.pbt import pbt_scheduler

        return pbt_scheduler(cfg)
    if s.type == "asha_configs":
        from pipelines.tune.asha import ConfigASHA

        return ConfigASHA(
            metric=s.metric,
            mode=s.mode,
            time_attr=TIME_ATTRS[s.time_attr],
            max_t=s.max_t or cfg.evals_per_trial,
            grace_period=s.grace_period,
            reduction_factor=s.reduction_factor,
            seeds=cfg.seeds,
            max_running=limit,
            default_seed=cfg.seed,
        )
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        time_attr=TIME_ATTRS[s.time_attr],
        max_t=s.max_t or cfg.evals_per_trial,
        grace_period=s.grace_period,
        reduction_factor=s.reduction_factor,
    )


def _search_alg(cfg: ExperimentConfig, limit: int | None):
    """The search algorithm; `limit`: trials running at once (`max_concurrent`)."""
    if cfg.search.algorithm == "optuna":
        if importlib.util.find_spec("optuna") is None:
            raise ConfigError(
                f"{cfg.name}: search.algorithm is 'optuna' but the optuna package is not installed; "
                "`pip install optuna` or set search.algorithm: basic"
            )
        from ray.tune.search.optuna import OptunaSearch

        from pipelines.config.space import optuna_space

        # define-by-run: the conditional space (ξ only for ACSL, ...) as Optuna suggestions; no Tune param_space
        return OptunaSearch(
            space=optuna_space(cfg.space), metric=cfg.scheduler.metric, mode=cfg.scheduler.mode, seed=cfg.search.seed
        )
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # Tune ignores TuneConfig.max_concurrent_trials for a variant generator: it takes the limit itself. It counts
    # paused trials as running, so under asha_configs (which pauses trials at rungs) the scheduler applies it.
    limit = 0 if cfg.scheduler.type == "asha_configs" else limit or 0
    return BasicVariantGenerator(random_state=cfg.search.seed, max_concurrent=limit)


def _shared_objects(cfg: ExperimentConfig) -> dict[str, dict[str, Any]]:
    """Read-only objects the trials of each seed need ({seed: the engine's shared loss inputs}: r_ij when some
    trial may use concurrent softmax or eq 5 scores), computed once per distinct dataset here and shipped through
    Ray's object store (tune.with_parameters). The training and validation annotation stores (`lt_models.data.store`)
    are built here first, once (and published to object storage), so trials only map them
    (`pipelines.storage.annotation_stores`)."""
    if not cfg.search.data_seeds:
        inputs = _shared_inputs(cfg)
        return {str(seed): inputs for seed in cfg.seeds}  # one object: every seed trains on the same data
    return {str(seed): _shared_inputs(cfg.with_seed(seed)) for seed in cfg.seeds}


def _shared_inputs(cfg: ExperimentConfig) -> dict[str, Any]:
    from lt_models.engine.build import shared_loss_inputs
    from pipelines.storage.annotation_stores import build_and_publish

    d = cfg.data
    stores = build_and_publish(cfg.run.storage_path, d)
    return shared_loss_inputs(
        str(d.train),
        None if d.hierarchy is None else str(d.hierarchy),
        d.hierarchy_rate,
        cfg.loss_inputs(),
        d.skip_invalid,
        store=stores[0],
    )


Stage1Set = dict[int, Stage1Checkpoint] | None  # a sweep's stage-1 checkpoint of each training seed


def stage1_shas(stage1: Stage1Set) -> dict[str, str] | None:
    return None if stage1 is None else {str(seed): ckpt.sha256 for seed, ckpt in stage1.items()}


def sweep_params(cfg: ExperimentConfig, stage1: Stage1Set) -> dict[str, Any]:
    """The sweep's config as logged on the MLflow parent run."""
    d = cfg.model_dump(mode="json", exclude={"space", "train"})
    d["space"] = {k: {p.kind: list(p.args)} for k, p in cfg.space.items()}
    if cfg.search.data_seeds:  # every seed its own draw of the data: one fingerprint of them all, and each
        each = {str(s): dataset_fingerprint(cfg.with_seed(s)) for s in cfg.seeds}
        d["dataset_fingerprint"] = hashlib.sha256(canonical_json(each).encode()).hexdigest()
        d["dataset_fingerprints"] = each
        d["frequency_source"] = frequency_source(cfg.with_seed(cfg.seeds[0]))
    else:
        d["dataset_fingerprint"] = dataset_fingerprint(cfg)
        d["frequency_source"] = frequency_source(cfg)
    d["pretrain_sha256"] = stage1_shas(stage1) or ""
    d["metric"], d["mode"] = cfg.scheduler.metric, cfg.scheduler.mode
    d["max_evaluations"] = cfg.evals_per_trial  # a full-length trial's evaluations (max_t may count images)
    return d


def build_trainable(cfg: ExperimentConfig, stage1: Stage1Set, trainable_fn: Callable | None = None):
    """`train_trial` (or a stand-in with its signature) bound to the experiment, the stage-1 checkpoint of each
    seed and the shared objects with tune.with_parameters, and given a trial's resources with tune.with_resources."""
    from pipelines.tune.cluster import trial_resources
    from pipelines.tune.trainable import train_trial

    stage1_ref = (
        None
        if stage1 is None
        else {str(seed): {"sha256": c.sha256, "checkpoint_dir": str(c.checkpoint_dir)} for seed, c in stage1.items()}
    )
    fn = tune.with_parameters(
        trainable_fn or train_trial, experiment=cfg, stage1=stage1_ref, shared=_shared_objects(cfg)
    )
    return tune.with_resources(fn, trial_resources(cfg))


def build_tuner(
    cfg: ExperimentConfig,
    stage1: Stage1Set,
    *,
    resume: bool = False,
    errored: str | None = None,
    trainable_fn: Callable | None = None,
    callbacks: Sequence[Any] = (),
    verbose: int = 0,
    progress: bool = True,
):
    from pipelines.tracking.callback import MLflowSweepCallback

    trainable = build_trainable(cfg, stage1, trainable_fn)
    if resume:
        # The original RunConfig (callbacks included) and search state come back from tuner.pkl. Finished trials
        # stay as they are, unfinished ones continue from their last checkpoint, errored ones are not retried.
        # errored: None = keep errored trials as they are; "resume" = continue them from their last checkpoint;
        # "restart" = train them again from scratch
        path, fs = tune_experiment_path(cfg)
        return tune.Tuner.restore(
            path,
            trainable=trainable,
            resume_unfinished=True,
            storage_filesystem=fs,
            resume_errored=errored == "resume",
            restart_errored=errored == "restart",
        )
    storage_path, fs = storage.tune_storage(cfg.run.storage_path)
    limit = max_concurrent(cfg)
    mlflow_cb = MLflowSweepCallback(
        tracking_uri_for(cfg),
        cfg.name,
        sweep_params(cfg, stage1),
        cfg.searched_keys(),
        val_annotations=str(cfg.data_for(cfg.seeds[0]).val),  # search.data_seeds: the first seed's draw
    )
    return tune.Tuner(
        trainable,
        param_space=cfg.param_space() if cfg.search.algorithm == "basic" else None,
        tune_config=tune.TuneConfig(
            metric=cfg.scheduler.metric,
            mode=cfg.scheduler.mode,
            scheduler=_scheduler(cfg, limit),
            search_alg=_search_alg(cfg, limit),
            num_samples=cfg.search.num_samples,
            max_concurrent_trials=limit if cfg.search.algorithm == "optuna" else None,
            # a finished trial's worker process (torch already imported) runs the next one; not for multi-worker
            # trials, whose process must end with the trial so that its Ray Train run goes down with it
            reuse_actors=not cfg.resources.distributed,
        ),
        run_config=tune.RunConfig(
            name=cfg.name,
            storage_path=storage_path,
            storage_filesystem=fs,
            failure_config=tune.FailureConfig(max_failures=cfg.run.max_failures),
            # keep each trial's best evaluations by the sweep's metric (Tune also always keeps the latest, which a
            # retry resumes from), so the best epoch survives num_to_keep
            checkpoint_config=tune.CheckpointConfig(
                # PBT / PB2: every checkpoint. A member copies the checkpoint another had at the exploit, and may wait
                # for a free slot while the donor trains on; any rotation (by score or by age) can delete it first
                num_to_keep=None if cfg.scheduler.type in POPULATION_SCHEDULERS else cfg.run.checkpoints_to_keep,
                checkpoint_score_attribute=cfg.scheduler.metric,
                checkpoint_score_order=cfg.scheduler.mode,
            ),
            callbacks=[
                mlflow_cb,
                *tune_callbacks(
                    cfg.evals_per_trial,
                    cfg.searched_keys(),
                    progress,
                    cfg.name,
                    population=cfg.scheduler.type in POPULATION_SCHEDULERS,
                ),
                *callbacks,
            ],
            verbose=verbose,
        ),
    )
