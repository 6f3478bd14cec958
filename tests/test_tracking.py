"""MLflow tracking of sweeps, through Ray Tune for real (pipelines/tracking/callback.py -> mlflow_writer.py ->
report.py).

The trials here are a small test-local function trainable that reports synthetic metrics (a closed form of the
config and the iteration, plus `per_class`), so the callback is exercised through Tune in seconds; the real-engine
sweep is tested in the pipelines tests. One Ray session and one MLflow server serve the whole module.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import pytest
import ray
from local_mlflow import start_server, stop_process_group, wait_healthy
from mlflow import MlflowClient
from ray import tune
from ray.tune.schedulers import ASHAScheduler

from pipelines import cli
from pipelines.mlflow_io.client import default_tracking_uri
from pipelines.mlflow_io.reads import search_tagged
from pipelines.names import CALIBRATION_METRICS, LARGE_VOCAB_METRICS, MLFLOW_TRIAL_METRICS, TIDE_METRICS
from pipelines.tracking.callback import MLflowSweepCallback
from pipelines.tracking.stage1_run import log_pretrain_run

CATS = (1, 2, 3)  # category ids of the tiny ground truth: 3 = frequent, 2 = common, 1 = rare


# ---------------------------------------------------------------------------------------------------------------
# the synthetic trial
def expected_metrics(config: dict, it: int) -> dict:
    """What the synthetic trainable reports at iteration `it` (closed form, so MLflow values can be checked)."""
    ap = round(0.1 + 0.1 * config["lam"] + 0.05 * config["xi"] + 0.01 * it, 6)
    return {
        "AP": ap,
        "AP50": ap + 0.2,
        "APr": ap * 0.5,
        "APc": ap * 0.9,
        "APf": ap * 1.2,
        "loss": 1.0 / it,
        "epoch": float(it),
        **{k: round(ap * (0.8 + 0.01 * i), 9) for i, k in enumerate(LARGE_VOCAB_METRICS)},
        **{k: round(0.3 - 0.01 * it - 0.001 * i, 9) for i, k in enumerate(CALIBRATION_METRICS)},
        **{k: round(0.001 * (i % 7) + 0.0001 * it, 9) for i, k in enumerate(TIDE_METRICS)},
        "lam": float(config["lam"]),
        "xi": float(config["xi"]),
    }


def synthetic_trial(config: dict) -> None:
    start = 0
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            start = json.loads(Path(d, "state.json").read_text())["it"]
    barrier = config.get("barrier_dir")
    if barrier:  # wait (bounded) until every trial of the sweep runs, so that they really report concurrently
        Path(barrier, tune.get_context().get_trial_id()).touch()
        deadline = time.monotonic() + 120
        while len(os.listdir(barrier)) < config["barrier_n"] and time.monotonic() < deadline:
            time.sleep(0.05)
    for it in range(start + 1, config["reports"] + 1):
        flag = config.get("fail_flag")
        if flag and config["lam"] == config["fail_lam"] and it == config["fail_at"] and not os.path.exists(flag):
            Path(flag).write_text("failed once")
            raise RuntimeError("injected failure: the sweep is interrupted here")
        m = expected_metrics(config, it)
        m["per_class"] = {1: m["APr"], 2: m["APc"], 3: m["APf"]}
        m["pretrain_sha256"] = config["sha"]
        if config.get("checkpoint", True):
            with tempfile.TemporaryDirectory() as d:
                Path(d, "state.json").write_text(json.dumps({"it": it}))
                tune.report(m, checkpoint=tune.Checkpoint.from_directory(d))
        else:
            tune.report(m)


def tiny_gt() -> dict:
    """A minimal LVIS-format validation file: 3 categories, one per frequency bucket."""
    images = [
        {"id": i, "width": 64, "height": 64, "neg_category_ids": [], "not_exhaustive_category_ids": []}
        for i in range(1, 5)
    ]
    anns, aid = [], 1
    for cid, n_img in ((3, 4), (2, 2), (1, 1)):
        for i in range(1, n_img + 1):
            anns.append({"id": aid, "image_id": i, "category_id": cid, "bbox": [4, 4, 20, 20], "area": 400})
            aid += 1
    cats = [
        {"id": 1, "name": "rare_thing", "frequency": "r", "image_count": 3},
        {"id": 2, "name": "common_thing", "frequency": "c", "image_count": 50},
        {"id": 3, "name": "frequent_thing", "frequency": "f", "image_count": 500},
    ]
    return {"images": images, "annotations": anns, "categories": cats}


def sweep_params(name: str, keys: list[str]) -> dict:
    return {
        "name": name,
        "dataset_fingerprint": "d" * 64,
        "scheduler": {"metric": "AP", "mode": "max"},
        "stage2": {"epochs": 3},
        "eval": {"every": 1},
        "space": {k: {"grid": [0.0, 1.0]} for k in keys},
    }


def run_tuner(
    name,
    storage,
    uri,
    param_space,
    *,
    resources=1.0,
    max_concurrent=None,
    scheduler=None,
    max_failures=0,
    val_annotations=None,
    reuse_actors=True,
):
    cb = MLflowSweepCallback(
        uri, name, sweep_params(name, ["lam", "xi"]), ["lam", "xi"], val_annotations=val_annotations
    )
    tuner = tune.Tuner(
        tune.with_resources(synthetic_trial, {"cpu": resources}),
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric="AP",
            mode="max",
            scheduler=scheduler,
            max_concurrent_trials=max_concurrent,
            reuse_actors=reuse_actors,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=str(storage),
            callbacks=[cb],
            verbose=0,
            failure_config=tune.FailureConfig(max_failures=max_failures),
        ),
    )
    return tuner.fit()


# ---------------------------------------------------------------------------------------------------------------
# fixtures: one MLflow server and one Ray session for the module
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server_proc(tmp_path_factory):
    """Start `mlflow server` (sqlite backend, proxied artifacts) on 127.0.0.1; readiness is awaited separately so
    that it boots while Ray starts."""
    server = start_server(tmp_path_factory.mktemp("mlflow_server"))
    yield {"proc": server.proc, "url": server.url, "root": server.root, "log": server.log, "server": server}
    stop_process_group(server.proc)


@pytest.fixture(scope="module")
def ray_session(mlflow_server_proc):
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    # the trainable lives in this test module, which Ray's workers cannot import: ship it by value
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def mlflow_server(mlflow_server_proc, ray_session):
    """The server's URL once GET /health answers OK (bounded wait; the server's log is shown if it never does)."""
    try:
        wait_healthy(mlflow_server_proc["server"])
    except RuntimeError as exc:
        pytest.fail(str(exc))
    return mlflow_server_proc


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A local sqlite store shared by the restore and concurrency sweeps (and compared afterwards)."""
    root = tmp_path_factory.mktemp("results")
    return {"root": root, "uri": default_tracking_uri(root)}


