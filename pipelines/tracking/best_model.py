"""The sweep's answer as a model: the best checkpoint of the best trial, logged on the sweep's MLflow run as a pyfunc
model (artifact ``best_model``) and registered in the model registry under the sweep's name.

- The trial: the best trial (:func:`pipelines.analysis.aggregate.best_trial`) among the runs of the best configuration
  (the best mean over seeds among the configurations that ran the full schedule), else the sweep's best trial.
- The checkpoint: that trial's best evaluation by ``scheduler.metric``. Tune keeps it whatever ``num_to_keep`` is
  (``CheckpointConfig.checkpoint_score_attribute``).
- The model: :class:`DetectorModel`. ``mlflow.pyfunc.load_model("models:/<name>/latest").predict(image)`` takes
  one H x W x 3 RGB array (uint8) and returns ``{"boxes", "category_ids", "scores"}``. The pickled torch detector
  travels inside it (``detector.pt``), so loading needs ltsweep installed but not the training data;
  ``unwrap_python_model().detector`` is the ``torch.nn.Module``.
- The version carries tags linking the sweep run, the trial, the checkpoint, the configuration, the stage-1
  sha256 and the dataset fingerprint. Registering the same checkpoint again (``--resume`` of a finished sweep) adds
  no version.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import numpy as np
from mlflow.pyfunc import PythonModel

from pipelines.analysis.aggregate import best_trial
from pipelines.names import (
    FINGERPRINT_TAG,
    MODEL_ARTIFACT,
    MODEL_CHECKPOINT_TAG,
    MODEL_ERROR_TAG,
    MODEL_TRIAL_TAG,
    MODEL_VERSION_TAG,
    PRETRAIN_SHA_TAG,
    SWEEP_TAG,
)

logger = logging.getLogger(__name__)


class DetectorModel(PythonModel):  # by name: mypy sees mlflow.pyfunc as mlflow's LazyLoader attribute
    """pyfunc wrapper of an ltsweep detector: ``predict(image)`` on one H x W x 3 RGB array."""

    def load_context(self, context):
        import torch

        saved = torch.load(context.artifacts["detector"], map_location="cpu", weights_only=False)
        self.detector, self.label_to_cat_id = saved["model"].eval(), list(saved["label_to_cat_id"])

    def predict(self, context, model_input: np.ndarray, params: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
        from lt_models.engine.inference import detect

        if isinstance(model_input, dict):  # {"image": array}, as a serving request names it
            model_input = next(iter(model_input.values()))
        return detect(self.detector, self.label_to_cat_id, np.asarray(model_input))


@dataclass
class RegisteredModel:
    name: str | None  # None when not registered (--no-register)
    version: str | None
    run_id: str  # the sweep run that holds the artifact
    trial_id: str
    checkpoint: str

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}" if self.name else f"runs:/{self.run_id}/{MODEL_ARTIFACT}"


def model_trial(summary):
    """The trial whose checkpoint becomes the model (see the module docstring)."""
    best = summary.best_config
    if best is None:
        return summary.best
    return best_trial(
        best.runs.values(),
        value=lambda t: t.metrics.get(summary.metric),
        evaluations=lambda t: t.evaluations,
        failed=lambda t: t.error is not None,
        trial_id=lambda t: t.trial_id,
        mode=summary.mode,
        full_length=summary.max_evaluations,
    )


def best_checkpoint(results, trial_id: str, metric: str, mode: str):
    """The trial's best checkpoint (a ``tune.Checkpoint``) from Tune's ResultGrid, else its latest."""
    for r in results:
        if str((r.metrics or {}).get("trial_id") or Path(r.path).name) == trial_id:
            return r.get_best_checkpoint(metric, mode) or r.checkpoint
    return None


def _signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, 3))]),  # one RGB image
        outputs=Schema(
            [
                TensorSpec(np.dtype(np.float32), (-1, 4), "boxes"),
                TensorSpec(np.dtype(np.int64), (-1,), "category_ids"),
                TensorSpec(np.dtype(np.float32), (-1,), "scores"),
            ]
        ),
    )


def _requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for dist in ("ltsweep", "torch", "torchvision", "mlflow"):
        try:
            out.append(f"{dist}=={version(dist).split('+')[0]}")
        except PackageNotFoundError:
            out.append(dist)
    return out


@contextlib.contextmanager
def _quiet(*loggers: str):
    """Raise the given loggers to ERROR for the duration."""
    saved = {name: logging.getLogger(name).level for name in loggers}
    for name in loggers:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def _existing_version(client, name: str, run_id: str, checkpoint: str) -> str | None:
    for mv in client.search_model_versions(f"name = '{name}'"):
        tags = mv.tags or {}
        if mv.run_id == run_id and tags.get(MODEL_CHECKPOINT_TAG) == checkpoint:
            return str(mv.version)
    return None


def log_best_model(
    client,
    summary,
    results,
    *,
    register: bool = True,
    name: str | None = None,
    tags: dict[str, str] | None = None,
) -> RegisteredModel | None:
    """Log the best checkpoint of ``summary``'s sweep (Tune ``results``) on its MLflow sweep run and register it as
    ``name`` (default the sweep's name). None when no trial qualifies. ``tags``: added to the model version (the
    stage-1 sha256, the dataset fingerprint)."""
    from lt_models.engine.inference import load_detector
    from pipelines.mlflow_io.reads import latest_sweep_run

    trial = model_trial(summary)
    if trial is None:
        return None
    ckpt = best_checkpoint(results, trial.trial_id, summary.metric, summary.mode)
    if ckpt is None:
        raise RuntimeError(f"trial {trial.trial_id} has no checkpoint in {summary.experiment_path}")
    run = latest_sweep_run(client, summary.name)
    if run is None:
        raise RuntimeError(f"sweep {summary.name!r} has no MLflow sweep run in {summary.tracking_uri}")
    run_id, checkpoint = run.info.run_id, str(ckpt.path)
    name = name or summary.name
    if run.data.tags.get(MODEL_CHECKPOINT_TAG) != checkpoint:  # not logged yet (a finished sweep resumed: it is)
        import torch

        with ckpt.as_directory() as ckpt_dir, tempfile.TemporaryDirectory() as tmp:
            model, label_to_cat_id = load_detector(ckpt_dir)
            torch.save({"model": model, "label_to_cat_id": label_to_cat_id}, Path(tmp, "detector.pt"))
            example = np.zeros((32, 32, 3), dtype=np.uint8)
            # MLflow's advice to save models from code does not apply (the class is importable from ltsweep): keep
            # it out of the sweep's output
            with warnings.catch_warnings(), _quiet("mlflow.pyfunc", "mlflow.models"):
                warnings.simplefilter("ignore", UserWarning)
                mlflow.pyfunc.save_model(
                    str(Path(tmp, MODEL_ARTIFACT)),
                    python_model=DetectorModel(),
                    artifacts={"detector": str(Path(tmp, "detector.pt"))},
                    signature=_signature(),
                    input_example=example,
                    pip_requirements=_requirements(),
                )
            client.log_artifacts(run_id, str(Path(tmp, MODEL_ARTIFACT)), MODEL_ARTIFACT)
        client.set_tag(run_id, MODEL_TRIAL_TAG, trial.trial_id)
        client.set_tag(run_id, MODEL_CHECKPOINT_TAG, checkpoint)
    version = None
    if register:
        version = _existing_version(client, name, run_id, checkpoint)
        if version is None:
            try:
                client.get_registered_model(name)
            except mlflow.exceptions.MlflowException:
                client.create_registered_model(
                    name, tags={SWEEP_TAG: summary.name}, description=f"best model of ltsweep sweep {summary.name!r}"
                )
            vtags = {
                SWEEP_TAG: summary.name,
                "ltsweep.sweep_run_id": run_id,
                MODEL_TRIAL_TAG: trial.trial_id,
                MODEL_CHECKPOINT_TAG: checkpoint,
                "ltsweep.config": json.dumps(trial.config, default=str),
                summary.metric: f"{trial.metrics.get(summary.metric, float('nan')):.4f}",
                **(tags or {}),
            }
            mv = client.create_model_version(
                name, source=f"{run.info.artifact_uri}/{MODEL_ARTIFACT}", run_id=run_id, tags=vtags
            )
            version = str(mv.version)
        client.set_tag(run_id, MODEL_VERSION_TAG, f"{name}/{version}")
    return RegisteredModel(name if register else None, version, run_id, trial.trial_id, checkpoint)


def log_best_model_safely(cfg, summary, results, *, register: bool, name: str | None) -> RegisteredModel | None:
    """:func:`log_best_model` for the end of a sweep: a failure is printed and tagged on the sweep run
    (``ltsweep.model_error``), never lost and never fatal to the sweep's results."""
    from pipelines.config.identity import dataset_fingerprint
    from pipelines.mlflow_io.client import open_store
    from pipelines.mlflow_io.reads import latest_sweep_run

    client = open_store(summary.tracking_uri)
    try:
        trial = model_trial(summary)
        seed = None if trial is None else trial.config.get("seed", cfg.seed)
        sha = (summary.stage1 or {}).get(int(seed)) if seed is not None else None
        sha = sha.sha256 if sha is not None else None
        data_cfg = cfg.with_seed(int(seed)) if seed is not None else cfg  # search.data_seeds: its seed's data
        tags = {FINGERPRINT_TAG: dataset_fingerprint(data_cfg), **({PRETRAIN_SHA_TAG: sha} if sha else {})}
        return log_best_model(client, summary, results, register=register, name=name, tags=tags)
    except Exception as exc:
        logger.exception("logging the best model of sweep %s failed", summary.name)
        print(f"the best model of sweep {summary.name!r} was not logged: {type(exc).__name__}: {exc}", flush=True)
        run = latest_sweep_run(client, summary.name)
        if run is not None:
            client.set_tag(run.info.run_id, MODEL_ERROR_TAG, f"{type(exc).__name__}: {exc}"[:5000])
        return None
