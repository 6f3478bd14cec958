"""The sweep's Tune callbacks besides MLflow: result.json, TensorBoard and CSV loggers, and one progress line per
evaluation. Each sees a report once its checkpoint is Tune's (:class:`pipelines.tracking.callback.CheckpointedResults`),
so no log is ahead of what ``--resume`` restores."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

import pyarrow.fs
from ray import tune
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback, TBXLoggerCallback
from ray.tune.result import EXPR_PROGRESS_FILE

from lt_models.atomic import write_bytes_atomic
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
    synced back over them. Written here, a log can be ahead of the experiment state that a killed driver stored
    last: a trial (re)starting first cuts its progress.csv back to the checkpoint it restarts from
    (:func:`drop_reports_after`). Tune's ``result.json`` stays in the staging copy (see :class:`JsonLogger`)."""
    storage = trial.storage
    if not isinstance(storage.storage_filesystem, pyarrow.fs.LocalFileSystem):
        return None
    trial.init_local_path()  # Tune's staging directory, as its loggers make it
    if os.path.realpath(trial.local_path) == os.path.realpath(storage.trial_fs_path):
        return None
    os.makedirs(storage.trial_fs_path, exist_ok=True)
    return storage.trial_fs_path


def restart_iteration(trial) -> int:
    """The ``training_iteration`` of the checkpoint a starting trial goes on from (0: none, it starts over)."""
    latest = trial.run_metadata.checkpoint_manager.latest_checkpoint_result
    return int((latest.metrics or {}).get("training_iteration") or 0) if latest is not None else 0


def drop_reports_after(path: Path, iteration: int) -> None:
    """Rewrite a trial's ``progress.csv`` (a header, one row per report) without the reports past ``iteration``,
    atomically; untouched when nothing is past it. A row without a readable ``training_iteration`` (written half
    when the driver was killed) goes too: the trial reports it again."""
    try:
        with open(path, newline="") as f:  # the rows as written (Tune's csv module ends them with \r\n)
            lines = f.read().splitlines(keepends=True)
    except FileNotFoundError:
        return
    rows = list(csv.DictReader(lines))
    if len(rows) != len(lines) - 1:  # a value spanning lines: not Tune's flat rows; leave the file as it is
        return
    keep = lines[:1] + [
        line
        for line, row in zip(lines[1:], rows, strict=True)
        if (n := _int(row.get("training_iteration"))) is not None and n <= iteration
    ]
    if len(keep) < len(lines):
        write_bytes_atomic(path, "".join(keep).encode())


def _int(v) -> int | None:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


class JsonLogger(CheckpointedResults, JsonLoggerCallback):
    """Tune's result.json (Tune adds no JSON logger of its own when the sweep passes this one), through Tune's
    staging copy: it reaches the storage path in the same copy as the experiment state, so after a driver killed
    between two snapshots a trial's result.json is never ahead of what ``--resume`` restores, and a trial that
    looks finished there is finished for the resume too (its result.json stays byte for byte: tests/test_faults.py,
    benchmarks/faults). Written straight to the trial's directory, as the other logs are, it cut Arrow's copy
    threads from 39.6 s to 2.9 s at 1,000 trials, but a trial finished since the last snapshot was then trained
    again by the resume (2 of 5 ``driver_kill`` runs; docs/clusters.md)."""


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
    storage path (``direct_log_dir``; a resumed trial appends to it, with ``cut_back`` after cutting it back to the
    checkpoint it restarts from)."""

    cut_back = False  # a logger pickled (tuner.pkl) by a sweep that started before this option: as it was then

    def __init__(self, cut_back: bool = True):
        super().__init__()
        self.cut_back = cut_back

    def _setup_trial(self, trial):
        path = direct_log_dir(trial)
        if path is None:
            return super()._setup_trial(trial)
        if trial in self._trial_files:
            self._trial_files[trial].close()
        progress = Path(path, EXPR_PROGRESS_FILE)
        if self.cut_back:
            drop_reports_after(progress, restart_iteration(trial))
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


def tune_callbacks(
    max_evals: int, searched_keys: Sequence[str], progress: bool, experiment: str, population: bool = False
) -> list:
    """result.json, TensorBoard + CSV loggers without the per-class dict, the completion record and (optionally)
    one progress line per report. ``population`` (PBT, PB2): progress.csv is not cut back to a trial's checkpoint
    (a member that copies another's checkpoint goes on from the donor's iteration)."""
    loggers = [JsonLogger(), TBXLogger(), CSVLogger(cut_back=not population)]
    return (
        loggers + [CompletionRecorder(experiment)] + ([ProgressPrinter(max_evals, searched_keys)] if progress else [])
    )