def runs_of(client, name: str, role: str) -> list:
    exp = client.get_experiment_by_name(name)
    return search_tagged(client, exp.experiment_id, {"ltsweep.role": role})


def assert_history(client, run_id: str, config: dict, steps: list[int]) -> None:
    """Every metric key has exactly one value per step, equal to the trainable's closed form."""
    for key in MLFLOW_TRIAL_METRICS:
        hist = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        assert [m.step for m in hist] == steps, (key, [m.step for m in hist])
        for m in hist:
            assert m.value == pytest.approx(expected_metrics(config, m.step)[key], rel=1e-9), (key, m.step)


# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def http_sweep(mlflow_server, tmp_path_factory):
    """A 4-trial ASHA sweep logged to the MLflow server over HTTP, with a stage-1 run logged first."""
    tmp = tmp_path_factory.mktemp("http_sweep")
    gt = tmp / "val.json"
    gt.write_text(json.dumps(tiny_gt()))
    uri, name, sha = mlflow_server["url"], "http-sweep", "a" * 64
    log_pretrain_run(
        uri,
        name,
        sha,
        {"epochs": 2, "sampler": "nonbalance"},
        {"AP": 0.1, "APr": 0.0, "iteration": 2, "per_class": {1: 0.0, 2: 0.1, 3: 0.3}},
        tmp / "stage1",
        val_annotations=gt,
    )
    results = run_tuner(
        name,
        tmp / "tune",
        uri,
        {"lam": tune.grid_search([0.0, 1.0]), "xi": tune.grid_search([0.1, 0.7]), "reports": 3, "sha": sha},
        scheduler=ASHAScheduler(grace_period=1, max_t=3, reduction_factor=2),
        val_annotations=str(gt),
    )
    return {"uri": uri, "name": name, "results": results, "sha": sha, "tmp": tmp}


