"""End-to-end Ray Tune sweeps on CPU with the real engine, on a tiny synthetic benchmark (64 px, ~50 images).

One local Ray session serves the whole module. The main sweep (6 stage-2 trials under ASHA) is interrupted at the
first report after its first trial finishes (SIGINT, as Ctrl+C would, before Tune registers that report's
checkpoint) and resumed with `resume=True`; its assertions are split over several tests. A second one-trial sweep
injects a fault from the test (a wrapper around the production trainable) to check the retry from the last
checkpoint.
"""

import json
import sys
import tempfile
from pathlib import Path

import pytest
import ray
import ray.cloudpickle
import yaml
from ray import tune

from faults.common import TINY  # the tiny synthetic benchmark (64 px, ~50 training images)
from faults.stand_ins import InterruptAfterFirstTrial  # Ctrl+C at the first report after a trial completes
from lt_models.data.synthetic.generate import generate_benchmark
from pipelines.config.load import load_experiment_config
from pipelines.tune import stage1 as pretrain
from pipelines.tune import sweep, trainable

pytestmark = pytest.mark.slow

# Ray workers cannot import this test module by name: ship its functions/classes by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

STAGE2_EPOCHS = 3


@pytest.fixture(scope="module")
def ray_session():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep_e2e")
    generate_benchmark(root / "data", preset=TINY, seed=0)
    return root


def make_cfg(workdir: Path, name: str, **sections):
    raw = {
        "name": name,
        "seed": 0,
        "data": {
            "train": str(workdir / "data/train.json"),
            "val": str(workdir / "data/val.json"),
            "hierarchy": str(workdir / "data/hierarchy.json"),
        },
        "model": {"backbone": "tiny", "image_size": 64},
        "stage1": {"epochs": 1, "batch_size": 4, "lr": 0.02, "warmup": 5},
        "stage2": {"epochs": STAGE2_EPOCHS, "batch_size": 4, "lr": 0.01, "warmup": 2, "samples_per_epoch": 24},
        "eval": {"every": 1},
        "resources": {"cpus_per_trial": 1},
        "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2, "max_t": STAGE2_EPOCHS},
        "search": {"num_samples": 1, "max_concurrent_trials": 2, "seed": 0},
        "space": {
            "lam": {"grid": [0.0, 0.5, 1.0]},
            "loss": {"grid": ["concurrent_softmax", "acsl"]},
            "xi": {"choice": [0.3, 0.7]},
        },
        "run": {"storage_path": str(workdir / "results"), "max_failures": 1, "checkpoints_to_keep": 1},
    }
    raw.update(sections)
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_experiment_config(path)


def trial_results(trial_path: str) -> list[dict]:
    """Every result Tune recorded for a trial (result.json holds one JSON object per report)."""
    lines = Path(trial_path, "result.json").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


@pytest.fixture(scope="module")
def interrupted_and_resumed(ray_session, workdir):
    cfg = make_cfg(workdir, "main")
    flag = workdir / "interrupted.txt"
    first = sweep.run_sweep(cfg, callbacks=[InterruptAfterFirstTrial(flag)], verbose=0)
    finished_id = flag.read_text()
    finished = next(t for t in first.trials if t.trial_id == finished_id)
    from mlflow import MlflowClient

    client = MlflowClient(first.tracking_uri)
    exp = client.get_experiment_by_name(cfg.name)
    run = client.search_runs([exp.experiment_id], f"tags.`ltsweep.trial_id` = '{finished_id}'")[0]
    snapshot = {
        "results": trial_results(finished.path),
        "meta": (first.stage1[0].path / "meta.json").read_text(),
        "end_time": run.info.end_time,
        "run_id": run.info.run_id,
        "interrupted": {t.trial_id: trial_results(t.path) for t in first.trials if t.interrupted},
    }
    resumed = sweep.run_sweep(cfg, resume=True, verbose=0)
    return cfg, first, resumed, finished_id, snapshot


def test_sweep_was_really_interrupted(interrupted_and_resumed):
    cfg, first, resumed, finished_id, _ = interrupted_and_resumed
    # Ctrl+C is reported as an interruption (exit 1, "--resume"), never as trials stopped early by the scheduler
    assert first.interrupted and first.exit_code() == 1 and "--resume" in first.outcome()
    assert first.unfinished >= 1 and all(not t.stopped_early for t in first.trials if t.interrupted)
    assert not resumed.interrupted and resumed.exit_code() == 0 and resumed.unfinished == 0
    # the variant generator creates trials as slots free up (max_concurrent_trials), so the interrupted run
    # knows only some of the 6; the resumed one continues those and creates the rest
    assert 1 <= len(first.trials) < 6 and len(resumed.trials) == 6
    assert {t.trial_id for t in first.trials} < {t.trial_id for t in resumed.trials}
    assert sum(t.evaluations for t in resumed.trials) > sum(t.evaluations for t in first.trials)
    assert resumed.resumed and resumed.errored == 0


