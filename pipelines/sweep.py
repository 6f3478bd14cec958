"""A whole hybrid-schedule study as one Ray Tune sweep.

    python -m pipelines.sweep search_spaces/demo.yaml [--resume] [--force-pretrain] [--storage-path DIR]
    ltsweep sweep search_spaces/demo.yaml ...                       (the same)
    ray job submit --working-dir . -- python -m pipelines.sweep search_spaces/demo.yaml   (on a cluster)

Steps: validate the YAML (pipelines.config) -> generate the synthetic benchmark if the config asks for it and it
is absent -> join the Ray cluster (RAY_ADDRESS, as set by `ray job submit`) or start a local Ray -> make sure the
shared stage-1 checkpoint exists (pipelines.pretrain: trained once, as a Ray task with a trial's resources) ->
`Tuner` over `pipelines.trainable.train_trial` with ASHA (or FIFO), the search space, `max_concurrent_trials`,
`with_resources`, `FailureConfig(max_failures)`, `CheckpointConfig(num_to_keep)`; MLflow (one driver-side
callback) and TensorBoard (Tune's TBX logger) -> a summary table.

Layout under `run.storage_path` (shared storage on a multi-node cluster):
    <name>/            the Tune experiment (trial dirs with TensorBoard event files, checkpoints, tuner.pkl)
    pretrain/<sha256>/ the shared stage-1 checkpoint
    mlflow.db          the default MLflow store (sqlite); mlartifacts/ beside it
`--resume` continues an interrupted sweep of the same name (Tuner.restore): finished trials are kept as they
are, unfinished ones continue from their last checkpoints, errored ones are not retried.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from filelock import FileLock
from ray import tune
from ray.tune.logger import CSVLoggerCallback, TBXLoggerCallback

from lt_models.errors import ConfigError
from pipelines.config import ExperimentConfig, check_dataset, load_experiment_config
from pipelines.pretrain import Stage1Checkpoint, dataset_fingerprint, ensure_stage1, pretrain_root, stage1_key

log = logging.getLogger(__name__)

RESERVED_NAMES = {"pretrain", "train", "mlartifacts", "mlruns"}
TABLE_METRICS = ("AP", "APr", "APc", "APf")


# ---- results -----------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class TrialSummary:
    trial_id: str
    config: dict[str, Any]
    metrics: dict[str, float]          # last reported AP, AP50, APr, APc, APf, loss
    epochs: int                        # stage-2 epochs the trial trained
    evaluations: int                   # results reported (Tune's training_iteration)
    stopped_early: bool                # ended without error before max evaluations (ASHA)
    error: Optional[str] = None
    path: Optional[str] = None


@dataclasses.dataclass
class SweepSummary:
    name: str
    experiment_path: str
    storage_path: str
    tracking_uri: str
    metric: str
    mode: str
    max_evaluations: int
    trials: list[TrialSummary]
    best: Optional[TrialSummary]
    stage1: Optional[Stage1Checkpoint]
    resumed: bool = False

    @property
    def trial_epochs(self) -> int:
        return sum(t.epochs for t in self.trials)

    @property
    def stopped_early(self) -> int:
        return sum(t.stopped_early for t in self.trials)

    @property
    def errored(self) -> int:
        return sum(t.error is not None for t in self.trials)

    def exit_code(self) -> int:
        """0 unless no trial produced a result: a job whose every trial errored must not report SUCCEEDED."""
        return 1 if not self.trials or self.errored == len(self.trials) else 0

    def table(self) -> str:
        """Fixed-width table of every trial (searched values, AP, APr, APc, APf, epochs, status)."""
        keys = sorted({k for t in self.trials for k in t.config})
        head = ["trial"] + keys + list(TABLE_METRICS) + ["epochs", "status"]
        rows = []
        for t in sorted(self.trials, key=lambda t: t.trial_id):
            status = "ERROR" if t.error else ("stopped early" if t.stopped_early else "completed")
            if self.best is not None and t.trial_id == self.best.trial_id:
                status += " *best*"
            rows.append([t.trial_id] + [_fmt(t.config.get(k)) for k in keys]
                        + [_fmt(t.metrics.get(m)) for m in TABLE_METRICS] + [str(t.epochs), status])
        widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
        line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
        return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["stage1"] = None if self.stage1 is None else {"sha256": self.stage1.sha256, "path": str(self.stage1.path),
                                                        "trained": self.stage1.trained}
        d.update(trial_epochs=self.trial_epochs, stopped_early=self.stopped_early, errored=self.errored)
        return d


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


# ---- Tune callbacks ----------------------------------------------------------------------------------------------

def _without_per_class(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "per_class"}


class TBXLogger(TBXLoggerCallback):
    """Tune's TensorBoard logger minus `per_class` (LVIS: 1203 scalars per evaluation); MLflow keeps it."""

    def log_trial_result(self, iteration, trial, result):
        super().log_trial_result(iteration, trial, _without_per_class(result))