@pytest.mark.slow
def test_sweep_logged_over_http_parent_and_nested_runs(http_sweep, mlflow_server):
    client = MlflowClient(http_sweep["uri"])
    name, results = http_sweep["name"], http_sweep["results"]
    assert not results.errors
    parents = runs_of(client, name, "sweep")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.info.run_name == name
    assert parent.data.params["scheduler.metric"] == "AP"
    assert parent.data.tags["ltsweep.dataset_fingerprint"] == "d" * 64
    assert json.loads(parent.data.tags["ltsweep.search_space"]) == {
        "lam": {"grid": [0.0, 1.0]},
        "xi": {"grid": [0.0, 1.0]},
    }
    assert parent.data.tags["ltsweep.code_version"]

    trials = runs_of(client, name, "trial")
    by_id = {r.data.tags["ltsweep.trial_id"]: r for r in trials}
    assert len(trials) == len(by_id) == len(results) == 4
    for res in results:
        run = by_id[res.metrics["trial_id"]]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.status == "FINISHED"
        cfg = res.config
        assert run.data.params["lam"] == str(cfg["lam"]) and run.data.params["xi"] == str(cfg["xi"])
        assert run.data.params["pretrain_sha256"] == http_sweep["sha"]
        # every report Tune received (progress.csv) is in MLflow with step = training_iteration
        reported = [int(i) for i in res.metrics_dataframe["training_iteration"]]
        assert reported == list(range(1, len(reported) + 1))
        assert_history(client, run.info.run_id, cfg, reported)
        assert int(run.data.tags["ltsweep.iterations"]) == reported[-1]
        assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"per_class_ap.csv", "ap_by_frequency.png"}
        csv_path = client.download_artifacts(run.info.run_id, "per_class_ap.csv", str(http_sweep["tmp"]))
        text = Path(csv_path).read_text()
        assert "rare_thing" in text and "frequent_thing" in text  # written by lt_models.evaluation with the gt
        Path(csv_path).unlink()
    # artifacts went through the server's proxy into its --artifacts-destination
    stored = {p.name for p in (mlflow_server["root"] / "artifacts").rglob("*") if p.is_file()}
    assert {"per_class_ap.csv", "ap_by_frequency.png", "sweep_report.html"} <= stored


@pytest.mark.slow
def test_sweep_report_logged_on_parent(http_sweep):
    client = MlflowClient(http_sweep["uri"])
    parent = runs_of(client, http_sweep["name"], "sweep")[0]
    assert "ltsweep.report_error" not in parent.data.tags
    path = client.download_artifacts(parent.info.run_id, "sweep_report.html", str(http_sweep["tmp"]))
    page = Path(path).read_text()
    for section in (
        "AP and APr vs λ",
        "AP and APr vs ξ",
        "APr / APc / APf per trial",
        "How long each trial ran before ASHA stopped it",
        "best trial vs stage-1 baseline",
    ):
        assert section in page
    assert page.count("data:image/png;base64,") == 5
    assert "No stage-1 per-class AP" not in page  # the pretrain run's per-class AP was found
    best = max(http_sweep["results"], key=lambda r: r.metrics["AP"])  # also ran all 3 evaluations (ASHA top)
    assert f"<b>{best.metrics['trial_id']}</b> with AP = {best.metrics['AP']:.3f}" in page
    pre = runs_of(client, http_sweep["name"], "pretrain")
    assert len(pre) == 1 and pre[0].data.tags["ltsweep.pretrain_sha256"] == http_sweep["sha"]


# ---------------------------------------------------------------------------------------------------------------
RESTORE_NAME = "restored-sweep"


@pytest.fixture(scope="module")
def restored_sweep(store, ray_session):
    """A sweep interrupted by a trial failure (max_failures=0), then resumed with Tuner.restore."""
    storage = store["root"]
    flag = storage / "failed_once"
    space = {
        "lam": tune.grid_search([0.0, 0.5]),
        "xi": 0.5,
        "reports": 3,
        "sha": "b" * 64,
        "fail_lam": 0.5,
        "fail_at": 2,
        "fail_flag": str(flag),
    }
    first = run_tuner(RESTORE_NAME, storage, store["uri"], space)
    client = MlflowClient(store["uri"])
    before = {
        r.data.tags["ltsweep.trial_id"]: (r.info.status, r.info.run_id) for r in runs_of(client, RESTORE_NAME, "trial")
    }
    exp_dir = storage / RESTORE_NAME
    assert tune.Tuner.can_restore(str(exp_dir))
    second = tune.Tuner.restore(
        str(exp_dir), trainable=tune.with_resources(synthetic_trial, {"cpu": 1.0}), resume_errored=True
    ).fit()
    return {"first": first, "second": second, "before": before, "flag": flag}