def test_resume_does_not_rerun_finished_trials(interrupted_and_resumed):
    from mlflow import MlflowClient

    cfg, first, resumed, finished_id, snapshot = interrupted_and_resumed
    done = next(t for t in resumed.trials if t.trial_id == finished_id)
    assert trial_results(done.path) == snapshot["results"]  # not one more report after the resume
    run = MlflowClient(resumed.tracking_uri).get_run(snapshot["run_id"])
    assert run.info.status == "FINISHED" and run.info.end_time == snapshot["end_time"]  # its run is left as it was
    for t in resumed.trials:  # resumed trials continued from their checkpoints: no epoch was reported twice
        epochs = [r["epoch"] for r in trial_results(t.path)]
        assert epochs == list(range(1, len(epochs) + 1)), (t.trial_id, epochs)
    assert not resumed.stage1[0].trained and resumed.stage1[0].sha256 == first.stage1[0].sha256
    assert (resumed.stage1[0].path / "meta.json").read_text() == snapshot["meta"]


def test_a_resumed_trial_keeps_its_results_and_appends(interrupted_and_resumed):
    # after --resume Tune's JSON logger copies a trial's stored result.json back into its staging directory and
    # appends there; nothing reported before the interruption may be lost or rewritten
    _, _, resumed, _, snapshot = interrupted_and_resumed
    assert snapshot["interrupted"]
    for trial_id, before in snapshot["interrupted"].items():
        after = trial_results(next(t.path for t in resumed.trials if t.trial_id == trial_id))
        assert after[: len(before)] == before and len(after) > len(before)


def test_restart_and_resume_guards(interrupted_and_resumed, workdir):
    from lt_models.errors import ConfigError

    cfg = interrupted_and_resumed[0]
    with pytest.raises(ConfigError, match="already exists.*pass --resume"):
        sweep.run_sweep(cfg)
    with pytest.raises(ConfigError, match="cannot be combined with --resume"):
        sweep.run_sweep(cfg, resume=True, force_pretrain=True)
    changed = cfg.model_copy(update={"stage2": cfg.stage2.model_copy(update={"lr": 0.5})})
    with pytest.raises(ConfigError, match="changed since it started"):
        sweep.run_sweep(changed, resume=True)
    with pytest.raises(ConfigError, match="no restorable sweep"):
        sweep.run_sweep(cfg.model_copy(update={"name": "never-started"}), resume=True)


def test_asha_stops_trials_early(interrupted_and_resumed):
    cfg, _, resumed, _, _ = interrupted_and_resumed
    assert resumed.stopped_early >= 1
    assert any(t.evaluations == cfg.evals_per_trial for t in resumed.trials)
    assert resumed.best is not None and resumed.best.evaluations == cfg.evals_per_trial
    assert resumed.trial_epochs < len(resumed.trials) * STAGE2_EPOCHS


def test_metrics_reported_at_every_evaluation(interrupted_and_resumed):
    _, _, resumed, _, _ = interrupted_and_resumed
    for t in resumed.trials:
        results = trial_results(t.path)
        assert len(results) == t.evaluations >= 1
        assert [r["training_iteration"] for r in results] == list(range(1, len(results) + 1))
        for r in results:
            for key in ("AP", "AP50", "APr", "APc", "APf", "loss", "AP_fixed", "AP_pool", "APr_pool", "ECE"):
                assert isinstance(r[key], float), (key, r)
            assert 0.0 <= r["AP"] <= 1.0 and r["iteration"] > 0 and r["per_class"]
        assert list(Path(t.path).glob("events.out.tfevents.*")), "no TensorBoard log"


def test_one_stage1_training_shared_by_every_trial(interrupted_and_resumed):
    cfg, first, resumed, _, _ = interrupted_and_resumed
    sha = first.stage1[0].sha256
    assert first.stage1[0].trained and len(sha) == 64
    assert [p.name for p in pretrain.pretrain_root(cfg.run.storage_path).iterdir() if p.is_dir()] == [sha]
    for t in resumed.trials:
        assert {r["pretrain_sha256"] for r in trial_results(t.path)} == {sha}
        spec = json.loads(next(Path(t.path).glob("checkpoint_*/spec.json")).read_text())
        assert spec["stage"] == "stage2" and spec["loss"]["name"] == t.config["loss"]
        assert spec["sampler"] == {
            "name": "softbalance",
            "lam": t.config["lam"],
            "num_samples": 24,
            "threshold": None,
            "lam_schedule": None,
        }
    # another sweep with the same stage-1 settings and data reuses the checkpoint instead of training again
    other = make_cfg(Path(cfg.run.storage_path).parent, "other", space={"lam": {"grid": [0.7]}})
    again = pretrain.ensure_stage1(other)
    assert not again.trained and again.sha256 == sha


