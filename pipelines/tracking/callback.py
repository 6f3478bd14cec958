"""MLflow tracking of a sweep: the Ray Tune callback that hands Tune's events to the sweep's MLflow writer.

Tune calls :class:`MLflowSweepCallback` on the driver; the callback only translates each event (a trial started,
reported, ended, was retried; the experiment ended) into a call of :class:`pipelines.tracking.writer.SweepWriter`,
which does all MLflow work and, at the end, has :mod:`pipelines.analysis.report` log the sweep report. The chain
is one-way: callback -> writer -> analysis.report -> names.

:class:`CheckpointedResults` is the rule every sweep logger follows (MLflow here; result.json, progress.csv,
TensorBoard and the progress lines in :mod:`pipelines.tune.callbacks`): a report is logged once its checkpoint
is Tune's, so nothing logged is ahead of what ``--resume`` restores.
"""

from __future__ import annotations

import os
from pathlib import Path

from ray.tune import Callback
from ray.tune.result import SHOULD_CHECKPOINT

from pipelines.config.space import trial_values
from pipelines.tracking.writer import SweepWriter, TrialInfo

__all__ = ["CheckpointedResults", "MLflowSweepCallback"]


def _info(trial) -> TrialInfo:
    """What the writer needs of a Tune ``Trial``."""
    return TrialInfo(
        trial_id=trial.trial_id,
        name=str(trial),
        config=trial_values(trial.config or {}),
        status=getattr(trial, "status", ""),
        last_result=getattr(trial, "last_result", None) or {},
        checkpoint=getattr(trial, "checkpoint", None),
    )


def _error_text(trial) -> str | None:
    """The contents of the trial's Tune error file, if it has one that can be read."""
    path = getattr(trial, "error_file", None) or None
    try:
        if path and os.path.exists(path):
            return Path(path).read_text()
    except OSError:
        pass
    return None


class CheckpointedResults:
    """Mixin for a Tune callback, listed first among the bases of a subclass of the callback (whose own hooks it
    wraps): a result reported with a checkpoint reaches the callback's ``on_trial_result`` only when Tune has
    registered that checkpoint (``on_trial_save``).

    Tune hands a report to its callbacks first and registers the report's checkpoint later, when the trial's
    ``save`` comes back. A sweep interrupted in between (Ctrl+C, a killed driver) stores the trial with its previous
    checkpoint, and ``--resume`` trains the last epoch again: a logger that had written the report would then hold
    that epoch twice. Holding the report until its checkpoint is registered keeps every log in step with what a
    resume restores (tests/test_sweep_e2e.py). A report without a checkpoint is passed on at once; a held report
    whose save never comes (the trial was stopped or failed first) is dropped, as Tune drops its checkpoint."""

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get(SHOULD_CHECKPOINT):
            self._held()[trial.trial_id] = (iteration, dict(result), info)
            return
        super().on_trial_result(iteration, trials, trial, result, **info)

    def on_trial_save(self, iteration, trials, trial, **info):
        held = self._held().pop(trial.trial_id, None)
        if held is not None:
            at, result, result_info = held
            super().on_trial_result(at, trials, trial, result, **result_info)
        super().on_trial_save(iteration, trials, trial, **info)

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._held().pop(trial.trial_id, None)  # the retry reports again from the last registered checkpoint
        super().on_trial_recover(iteration, trials, trial, **info)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._held().pop(trial.trial_id, None)
        super().on_trial_error(iteration, trials, trial, **info)

    def _held(self) -> dict:
        """trial id -> the report waiting for its checkpoint (made on first use: a callback unpickled from an
        older tuner.pkl has none)."""
        held = self.__dict__.get("_held_results")
        if held is None:
            held = self.__dict__["_held_results"] = {}
        return held

    def __getstate__(self) -> dict:  # tuner.pkl: a report held in this process means nothing to a resumed one
        state = dict(self.__dict__)
        state.pop("_held_results", None)
        return state


class _MLflowEvents(Callback):
    """Ray Tune callback that logs a whole sweep to MLflow through one :class:`~pipelines.tracking.writer.SweepWriter`.

    The arguments are the writer's (see there): ``tracking_uri`` (``sqlite:///...`` or ``http://host:port``),
    ``sweep_name`` (experiment and parent run name), ``sweep_params`` (the sweep's config, logged on the parent run),
    ``searched_keys`` (dotted trial-config keys logged as params of every trial run) and ``val_annotations``
    (LVIS-format annotations naming categories and frequency buckets in the per-class artifacts and the report).

    Tune pickles the callback into ``tuner.pkl``; the writer keeps only its arguments and the sweep's uid, so after
    ``Tuner.restore`` the same parent run and trial runs (found by ``ltsweep.trial_id``) are continued.
    """

    def __init__(
        self,
        tracking_uri: str,
        sweep_name: str,
        sweep_params: dict,
        searched_keys: list[str],
        val_annotations: str | None = None,
    ):
        self.writer = SweepWriter(tracking_uri, sweep_name, sweep_params, searched_keys, val_annotations)

    def __setstate__(self, state: dict) -> None:
        if "writer" not in state:  # pickled before the writer existed: the callback held the writer's fields
            writer = SweepWriter(
                state["tracking_uri"],
                state["sweep_name"],
                state["sweep_params"],
                state["searched_keys"],
                state.get("val_annotations"),
            )
            writer.sweep_uid = state["sweep_uid"]
            state = {"writer": writer}
        self.__dict__.update(state)

    # the writer's view of the sweep, for callers that look up its runs
    @property
    def experiment_id(self) -> str:
        return self.writer.experiment_id

    @property
    def parent_run_id(self) -> str:
        return self.writer.parent_run_id

    def trial_run_id(self, trial_id: str) -> str | None:
        return self.writer.trial_run_id(trial_id)

    # ------------------------------------------------------------------ Tune hooks
    def setup(self, stop=None, num_samples=None, total_num_samples=None, **info):
        self.writer.start()

    def on_trial_start(self, iteration, trials, trial, **info):
        self.writer.open_trial(_info(trial))

    def on_trial_restore(self, iteration, trials, trial, **info):
        self.writer.open_trial(_info(trial))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.writer.log_result(_info(trial), result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.writer.finish_trial(_info(trial), "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        error = _error_text(trial) or "trial raised an error (see the Tune trial log)"
        self.writer.finish_trial(_info(trial), "FAILED", error=error)

    def on_trial_recover(self, iteration, trials, trial, **info):
        self.writer.tag_retry(trial.trial_id, getattr(trial, "num_failures", ""))

    def on_experiment_end(self, trials, **info):
        self.writer.end_sweep([_info(t) for t in trials], errored=sum(1 for t in trials if t.status == "ERROR"))


class MLflowSweepCallback(CheckpointedResults, _MLflowEvents):
    """The sweep's MLflow callback (arguments and behaviour: :class:`_MLflowEvents`); each report is logged once its
    checkpoint is Tune's (:class:`CheckpointedResults`)."""