class CSVLogger(CSVLoggerCallback):
    """Tune's progress.csv minus `per_class` (result.json keeps it)."""

    def log_trial_result(self, iteration, trial, result):
        super().log_trial_result(iteration, trial, _without_per_class(result))


class ProgressPrinter(tune.Callback):
    """One line per evaluation / trial end on the driver's stdout (instead of Tune's verbose result boxes)."""

    def __init__(self, max_evals: int, searched_keys: Sequence[str]):
        self.max_evals = max_evals
        self.keys = list(searched_keys)

    def _tag(self, trial) -> str:
        cfg = " ".join(f"{k}={_fmt(trial.config.get(k))}" for k in self.keys)
        return f"[{trial.trial_id} {cfg}]"

    def on_trial_result(self, iteration, trials, trial, result, **info):
        vals = "  ".join(f"{m} {_fmt(result.get(m))}" for m in (*TABLE_METRICS, "loss"))
        print(f"{self._tag(trial)} evaluation {result.get('training_iteration')}/{self.max_evals} "
              f"(epoch {result.get('epoch')}): {vals}", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        n = int((trial.last_result or {}).get("training_iteration") or 0)
        how = "finished" if n >= self.max_evals else f"stopped early by the scheduler after {n} evaluation(s)"
        print(f"{self._tag(trial)} {how}", flush=True)

    def on_trial_recover(self, iteration, trials, trial, **info):
        print(f"{self._tag(trial)} failed; retrying from its last checkpoint (see {trial.error_file})", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"{self._tag(trial)} ERROR, no retries left: see {trial.error_file}", flush=True)


def _tune_callbacks(max_evals: int, searched_keys: Sequence[str], progress: bool) -> list:
    """TensorBoard + CSV loggers without the per-class dict, and (optionally) one progress line per report."""
    return [TBXLogger(), CSVLogger()] + ([ProgressPrinter(max_evals, searched_keys)] if progress else [])


# ---- setup helpers -----------------------------------------------------------------------------------------------

def experiment_path(cfg: ExperimentConfig) -> Path:
    return Path(cfg.run.storage_path) / cfg.name


def tracking_uri_for(cfg: ExperimentConfig) -> str:
    from pipelines.tracking import default_tracking_uri

    return cfg.run.tracking_uri or default_tracking_uri(cfg.run.storage_path)


def ensure_dataset(cfg: ExperimentConfig) -> None:
    """Generate the synthetic benchmark where the config expects it (data.synthetic) if it is not there yet."""
    d = cfg.data
    if d.synthetic is not None and not (d.train.is_file() and d.val.is_file()):
        from lt_models.synthetic import generate_benchmark

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


def _scheduler(cfg: ExperimentConfig):
    if cfg.scheduler.type == "fifo":
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="training_iteration", max_t=cfg.evals_per_trial,
                         grace_period=cfg.scheduler.grace_period, reduction_factor=cfg.scheduler.reduction_factor)


def _search_alg(cfg: ExperimentConfig):
    if cfg.search.algorithm == "optuna":
        if importlib.util.find_spec("optuna") is None:
            raise ConfigError(f"{cfg.name}: search.algorithm is 'optuna' but the optuna package is not installed; "
                              "`pip install optuna` or set search.algorithm: basic")
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(metric=cfg.scheduler.metric, mode=cfg.scheduler.mode, seed=cfg.search.seed)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # Tune ignores TuneConfig.max_concurrent_trials for a variant generator: it takes the limit itself
    return BasicVariantGenerator(random_state=cfg.search.seed, max_concurrent=cfg.search.max_concurrent_trials or 0)