def test_table2_grid_of_training_loss_by_test_scores_runs_as_one_sweep(interrupted_and_resumed, workdir):
    """The concurrent-softmax paper's Table 2 (softmax / concurrent softmax in training x in testing) as one
    search space: 4 trials from the shared stage 1; the cells that share a training loss train identically and differ
    only in how detections are scored."""
    cfg = make_cfg(
        workdir,
        "table2",
        space={"loss": {"grid": ["softmax", "concurrent_softmax"]}, "scores": {"grid": ["softmax", "concurrent"]}},
        stage2={
            "epochs": 1,
            "batch_size": 4,
            "lr": 0.01,
            "warmup": 2,
            "samples_per_epoch": 24,
            "sampler": "classaware",
        },
        scheduler={"type": "fifo"},
    )
    result = sweep.run_sweep(cfg, verbose=0)
    assert result.stage1[0].sha256 == interrupted_and_resumed[1].stage1[0].sha256 and not result.stage1[0].trained
    cells = {}
    for t in result.trials:
        assert t.error is None and t.evaluations == 1
        spec = json.loads(next(Path(t.path).glob("checkpoint_*/spec.json")).read_text())
        assert spec["loss"]["name"] == t.config["loss"] and spec["loss"]["scores"] == t.config["scores"]
        cells[(t.config["loss"], t.config["scores"])] = t.metrics
    assert sorted(cells) == [
        ("concurrent_softmax", "concurrent"),
        ("concurrent_softmax", "softmax"),
        ("softmax", "concurrent"),
        ("softmax", "softmax"),
    ]
    for loss in ("softmax", "concurrent_softmax"):
        assert cells[(loss, "softmax")]["loss"] == pytest.approx(cells[(loss, "concurrent")]["loss"], rel=1e-6)
    assert cells[("softmax", "softmax")]["loss"] != pytest.approx(cells[("concurrent_softmax", "softmax")]["loss"])


@pytest.fixture(scope="module")
def seeded_and_confirmed(interrupted_and_resumed, workdir):
    """A 2-configuration x 2-seed sweep with a baseline and half the validation images held out, then `ltsweep
    confirm` of its best configuration."""
    from pipelines.commands.confirm import confirm

    data = {
        "train": str(workdir / "data/train.json"),
        "val": str(workdir / "data/val.json"),
        "hierarchy": str(workdir / "data/hierarchy.json"),
        "holdout": 0.5,
    }
    cfg = make_cfg(
        workdir,
        "seeded",
        data=data,
        space={"loss": {"grid": ["softmax", "concurrent_softmax"]}},
        stage2={
            "epochs": 1,
            "batch_size": 4,
            "lr": 0.01,
            "warmup": 2,
            "samples_per_epoch": 24,
            "sampler": "classaware",
        },
        scheduler={"type": "fifo"},
        report={"baseline": {"loss": "softmax"}},
        search={"num_samples": 1, "max_concurrent_trials": 2, "seed": 0, "seeds": [0, 1]},
    )
    first = sweep.run_sweep(cfg, verbose=0)
    confirmed = confirm("seeded", top=1, seeds=3, storage_path=cfg.run.storage_path)
    return cfg, first, confirmed


def test_seeds_repeat_every_configuration_with_one_stage1_per_seed(seeded_and_confirmed, interrupted_and_resumed):
    cfg, first, _ = seeded_and_confirmed
    assert sorted((t.config["loss"], t.config["seed"]) for t in first.trials) == [
        ("concurrent_softmax", 0),
        ("concurrent_softmax", 1),
        ("softmax", 0),
        ("softmax", 1),
    ]
    assert sorted(first.stage1) == [0, 1]
    assert first.stage1[0].sha256 == interrupted_and_resumed[1].stage1[0].sha256 and not first.stage1[0].trained
    assert first.stage1[1].sha256 != first.stage1[0].sha256
    for t in first.trials:  # each trial restored its own seed's stage 1
        assert {r["pretrain_sha256"] for r in trial_results(t.path)} == {first.stage1[t.config["seed"]].sha256}
        assert {r["seed"] for r in trial_results(t.path)} == {t.config["seed"]}
    configs = first.configs
    assert [c.n for c in configs] == [2, 2] and all(c.stats["AP"].n == 2 for c in configs)
    # every interval counts the seeds and the validation images: each trial's checkpoint holds its replicates
    shown = [c.stats[m] for c in configs for m in ("AP", "APr", "APc", "APf") if c.stats[m].n]  # -1: empty bucket
    assert shown and all(st.method == "seeds x images" for st in shown)
    # 1000 draws of the images; a draw that leaves a bucket without ground truth does not count for that bucket
    assert all(c.stats["AP"].replicates == 1000 for c in configs) and all(900 < st.replicates for st in shown)
    sentences = first.comparisons()
    assert any("p = " in x for x in sentences) and any(
        "the baseline" in x or "is itself the best" in x for x in sentences
    )
    assert all(any(w in x for w in (": better (", ": worse (", ": cannot tell (")) for x in sentences if " vs " in x)


