"""MLflow tracking for ltsweep sweeps: one driver-side Ray Tune callback is the only MLflow writer.

Layout in MLflow (conventions pinned in DESIGN.md):

- one experiment per sweep, named after the sweep;
- a parent run per sweep (tag ``ltsweep.role=sweep``) with the flattened sweep config as params and the search
  space, dataset fingerprint and code version as tags; the HTML sweep report (``sweep_report.html``) is logged on it
  when the experiment ends;
- a nested run per Tune trial (``ltsweep.role=trial``, ``ltsweep.trial_id``, ``mlflow.parentRunId``) with every
  searched hyperparameter plus ``pretrain_sha256`` as params, the metrics ``AP AP50 APr APc APf loss epoch`` at every
  report (step = Tune's ``training_iteration``) and, when the trial ends, ``per_class_ap.csv`` and
  ``ap_by_frequency.png``;
- a run for the shared stage-1 training (``ltsweep.role=pretrain``, ``ltsweep.pretrain_sha256``), see
  :func:`log_pretrain_run`.

Everything is written through :class:`mlflow.MlflowClient` (no global active run), from the Tune driver only, so a
sqlite store never sees two writers. Runs are found again by their tags, which makes the callback idempotent after
``Tuner.restore``: the parent run is found by sweep name + role (+ the sweep's uid, which Tune pickles with the
callback in ``tuner.pkl``) and each trial's run by ``ltsweep.trial_id``; found runs are continued, never duplicated.
"""
from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Mapping

from ray.tune import Callback

logger = logging.getLogger(__name__)

ROLE_TAG = "ltsweep.role"
SWEEP_TAG = "ltsweep.sweep"
SWEEP_UID_TAG = "ltsweep.sweep_uid"
TRIAL_ID_TAG = "ltsweep.trial_id"
PRETRAIN_SHA_TAG = "ltsweep.pretrain_sha256"
PARENT_TAG = "mlflow.parentRunId"
ITERATIONS_TAG = "ltsweep.iterations"
TRIAL_STATUS_TAG = "ltsweep.trial_status"  # Tune's status of a trial the sweep left unfinished (run KILLED)
MAX_T_TAG = "ltsweep.max_t"  # evaluations a full-length trial reports (ASHA's max_t)
ERROR_TAG = "ltsweep.error"
METRIC_KEYS = ("AP", "AP50", "APr", "APc", "APf", "loss", "epoch")
PER_CLASS_CSV = "per_class_ap.csv"
PER_CLASS_JSON = "per_class_ap.json"
AP_BY_FREQUENCY_PNG = "ap_by_frequency.png"
REPORT_HTML = "sweep_report.html"

_MAX_PARAM_LEN = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
_MAX_TAG_LEN = 8000  # mlflow.utils.validation.MAX_TAG_VAL_LENGTH
_BATCH = 100  # params/tags per log_batch (MAX_PARAMS_TAGS_PER_BATCH)
_TERMINAL = {"FINISHED", "FAILED", "KILLED"}


# --------------------------------------------------------------------------------------------------------------
# store helpers
def default_tracking_uri(storage_path: str | os.PathLike) -> str:
    """The default MLflow store of a sweep: ``sqlite:///<absolute storage_path>/mlflow.db``."""
    return f"sqlite:///{Path(storage_path).expanduser().resolve() / 'mlflow.db'}"


def _sqlite_path(tracking_uri: str) -> Path | None:
    if tracking_uri.startswith("sqlite:///"):
        return Path(tracking_uri[len("sqlite:///"):])
    return None


def make_client(tracking_uri: str):
    """An MlflowClient for ``tracking_uri``; for a sqlite store the directory is created first."""
    from mlflow import MlflowClient

    db = _sqlite_path(tracking_uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=tracking_uri)


def _artifact_location(tracking_uri: str, experiment_name: str) -> str | None:
    """Artifacts of a local sqlite store live beside the database (MLflow's default would be ``./mlruns`` in the
    current directory). A server (``http://``) decides for itself (``mlflow-artifacts:/`` when it proxies)."""
    db = _sqlite_path(tracking_uri)
    if db is None:
        return None
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in experiment_name)
    return (db.parent / "mlartifacts" / safe).resolve().as_uri()


