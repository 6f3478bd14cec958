"""Where ltsweep's MLflow store is, and the primitives its writers log through.

- :func:`default_tracking_uri`, :func:`make_client`, :func:`open_store` and :func:`get_or_create_experiment` find or
  create the store and a sweep's experiment (a local sqlite store keeps its artifacts beside the database);
- :func:`log_params` and :func:`log_tags` write values as MLflow takes them (strings, within its length limits, in
  batches); :func:`flatten`, :func:`find_key` and :func:`code_version` prepare them.

Everything goes through :class:`mlflow.MlflowClient` (no global active run). MLflow is imported inside the
functions, so importing this module stays cheap.

Concurrent processes on one sqlite store: several processes may write the same sqlite store (two sweep drivers on
one ``storage_path``, ``ltsweep compare`` while a sweep starts). Once the schema exists sqlite serialises their writes
itself, but MLflow creates the schema of a new database without any cross-process guard, so :func:`make_client` and
:func:`open_store` create (or finish creating) it under a file lock first; see :func:`_client`.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lt_models.errors import ConfigError

logger = logging.getLogger(__name__)

# The experiment kind of a model-training experiment. MLflow 3.17's UI does not follow it yet: its mode ("GenAI" /
# "Model training") comes from the URL's workflowType or the browser's last choice, so ltsweep prints
# runs_table_url(), which opens the runs table in Model training mode.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
MLFLOW_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default


def runs_table_url(experiment_id: str, ui: str = MLFLOW_UI) -> str:
    """The MLflow UI's runs table of an experiment, in Model training mode (not the GenAI overview)."""
    return f"{ui}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


#: where `ltsweep sweep` keeps results unless the config says otherwise (pipelines.config.load.RunSettings.storage_path)
DEFAULT_STORAGE_PATH = Path("results")
MAX_PARAM_LEN = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
MAX_TAG_LEN = 8000  # mlflow.utils.validation.MAX_TAG_VAL_LENGTH
MAX_KEY_LEN = 250  # mlflow.utils.validation.MAX_ENTITY_KEY_LENGTH
PARAMS_PER_BATCH = 100  # params/tags per log_batch (MAX_PARAMS_TAGS_PER_BATCH)