def test_seeded_sweep_aggregates_reach_mlflow_and_the_report(seeded_and_confirmed, tmp_path):
    from mlflow import MlflowClient

    cfg, first, _ = seeded_and_confirmed
    client = MlflowClient(first.tracking_uri)
    exp = client.get_experiment_by_name("seeded")
    parent = client.search_runs([exp.experiment_id], "tags.`ltsweep.role` = 'sweep'")[0]
    assert parent.data.metrics["best_n"] == 2 and "AP_ci_low" in parent.data.metrics
    trials = client.search_runs([exp.experiment_id], "tags.`ltsweep.role` = 'trial'")
    assert sorted(r.data.params["seed"] for r in trials) == ["0", "0", "1", "1"]
    for r in trials:  # the image-bootstrap replicates of each trial's last evaluation, for `ltsweep compare`
        assert "replicates.npz" in {a.path for a in client.list_artifacts(r.info.run_id)}
    assert parent.data.tags["ltsweep.intervals"].startswith("95% intervals: seeds x images")
    page = Path(client.download_artifacts(parent.info.run_id, "sweep_report.html", str(tmp_path))).read_text()
    assert "Per configuration over its seeds" in page and "p = " in page and "seeds x images" in page
    assert "Calibration of the best trial's scores" in page and 'alt="reliability diagram"' in page


def test_confirm_reruns_the_best_configuration_and_the_baseline_with_more_seeds(seeded_and_confirmed):
    from mlflow import MlflowClient

    cfg, first, confirmed = seeded_and_confirmed
    best = first.best_config.config["loss"]
    expected = sorted({best, "softmax"})  # the top-1 configuration plus the baseline when it is not the best
    assert confirmed.name == "seeded-confirm" and confirmed.errored == 0
    assert sorted({t.config["loss"] for t in confirmed.trials}) == expected
    # fresh seeds, never used by the sweep: new stage-1 checkpoints, new runs
    assert sorted(confirmed.stage1) == [2, 3, 4] and all(c.trained for c in confirmed.stage1.values())
    assert all(c.n == 3 and c.full for c in confirmed.configs)
    # the sweep chose on the selection images; the confirmation evaluated on the held-out ones
    selection = {tuple(_matches(t.path).img_ids) for t in first.trials}
    held_out = {tuple(_matches(t.path).img_ids) for t in confirmed.trials}
    assert len(selection) == len(held_out) == 1 and not set(selection.pop()) & set(held_out.pop())
    client = MlflowClient(confirmed.tracking_uri)
    runs = {
        name: client.search_runs([client.get_experiment_by_name(name).experiment_id], "tags.`ltsweep.role` = 'sweep'")[
            0
        ]
        for name in ("seeded", "seeded-confirm")
    }
    assert runs["seeded-confirm"].data.tags["ltsweep.confirms"] == runs["seeded"].info.run_id
    assert runs["seeded"].data.tags["ltsweep.confirmed_by"] == runs["seeded-confirm"].info.run_id
    assert json.loads(runs["seeded-confirm"].data.tags["ltsweep.confirm_seeds"]) == [2, 3, 4]
    assert "held-out" in runs["seeded-confirm"].data.tags["ltsweep.confirm_images"]
    trials = client.search_runs([runs["seeded-confirm"].info.experiment_id], "tags.`ltsweep.role` = 'trial'")
    assert {r.data.params["seed"] for r in trials} == {"2", "3", "4"}  # visible in MLflow params
    with tempfile.TemporaryDirectory() as tmp:
        rows = json.loads(
            Path(client.download_artifacts(runs["seeded-confirm"].info.run_id, "confirmation.json", tmp)).read_text()
        )
    assert {r["metric"] for r in rows} == {"AP", "APr", "APc", "APf"} and {r["config"] for r in rows} == {
        f"loss={loss}" for loss in expected
    }
    assert all(r["selection"] and r["independent"] and r["difference"] for r in rows)