@pytest.mark.slow
def test_restore_continues_runs_without_duplicates(restored_sweep, store):
    first, second = restored_sweep["first"], restored_sweep["second"]
    assert restored_sweep["flag"].exists() and len(first.errors) == 1  # really interrupted
    assert sorted(status for status, _ in restored_sweep["before"].values()) == ["FAILED", "FINISHED"]
    assert not second.errors
    client = MlflowClient(store["uri"])
    assert len(runs_of(client, RESTORE_NAME, "sweep")) == 1
    parent = runs_of(client, RESTORE_NAME, "sweep")[0]
    assert parent.info.status == "FINISHED"
    trials = runs_of(client, RESTORE_NAME, "trial")
    ids = [r.data.tags["ltsweep.trial_id"] for r in trials]
    assert len(ids) == len(set(ids)) == 2  # exactly one run per trial
    assert set(ids) == {r.metrics["trial_id"] for r in second}
    # the same runs were continued (same run ids), none left RUNNING, all nested under the one parent
    assert {r.data.tags["ltsweep.trial_id"]: r.info.run_id for r in trials} == {
        k: v[1] for k, v in restored_sweep["before"].items()
    }
    for r in trials:
        assert r.info.status == "FINISHED"
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id
        cfg = {"lam": float(r.data.params["lam"]), "xi": 0.5}
        assert_history(client, r.info.run_id, cfg, [1, 2, 3])  # resumed from its step-1 checkpoint: no repeats


# ---------------------------------------------------------------------------------------------------------------
CONCURRENT_NAME = "concurrent-sweep"
N_CONCURRENT, N_REPORTS = 8, 30


@pytest.fixture(scope="module")
def concurrent_sweep(store, ray_session):
    barrier = store["root"] / "barrier"
    barrier.mkdir()
    results = run_tuner(
        CONCURRENT_NAME,
        store["root"],
        store["uri"],
        {
            "lam": tune.grid_search([0.0, 0.25, 0.5, 0.75]),
            "xi": tune.grid_search([0.2, 0.6]),
            "reports": N_REPORTS,
            "sha": "c" * 64,
            "checkpoint": False,
            "barrier_dir": str(barrier),
            "barrier_n": N_CONCURRENT,
        },
        resources=0.25,
        max_concurrent=N_CONCURRENT,
        reuse_actors=False,
    )
    return {"results": results, "barrier": barrier}


@pytest.mark.slow
def test_eight_concurrent_trials_lose_no_metric(concurrent_sweep, store, caplog):
    results = concurrent_sweep["results"]
    assert not results.errors
    assert len(os.listdir(concurrent_sweep["barrier"])) == N_CONCURRENT  # all 8 were running at the same time
    client = MlflowClient(store["uri"])
    trials = runs_of(client, CONCURRENT_NAME, "trial")
    assert len(trials) == N_CONCURRENT
    for r in trials:
        assert r.info.status == "FINISHED"
        cfg = {"lam": float(r.data.params["lam"]), "xi": float(r.data.params["xi"])}
        assert_history(client, r.info.run_id, cfg, list(range(1, N_REPORTS + 1)))
    assert "database is locked" not in caplog.text


@pytest.mark.slow
def test_compare_two_sweeps_prints_both_and_writes_png(restored_sweep, concurrent_sweep, store, tmp_path, capsys):
    png = tmp_path / "cmp" / "compare.png"
    rc = cli.main(["compare", RESTORE_NAME, CONCURRENT_NAME, "--tracking-uri", store["uri"], "--out", str(png)])
    out = capsys.readouterr().out
    assert rc == 0
    assert RESTORE_NAME in out and CONCURRENT_NAME in out
    # best trials: the largest λ (and ξ) of each sweep, at its last iteration
    best_restore = expected_metrics({"lam": 0.5, "xi": 0.5}, 3)
    best_conc = expected_metrics({"lam": 0.75, "xi": 0.6}, N_REPORTS)
    lines = {l.split()[0]: l for l in out.splitlines() if l.split() and l.split()[0] in (RESTORE_NAME, CONCURRENT_NAME)}
    for name, best in ((RESTORE_NAME, best_restore), (CONCURRENT_NAME, best_conc)):
        for key in ("AP", "APr", "APc", "APf"):
            assert f"{best[key]:.3f}" in lines[name], (name, key, lines[name])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(png) as im:
        assert im.size[0] > 300 and im.size[1] > 200
    assert [p.name for p in png.parent.iterdir()] == ["compare.png"]  # no temp file left behind

    rc = cli.main(["compare", "no-such-sweep", "--tracking-uri", store["uri"], "--out", str(png)])
    err = capsys.readouterr().err
    assert rc == 2 and "no-such-sweep" in err and RESTORE_NAME in err


