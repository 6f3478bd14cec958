"""The MLflow writer of a sweep: the parent run, one nested run per trial, and the shared stage-1 (pretrain) run.

The layout and every tag, metric and artifact name are in :mod:`pipelines.names`. :class:`SweepWriter` is driven by
the Tune callback (:class:`pipelines.tracking.callback.MLflowSweepCallback`) on the Tune driver only, so a sqlite store
never sees two writers; :func:`log_pretrain_run` records the stage-1 training. When the sweep ends the writer has
:mod:`pipelines.analysis.report` build the HTML sweep report.

Runs are found again by their tags, which makes the writer idempotent after ``Tuner.restore``: the parent run is
found by sweep name + role (+ the sweep's uid, which Tune pickles with the callback in ``tuner.pkl``) and each trial's
run by ``ltsweep.trial_id``; found runs are continued, never duplicated.

Calls per trial are few, since the driver pays for each (a thousand-trial sweep: ``benchmarks/bench_driver.py``): the
parent's trial runs are read back in one search; a new trial run costs ``create_run`` and ``log_inputs``, each result
one ``log_batch`` (its params ride with the first, the evaluation count with each), and its end ``set_terminated``
(plus a batch for an error, or for a trial that reported nothing).
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipelines.analysis import replicates
from pipelines.analysis.report import log_sweep_report
from pipelines.config.sections import POPULATION_SCHEDULERS
from pipelines.mlflow_io.client import (
    MAX_TAG_LEN,
    PARAMS_PER_BATCH,
    find_key,
    flatten,
    get_or_create_experiment,
    log_params,
    log_tags,
    make_client,
    new_params,
    tag_entities,
    to_str,
)
from pipelines.mlflow_io.reads import search_tagged
from pipelines.names import (
    ARTIFACT_ERROR_TAG,
    ERROR_TAG,
    ERRORED_TRIALS_TAG,
    FINGERPRINT_TAG,
    ITERATIONS_TAG,
    MLFLOW_TRIAL_METRICS,
    PARENT_TAG,
    PRETRAIN_SHA_PARAM,
    REPORT_ERROR_TAG,
    RETRIES_TAG,
    ROLE_SWEEP,
    ROLE_TAG,
    ROLE_TRIAL,
    SEED_PARAM,
    SWEEP_TAG,
    SWEEP_UID_TAG,
    TRIAL_ID_TAG,
    TRIAL_STATUS_TAG,
    TRIALS_TAG,
    UNFINISHED_TRIALS_TAG,
    WORKERS_PARAM,
    per_class_dict,
)
from pipelines.tracking.artifacts import log_calibration, log_per_class_artifacts, log_replicates
from pipelines.tracking.lineage import (
    PRETRAIN_RUN_TAG,
    dataset_inputs,
    link_stage1,
    log_datasets,
    pretrain_runs,
    source_tags,
)
from pipelines.tracking.sweep_settings import max_evaluations, parent_tags, sweep_setting

logger = logging.getLogger(__name__)

_TERMINAL = {"FINISHED", "FAILED", "KILLED"}


@dataclass
class TrialInfo:
    """What the writer needs to know of a Tune trial (the callback reads it off Tune's ``Trial``)."""

    trial_id: str
    name: str  # the trial run's name
    config: Mapping[str, Any]
    status: str = ""  # Tune's status; recorded on a run the sweep leaves unfinished
    last_result: Mapping[str, Any] = field(default_factory=dict)  # Tune's, for trials the writer saw no result of
    checkpoint: Any = None  # Tune's latest checkpoint of the trial (its last evaluation), if any


class SweepWriter:
    """Writes one sweep to MLflow (see the module docstring). Picklable: only the arguments and the sweep's uid are
    kept, so a copy restored from ``tuner.pkl`` finds the same runs again.

    Args:
        tracking_uri: ``sqlite:///...`` (default store: :func:`pipelines.mlflow_io.client.default_tracking_uri`) or
            ``http://host:port``.
        sweep_name: the experiment name and the parent run's name.
        sweep_params: the sweep's config (nested dicts allowed); logged flattened as params of the parent run.
            A ``dataset_fingerprint`` key anywhere in it (or in a trial's result) becomes the
            ``ltsweep.dataset_fingerprint`` tag, its ``space`` (or ``search_space``) section the
            ``ltsweep.search_space`` tag; ``metric``/``mode`` (or ``scheduler.metric``
            / ``scheduler.mode``) pick the best trial in the report (default AP / max).
        searched_keys: dotted keys of the trial config that are searched (``stage2.lam``); each becomes a param of
            every trial run.
        val_annotations: LVIS-format validation annotations, used to name categories and bucket them by frequency
            in ``per_class_ap.csv`` / ``ap_by_frequency.png`` and the report.
    """

    def __init__(
        self,
        tracking_uri: str,
        sweep_name: str,
        sweep_params: dict,
        searched_keys: list[str],
        val_annotations: str | None = None,
    ):
        self.tracking_uri = str(tracking_uri)
        self.sweep_name = str(sweep_name)
        self.sweep_params = dict(sweep_params or {})
        self.searched_keys = list(searched_keys or [])
        self.val_annotations = None if val_annotations is None else os.fspath(val_annotations)
        # A restored sweep continues its parent run; a fresh sweep with the same name gets a new one.
        self.sweep_uid = uuid.uuid4().hex
        self._reset()

    # what is pickled (Tune pickles the callback, and this writer with it, into tuner.pkl): the arguments and the
    # sweep's uid; the rest is state of this process, made again by _reset
    _PICKLED = ("tracking_uri", "sweep_name", "sweep_params", "searched_keys", "val_annotations", "sweep_uid")

    def _reset(self) -> None:
        self._client = None
        self._experiment_id: str | None = None
        self._parent_run_id: str | None = None
        self._trial_runs: dict[str, str] = {}
        self._trial_runs_loaded = False  # the parent's trial runs were read once; the others this writer created
        self._run_params: dict[str, dict[str, str]] = {}  # trial id -> the params its run has (as logged or read)
        self._resumed_status: set[str] = set()  # trial ids whose run carries a TRIAL_STATUS_TAG from an interruption
        self._inputs: list | None = None  # the dataset inputs every trial run logs (built once)
        self._pending_params: dict[str, list] = {}  # trial id -> params of its new run, not sent yet
        self._open_runs: dict[str, str] = {}  # trial id -> run id of runs this process has (re)opened
        self._run_status: dict[str, str] = {}  # trial id -> its run's status as read from the store or set here
        self._last_results: dict[str, dict] = {}
        self._sha_logged: set[str] = set()
        self._stage1_runs: dict[str, str] = {}
        self.replicates: dict[str, dict] = {}  # trial id -> its last evaluation's image-bootstrap replicates
        self._fingerprint_tagged = find_key(flatten(self.sweep_params), "dataset_fingerprint") is not None

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k in self._PICKLED}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset()

    # ------------------------------------------------------------------ the store
    @property
    def client(self):
        if self._client is None:
            self._client = make_client(self.tracking_uri)
        return self._client

    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            self._experiment_id = get_or_create_experiment(self.client, self.sweep_name, self.tracking_uri)
        return self._experiment_id

    @property
    def parent_run_id(self) -> str:
        if self._parent_run_id is None:
            self._parent_run_id = self._get_or_create_parent()
        return self._parent_run_id

    def trial_run_id(self, trial_id: str) -> str | None:
        """The MLflow run id of a Tune trial (None if not logged). The parent run's trial runs are found by their
        ``ltsweep.trial_id`` tag in one search, the first time one is asked for; the runs created after that are
        this writer's own."""
        if not self._trial_runs_loaded:
            tags = {ROLE_TAG: ROLE_TRIAL, PARENT_TAG: self.parent_run_id}
            runs = search_tagged(self.client, self.experiment_id, tags)
            by_trial: dict[str, list[str]] = {}
            for run in runs:  # oldest first
                by_trial.setdefault(run.data.tags.get(TRIAL_ID_TAG, ""), []).append(run.info.run_id)
            for tid, ids in by_trial.items():
                if len(ids) > 1:
                    logger.warning("MLflow: %d runs tagged %s=%s; continuing the oldest", len(ids), TRIAL_ID_TAG, tid)
                self._trial_runs.setdefault(tid, ids[0])
            for run in runs:
                if run.info.run_id == self._trial_runs.get(run.data.tags.get(TRIAL_ID_TAG, "")):
                    self._run_status[run.data.tags[TRIAL_ID_TAG]] = run.info.status
            self._trial_runs_loaded = True
        return self._trial_runs.get(trial_id)

    # ------------------------------------------------------------------ parent run
    def _get_or_create_parent(self) -> str:
        client = self.client
        tags = {ROLE_TAG: ROLE_SWEEP, SWEEP_TAG: self.sweep_name, SWEEP_UID_TAG: self.sweep_uid}
        runs = search_tagged(client, self.experiment_id, tags)
        if runs:
            run = runs[0]
            run_id = run.info.run_id
            if run.info.status != "RUNNING":
                client.update_run(run_id, status="RUNNING")
            existing = run.data.params
            logger.info("MLflow: continuing sweep run %s of %r", run_id, self.sweep_name)
        else:
            run = client.create_run(self.experiment_id, run_name=self.sweep_name, tags={**tags, **source_tags()})
            run_id = run.info.run_id
            existing = {}
            logger.info("MLflow: sweep run %s in experiment %r (%s)", run_id, self.sweep_name, self.tracking_uri)
        log_params(client, run_id, flatten(self.sweep_params), existing)
        log_tags(client, run_id, parent_tags(self.sweep_params, self.searched_keys))
        log_datasets(client, run_id, *self._datasets())
        self._stage1_runs = pretrain_runs(client, self.experiment_id, self._stage1_shas())
        link_stage1(client, run_id, self._stage1_runs)
        return run_id

    def _datasets(self) -> tuple[str | None, str | None, str | None]:
        data = self.sweep_params.get("data") or {}
        return data.get("train"), data.get("val"), self.sweep_params.get("dataset_fingerprint")

    def _stage1_shas(self) -> dict[str, str]:
        shas = self.sweep_params.get("pretrain_sha256")
        return {str(k): str(v) for k, v in shas.items()} if isinstance(shas, dict) else {}

    def start(self) -> None:
        """Create (or, after a restore, continue) the sweep's parent run."""
        _ = self.parent_run_id

    # ------------------------------------------------------------------ trial runs
    def _searched_params(self, trial: TrialInfo) -> dict[str, Any]:
        flat = flatten(trial.config or {})
        out = {}
        for key in self.searched_keys:
            if key in flat:
                out[key] = flat[key]
            else:
                v = find_key(flat, key.rsplit(".", 1)[-1]) if "." in key else None
                if v is not None:
                    out[key] = v
        return out

    def open_trial(self, trial: TrialInfo) -> str:
        """The trial's run, created or (after a restore/retry) set RUNNING again. Cached while it is open."""
        if trial.trial_id in self._open_runs:
            return self._open_runs[trial.trial_id]
        run_id = self.trial_run_id(trial.trial_id)
        client = self.client
        if run_id is None:
            tags = {ROLE_TAG: ROLE_TRIAL, TRIAL_ID_TAG: trial.trial_id, PARENT_TAG: self.parent_run_id}
            run = client.create_run(
                self.experiment_id, run_name=trial.name, tags={**tags, SWEEP_TAG: self.sweep_name, **source_tags()}
            )
            run_id = run.info.run_id
            self._trial_runs[trial.trial_id] = run_id
            existing: dict[str, str] = {}
            if self._inputs is None:
                self._inputs = dataset_inputs(*self._datasets())
            if self._inputs:
                client.log_inputs(run_id, datasets=self._inputs)
        else:
            run = client.get_run(run_id)
            if run.info.status != "RUNNING":
                client.update_run(run_id, status="RUNNING")
            existing = dict(run.data.params)
            if TRIAL_STATUS_TAG in run.data.tags:
                self._resumed_status.add(trial.trial_id)
            log_datasets(client, run_id, *self._datasets())
        workers = int((self.sweep_params.get("resources") or {}).get("workers_per_trial", 1))  # Ray Train workers
        params = new_params(run_id, {**self._searched_params(trial), WORKERS_PARAM: workers}, existing)
        self._run_params[trial.trial_id] = {**existing, **{p.key: p.value for p in params}}
        self._pending_params[trial.trial_id] = params  # sent with the run's first batch (a result, or its end)
        self._open_runs[trial.trial_id] = run_id
        return run_id

    def _take_params(self, trial_id: str, run_id: str, room: int) -> list:
        """The trial's params not sent yet, to go into a batch with ``room`` params left; the rest are logged now."""
        params = self._pending_params.pop(trial_id, [])
        if len(params) > room:
            for i in range(0, len(params), PARAMS_PER_BATCH):
                self.client.log_batch(run_id, params=params[i : i + PARAMS_PER_BATCH])
            return []
        return params

    def log_result(self, trial: TrialInfo, result: Mapping[str, Any]) -> None:
        """One reported result: its metrics at step ``training_iteration``, the trial's stage-1 sha256 (once), and
        the dataset fingerprint on the parent run (once)."""
        from mlflow.entities import Metric, Param, RunTag

        run_id = self.open_trial(trial)
        step = int(result.get("training_iteration") or 0)
        ts = int(float(result.get("timestamp") or time.time()) * 1000)
        metrics = []
        for key in MLFLOW_TRIAL_METRICS:
            v = result.get(key)
            if v is None or isinstance(v, bool):
                continue
            try:
                value = float(v)
            except (TypeError, ValueError):
                continue
            metrics.append(Metric(key, value, ts, step))
        params, tags = [], []
        if trial.trial_id not in self._sha_logged:  # once per trial: its stage-1 sha256 and its training seed
            logged = self._run_params.setdefault(trial.trial_id, {})
            for key in (PRETRAIN_SHA_PARAM, SEED_PARAM):
                v = result.get(key)
                if v is not None and v != "" and key not in logged:
                    params.append(Param(key, str(v)))
                    logged[key] = str(v)
            stage1_run = self._stage1_run_of(result.get(PRETRAIN_SHA_PARAM))
            if stage1_run:
                tags.append(RunTag(PRETRAIN_RUN_TAG, stage1_run))
            self._sha_logged.add(trial.trial_id)
        tags.append(RunTag(ITERATIONS_TAG, str(step)))  # evaluations so far: with the result, not a call at the end
        params += self._take_params(trial.trial_id, run_id, PARAMS_PER_BATCH - len(params) - len(tags))
        if metrics or params or tags:
            self.client.log_batch(run_id, metrics=metrics, params=params, tags=tags)
        self._last_results[trial.trial_id] = dict(result)
        fp = result.get("dataset_fingerprint")
        if fp and not self._fingerprint_tagged:
            self.client.set_tag(self.parent_run_id, FINGERPRINT_TAG, str(fp))
            self._fingerprint_tagged = True

    def _stage1_run_of(self, sha: Any) -> str | None:
        _ = self.parent_run_id  # the stage-1 runs are looked up with the parent
        by_sha = {v: self._stage1_runs.get(k) for k, v in self._stage1_shas().items()}
        return by_sha.get(str(sha)) if sha else None

    def _last_result(self, trial: TrialInfo) -> dict:
        return dict(self._last_results.get(trial.trial_id) or trial.last_result or {})

    def finish_trial(self, trial: TrialInfo, status: str, error: str | None = None) -> None:
        """End the trial's run with MLflow ``status`` (FINISHED or FAILED, with the tail of ``error``), after its
        evaluation count and per-class artifacts."""
        run_id = self.trial_run_id(trial.trial_id)
        res = self._last_result(trial)
        if run_id is None:
            if not res and status != "FAILED":
                return  # never started (e.g. a pending trial removed at the end): nothing to record
            run_id = self.open_trial(trial)
        elif trial.trial_id not in self._open_runs and self.client.get_run(run_id).info.status == status:
            return  # restored as already finished by --resume: keep its run (and its end time) as it was
        tags: dict[str, int | str] = {}
        if trial.trial_id not in self._last_results:  # no result logged by this writer: its count, 0 if none
            tags[ITERATIONS_TAG] = int(res.get("training_iteration") or 0)
        if error:
            tags[ERROR_TAG] = error[-MAX_TAG_LEN:]
        params = self._take_params(trial.trial_id, run_id, PARAMS_PER_BATCH - len(tags))
        if tags or params:
            self.client.log_batch(run_id, params=params, tags=tag_entities(tags))
        if trial.trial_id in self._resumed_status:  # an interrupted trial that --resume finished
            self.client.delete_tag(run_id, TRIAL_STATUS_TAG)
            self._resumed_status.discard(trial.trial_id)
        per_class = per_class_dict(res.get("per_class"))
        try:
            if per_class:
                log_per_class_artifacts(self.client, run_id, per_class, res, self.val_annotations, trial.name)
            if isinstance(res.get("reliability"), dict):
                log_calibration(self.client, run_id, res)
            reps = log_replicates(self.client, run_id, trial.checkpoint)
            if reps is not None:
                self.replicates[trial.trial_id] = reps
        except Exception as exc:
            logger.exception("MLflow: artifacts of trial %s failed", trial.trial_id)
            self.client.set_tag(run_id, ARTIFACT_ERROR_TAG, to_str(repr(exc), MAX_TAG_LEN))
        self.client.set_terminated(run_id, status=status)
        self._open_runs.pop(trial.trial_id, None)
        self._run_status[trial.trial_id] = status

    def tag_retry(self, trial_id: str, retries: Any) -> None:
        """Record how often Tune retried a trial (if it has a run)."""
        run_id = self.trial_run_id(trial_id)
        if run_id is not None:
            self.client.set_tag(run_id, RETRIES_TAG, str(retries))

    # ------------------------------------------------------------------ end of the sweep
    def _may_be_open(self, trial_id: str) -> bool:
        """Whether the trial's run may still be unfinished: open in this process, or not known to be ended (read
        from the store once, or ended here). Only those are read again at the end, not every trial's run."""
        return trial_id in self._open_runs or self._run_status.get(trial_id) not in _TERMINAL

    def end_sweep(self, trials: Sequence[TrialInfo], errored: int) -> None:
        """Close the sweep: trials Tune left unfinished become KILLED runs, the report is logged, and the parent run
        ends FAILED if ``errored`` trials errored, KILLED if some were unfinished, else FINISHED."""
        client = self.client
        n_killed = 0
        for trial in trials:
            run_id = self.trial_run_id(trial.trial_id)
            if run_id is None or not self._may_be_open(trial.trial_id):
                continue
            run = client.get_run(run_id)
            if run.info.status not in _TERMINAL:
                tags = {
                    TRIAL_STATUS_TAG: trial.status,
                    ITERATIONS_TAG: int(self._last_result(trial).get("training_iteration") or 0),
                }
                params = self._take_params(trial.trial_id, run_id, PARAMS_PER_BATCH - len(tags))
                client.log_batch(run_id, params=params, tags=tag_entities(tags))
                client.set_terminated(run_id, status="KILLED")
                self._open_runs.pop(trial.trial_id, None)
                self._run_status[trial.trial_id] = "KILLED"
                n_killed += 1
        for trial in trials:  # a trial finished before a --resume: its replicates are beside its checkpoint
            if trial.trial_id not in self.replicates:
                reps = replicates.from_checkpoint(trial.checkpoint)
                if reps is not None:
                    self.replicates[trial.trial_id] = reps
        try:
            log_sweep_report(
                client,
                self.experiment_id,
                self.parent_run_id,
                sweep_name=self.sweep_name,
                searched_keys=self.searched_keys,
                val_annotations=self.val_annotations,
                metric=str(sweep_setting(self.sweep_params, "metric", "AP")),
                mode=str(sweep_setting(self.sweep_params, "mode", "max")),
                max_t=max_evaluations(self.sweep_params),
                last_results={t.trial_id: self._last_result(t) for t in trials},
                baseline=(self.sweep_params.get("report") or {}).get("baseline"),
                replicates=self.replicates,
                schedules=sweep_setting(self.sweep_params, "type", "") in POPULATION_SCHEDULERS,
            )
        except Exception as exc:
            logger.exception("MLflow: writing the sweep report failed")
            client.set_tag(self.parent_run_id, REPORT_ERROR_TAG, to_str(repr(exc), MAX_TAG_LEN))
        log_tags(
            client,
            self.parent_run_id,
            {TRIALS_TAG: len(trials), ERRORED_TRIALS_TAG: errored, UNFINISHED_TRIALS_TAG: n_killed},
        )
        # FAILED: some trial errored; KILLED: the sweep ended with trials unfinished (resume continues both)
        status = "FAILED" if errored else "KILLED" if n_killed else "FINISHED"
        client.set_terminated(self.parent_run_id, status=status)
