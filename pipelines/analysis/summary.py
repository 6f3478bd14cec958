"""What a sweep's driver prints at the end: a summary of the Tune results (trials, the answer, where to look).

:func:`summarize` turns Tune's ``ResultGrid`` into a :class:`SweepSummary`. Trials of the same configuration with
different seeds are aggregated (:mod:`pipelines.analysis.aggregate`: n, mean, sd, 95% CI); the answer is the best
configuration by mean (:func:`pipelines.analysis.aggregate.best_config`), compared with the runner-up and with the
``report.baseline`` configuration (paired over seeds). The best single trial
(:func:`pipelines.analysis.aggregate.best_trial`) of the best configuration gives the sweep's best model
(:mod:`pipelines.tracking.best_model`). :func:`print_summary` prints it all.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.analysis import aggregate
from pipelines.analysis.aggregate import best_trial
from pipelines.analysis.replicates import from_checkpoint, metric_of
from pipelines.analysis.schedule import trial_lam_schedule
from pipelines.config.space import trial_values
from pipelines.names import BUCKET_METRICS, SCHEDULER_METRICS

if TYPE_CHECKING:
    from pipelines.config.experiment import ExperimentConfig
    from pipelines.storage.stage1_cache import Stage1Checkpoint


@dataclasses.dataclass
class TrialSummary:
    trial_id: str
    config: dict[str, Any]
    metrics: dict[str, float]  # last reported AP, AP50, APr, APc, APf, loss
    epochs: int  # stage-2 epochs the trial trained
    evaluations: int  # results reported (Tune's training_iteration)
    stopped_early: bool  # ended without error before max evaluations (ASHA)
    error: str | None = None
    path: str | None = None
    interrupted: bool = False  # the sweep was interrupted before this trial finished (--resume continues it)
    bad_input: bool = False  # it failed on bad input (AnnotationError, ConfigError): exit code 2
    # its last evaluation's image-bootstrap replicates ({metric: [R]}, seed, n_images), when it has them
    replicates: dict[str, Any] | None = dataclasses.field(default=None, repr=False)

    @property
    def status(self) -> str:
        if self.error:
            return f"ERROR: {self.error}"
        if self.interrupted:
            return "interrupted"
        return "stopped early" if self.stopped_early else "completed"


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
    best: TrialSummary | None
    stage1: dict[int, Stage1Checkpoint] | None  # the stage-1 checkpoint of each training seed
    resumed: bool = False
    baseline: dict[str, Any] | None = None  # report.baseline: the configuration the others are compared with
    interrupted: bool = False  # Ctrl+C (SIGINT) ended the sweep before every trial finished
    model: Any = None  # pipelines.tracking.best_model.RegisteredModel, once logged
    experiment_id: str | None = None  # the sweep's MLflow experiment
    eval_every: int = 1  # epochs per evaluation (a trial's λ schedule is read from its evaluations)

    @functools.cached_property
    def configs(self) -> list[aggregate.ConfigResult]:
        """Trials grouped by configuration (their seeds are the repeats), with n, mean, sd and 95% CI."""
        return aggregate.aggregate(
            self.trials,
            config=lambda t: t.config,
            metric=lambda t, m: t.metrics.get(m),
            full=lambda t: t.evaluations >= self.max_evaluations,
            failed=lambda t: t.error is not None,
            metrics=tuple(dict.fromkeys(BUCKET_METRICS + (self.metric,))),
            replicates=_replicates,
        )

    @property
    def best_config(self) -> aggregate.ConfigResult | None:
        return aggregate.best_config(self.configs, self.metric, self.mode)

    def comparisons(self) -> list[str]:
        """In words: the best configuration against the runner-up and against the baseline, paired over seeds."""
        return aggregate.comparisons(
            aggregate.ranked(self.configs, self.metric, self.mode),
            self.metric,
            self.baseline,
            value=lambda t, m: t.metrics.get(m),
            replicates=_replicates,
            mode=self.mode,
        )

    @property
    def trial_epochs(self) -> int:
        return sum(t.epochs for t in self.trials)

    @property
    def stopped_early(self) -> int:
        return sum(t.stopped_early for t in self.trials)

    @property
    def errored(self) -> int:
        return sum(t.error is not None for t in self.trials)

    @property
    def unfinished(self) -> int:
        return sum(t.interrupted for t in self.trials)

    def exit_code(self) -> int:
        """The one exit-code rule of `sweep`, `confirm` and `demo`: 0 when every trial finished (ran its schedule or
        was stopped by the scheduler); 2 when a trial failed on bad input (as bad input found before the sweep
        starts); else 1 when any failed or diverged, or the sweep was interrupted."""
        if any(t.bad_input for t in self.trials):
            return 2
        return 1 if (not self.trials or self.errored or self.interrupted) else 0

    def outcome(self) -> str:
        """One line on how the sweep ended, for the console and the CLI's exit message."""
        if self.interrupted:
            return (
                f"sweep '{self.name}' was interrupted: {self.unfinished} trial(s) unfinished and the rest not "
                f"started; continue it with `ltsweep sweep CONFIG --resume`"
            )
        if not self.trials:
            return f"sweep '{self.name}' ran no trial"
        if self.errored:
            return (
                f"{self.errored} of {len(self.trials)} trials of sweep '{self.name}' failed (reasons in the "
                "table above; details in the Ray dashboard and each trial's error.txt)"
            )
        return f"every trial of sweep '{self.name}' finished"

    def table(self) -> str:
        """Fixed-width table of every trial (searched values, AP, APr, APc, APf, epochs, status)."""
        keys = sorted({k for t in self.trials for k in t.config})
        head = ["trial"] + keys + list(BUCKET_METRICS) + ["epochs", "status"]
        rows = []
        for t in sorted(self.trials, key=lambda t: t.trial_id):
            status = t.status
            if self.best is not None and t.trial_id == self.best.trial_id:
                status += " *best*"
            rows.append(
                [t.trial_id]
                + [format_value(t.config.get(k)) for k in keys]
                + [format_value(t.metrics.get(m)) for m in BUCKET_METRICS]
                + [str(t.epochs), status]
            )
        widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
        line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
        return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["trials"] = [_trial_dict(t) for t in self.trials]
        d["best"] = None if self.best is None else _trial_dict(self.best)
        d["stage1"] = (
            None
            if self.stage1 is None
            else {
                str(seed): {"sha256": c.sha256, "path": str(c.path), "trained": c.trained}
                for seed, c in self.stage1.items()
            }
        )
        d.update(
            trial_epochs=self.trial_epochs,
            stopped_early=self.stopped_early,
            errored=self.errored,
            unfinished=self.unfinished,
        )
        d["configs"] = aggregate.table(self.configs, self.best_config)
        return d