def _shared_objects(cfg: ExperimentConfig) -> dict[str, Any]:
    """Read-only objects every trial needs, computed once here and shipped through Ray's object store
    (tune.with_parameters): the concurrent-rate matrix when some trial may use concurrent softmax."""
    losses = {cfg.stage2.loss}
    if "loss" in cfg.space:
        losses |= set(cfg.space["loss"].values_to_check())
    if "concurrent_softmax" not in losses:
        return {}
    from lt_models.concurrency import concurrent_rate_matrix

    hierarchy = str(cfg.data.hierarchy) if cfg.data.hierarchy is not None else None
    return {"concurrent_rate": concurrent_rate_matrix(str(cfg.data.train), hierarchy=hierarchy,
                                                      hierarchy_rate=cfg.data.hierarchy_rate)}


def sweep_params(cfg: ExperimentConfig, stage1: Optional[Stage1Checkpoint]) -> dict[str, Any]:
    """The sweep's config as logged on the MLflow parent run."""
    d = cfg.model_dump(mode="json", exclude={"space", "train"})
    d["space"] = {k: {p.kind: list(p.args)} for k, p in cfg.space.items()}
    d["dataset_fingerprint"] = dataset_fingerprint(cfg)
    d["pretrain_sha256"] = stage1.sha256 if stage1 is not None else ""
    d["metric"], d["mode"] = cfg.scheduler.metric, cfg.scheduler.mode
    return d


def build_trainable(cfg: ExperimentConfig, stage1: Optional[Stage1Checkpoint],
                    trainable_fn: Optional[Callable] = None):
    """`train_trial` (or a stand-in with its signature) bound to the experiment, stage-1 checkpoint and shared
    objects with tune.with_parameters, and given a trial's resources with tune.with_resources."""
    from pipelines.trainable import train_trial, trial_resources

    stage1_ref = None if stage1 is None else {"sha256": stage1.sha256, "checkpoint_dir": str(stage1.checkpoint_dir)}
    fn = tune.with_parameters(trainable_fn or train_trial, experiment=cfg, stage1=stage1_ref,
                              shared=_shared_objects(cfg))
    return tune.with_resources(fn, trial_resources(cfg))


def build_tuner(cfg: ExperimentConfig, stage1: Optional[Stage1Checkpoint], *, resume: bool = False,
                trainable_fn: Optional[Callable] = None, callbacks: Sequence[Any] = (), verbose: int = 0,
                progress: bool = True):
    from pipelines.tracking import MLflowSweepCallback

    trainable = build_trainable(cfg, stage1, trainable_fn)
    path = experiment_path(cfg)
    if resume:
        # The original RunConfig (callbacks included) and search state come back from tuner.pkl. Finished trials
        # stay as they are, unfinished ones continue from their last checkpoint, errored ones are not retried.
        return tune.Tuner.restore(str(path), trainable=trainable, resume_unfinished=True, resume_errored=False)
    mlflow_cb = MLflowSweepCallback(tracking_uri_for(cfg), cfg.name, sweep_params(cfg, stage1), cfg.searched_keys(),
                                    val_annotations=str(cfg.data.val))
    return tune.Tuner(
        trainable,
        param_space=cfg.param_space(),
        tune_config=tune.TuneConfig(
            metric=cfg.scheduler.metric, mode=cfg.scheduler.mode, scheduler=_scheduler(cfg),
            search_alg=_search_alg(cfg), num_samples=cfg.search.num_samples,
            max_concurrent_trials=cfg.search.max_concurrent_trials if cfg.search.algorithm == "optuna" else None,
            reuse_actors=True),  # a finished trial's worker process (torch already imported) runs the next one
        run_config=tune.RunConfig(
            name=cfg.name, storage_path=str(cfg.run.storage_path),
            failure_config=tune.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=cfg.run.checkpoints_to_keep),
            callbacks=[mlflow_cb, *_tune_callbacks(cfg.evals_per_trial, cfg.searched_keys(), progress), *callbacks],
            verbose=verbose),
    )


def summarize(cfg: ExperimentConfig, results, stage1: Optional[Stage1Checkpoint], resumed: bool) -> SweepSummary:
    max_evals = cfg.evals_per_trial
    trials = []
    for r in results:
        m = r.metrics or {}
        evaluations = int(m.get("training_iteration") or 0)
        err = None if r.error is None else f"{type(r.error).__name__}: {str(r.error).strip().splitlines()[-1][:300]}"
        trials.append(TrialSummary(
            trial_id=str(m.get("trial_id") or Path(r.path).name), config=dict(r.config or {}),
            metrics={k: float(m[k]) for k in ("AP", "AP50", "APr", "APc", "APf", "loss") if k in m},
            epochs=int(m.get("epoch") or 0), evaluations=evaluations,
            stopped_early=err is None and evaluations < max_evals, error=err, path=r.path))
    best = pick_best(trials, cfg.scheduler.metric, cfg.scheduler.mode, max_evals)
    return SweepSummary(name=cfg.name, experiment_path=str(experiment_path(cfg)),
                        storage_path=str(cfg.run.storage_path), tracking_uri=tracking_uri_for(cfg),
                        metric=cfg.scheduler.metric, mode=cfg.scheduler.mode, max_evaluations=max_evals,
                        trials=trials, best=best, stage1=stage1, resumed=resumed)