def get_or_create_experiment(client, name: str, tracking_uri: str) -> str:
    """Experiment id of the experiment called ``name`` (restored if it was deleted, created if absent)."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=_artifact_location(tracking_uri, name))
        except MlflowException:  # created meanwhile by another driver
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    return exp.experiment_id


def _q(value: str) -> str:
    """A string literal for an MLflow filter string."""
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def _search_all(client, experiment_id: str, filter_string: str, view) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string, run_view_type=view,
                                  max_results=1000, order_by=["attributes.start_time ASC"], page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def search_tagged(client, experiment_id: str, tags: Mapping[str, str]) -> list:
    """Active runs whose tags equal ``tags`` (keys given verbatim, e.g. ``{"ltsweep.role": "trial"}``)."""
    from mlflow.entities import ViewType

    flt = " and ".join(f"tags.`{k}` = {_q(v)}" for k, v in tags.items())
    return _search_all(client, experiment_id, flt, ViewType.ACTIVE_ONLY)


# --------------------------------------------------------------------------------------------------------------
# value helpers
def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> one level with dotted keys (``{"a": {"b": 1}} -> {"a.b": 1}``)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _to_str(v: Any, limit: int) -> str:
    if isinstance(v, (dict, list, tuple)):
        try:
            s = json.dumps(v, sort_keys=True, default=str)
        except (TypeError, ValueError):
            s = str(v)
    elif isinstance(v, os.PathLike):
        s = os.fspath(v)
    else:
        s = str(v)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _finite_number(v: Any) -> float | None:
    if isinstance(v, bool) or v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def code_version() -> str:
    """``git describe --always --dirty --tags`` of the checkout this module runs from, else the package version."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], cwd=here, capture_output=True,
                             text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        from importlib.metadata import version

        return f"ltsweep {version('ltsweep')}"
    except Exception:  # noqa: BLE001 - not installed as a distribution
        return "unknown"


def _find_key(flat: Mapping[str, Any], name: str) -> Any:
    """Value of ``name`` or of any dotted key ending in ``.name``."""
    if name in flat:
        return flat[name]
    for k, v in flat.items():
        if k.endswith("." + name):
            return v
    return None


def _per_class_dict(per_class: Any) -> dict[int, float]:
    """Normalise a result's ``per_class`` ({category_id: AP}, keys possibly strings after JSON) to int keys."""
    out: dict[int, float] = {}
    if not isinstance(per_class, Mapping):
        return out
    for k, v in per_class.items():
        try:
            key = int(k)
        except (TypeError, ValueError):
            continue
        f = _finite_number(v)
        out[key] = f if f is not None else float("nan")
    return out


def _log_params(client, run_id: str, params: Mapping[str, Any], existing: Mapping[str, str] | None = None) -> None:
    """Log params in batches; keys already on the run are left alone (MLflow params are immutable)."""
    from mlflow.entities import Param

    existing = existing or {}
    items = []
    for k, v in params.items():
        s = _to_str(v, _MAX_PARAM_LEN)
        key = str(k)[:250]
        if key in existing:
            if existing[key] != s:
                logger.warning("MLflow run %s already has param %s=%r; keeping it (new value %r)", run_id, key,
                               existing[key], s)
            continue
        items.append(Param(key, s))
    for i in range(0, len(items), _BATCH):
        client.log_batch(run_id, params=items[i:i + _BATCH])


def _log_tags(client, run_id: str, tags: Mapping[str, Any]) -> None:
    from mlflow.entities import RunTag

    items = [RunTag(str(k)[:250], _to_str(v, _MAX_TAG_LEN)) for k, v in tags.items() if v is not None]
    for i in range(0, len(items), _BATCH):
        client.log_batch(run_id, tags=items[i:i + _BATCH])


