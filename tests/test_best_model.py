"""The best checkpoint of a trial survives Tune's num_to_keep (CheckpointConfig keeps by the sweep's metric), and
pipelines.tracking.best_model finds it and picks the trial of the best configuration."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
ray = pytest.importorskip("ray")
from ray import tune  # noqa: E402

from pipelines.analysis import aggregate  # noqa: E402
from pipelines.tracking.best_model import best_checkpoint, model_trial  # noqa: E402

CURVE = [0.5, 0.9, 0.3]  # the second evaluation is the best; the third, the latest, is worse


def curve_trial(config: dict) -> None:
    for it, ap in enumerate(CURVE, start=1):
        with tempfile.TemporaryDirectory() as d:
            Path(d, "state.json").write_text(json.dumps({"it": it}))
            tune.report({"AP": ap}, checkpoint=tune.Checkpoint.from_directory(d))


@pytest.mark.slow
def test_best_checkpoint_survives_num_to_keep_1(tmp_path):
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        results = tune.Tuner(
            curve_trial,
            tune_config=tune.TuneConfig(metric="AP", mode="max"),
            run_config=tune.RunConfig(
                name="keep",
                storage_path=str(tmp_path),
                verbose=0,
                checkpoint_config=tune.CheckpointConfig(
                    num_to_keep=1, checkpoint_score_attribute="AP", checkpoint_score_order="max"
                ),
            ),
        ).fit()
    finally:
        ray.shutdown()
    trial_id = results[0].metrics["trial_id"]
    ckpt = best_checkpoint(results, trial_id, "AP", "max")
    assert json.loads(Path(ckpt.path, "state.json").read_text()) == {"it": 2}
    kept = sorted(
        json.loads(Path(p, "state.json").read_text())["it"] for p in Path(results[0].path).glob("checkpoint_*")
    )
    assert kept == [2, 3]  # num_to_keep = 1 deleted the first; the best stays (Tune also keeps the latest to resume)
    assert best_checkpoint(results, "no-such-trial", "AP", "max") is None


def _trial(tid, lam, seed, ap, evals=3, error=None):
    return SimpleNamespace(
        trial_id=tid, config={"lam": lam, "seed": seed}, metrics={"AP": ap}, evaluations=evals, error=error
    )


def test_the_model_is_the_best_trial_of_the_best_configuration():
    # lam 1.0 has the best single trial (0.9) but the lower mean; lam 0.5 is the answer, its best seed the model
    trials = [
        _trial("a", 1.0, 0, 0.9),
        _trial("b", 1.0, 1, 0.1),
        _trial("c", 0.5, 0, 0.6),
        _trial("d", 0.5, 1, 0.7),
        _trial("e", 0.0, 0, 0.95, evals=1),
        _trial("f", 0.0, 1, 0.99, evals=1),
    ]
    configs = aggregate.aggregate(
        trials,
        config=lambda t: t.config,
        metric=lambda t, m: t.metrics.get(m),
        full=lambda t: t.evaluations >= 3,
        failed=lambda t: t.error is not None,
    )
    summary = SimpleNamespace(
        best_config=aggregate.best_config(configs, "AP", "max"),
        best=trials[0],
        metric="AP",
        mode="max",
        max_evaluations=3,
    )
    assert model_trial(summary).trial_id == "d"
    assert model_trial(SimpleNamespace(**{**vars(summary), "best_config": None})).trial_id == "a"