def pick_best(trials: Sequence[TrialSummary], metric: str, mode: str, max_evals: int) -> Optional[TrialSummary]:
    """Best last-reported metric among trials that ran the full schedule (ASHA's survivors); among all trials
    without error if none did."""
    ok = [t for t in trials if t.error is None and math.isfinite(t.metrics.get(metric, float("nan")))]
    full = [t for t in ok if t.evaluations >= max_evals] or ok
    if not full:
        return None
    sign = 1 if mode == "max" else -1
    return max(full, key=lambda t: (sign * t.metrics[metric], t.trial_id))


# ---- entry points ------------------------------------------------------------------------------------------------

def run_sweep(cfg: ExperimentConfig, *, resume: bool = False, force_pretrain: bool = False,
              trainable_fn: Optional[Callable] = None, callbacks: Sequence[Any] = (), verbose: int = 0,
              progress: bool = True, include_dashboard: Optional[bool] = None) -> SweepSummary:
    """Run (or, with resume, continue) the sweep described by cfg and return its summary.

    trainable_fn: a stand-in for pipelines.trainable.train_trial with the same signature (tests wrap it to inject
    faults); callbacks: extra Tune callbacks (a resumed sweep gets back the original ones from tuner.pkl);
    verbose: Tune's own output (0 = quiet); progress: one line per evaluation from ProgressPrinter."""
    if cfg.name in RESERVED_NAMES:
        raise ConfigError(f"name: {cfg.name!r} is reserved (it is a directory under run.storage_path); rename the sweep")
    path = experiment_path(cfg)
    if resume:
        if force_pretrain:
            raise ConfigError("--force-pretrain cannot be combined with --resume: the sweep's trials already started "
                              "from its stage-1 checkpoint; start a new sweep to retrain stage 1")
        if not tune.Tuner.can_restore(str(path)):
            raise ConfigError(f"--resume: there is no restorable sweep at {path}; run without --resume to start "
                              f"sweep {cfg.name!r} (or check run.storage_path / --storage-path)")
    elif tune.Tuner.can_restore(str(path)):
        raise ConfigError(f"sweep {cfg.name!r} already exists at {path}; pass --resume to continue it, or give it "
                          "a new name (name: in the YAML) or another --storage-path")
    ensure_dataset(cfg)
    Path(cfg.run.storage_path).mkdir(parents=True, exist_ok=True)
    # num_to_keep forces an experiment snapshot per checkpoint; on toy data that is every few seconds, and Tune
    # would warn about it at each one
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    init_ray(cfg, include_dashboard=include_dashboard)
    if resume:
        stage1 = _stage1_of_existing_sweep(cfg)
    else:
        stage1 = ensure_stage1(cfg, force=force_pretrain, tracking_uri=tracking_uri_for(cfg), sweep_name=cfg.name)
        _write_sweep_record(cfg, stage1)
    tuner = build_tuner(cfg, stage1, resume=resume, trainable_fn=trainable_fn, callbacks=callbacks, verbose=verbose,
                        progress=progress)
    results = tuner.fit()
    return summarize(cfg, results, stage1, resumed=resume)


SWEEP_RECORD = "ltsweep_sweep.json"


def _write_sweep_record(cfg: ExperimentConfig, stage1: Optional[Stage1Checkpoint]) -> None:
    path = experiment_path(cfg)
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / f".{SWEEP_RECORD}.tmp"
    tmp.write_text(json.dumps({"config_fingerprint": cfg.fingerprint(),
                               "stage1_sha256": stage1.sha256 if stage1 is not None else None}, indent=2))
    os.replace(tmp, path / SWEEP_RECORD)


