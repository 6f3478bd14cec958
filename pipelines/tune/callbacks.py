"""The sweep's Tune callbacks besides MLflow: result.json, TensorBoard and CSV loggers, and one progress line per
evaluation. Each sees a report once its checkpoint is Tune's (:class:`pipelines.tracking.callback.CheckpointedResults`),
so no log is ahead of what ``--resume`` restores."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pyarrow.fs
from ray import tune
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback, TBXLoggerCallback
from ray.tune.result import EXPR_PROGRESS_FILE

from pipelines.analysis.summary import format_value
from pipelines.config.space import trial_values
from pipelines.names import BUCKET_METRICS
from pipelines.tracking.callback import CheckpointedResults


def _without_per_class(result: dict) -> dict:
    """The result minus its per-class AP and reliability diagram (MLflow artifacts, not scalars)."""
    return {k: v for k, v in result.items() if k not in ("per_class", "reliability")}


def direct_log_dir(trial) -> str | None:
    """The trial's directory under ``run.storage_path`` when that is a local filesystem apart from Tune's staging
    copy, else None.

    Tune's loggers write into the driver's staging copy of the experiment, and Tune copies the whole staging tree
    (every trial's log files) to the storage path at each experiment snapshot: at a thousand trials that copying
    was the driver's largest cost. On a local storage path the TensorBoard and CSV logs go straight to the trial's
    directory instead (TensorBoard sees them at once, and the snapshot copies less). Tune's restore downloads only
    the experiment's top-level ``*.json`` and ``*.pkl`` into the staging copy, so no stale copy of these logs is
    synced back over them. Tune's ``result.json`` stays in the staging copy: it reaches the storage path in the same
    copy as the experiment state, so after a driver killed between two snapshots a trial's ``result.json`` is not
    ahead of what ``--resume`` restores, which would repeat its last epochs (tests/test_faults.py)."""
    storage = trial.storage
    if not isinstance(storage.storage_filesystem, pyarrow.fs.LocalFileSystem):
        return None
    trial.init_local_path()  # Tune's staging directory, as its loggers make it
    if os.path.realpath(trial.local_path) == os.path.realpath(storage.trial_fs_path):
        return None
    os.makedirs(storage.trial_fs_path, exist_ok=True)
    return storage.trial_fs_path


class JsonLogger(CheckpointedResults, JsonLoggerCallback):
    """Tune's result.json (one JSON object per report; Tune's own is not added when the sweep passes this one)."""


class TBXLogger(CheckpointedResults, TBXLoggerCallback):
    """Tune's TensorBoard logger minus `per_class` (LVIS: 1203 scalars per evaluation; MLflow keeps it), writing
    to the trial's directory on a local storage path (``direct_log_dir``)."""

    def log_trial_start(self, trial):
        path = direct_log_dir(trial)
        if path is None:
            return super().log_trial_start(trial)
        if trial in self._trial_writer:
            self._trial_writer[trial].close()
        self._trial_writer[trial] = self._summary_writer_cls(path, flush_secs=30)
        self._trial_result[trial] = {}

    def log_trial_result(self, iteration, trial, result):
        super().log_trial_result(iteration, trial, _without_per_class(result))


class CSVLogger(CheckpointedResults, CSVLoggerCallback):
    """Tune's progress.csv minus `per_class` (result.json keeps it), written to the trial's directory on a local
    storage path (``direct_log_dir``; a resumed trial appends to it)."""

    def _setup_trial(self, trial):
        path = direct_log_dir(trial)
        if path is None:
            return super()._setup_trial(trial)
        if trial in self._trial_files:
            self._trial_files[trial].close()
        progress = Path(path, EXPR_PROGRESS_FILE)
        self._trial_continue[trial] = progress.exists() and progress.stat().st_size > 0
        self._trial_files[trial] = progress.open("at")
        self._trial_csv[trial] = None

    def log_trial_result(self, iteration, trial, result):
        super().log_trial_result(iteration, trial, _without_per_class(result))


class _ProgressLines(tune.Callback):
    """One line per evaluation / trial end on the driver's stdout (instead of Tune's verbose result boxes)."""

    def __init__(self, max_evals: int, searched_keys: Sequence[str]):
        self.max_evals = max_evals
        self.keys = list(searched_keys)
        self._ran: set[str] = set()  # trials that reported in this session (a resumed sweep's finished ones do not)

    def _tag(self, trial) -> str:
        cfg = " ".join(f"{k}={format_value(trial_values(trial.config).get(k))}" for k in self.keys)
        return f"[{trial.trial_id} {cfg}]"

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._ran.add(trial.trial_id)
        vals = "  ".join(f"{m} {format_value(result.get(m))}" for m in (*BUCKET_METRICS, "loss"))
        print(
            f"{self._tag(trial)} evaluation {result.get('training_iteration')}/{self.max_evals} "
            f"(epoch {result.get('epoch')}): {vals}",
            flush=True,
        )

    def on_trial_complete(self, iteration, trials, trial, **info):
        if trial.trial_id not in self._ran:  # restored as finished by --resume: it said so in its own session
            return
        n = int((trial.last_result or {}).get("training_iteration") or 0)
        how = "finished" if n >= self.max_evals else f"stopped early by the scheduler after {n} evaluation(s)"
        print(f"{self._tag(trial)} {how}", flush=True)

    def on_trial_recover(self, iteration, trials, trial, **info):
        where = "its last checkpoint" if getattr(trial, "checkpoint", None) is not None else "the start"
        print(f"{self._tag(trial)} failed; retrying from {where} (see {trial.error_file})", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"{self._tag(trial)} ERROR, no retries left: see {trial.error_file}", flush=True)


class ProgressPrinter(CheckpointedResults, _ProgressLines):
    """:class:`_ProgressLines`, one line per report once its checkpoint is Tune's."""


# experiment name -> trials Tune completed (ran their schedule, or stopped by the scheduler) in this driver process
_COMPLETED: dict[str, set[str]] = {}


class CompletionRecorder(tune.Callback):
    """Remembers which trials Tune completed in this process (``on_trial_complete``: the schedule ran out or the
    scheduler stopped the trial). When Ctrl+C ends a sweep, Tune stops the running trials without completing them,
    so the summary tells "interrupted" from "stopped early" by this record (:func:`completed_trials`). A resumed
    sweep's Tuner.restore brings the callback back from tuner.pkl; it writes to the same module-level record."""

    def __init__(self, experiment: str):
        self.experiment = experiment

    def on_trial_complete(self, iteration, trials, trial, **info):
        _COMPLETED.setdefault(self.experiment, set()).add(trial.trial_id)


def completed_trials(experiment: str) -> set[str]:
    return set(_COMPLETED.get(experiment, ()))


def tune_callbacks(max_evals: int, searched_keys: Sequence[str], progress: bool, experiment: str) -> list:
    """result.json, TensorBoard + CSV loggers without the per-class dict, the completion record and (optionally)
    one progress line per report."""
    return [JsonLogger(), TBXLogger(), CSVLogger(), CompletionRecorder(experiment)] + (
        [ProgressPrinter(max_evals, searched_keys)] if progress else []
    )