def _matches(trial_path: str):
    """The matching of a trial's last evaluation (the newest checkpoint Tune kept)."""
    from lt_models.evaluation.matches import Matches

    return Matches.load(max(Path(trial_path).glob("checkpoint_*/matches.npz")))


def test_best_model_is_logged_registered_and_predicts(interrupted_and_resumed, workdir):
    """The resumed sweep's best checkpoint is registered as `main`; models:/main/latest loads with
    mlflow.pyfunc and detects on one image exactly as the checkpoint's detector does. The interrupted run logged
    no model."""
    import mlflow
    import numpy as np
    from mlflow import MlflowClient
    from PIL import Image

    from lt_models.engine.inference import detect, load_detector

    cfg, first, resumed, _, _ = interrupted_and_resumed
    assert first.model is None and resumed.model is not None
    m = resumed.model
    assert (m.name, m.version, m.uri) == ("main", "1", "models:/main/1")
    best = resumed.best_config
    assert m.trial_id in {t.trial_id for t in best.runs.values()}
    client = MlflowClient(resumed.tracking_uri)
    tags = client.get_model_version("main", "1").tags
    assert tags["ltsweep.sweep_run_id"] == m.run_id and tags["ltsweep.best_model_checkpoint"] == m.checkpoint
    assert (
        tags["ltsweep.pretrain_sha256"] == resumed.stage1[0].sha256 and len(tags["ltsweep.dataset_fingerprint"]) == 64
    )
    # the checkpoint is the trial's best evaluation by the sweep's metric
    evals = trial_results(next(t.path for t in resumed.trials if t.trial_id == m.trial_id))
    best_epoch = max(evals, key=lambda r: (r["AP"], r["epoch"]))["epoch"]
    assert json.loads(Path(m.checkpoint, "metrics.json").read_text())["epoch"] in {
        r["epoch"] for r in evals if r["AP"] == evals[best_epoch - 1]["AP"]
    }

    mlflow.set_tracking_uri(resumed.tracking_uri)
    try:
        model = mlflow.pyfunc.load_model("models:/main/latest")
    finally:
        mlflow.set_tracking_uri(None)
    val = json.loads((workdir / "data/val.json").read_text())
    image = np.asarray(Image.open(workdir / "data/images" / val["images"][0]["file_name"]).convert("RGB"))
    out = model.predict(image)
    assert set(out) == {"boxes", "category_ids", "scores"} and out["boxes"].shape == (len(out["scores"]), 4)
    assert set(out["category_ids"].tolist()) <= {c["id"] for c in val["categories"]}
    assert np.all(np.diff(out["scores"]) <= 0)  # best first
    detector, label_to_cat_id = load_detector(m.checkpoint)
    ref = detect(detector, label_to_cat_id, image)
    for key in out:
        np.testing.assert_allclose(out[key], ref[key], rtol=1e-5, atol=1e-5)


def test_asha_over_configurations_pauses_promotes_and_keeps_one_run_per_trial(seeded_and_confirmed, workdir, capsys):
    """scheduler.type asha_configs with the production trainable: 3 configurations x 2 seeds, rungs at 1 and 2 of
    3 evaluations (η = 2). Rung 1 promotes ⌊3/2⌋ = 1 configuration (both seeds); rung 2 then holds 1, so the best
    there is promoted to the full schedule. Paused trials resume from their checkpoints and keep their MLflow run."""
    from mlflow import MlflowClient

    cfg = make_cfg(
        workdir,
        "asha-configs",
        space={"lam": {"grid": [0.0, 0.5, 1.0]}},
        scheduler={"type": "asha_configs", "grace_period": 1, "reduction_factor": 2, "metric": "AP_fixed"},
        search={"num_samples": 1, "max_concurrent_trials": 2, "seed": 0, "seeds": [0, 1]},
    )  # ranked by AP-fixed (top 10,000 detections per class, no per-image cap)
    s = sweep.run_sweep(cfg, verbose=0)
    assert s.exit_code() == 0 and s.errored == 0 and len(s.trials) == 6
    evals = {(t.config["lam"], t.config["seed"]): t.evaluations for t in s.trials}
    full = [lam for lam in (0.0, 0.5, 1.0) if evals[(lam, 0)] == evals[(lam, 1)] == STAGE2_EPOCHS]
    assert len(full) == 1 and sorted(evals.values()) == [1, 1, 1, 1, 3, 3]  # 10 of the grid's 18 trial-epochs
    assert s.best_config is not None and s.best_config.full and s.best_config.config == {"lam": full[0]}
    assert s.stopped_early == 4 and "ASHA: promoted lam=" in capsys.readouterr().out
    for t in s.trials:  # a paused trial continued from its checkpoint: every epoch reported once, in order
        assert [r["epoch"] for r in trial_results(t.path)] == list(range(1, t.evaluations + 1))
    client = MlflowClient(s.tracking_uri)
    exp = client.get_experiment_by_name(cfg.name)
    runs = client.search_runs([exp.experiment_id], "tags.`ltsweep.role` = 'trial'")
    assert sorted(r.data.tags["ltsweep.trial_id"] for r in runs) == sorted(t.trial_id for t in s.trials)
    assert {r.info.status for r in runs} == {"FINISHED"}

    def at_rung1(run) -> float:  # AP-fixed of the first evaluation, which rung 1 compares
        return next(m.value for m in client.get_metric_history(run.info.run_id, "AP_fixed") if m.step == 1)

    rung1 = {lam: sum(at_rung1(r) for r in runs if r.data.params["lam"] == str(lam)) / 2 for lam in (0.0, 0.5, 1.0)}
    assert max(rung1, key=rung1.__getitem__) == full[0]  # ASHA promoted the best mean AP-fixed


