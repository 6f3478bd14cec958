"""The names shared by ltsweep's tracking writers and readers, and the one rule that picks a sweep's best trial.

Layout in MLflow (written by :mod:`pipelines.tracking.writer`, read back by :mod:`pipelines.analysis.report`):

- one experiment per sweep, named after the sweep;
- a parent run per sweep (``ltsweep.role=sweep``) with the flattened sweep config as params and the search space,
  dataset fingerprint and code version as tags; the HTML sweep report is logged on it when the sweep ends;
- a nested run per Tune trial (``ltsweep.role=trial``, ``ltsweep.trial_id``, ``mlflow.parentRunId``) with every
  searched hyperparameter plus ``pretrain_sha256`` as params, :data:`MLFLOW_TRIAL_METRICS` at every report
  (step = Tune's ``training_iteration``) and, when the trial ends, the per-class artifacts;
- a run for the shared stage-1 training (``ltsweep.role=pretrain``, ``ltsweep.pretrain_sha256``).

This module imports nothing of the project, Ray or MLflow, so any module may import it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

# ---- metric names ------------------------------------------------------------------------------------------------
#: AP-fixed (top 10,000 detections per class, no per-image cap) and AP-pool (one curve per pool of classes), overall
#: and per frequency bucket (lt_models.evaluation.large_vocab); LVIS evaluation only
LARGE_VOCAB_METRICS = ("AP_fixed", "APr_fixed", "APc_fixed", "APf_fixed", "AP_pool", "APr_pool", "APc_pool", "APf_pool")
#: expected calibration error of the detection scores, overall and per bucket (lt_models.evaluation.calibration)
CALIBRATION_METRICS = ("ECE", "ECEr", "ECEc", "ECEf")
#: TIDE's error breakdown: the AP50 gained by fixing each error type, for every class and per bucket
#: (lt_models.evaluation.tide: Cls, Loc, Both, Dupe, Bkg, Miss)
TIDE_ERROR_TYPES = ("Cls", "Loc", "Both", "Dupe", "Bkg", "Miss")  # lt_models.evaluation.tide.ERROR_TYPES
TIDE_METRICS = tuple(f"dAP_{kind}{bucket}" for bucket in ("", "_r", "_c", "_f") for kind in TIDE_ERROR_TYPES)
#: the hyperparameters the last epoch trained with (soft-balance λ, ACSL ξ), reported with every evaluation: a λ
#: schedule or a PBT sweep changes them during a trial, so MLflow keeps them as metric series
HYPERPARAMETER_METRICS = ("lam", "xi")
#: scalar evaluation metrics a trial copies from the engine into every result it reports to Tune (with the epoch's
#: training throughput and the share of step time spent waiting on the data loader)
RESULT_METRICS = (
    ("AP", "AP50", "AP75", "APr", "APc", "APf", "APs", "APm", "APl", "loss")
    + (
        "train_img_per_s",
        "loader_wait_fraction",
    )
    + (LARGE_VOCAB_METRICS + CALIBRATION_METRICS + TIDE_METRICS + HYPERPARAMETER_METRICS)
)
#: the metrics ``scheduler.metric`` may name (ASHA and the best-trial rule rank trials by it); the sweep summary
#: keeps their last values per trial
SCHEDULER_METRICS = ("AP", "AP50", "APr", "APc", "APf", "loss", "AP_fixed", "APr_fixed", "AP_pool", "APr_pool")
#: scheduler metrics only an LVIS evaluation (``eval.metric: lvis``) reports
LVIS_ONLY_METRICS = tuple(m for m in SCHEDULER_METRICS if m in LARGE_VOCAB_METRICS)
#: logged on each trial's MLflow run at every report (step = training_iteration), and read back by the report
MLFLOW_TRIAL_METRICS = ("AP", "AP50", "APr", "APc", "APf", "loss", "epoch") + (
    LARGE_VOCAB_METRICS + CALIBRATION_METRICS + TIDE_METRICS + HYPERPARAMETER_METRICS
)
#: what the stage-1 (pretrain) MLflow run gets; ``per_class`` becomes its per-class artifacts (the evaluation also
#: returns keys such as "AR@300", which are not valid MLflow metric names)
PRETRAIN_METRICS = (
    "AP",
    "AP50",
    "AP75",
    "APr",
    "APc",
    "APf",
    "APs",
    "APm",
    "APl",
    "loss",
    "epoch",
    "iteration",
    "per_class",
)
#: the metrics `ltsweep train` prints and writes to result.json
TRAIN_SUMMARY_METRICS = ("AP", "AP50", "AP75", "APr", "APc", "APf", "loss", "epoch", "iteration", "images")
#: the metrics with an interval per configuration in the HTML sweep report and `ltsweep compare`'s table
REPORT_TABLE_METRICS = ("AP", "AP50", "APr", "APc", "APf")
#: the columns of the report's table of trials (final values)
TRIAL_TABLE_METRICS = REPORT_TABLE_METRICS + ("AP_fixed", "AP_pool", "ECE")
#: AP overall and per frequency bucket (rare / common / frequent): the console summary and demo tables, the
#: progress lines and `ltsweep compare`'s bar chart
BUCKET_METRICS = ("AP", "APr", "APc", "APf")

# ---- MLflow tags -------------------------------------------------------------------------------------------------
ROLE_TAG = "ltsweep.role"  # one of the ROLE_* values below
ROLE_SWEEP, ROLE_TRIAL, ROLE_PRETRAIN = "sweep", "trial", "pretrain"
SWEEP_TAG = "ltsweep.sweep"  # the sweep's name, on every run
SWEEP_UID_TAG = "ltsweep.sweep_uid"  # parent run: tells a resumed sweep from a new sweep of the same name
TRIAL_ID_TAG = "ltsweep.trial_id"  # Tune's trial id: how a trial's run is found again after Tuner.restore
PRETRAIN_SHA_TAG = "ltsweep.pretrain_sha256"  # pretrain run: the key of the stage-1 checkpoint
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own nesting tag
ITERATIONS_TAG = "ltsweep.iterations"  # evaluations a trial reported before it ended
TRIAL_STATUS_TAG = "ltsweep.trial_status"  # Tune's status of a trial the sweep left unfinished (run KILLED)
ERROR_TAG = "ltsweep.error"  # the tail of a failed trial's error
RETRIES_TAG = "ltsweep.retries"  # how often Tune retried a trial
ARTIFACT_ERROR_TAG = "ltsweep.artifact_error"  # writing a trial's per-class artifacts failed
CHECKPOINT_TAG = "ltsweep.checkpoint"  # pretrain run: path of the stage-1 checkpoint (not uploaded)
CODE_VERSION_TAG = "ltsweep.code_version"
# the best model (pipelines.tracking.best_model): an artifact of the parent run, registered under the sweep's name
MODEL_ARTIFACT = "best_model"  # artifact path of the pyfunc model on the parent run
MODEL_TRIAL_TAG = "ltsweep.best_model_trial"  # parent run / model version: the trial whose checkpoint it is
MODEL_CHECKPOINT_TAG = "ltsweep.best_model_checkpoint"  # parent run / model version: that checkpoint's path
MODEL_VERSION_TAG = "ltsweep.registered_model"  # parent run: "<name>/<version>" in the model registry
MODEL_ERROR_TAG = "ltsweep.model_error"  # parent run: logging or registering the best model failed
# parent run
SEARCH_SPACE_TAG = "ltsweep.search_space"
SEARCHED_KEYS_TAG = "ltsweep.searched_keys"  # JSON list of the dotted keys each trial run has as params
FINGERPRINT_TAG = "ltsweep.dataset_fingerprint"
FREQUENCY_SOURCE_TAG = "ltsweep.frequency_source"  # whose counts bucket APr/APc/APf: always the training file's
METRIC_TAG = "ltsweep.metric"  # what the best trial is chosen by ...
MODE_TAG = "ltsweep.mode"  # ... and whether larger (max) or smaller (min) is better
CONFIRMS_TAG = "ltsweep.confirms"  # a confirmation sweep's run: the run id of the sweep it confirms
CONFIRMED_BY_TAG = "ltsweep.confirmed_by"  # a sweep's run: the run id of its confirmation sweep
CONFIRM_SEEDS_TAG = "ltsweep.confirm_seeds"  # the fresh training seeds of a confirmation sweep
CONFIRM_IMAGES_TAG = "ltsweep.confirm_images"  # the images it evaluated on, in words
MAX_T_TAG = "ltsweep.max_t"  # evaluations a full-length trial reports (ASHA's max_t)
TRIALS_TAG = "ltsweep.trials"
ERRORED_TRIALS_TAG = "ltsweep.errored_trials"
UNFINISHED_TRIALS_TAG = "ltsweep.unfinished_trials"
REPORT_ERROR_TAG = "ltsweep.report_error"  # writing the sweep report failed
INTERVALS_TAG = "ltsweep.intervals"  # how the sweep run's intervals (AP_ci_low, ...) were computed

#: trial-run param naming the stage-1 checkpoint the trial started from
PRETRAIN_SHA_PARAM = "pretrain_sha256"
#: trial-run param: the trial's training seed (configurations repeat once per seed, `search.seeds`)
SEED_PARAM = "seed"
#: trial-run param: the Ray Train workers each trial trained on (`resources.workers_per_trial`; 1 = one process)
WORKERS_PARAM = "workers_per_trial"

# ---- artifacts ---------------------------------------------------------------------------------------------------
PER_CLASS_JSON = "per_class_ap.json"  # {category_id: AP} (see per_class_dict); the report reads it back
PER_CLASS_CSV = "per_class_ap.csv"
AP_BY_FREQUENCY_PNG = "ap_by_frequency.png"
REPORT_HTML = "sweep_report.html"  # on the parent run
CONFIG_AGGREGATES_JSON = "config_aggregates.json"  # on the parent run: n, mean, sd, 95% CI per configuration
#: on a trial run: the reliability diagram per bucket of its last evaluation ({"all"|"r"|"c"|"f": {"edges", "count",
#: "confidence", "precision"}}, lt_models.evaluation.calibration.reliability); the report plots the best trial's
CALIBRATION_JSON = "calibration.json"


# ---- values in results and runs ----------------------------------------------------------------------------------
def finite_number(v: Any) -> float | None:
    """``v`` as a finite float, else None (None, booleans, non-numbers, NaN and infinities)."""
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def per_class_dict(per_class: Any) -> dict[int, float]:
    """Per-class AP as a trial reports it (``per_class`` of a result) or as :data:`PER_CLASS_JSON` holds it
    ({category_id: AP}, keys possibly strings after JSON), with int keys and float values (NaN where a value is not
    a finite number; keys that are not integers are dropped). Anything but a mapping gives {}."""
    out: dict[int, float] = {}
    if not isinstance(per_class, Mapping):
        return out
    for k, v in per_class.items():
        try:
            key = int(k)
        except (TypeError, ValueError):
            continue
        f = finite_number(v)
        out[key] = f if f is not None else float("nan")
    return out