# ---------------------------------------------------------------------------------------------------------------
# no Ray needed
def test_log_pretrain_run_is_idempotent(store, tmp_path):
    uri = store["uri"]
    assert uri == f"sqlite:///{store['root'].resolve()}/mlflow.db"
    pc = {1: 0.0, 2: 0.25, 3: 0.5}
    a = log_pretrain_run(
        uri, "pre", "e" * 64, {"epochs": 2, "stage1": {"lr": 0.02}}, {"AP": 0.2, "per_class": pc}, tmp_path / "ck"
    )
    b = log_pretrain_run(
        uri, "pre", "e" * 64, {"epochs": 2, "stage1": {"lr": 0.02}}, {"AP": 0.2, "per_class": pc}, tmp_path / "ck"
    )
    c = log_pretrain_run(uri, "pre", "f" * 64, {"epochs": 3}, {"AP": 0.3}, None)
    assert a == b != c
    client = MlflowClient(uri)
    runs = runs_of(client, "pre", "pretrain")
    assert sorted(r.data.tags["ltsweep.pretrain_sha256"] for r in runs) == ["e" * 64, "f" * 64]
    run = client.get_run(a)
    assert run.info.status == "FINISHED" and run.data.params["stage1.lr"] == "0.02"
    assert run.data.metrics["AP"] == 0.2
    assert {x.path for x in client.list_artifacts(a)} == {
        "per_class_ap.json",
        "per_class_ap.csv",
        "ap_by_frequency.png",
    }
    # artifacts of a local store live beside the database, not in the current directory
    assert (store["root"] / "mlartifacts" / "pre").is_dir() and not Path("mlruns").exists()


class FakeTrial:
    """Just what the callback reads from a Tune Trial."""

    def __init__(self, trial_id, config):
        self.trial_id, self.config, self.status, self.last_result = trial_id, config, "RUNNING", {}

    def __str__(self):
        return f"fake_{self.trial_id}"


def test_parent_run_is_per_sweep_instance_and_survives_pickling(store):
    """Tune pickles callbacks into tuner.pkl: the unpickled copy (Tuner.restore) continues the same parent run and
    trial runs; a new sweep with the same name gets its own parent run."""
    import pickle

    uri = store["uri"]
    cb = MLflowSweepCallback(uri, "same-name", {"a": 1}, ["lam"])
    restored = pickle.loads(pickle.dumps(cb))
    cb.setup()
    t = FakeTrial("t1", {"lam": 0.5})
    cb.on_trial_start(0, [t], t)
    cb.on_trial_result(0, [t], t, {"training_iteration": 1, "AP": 0.1})
    restored.setup()
    restored.on_trial_start(0, [t], t)
    restored.on_trial_result(0, [t], t, {"training_iteration": 2, "AP": 0.2})
    assert restored.parent_run_id == cb.parent_run_id
    assert restored.trial_run_id("t1") == cb.trial_run_id("t1")
    other = MLflowSweepCallback(uri, "same-name", {"a": 1}, ["lam"])
    other.setup()
    assert other.parent_run_id != cb.parent_run_id
    client = MlflowClient(uri)
    assert len(runs_of(client, "same-name", "sweep")) == 2
    assert len(runs_of(client, "same-name", "trial")) == 1
    hist = client.get_metric_history(cb.trial_run_id("t1"), "AP")
    assert sorted((m.step, m.value) for m in hist) == [(1, 0.1), (2, 0.2)]


def test_callback_pickled_before_the_writer_existed_continues_its_runs(store):
    """A tuner.pkl written by an older ltsweep holds the callback's own fields (no writer): restoring it rebuilds the
    writer with the same sweep uid, so the sweep continues its parent run."""
    import pickle

    uri = store["uri"]
    cb = MLflowSweepCallback(uri, "old-pickle", {"a": 1}, ["lam"])
    cb.setup()
    old = MLflowSweepCallback.__new__(MLflowSweepCallback)
    old.__setstate__(
        {
            "tracking_uri": uri,
            "sweep_name": "old-pickle",
            "sweep_params": {"a": 1},
            "searched_keys": ["lam"],
            "val_annotations": None,
            "sweep_uid": cb.writer.sweep_uid,
        }
    )
    restored = pickle.loads(pickle.dumps(old))
    restored.setup()
    assert restored.parent_run_id == cb.parent_run_id
    assert len(runs_of(MlflowClient(uri), "old-pickle", "sweep")) == 1