def _replicates(t: TrialSummary, metric: str):
    return metric_of(t.replicates, metric)


def _trial_dict(t: TrialSummary) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(t).items() if k != "replicates"}


def format_value(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def _error_line(error: BaseException | None) -> tuple[str | None, bool]:
    """A failed trial's reason in one line, and whether it is bad input. Tune hands back a RayTaskError whose
    ``cause`` is the trial's own exception; ltsweep's input errors (AnnotationError, ConfigError) are one line."""
    from lt_models.errors import LtsweepInputError

    if error is None:
        return None, False
    cause = getattr(error, "cause", None) or error
    lines = str(cause).strip().splitlines() or [""]
    text = lines[0] if cause is not error else lines[-1]
    return f"{type(cause).__name__}: {text[:300]}", isinstance(cause, LtsweepInputError)


def _checkpointed(result, evaluations: int) -> int:
    """The evaluations a Tune result's latest registered checkpoint covers (``evaluations`` when it kept none).
    Ctrl+C between a trial's last report and the registration of that report's checkpoint leaves the trial one
    report ahead of what ``--resume`` restores: it is interrupted, not finished."""
    kept = [int(m.get("training_iteration") or 0) for _, m in getattr(result, "best_checkpoints", None) or ()]
    return max(kept) if kept else evaluations


def summarize(
    cfg: ExperimentConfig,
    results,
    stage1: dict[int, Stage1Checkpoint] | None,
    resumed: bool,
    *,
    experiment_path: str | Path,
    tracking_uri: str,
    interrupted: bool = False,
    completed: set[str] | None = None,
) -> SweepSummary:
    """The summary of a finished ``tuner.fit()``. ``experiment_path`` (the Tune experiment directory) and
    ``tracking_uri`` (the MLflow store) are where the sweep wrote; the summary prints them. ``interrupted``: the
    fit ended on Ctrl+C; then a trial short of its schedule (or with a report past its last registered checkpoint)
    that Tune did not complete (``completed``: the trial ids it did, :func:`pipelines.tune.callbacks.completed_trials`)
    is "interrupted", never "stopped early"."""
    max_evals = cfg.evals_per_trial
    trials = []
    for r in results:
        m = r.metrics or {}
        evaluations = int(m.get("training_iteration") or 0)
        err, bad_input = _error_line(r.error)
        trial_id = str(m.get("trial_id") or Path(r.path).name)
        short = evaluations < max_evals or _checkpointed(r, evaluations) < evaluations
        unfinished = interrupted and err is None and short and trial_id not in (completed or ())
        trials.append(
            TrialSummary(
                trial_id=trial_id,
                config=trial_values(r.config or {}),
                metrics={k: float(m[k]) for k in SCHEDULER_METRICS if k in m},
                epochs=int(m.get("epoch") or 0),
                evaluations=evaluations,
                stopped_early=err is None and evaluations < max_evals and not unfinished,
                error=err,
                path=r.path,
                interrupted=unfinished,
                bad_input=bad_input,
                replicates=from_checkpoint(getattr(r, "checkpoint", None)),
            )
        )
    metric = cfg.scheduler.metric
    best = best_trial(
        trials,
        value=lambda t: t.metrics.get(metric),
        evaluations=lambda t: t.evaluations,
        failed=lambda t: t.error is not None,
        trial_id=lambda t: t.trial_id,
        mode=cfg.scheduler.mode,
        full_length=max_evals,
    )
    return SweepSummary(
        name=cfg.name,
        experiment_path=str(experiment_path),
        storage_path=str(cfg.run.storage_path),
        tracking_uri=tracking_uri,
        metric=cfg.scheduler.metric,
        mode=cfg.scheduler.mode,
        max_evaluations=max_evals,
        trials=trials,
        best=best,
        stage1=stage1,
        resumed=resumed,
        baseline=cfg.report.baseline,
        interrupted=interrupted,
        eval_every=cfg.eval.every,
    )


def print_summary(summary: SweepSummary, file=None) -> None:
    file = file or sys.stdout
    print(
        f"\nsweep {summary.name!r}: {len(summary.trials)} trials, {summary.trial_epochs} trial-epochs, "
        f"{summary.stopped_early} stopped early by the scheduler, {summary.errored} errored"
        + (f", {summary.unfinished} interrupted" if summary.interrupted else ""),
        file=file,
    )
    for seed, ckpt in (summary.stage1 or {}).items():
        how = "trained for this sweep" if ckpt.trained else "reused"
        print(f"stage 1 (seed {seed}): {ckpt.sha256[:12]} ({how}) at {ckpt.path}", file=file)
    print(summary.table(), file=file)
    configs = summary.configs
    best = aggregate.best_config(configs, summary.metric, summary.mode)
    print(
        f"\nper configuration over its seeds (mean [95% interval]; best = best mean {summary.metric} among "
        f"configurations that ran the full schedule):",
        file=file,
    )
    print(aggregate.format_table(configs, best=best), file=file)
    print(aggregate.method_line(configs), file=file)
    if best is not None:
        print(
            f"best configuration ({summary.metric}, {summary.mode}): {best.label()} -> "
            + ", ".join(f"{m} {best.stats[m].text()}" for m in BUCKET_METRICS)
            + f" over n={best.n}",
            file=file,
        )
        for sentence in summary.comparisons():
            print(sentence, file=file)
    if summary.best is not None:
        b = summary.best
        print(
            f"best single trial: {b.trial_id} {b.config} -> "
            + ", ".join(f"{k} {b.metrics[k]:.4f}" for k in BUCKET_METRICS if k in b.metrics),
            file=file,
        )
        schedule = trial_lam_schedule(summary.tracking_uri, summary.name, b.trial_id, summary.eval_every)
        if schedule is not None and len(schedule) > 1:
            print(f"its λ schedule: {schedule} (replay it with stage2.lam_schedule)", file=file)
    if summary.model is not None:
        m = summary.model
        print(
            f"best model: {m.uri} (trial {m.trial_id}, checkpoint {m.checkpoint}); load it with "
            f"mlflow.pyfunc.load_model({m.uri!r}).predict(image_hwc_uint8)",
            file=file,
        )
    print(f"\n{summary.outcome()}", file=file)
    print(f"TensorBoard:  tensorboard --logdir {summary.experiment_path} --host 127.0.0.1", file=file)
    print(f"MLflow:       mlflow ui --backend-store-uri {summary.tracking_uri} --host 127.0.0.1", file=file)
    if summary.experiment_id is not None:
        from pipelines.mlflow_io.client import runs_table_url

        print(f"              then {runs_table_url(summary.experiment_id)}", file=file)