def test_openimages_metric_is_what_trials_report_to_tune_and_mlflow(interrupted_and_resumed, workdir):
    """eval.metric openimages: every evaluation reports the Open Images challenge AP@0.5 (hierarchy expansion) as
    AP and AP50, the number evaluate_openimages gives on the checkpoint's own detections; MLflow logs the same."""
    import torch
    from mlflow import MlflowClient

    from lt_models.data.datasets import LVISDetection, collate_detection
    from lt_models.engine.inference import load_detector
    from lt_models.engine.validation import predict
    from lt_models.evaluation import evaluate_lvis, evaluate_openimages

    cfg = make_cfg(
        workdir,
        "oi-metric",
        space={"lam": {"grid": [0.5]}},
        scheduler={"type": "fifo"},
        eval={"every": 1, "metric": "openimages"},
        stage2={"epochs": 1, "batch_size": 4, "lr": 0.01, "warmup": 2, "samples_per_epoch": 24},
    )
    s = sweep.run_sweep(cfg, verbose=0, register=False)
    assert s.exit_code() == 0 and len(s.trials) == 1
    trial = s.trials[0]
    reported = trial_results(trial.path)[-1]
    ckpt = next(Path(trial.path).glob("checkpoint_*"))
    ckpt_dir = next(p.parent for p in ckpt.rglob("checkpoint.pt"))
    model, label_to_cat_id = load_detector(ckpt_dir)
    val = LVISDetection(str(cfg.data.val), None, hierarchy_file=str(cfg.data.hierarchy), train=False)
    loader = torch.utils.data.DataLoader(val, batch_size=4, collate_fn=collate_detection)
    dets = predict(model, loader, torch.device("cpu"), label_to_cat_id, progress=False)
    train_buckets = dict(
        zip(
            *(lambda d: (d.cat_ids, d.frequency))(
                LVISDetection(str(cfg.data.train), None, hierarchy_file=str(cfg.data.hierarchy), train=True)
            )
        )
    )
    oi = evaluate_openimages(str(cfg.data.val), dets, str(cfg.data.hierarchy), frequency=train_buckets)
    assert reported["AP"] == pytest.approx(oi["AP"], abs=1e-9) and reported["AP50"] == pytest.approx(oi["AP50"])
    assert reported["APr"] == pytest.approx(oi["APr"], abs=1e-9)
    lvis = evaluate_lvis(str(cfg.data.val), dets, frequency=train_buckets)
    assert lvis["AP"] != pytest.approx(oi["AP"])  # a different number: the sweep really used the OI metric
    client = MlflowClient(s.tracking_uri)
    exp = client.get_experiment_by_name(cfg.name)
    run = client.search_runs([exp.experiment_id], "tags.`ltsweep.role` = 'trial'")[0]
    assert run.data.metrics["AP"] == pytest.approx(reported["AP"])