# --------------------------------------------------------------------------------------------------------------
# per-class artifacts
def _write_per_class_artifacts(per_class: Mapping[int, float], res: Mapping[str, Any], val_annotations: str | None,
                               out_dir: Path, label: str) -> list[Path]:
    """Write per_class_ap.json, per_class_ap.csv and ap_by_frequency.png into ``out_dir``.

    With the validation annotations, the CSV and the plot come from ``lt_models.evaluation`` (category names,
    frequency buckets, image counts; categories ranked by frequency). Without them: a plain ``category_id,AP`` CSV
    and per-class AP in category-id order. The JSON ({category_id: AP}) is what the sweep report reads back.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    p_json, p_csv, p_png = out_dir / PER_CLASS_JSON, out_dir / PER_CLASS_CSV, out_dir / AP_BY_FREQUENCY_PNG
    p_json.write_text(json.dumps({str(k): v for k, v in sorted(per_class.items())}))
    result = {**res, "per_class": dict(per_class)}
    if val_annotations:
        from lt_models.evaluation import plot_ap_by_frequency, write_per_class_csv

        write_per_class_csv(result, val_annotations, p_csv)
        plot_ap_by_frequency({label: result}, val_annotations, p_png)
    else:
        import csv

        from pipelines.report import plot_ap_by_rank

        with open(p_csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["category_id", "AP"])
            w.writerows(sorted(per_class.items()))
        plot_ap_by_rank({label: per_class}, p_png, title=f"per-class AP ({label})")
    return [p_json, p_csv, p_png]


# --------------------------------------------------------------------------------------------------------------
class MLflowSweepCallback(Callback):
    """Ray Tune callback that logs a whole sweep to MLflow (the single writer; see the module docstring).

    Args:
        tracking_uri: ``sqlite:///...`` (default store: :func:`default_tracking_uri`) or ``http://host:port``.
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

    def __init__(self, tracking_uri: str, sweep_name: str, sweep_params: dict, searched_keys: list[str],
                 val_annotations: str | None = None):
        self.tracking_uri = str(tracking_uri)
        self.sweep_name = str(sweep_name)
        self.sweep_params = dict(sweep_params or {})
        self.searched_keys = list(searched_keys or [])
        self.val_annotations = None if val_annotations is None else os.fspath(val_annotations)
        # Pickled with the callback into tuner.pkl, so Tuner.restore brings the same uid back: a restored sweep
        # continues its parent run, a fresh sweep with the same name gets a new one.
        self.sweep_uid = uuid.uuid4().hex
        self._reset()

    # state that must not be pickled (Tune pickles callbacks into tuner.pkl and the experiment state)
    def _reset(self) -> None:
        self._client = None
        self._experiment_id: str | None = None
        self._parent_run_id: str | None = None
        self._trial_runs: dict[str, str] = {}
        self._open_runs: dict[str, str] = {}  # trial id -> run id of runs this process has (re)opened
        self._last_results: dict[str, dict] = {}
        self._sha_logged: set[str] = set()
        self._fingerprint_tagged = _find_key(flatten(self.sweep_params), "dataset_fingerprint") is not None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for k in ("_client", "_experiment_id", "_parent_run_id", "_trial_runs", "_open_runs",
                  "_last_results", "_sha_logged", "_fingerprint_tagged"):
            state.pop(k, None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset()

    # ------------------------------------------------------------------ public helpers
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
        """The MLflow run id of a Tune trial, looked up by its ``ltsweep.trial_id`` tag (None if not logged)."""
        if trial_id in self._trial_runs:
            return self._trial_runs[trial_id]
        runs = search_tagged(self.client, self.experiment_id,
                             {ROLE_TAG: "trial", TRIAL_ID_TAG: trial_id, PARENT_TAG: self.parent_run_id})
        if len(runs) > 1:
            logger.warning("MLflow: %d runs tagged %s=%s; continuing the oldest", len(runs), TRIAL_ID_TAG, trial_id)
        if runs:
            self._trial_runs[trial_id] = runs[0].info.run_id
            return runs[0].info.run_id
        return None

    # ------------------------------------------------------------------ parent run
    def _sweep_setting(self, name: str, default: Any) -> Any:
        flat = flatten(self.sweep_params)
        for key in (name, f"scheduler.{name}", f"tune.{name}", f"sweep.{name}"):
            if flat.get(key) not in (None, ""):
                return flat[key]
        return default

    def _max_t(self) -> int | None:
        """Evaluations of a full-length trial: ``scheduler.max_t``, else ceil(stage2.epochs / eval.every)."""
        flat = flatten(self.sweep_params)
        v = self._sweep_setting("max_t", None)
        if v in (None, "") and flat.get("stage2.epochs") is not None:
            v = math.ceil(float(flat["stage2.epochs"]) / float(flat.get("eval.every") or 1))
        try:
            return int(v) if v not in (None, "") else None
        except (TypeError, ValueError):
            return None

    def _parent_tags(self) -> dict[str, Any]:
        flat = flatten(self.sweep_params)
        space = next((self.sweep_params[k] for k in ("space", "search_space") if self.sweep_params.get(k)), None)
        return {
            "ltsweep.search_space": space if space is not None else self.searched_keys,
            "ltsweep.searched_keys": self.searched_keys,
            "ltsweep.dataset_fingerprint": _find_key(flat, "dataset_fingerprint"),
            "ltsweep.code_version": code_version(),
            "ltsweep.metric": self._sweep_setting("metric", "AP"),
            "ltsweep.mode": self._sweep_setting("mode", "max"),
            MAX_T_TAG: self._max_t(),
        }

    def _get_or_create_parent(self) -> str:
        client = self.client
        runs = search_tagged(client, self.experiment_id,
                             {ROLE_TAG: "sweep", SWEEP_TAG: self.sweep_name, SWEEP_UID_TAG: self.sweep_uid})
        if runs:
            run = runs[0]
            run_id = run.info.run_id
            if run.info.status != "RUNNING":
                client.update_run(run_id, status="RUNNING")
            existing = run.data.params
            logger.info("MLflow: continuing sweep run %s of %r", run_id, self.sweep_name)
        else:
            run = client.create_run(self.experiment_id, run_name=self.sweep_name, tags={
                ROLE_TAG: "sweep", SWEEP_TAG: self.sweep_name, SWEEP_UID_TAG: self.sweep_uid})
            run_id = run.info.run_id
            existing = {}
            logger.info("MLflow: sweep run %s in experiment %r (%s)", run_id, self.sweep_name, self.tracking_uri)
        _log_params(client, run_id, flatten(self.sweep_params), existing)
        _log_tags(client, run_id, self._parent_tags())
        return run_id

    # ------------------------------------------------------------------ trial runs
    def _searched_params(self, trial) -> dict[str, Any]:
        flat = flatten(trial.config or {})
        out = {}
        for key in self.searched_keys:
            if key in flat:
                out[key] = flat[key]
            else:
                v = _find_key(flat, key.rsplit(".", 1)[-1]) if "." in key else None
                if v is not None:
                    out[key] = v
        return out

    def _ensure_trial_run(self, trial) -> str:
        """The trial's run, created or (after a restore/retry) set RUNNING again. Cached while it is open."""
        if trial.trial_id in self._open_runs:
            return self._open_runs[trial.trial_id]
        run_id = self.trial_run_id(trial.trial_id)
        client = self.client
        if run_id is None:
            run = client.create_run(self.experiment_id, run_name=str(trial), tags={
                ROLE_TAG: "trial", TRIAL_ID_TAG: trial.trial_id, PARENT_TAG: self.parent_run_id,
                SWEEP_TAG: self.sweep_name})
            run_id = run.info.run_id
            self._trial_runs[trial.trial_id] = run_id
            existing = {}
        else:
            run = client.get_run(run_id)
            if run.info.status != "RUNNING":
                client.update_run(run_id, status="RUNNING")
            existing = run.data.params
        _log_params(client, run_id, self._searched_params(trial), existing)
        self._open_runs[trial.trial_id] = run_id
        return run_id

    # ------------------------------------------------------------------ Tune hooks
    def setup(self, stop=None, num_samples=None, total_num_samples=None, **info):
        _ = self.parent_run_id

    def on_trial_start(self, iteration, trials, trial, **info):
        self._ensure_trial_run(trial)

    def on_trial_restore(self, iteration, trials, trial, **info):
        self._ensure_trial_run(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        from mlflow.entities import Metric, Param

        run_id = self._ensure_trial_run(trial)
        step = int(result.get("training_iteration") or 0)
        ts = int(float(result.get("timestamp") or time.time()) * 1000)
        metrics = []
        for key in METRIC_KEYS:
            v = result.get(key)
            if v is None or isinstance(v, bool):
                continue
            try:
                value = float(v)
            except (TypeError, ValueError):
                continue
            metrics.append(Metric(key, value, ts, step))
        params = []
        sha = result.get("pretrain_sha256")
        if sha and trial.trial_id not in self._sha_logged:
            if "pretrain_sha256" not in self.client.get_run(run_id).data.params:
                params.append(Param("pretrain_sha256", str(sha)))
            self._sha_logged.add(trial.trial_id)
        if metrics or params:
            self.client.log_batch(run_id, metrics=metrics, params=params)
        self._last_results[trial.trial_id] = dict(result)
        fp = result.get("dataset_fingerprint")
        if fp and not self._fingerprint_tagged:
            self.client.set_tag(self.parent_run_id, "ltsweep.dataset_fingerprint", str(fp))
            self._fingerprint_tagged = True

    def _last_result(self, trial) -> dict:
        res = self._last_results.get(trial.trial_id) or getattr(trial, "last_result", None) or {}
        return dict(res)

    def _finish_trial(self, trial, status: str, error: str | None = None) -> None:
        run_id = self.trial_run_id(trial.trial_id)
        res = self._last_result(trial)
        if run_id is None:
            if not res and status != "FAILED":
                return  # never started (e.g. a pending trial removed at the end): nothing to record
            run_id = self._ensure_trial_run(trial)
        tags = {ITERATIONS_TAG: int(res.get("training_iteration") or 0)}
        if error:
            tags[ERROR_TAG] = error
        _log_tags(self.client, run_id, tags)
        per_class = _per_class_dict(res.get("per_class"))
        if per_class:
            try:
                with tempfile.TemporaryDirectory(prefix="ltsweep-mlflow-") as tmp:
                    for p in _write_per_class_artifacts(per_class, res, self.val_annotations, Path(tmp),
                                                        label=str(trial)):
                        self.client.log_artifact(run_id, str(p))
            except Exception as exc:  # noqa: BLE001 - never lose the run status because a plot failed
                logger.exception("MLflow: per-class artifacts of trial %s failed", trial.trial_id)
                self.client.set_tag(run_id, "ltsweep.artifact_error", _to_str(repr(exc), _MAX_TAG_LEN))
        self.client.set_terminated(run_id, status=status)
        self._open_runs.pop(trial.trial_id, None)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._finish_trial(trial, "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        err = None
        path = getattr(trial, "error_file", None) or None
        try:
            if path and os.path.exists(path):
                err = Path(path).read_text()[-_MAX_TAG_LEN:]
        except OSError:
            err = None
        self._finish_trial(trial, "FAILED", error=err or "trial raised an error (see the Tune trial log)")

    def on_trial_recover(self, iteration, trials, trial, **info):
        run_id = self.trial_run_id(trial.trial_id)
        if run_id is not None:
            self.client.set_tag(run_id, "ltsweep.retries", str(getattr(trial, "num_failures", "")))

    def on_experiment_end(self, trials, **info):
        client = self.client
        # Trials that Tune left unfinished (stopped by a stopper/time budget while pending or paused) are KILLED.
        n_killed = 0
        for trial in trials:
            run_id = self.trial_run_id(trial.trial_id)
            if run_id is None:
                continue
            run = client.get_run(run_id)
            if run.info.status not in _TERMINAL:
                _log_tags(client, run_id, {TRIAL_STATUS_TAG: trial.status,
                                           ITERATIONS_TAG: int(self._last_result(trial).get("training_iteration")
                                                               or 0)})
                client.set_terminated(run_id, status="KILLED")
                self._open_runs.pop(trial.trial_id, None)
                n_killed += 1
        n_err = sum(1 for t in trials if t.status == "ERROR")
        try:
            from pipelines.report import log_sweep_report

            log_sweep_report(client, self.experiment_id, self.parent_run_id, sweep_name=self.sweep_name,
                             searched_keys=self.searched_keys, val_annotations=self.val_annotations,
                             metric=str(self._sweep_setting("metric", "AP")),
                             mode=str(self._sweep_setting("mode", "max")), max_t=self._max_t(),
                             last_results={t.trial_id: self._last_result(t) for t in trials})
        except Exception as exc:  # noqa: BLE001 - the sweep's results are logged; say loudly the report is not
            logger.exception("MLflow: writing the sweep report failed")
            client.set_tag(self.parent_run_id, "ltsweep.report_error", _to_str(repr(exc), _MAX_TAG_LEN))
        _log_tags(client, self.parent_run_id, {"ltsweep.trials": len(trials), "ltsweep.errored_trials": n_err,
                                               "ltsweep.unfinished_trials": n_killed})
        # FAILED: some trial errored; KILLED: the sweep ended with trials unfinished (resume continues both)
        status = "FAILED" if n_err else "KILLED" if n_killed else "FINISHED"
        client.set_terminated(self.parent_run_id, status=status)


# --------------------------------------------------------------------------------------------------------------
def log_pretrain_run(tracking_uri: str, sweep_name: str, sha256: str, params: Mapping[str, Any],
                     metrics: Mapping[str, Any], checkpoint_path: str | os.PathLike | None, *,
                     val_annotations: str | os.PathLike | None = None) -> str:
    """Record the shared stage-1 training as a run (``ltsweep.role=pretrain``, ``ltsweep.pretrain_sha256``) in the
    sweep's experiment and return its run id.

    Idempotent: if the experiment already holds a pretrain run with this sha256, that run is reused (finished if a
    previous driver died half-way), never duplicated. ``metrics``: numeric values are logged (step =
    ``metrics["iteration"]`` or ``metrics["epoch"]``); a ``per_class`` dict {category_id: AP} becomes the artifacts
    ``per_class_ap.json``/``.csv`` and ``ap_by_frequency.png``, which the sweep report uses as the stage-1 baseline.
    The checkpoint itself is not uploaded; its path is the tag ``ltsweep.checkpoint``. ``val_annotations`` (optional)
    names categories and frequency buckets in those artifacts, as for trial runs.
    """
    from mlflow.entities import Metric

    client = make_client(tracking_uri)
    exp_id = get_or_create_experiment(client, sweep_name, tracking_uri)
    runs = search_tagged(client, exp_id, {ROLE_TAG: "pretrain", PRETRAIN_SHA_TAG: sha256})
    finished = [r for r in runs if r.info.status == "FINISHED"]
    if finished:
        return finished[0].info.run_id
    if runs:
        run = runs[0]
        if run.info.status != "RUNNING":
            client.update_run(run.info.run_id, status="RUNNING")
    else:
        run = client.create_run(exp_id, run_name=f"pretrain-{sha256[:12]}", tags={
            ROLE_TAG: "pretrain", PRETRAIN_SHA_TAG: sha256, SWEEP_TAG: sweep_name})
    run_id = run.info.run_id
    _log_params(client, run_id, flatten(dict(params or {})), run.data.params)
    _log_tags(client, run_id, {"ltsweep.checkpoint": os.fspath(checkpoint_path) if checkpoint_path else None,
                               "ltsweep.code_version": code_version()})
    metrics = dict(metrics or {})
    step = int(_finite_number(metrics.get("iteration", metrics.get("epoch", 0))) or 0)
    ts = int(time.time() * 1000)
    ms = []
    for k, v in metrics.items():
        if k == "per_class":
            continue
        f = _finite_number(v)
        if f is not None or (isinstance(v, float) and math.isnan(v)):
            ms.append(Metric(str(k)[:250], float(v), ts, step))
    for i in range(0, len(ms), 1000):
        client.log_batch(run_id, metrics=ms[i:i + 1000])
    per_class = _per_class_dict(metrics.get("per_class"))
    if per_class:
        with tempfile.TemporaryDirectory(prefix="ltsweep-mlflow-") as tmp:
            for p in _write_per_class_artifacts(per_class, metrics, os.fspath(val_annotations) if val_annotations else None,
                                                Path(tmp),
                                                label="stage 1"):
                client.log_artifact(run_id, str(p))
    client.set_terminated(run_id, status="FINISHED")
    return run_id