def _stage1_of_existing_sweep(cfg: ExperimentConfig) -> Optional[Stage1Checkpoint]:
    """The stage-1 checkpoint a sweep started with: resumed trials and the ones still pending must share it, even
    if the training code or data changed meanwhile (then its key would differ)."""
    record_file = experiment_path(cfg) / SWEEP_RECORD
    if not record_file.is_file():
        raise ConfigError(f"--resume: {record_file} is missing, so the stage-1 checkpoint this sweep started from is "
                          "unknown; start a new sweep instead")
    record = json.loads(record_file.read_text())
    if record["config_fingerprint"] != cfg.fingerprint():
        raise ConfigError(f"--resume: the config of sweep {cfg.name!r} changed since it started (only run.* may "
                          "differ); resume with the original YAML or start a new sweep under another name")
    sha = record["stage1_sha256"]
    if sha is None:
        return None
    ckpt_path = pretrain_root(cfg.run.storage_path) / sha
    if not (ckpt_path / "meta.json").is_file():
        raise ConfigError(f"--resume: the sweep's stage-1 checkpoint {ckpt_path} is gone; start a new sweep")
    if sha != stage1_key(cfg):
        log.warning("the training code or data changed since sweep %r started; its trials keep using its stage-1 "
                    "checkpoint %s", cfg.name, sha[:12])
    meta = json.loads((ckpt_path / "meta.json").read_text())
    return Stage1Checkpoint(sha, ckpt_path, trained=False, metrics=meta.get("metrics", {}),
                            seconds=float(meta.get("seconds", 0.0)))


def apply_run_overrides(cfg: ExperimentConfig, storage_path: Optional[os.PathLike] = None,
                        tracking_uri: Optional[str] = None) -> ExperimentConfig:
    update = {}
    if storage_path is not None:
        update["storage_path"] = Path(storage_path).expanduser().resolve()
    if tracking_uri is not None:
        update["tracking_uri"] = tracking_uri
    return cfg.model_copy(update={"run": cfg.run.model_copy(update=update)}) if update else cfg


def print_summary(summary: SweepSummary, file=None) -> None:
    file = file or sys.stdout
    print(f"\nsweep {summary.name!r}: {len(summary.trials)} trials, {summary.trial_epochs} trial-epochs, "
          f"{summary.stopped_early} stopped early by the scheduler, {summary.errored} errored", file=file)
    if summary.stage1 is not None:
        how = "trained for this sweep" if summary.stage1.trained else "reused"
        print(f"stage 1: {summary.stage1.sha256[:12]} ({how}) at {summary.stage1.path}", file=file)
    print(summary.table(), file=file)
    if summary.best is not None:
        b = summary.best
        print(f"best ({summary.metric}, {summary.mode}): {b.trial_id} {b.config} -> "
              + ", ".join(f"{k} {b.metrics[k]:.4f}" for k in TABLE_METRICS if k in b.metrics), file=file)
    print(f"\nTensorBoard:  tensorboard --logdir {summary.experiment_path} --host 127.0.0.1", file=file)
    print(f"MLflow:       mlflow ui --backend-store-uri {summary.tracking_uri} --host 127.0.0.1", file=file)


def run_sweep_from_file(config: os.PathLike, resume: bool = False, force_pretrain: bool = False,
                        storage_path: Optional[os.PathLike] = None, tracking_uri: Optional[str] = None
                        ) -> SweepSummary:
    """`ltsweep sweep` / `python -m pipelines.sweep`: load, run, print the summary table."""
    cfg = load_experiment_config(config)
    cfg = apply_run_overrides(cfg, storage_path, tracking_uri)
    summary = run_sweep(cfg, resume=resume, force_pretrain=force_pretrain)
    print_summary(summary)
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.sweep", description="run a Ray Tune sweep from a YAML")
    p.add_argument("config", type=Path)
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep")
    p.add_argument("--force-pretrain", action="store_true", help="retrain the shared stage-1 checkpoint")
    p.add_argument("--storage-path", type=Path, default=None)
    p.add_argument("--tracking-uri", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = run_sweep_from_file(args.config, resume=args.resume, force_pretrain=args.force_pretrain,
                                      storage_path=args.storage_path, tracking_uri=args.tracking_uri)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"pipelines.sweep: error: {exc}", file=sys.stderr)
        return 2
    if summary.exit_code():
        print(f"pipelines.sweep: error: all {len(summary.trials)} trials of sweep '{summary.name}' failed; "
              "see the trial errors above and in the Ray dashboard", file=sys.stderr)
    return summary.exit_code()


if __name__ == "__main__":
    sys.exit(main())