def test_mlflow_has_one_pretrain_run_and_a_run_per_trial(interrupted_and_resumed):
    from mlflow import MlflowClient

    cfg, _, resumed, _, _ = interrupted_and_resumed
    client = MlflowClient(resumed.tracking_uri)
    exp = client.get_experiment_by_name(cfg.name)
    role = lambda r: client.search_runs([exp.experiment_id], f"tags.`ltsweep.role` = '{r}'")  # noqa: E731
    assert len(role("pretrain")) == 1 and len(role("sweep")) == 1
    # after --resume finished them, no run keeps the "unfinished" tag of the interruption
    assert all("ltsweep.trial_status" not in r.data.tags for r in role("trial"))
    assert {r.info.status for r in role("trial")} == {"FINISHED"}
    # APr/APc/APf bucket classes by the training set's frequency, and the runs say so
    assert str(cfg.data.train) in role("sweep")[0].data.tags["ltsweep.frequency_source"]
    assert str(cfg.data.train) in role("pretrain")[0].data.params["frequency_source"]
    trial_runs = role("trial")
    assert sorted(r.data.tags["ltsweep.trial_id"] for r in trial_runs) == sorted(t.trial_id for t in resumed.trials)
    assert all(r.data.params["pretrain_sha256"] == resumed.stage1[0].sha256 for r in trial_runs)
    for run in trial_runs:  # AP-fixed, AP-pool and calibration beside AP, and the reliability diagram
        assert {"AP_fixed", "APr_fixed", "AP_pool", "APr_pool", "ECE", "ECEr"} <= set(run.data.metrics)
        assert "calibration.json" in {a.path for a in client.list_artifacts(run.info.run_id)}
    # lineage: the stage-1 run and the runs that start from it name each other; every run lists its datasets
    pretrain, sweep_run = role("pretrain")[0], role("sweep")[0]
    assert json.loads(sweep_run.data.tags["ltsweep.pretrain_runs"]) == {"0": pretrain.info.run_id}
    assert json.loads(pretrain.data.tags["ltsweep.sweep_runs"]) == [sweep_run.info.run_id]
    assert {r.data.tags["ltsweep.pretrain_run_id"] for r in trial_runs} == {pretrain.info.run_id}
    fingerprint = sweep_run.data.tags["ltsweep.dataset_fingerprint"]
    for run in [sweep_run, pretrain, *trial_runs]:
        inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
        assert sorted(inputs) == ["training", "validation"], run.info.run_id
        assert inputs["training"].digest == fingerprint[:16] and "train.json" in inputs["training"].source
        assert run.data.tags["mlflow.source.name"] == "ltsweep"


def faulty_trial(config, experiment, stage1=None, shared=None):
    """The production trainable with faults injected here, in the test (not through a config flag):
    lam 0.5: the first attempt raises right after the epoch-2 report (whose checkpoint Tune has persisted);
    lam 1.0: the engine reports a non-finite loss (each call of it is counted in a file)."""
    from lt_models.engine import loop as engine

    store = Path(experiment.run.storage_path)
    trial_id = tune.get_context().get_trial_id()
    real_tune, real_train = trainable.tune, engine.train

    class FlakyTune:
        def __getattr__(self, name):
            return getattr(real_tune, name)

        def report(self, metrics, checkpoint=None):
            real_tune.report(metrics, checkpoint=checkpoint)
            marker = store / f"fault-{trial_id}.txt"
            if metrics["epoch"] == 2 and not marker.exists():
                marker.write_text("injected")
                raise RuntimeError("injected fault after the epoch-2 report")

    def diverging_train(spec, out_dir, **kw):
        with open(store / f"engine-calls-{trial_id}.txt", "a") as f:
            f.write("call\n")
        raise engine.NonFiniteLossError(7, 0, {"loss_classifier": float("nan")}, 0.01)

    trainable.tune = FlakyTune()
    if config["lam"] == 1.0:
        engine.train = diverging_train
    try:
        trainable.train_trial(config, experiment, stage1, shared)
    finally:
        trainable.tune, engine.train = real_tune, real_train


@pytest.fixture(scope="module")
def faulty_sweep(ray_session, workdir):
    cfg = make_cfg(workdir, "faulty", space={"lam": {"grid": [0.5, 1.0]}}, scheduler={"type": "fifo"})
    return cfg, sweep.run_sweep(cfg, trainable_fn=faulty_trial, verbose=0)


def test_failed_trial_is_retried_from_its_last_checkpoint(faulty_sweep):
    cfg, summary = faulty_sweep
    assert not summary.stage1[0].trained  # the same stage 1 as the main sweep
    t = next(t for t in summary.trials if t.config["lam"] == 0.5)
    assert (Path(cfg.run.storage_path) / f"fault-{t.trial_id}.txt").exists(), "the fault was not injected"
    assert t.error is None and t.epochs == STAGE2_EPOCHS
    results = trial_results(t.path)
    # restarted from the epoch-2 checkpoint: epoch 3 follows epoch 2 (a restart from stage 1 would report 1, 2 again)
    assert [r["epoch"] for r in results] == [1, 2, 3]
    assert [r["training_iteration"] for r in results] == [1, 2, 3]