# --------------------------------------------------------------------------------------------------------------
# the store
def default_tracking_uri(storage_path: str | Path) -> str:
    """The default MLflow store of a sweep: ``sqlite:///<absolute storage_path>/mlflow.db``. An object-store
    ``storage_path`` (``s3://...``) has none: sqlite needs a real file, so ``run.tracking_uri`` must name the store."""
    from pipelines.storage.location import display, is_uri

    if is_uri(storage_path):
        raise ConfigError(
            f"run.tracking_uri is required when run.storage_path is object storage "
            f"({display(storage_path)}): MLflow's default store sqlite:///<storage_path>/mlflow.db "
            "cannot live in a bucket; set run.tracking_uri (or --tracking-uri) to an MLflow server "
            "(http://HOST:5000) or a local sqlite:////abs/path/mlflow.db"
        )
    return f"sqlite:///{Path(storage_path).expanduser().resolve() / 'mlflow.db'}"


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` tracking URI; None for any other store."""
    if tracking_uri.startswith("sqlite:///"):
        return Path(tracking_uri[len("sqlite:///") :])
    return None


#: sqlite URIs whose schema this process has created or checked under the file lock (see :func:`_client`)
_READY: set[str] = set()
_READY_GUARD = threading.Lock()
_LOCK_TIMEOUT_S = 600.0  # creating the schema takes seconds; a lock held this long is a hung process


def _client(tracking_uri: str, reader: bool = False):
    """An MlflowClient for ``tracking_uri``; for a sqlite store, the first one in this process is made while holding
    the file lock ``<db>.lock``, so the store's schema is complete before any client of this process uses it.

    Why: MLflow's ``SqlAlchemyStore.__init__`` (mlflow 3.x, mlflow/store/tracking/sqlalchemy_store.py) checks
    ``_all_tables_exist`` and, when tables are missing, runs ``mlflow.store.db.utils._initialize_tables``:
    ``InitialBase.metadata.create_all`` and then an alembic ``upgrade heads`` (dozens of migrations; on sqlite they
    rebuild tables through ``_alembic_tmp_*`` copies). Then it checks the schema revision (``_verify_schema``) and
    inserts the default experiment 0 if it is absent. None of this is guarded across processes (MLflow's
    ``_safe_initialize_tables`` lock is used only by its jobs and workspace stores), so two processes opening a new
    store at once both create tables and replay migrations: ``table experiments already exists``, ``duplicate column
    name: step``, alembic ``CommandError`` (``expected to match one row ... in 'alembic_version'``).

    The lock covers exactly that: ``MlflowClient(tracking_uri)`` builds the tracking store in its constructor
    (``TrackingServiceClient.__init__`` reads ``self.store``; the store is cached per process and URI) and
    ``search_experiments(max_results=1)`` makes sure it is built even if a later MLflow builds it lazily. The next
    process to take the lock finds every table, the head revision and experiment 0, so its store only reads. An
    existing store of an older schema is not upgraded here: MLflow refuses it (``_verify_schema``) and asks for
    ``mlflow db upgrade``, which should stay a deliberate step (back up first). The lock is taken once per process
    and URI (``_READY``); later clients of that URI reuse MLflow's cached store and need no lock. A reader
    (``reader=True``) that cannot create the lock file (a read-only results directory) opens the store without it.
    """
    from filelock import FileLock, Timeout
    from mlflow import MlflowClient

    db = sqlite_path(tracking_uri)
    if db is None or tracking_uri in _READY:
        return MlflowClient(tracking_uri=tracking_uri)
    with _READY_GUARD:  # threads of this process take the file lock one at a time
        if tracking_uri in _READY:
            return MlflowClient(tracking_uri=tracking_uri)
        lock = FileLock(f"{db}.lock", timeout=_LOCK_TIMEOUT_S)
        try:
            lock.acquire()
        except Timeout:  # a TimeoutError, hence an OSError: never swallowed
            raise
        except OSError as e:
            if not reader:
                raise
            logger.debug("cannot create %s.lock (%s); opening the store without it", db, e)
            return MlflowClient(tracking_uri=tracking_uri)
        try:
            client = MlflowClient(tracking_uri=tracking_uri)
            client.search_experiments(max_results=1)
        finally:
            lock.release()
        _READY.add(tracking_uri)
        return client


def make_client(tracking_uri: str):
    """An MlflowClient for ``tracking_uri``; for a sqlite store the directory is created first, and the schema is
    created (when the store is new) under a file lock, so processes opening one new store at once do not collide
    (:func:`_client`). Over HTTP, MLflow's "View run … at" line per ended run is not printed (a sweep ends a run per
    trial, and each line costs a ``get_run``) unless ``MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT`` is set otherwise."""
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    db = sqlite_path(tracking_uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    return _client(tracking_uri)


def open_store(tracking_uri: str | None = None, command: str = "ltsweep compare"):
    """An MlflowClient of a store that sweeps were logged to, for reading them back (``command`` names the caller in
    errors). ``tracking_uri`` defaults to the default sweep store, ``sqlite:///<cwd>/results/mlflow.db``; a
    sqlite store that does not exist is a ConfigError, and no empty store is created. A store that a sweep is
    creating right now is opened once its schema is complete (:func:`_client`)."""
    uri = tracking_uri or default_tracking_uri(DEFAULT_STORAGE_PATH)
    db = sqlite_path(uri)
    if db is not None and not db.is_file():
        raise ConfigError(
            f"{command}: MLflow store {db} does not exist; run a sweep first or pass "
            f"--tracking-uri (e.g. sqlite:///path/to/results/mlflow.db or http://127.0.0.1:5000)"
        )
    return _client(uri, reader=True)


def _artifact_location(tracking_uri: str, experiment_name: str) -> str | None:
    """Artifacts of a local sqlite store live beside the database (MLflow's default would be ``./mlruns`` in the
    current directory). A server (``http://``) decides for itself (``mlflow-artifacts:/`` when it proxies)."""
    db = sqlite_path(tracking_uri)
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
            return client.create_experiment(
                name,
                artifact_location=_artifact_location(tracking_uri, name),
                tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND},
            )
        except MlflowException:  # created meanwhile by another driver
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    if exp.tags.get(EXPERIMENT_KIND_TAG) != MODEL_TRAINING_KIND:  # an experiment made before ltsweep tagged it
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
    return exp.experiment_id


# --------------------------------------------------------------------------------------------------------------
# values
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


def find_key(flat: Mapping[str, Any], name: str) -> Any:
    """Value of ``name`` or of any dotted key ending in ``.name`` (None if there is none)."""
    if name in flat:
        return flat[name]
    for k, v in flat.items():
        if k.endswith("." + name):
            return v
    return None


def to_str(v: Any, limit: int) -> str:
    """``v`` as MLflow stores a param or tag: a string (JSON for dicts and lists), cut to ``limit`` characters."""
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


def git_commit() -> str | None:
    """The commit of the git checkout this module runs from (``mlflow.source.git.commit`` on every run), or None."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def code_version() -> str:
    """``git describe --always --dirty --tags`` of the checkout this module runs from, else the package version."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--tags"], cwd=here, capture_output=True, text=True, timeout=10
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        from importlib.metadata import version

        return f"ltsweep {version('ltsweep')}"
    except Exception:
        return "unknown"


# --------------------------------------------------------------------------------------------------------------
# logging
def new_params(run_id: str, params: Mapping[str, Any], existing: Mapping[str, str] | None = None) -> list:
    """``params`` as MLflow Params (values as strings), less the keys the run has already (MLflow params are
    immutable: a different value there is kept, with a warning)."""
    from mlflow.entities import Param

    existing = existing or {}
    items = []
    for k, v in params.items():
        s = to_str(v, MAX_PARAM_LEN)
        key = str(k)[:MAX_KEY_LEN]
        if key in existing:
            if existing[key] != s:
                logger.warning(
                    "MLflow run %s already has param %s=%r; keeping it (new value %r)", run_id, key, existing[key], s
                )
            continue
        items.append(Param(key, s))
    return items


def log_params(
    client, run_id: str, params: Mapping[str, Any], existing: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Log the params the run does not have yet (:func:`new_params`) in batches. Returns them, as strings."""
    items = new_params(run_id, params, existing)
    for i in range(0, len(items), PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[i : i + PARAMS_PER_BATCH])
    return {p.key: p.value for p in items}


def tag_entities(tags: Mapping[str, Any]) -> list:
    """``tags`` as MLflow RunTags (keys and values cut to MLflow's limits); a None value is left out."""
    from mlflow.entities import RunTag

    return [RunTag(str(k)[:MAX_KEY_LEN], to_str(v, MAX_TAG_LEN)) for k, v in tags.items() if v is not None]


def log_tags(client, run_id: str, tags: Mapping[str, Any]) -> None:
    """Set tags in batches; a None value sets nothing."""
    items = tag_entities(tags)
    for i in range(0, len(items), PARAMS_PER_BATCH):
        client.log_batch(run_id, tags=items[i : i + PARAMS_PER_BATCH])


def log_bytes_artifact(client, run_id: str, name: str, data: bytes) -> None:
    """Log ``data`` as the artifact file ``name`` of the run (through a temporary folder)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="ltsweep-artifact-") as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        client.log_artifact(run_id, str(path))