def test_non_finite_loss_ends_only_that_trial(faulty_sweep):
    cfg, summary = faulty_sweep
    bad = next(t for t in summary.trials if t.config["lam"] == 1.0)
    assert bad.error is not None and "diverged" in bad.error and "non-finite training loss" in bad.error
    # Tune retried it (max_failures: 1), but the retry stopped at the divergence marker without training again
    calls = (Path(cfg.run.storage_path) / f"engine-calls-{bad.trial_id}.txt").read_text().splitlines()
    assert len(calls) == 1
    assert summary.errored == 1 and summary.best is not None and summary.best.config["lam"] == 0.5


def test_ltsweep_train_runs_one_training_from_the_shared_stage1(interrupted_and_resumed, workdir, capsys):
    from pipelines import cli

    cfg = interrupted_and_resumed[0]
    out = workdir / "train_out"
    rc = cli.main(
        [
            "train",
            str(workdir / "main.yaml"),
            "--set",
            "stage2.epochs=1",
            "--set",
            "stage2.loss=acsl",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["stage"] == "stage2" and summary["metrics"]["epoch"] == 1
    assert summary["stage1"]["trained"] is False
    assert summary["stage1"]["sha256"] == pretrain.stage1_key(cfg)
    assert (out / "per_class_ap.csv").is_file() and json.loads((out / "result.json").read_text()) == summary


def test_bad_annotations_inside_a_ray_task_are_one_line_and_exit_2(ray_session, workdir, capsys):
    """The stage-1 Ray task meets a malformed annotation: the user gets the AnnotationError's own line (file, id,
    field, and a hint naming an option that exists), exit code 2 - not a Ray traceback."""
    from pipelines import cli

    data = json.loads((workdir / "data/train.json").read_text())
    data["annotations"][0]["bbox"][2] = 0  # w = 0
    bad = workdir / "bad_train.json"
    bad.write_text(json.dumps(data))
    cfg = make_cfg(workdir, "badann", space={"lam": {"grid": [0.5]}}, scheduler={"type": "fifo"})
    raw = yaml.safe_load((workdir / "badann.yaml").read_text())
    raw["data"]["train"] = str(bad)
    raw["data"]["image_dir"] = str(workdir / "data/images")
    (workdir / "badann.yaml").write_text(yaml.safe_dump(raw))
    capsys.readouterr()
    assert cli.main(["sweep", str(workdir / "badann.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("ltsweep: error: ") and "bad_train.json" in err
    assert f"annotation id {data['annotations'][0]['id']}" in err and "--skip-invalid" in err
    assert cfg.name == "badann"


def test_data_seeds_train_every_seed_on_its_own_draw_of_the_data(ray_session, workdir, monkeypatch):
    """search.data_seeds: each training seed generates, trains and evaluates on its own draw of the synthetic
    benchmark, so the spread over seeds holds the data draw; the intervals stay defined."""
    from lt_models.data.synthetic import layout

    monkeypatch.setitem(layout.PRESETS, "tiny", TINY)  # the driver generates the draws (one-stage: no Ray task does)
    root = workdir / "drawn"
    data = {"train": str(root / "train.json"), "val": str(root / "val.json"), "synthetic": "tiny"}
    cfg = make_cfg(
        workdir,
        "drawn",
        data=data,
        stage1=None,
        stage2={"epochs": 1, "batch_size": 4, "lr": 0.01, "warmup": 2, "samples_per_epoch": 16},
        space={},
        scheduler={"type": "fifo"},
        search={"num_samples": 1, "seeds": [0, 1], "data_seeds": True},
    )
    summary = sweep.run_sweep(cfg, verbose=0, progress=False, register=False)
    assert summary.errored == 0 and sorted(t.config["seed"] for t in summary.trials) == [0, 1]
    assert not root.exists()  # no undrawn copy: only the seeds' draws
    for t in summary.trials:
        seed = t.config["seed"]
        draw = workdir / f"drawn-data{seed}"
        assert (draw / "train.json").is_file()
        spec = json.loads(max(Path(t.path).glob("checkpoint_*/spec.json")).read_text())
        assert spec["train_ann"] == str(draw / "train.json") and spec["val_ann"] == str(draw / "val.json")
    draws = [json.loads((workdir / f"drawn-data{s}" / "train.json").read_text()) for s in (0, 1)]
    assert draws[0]["annotations"] != draws[1]["annotations"]  # two draws of the data, not one
    (config,) = summary.configs
    assert config.n == 2 and config.stats["AP"].method == "seeds x images"
    assert config.stats["AP"].ci_low <= config.stats["AP"].mean <= config.stats["AP"].ci_high
