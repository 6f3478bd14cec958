"""Multi-worker trials (`resources.workers_per_trial`): the config checks, and a real Ray Tune sweep whose trial (and
stage 1) trains on 2 Ray Train workers (gloo, CPU).

One sweep on the tiny synthetic benchmark: stage 1 and one stage-2 trial, each on `workers_per_trial: 2`. A
wrapper around the production trainable swaps in a recording worker loop (shipped to the Ray Train workers by
value) that logs, per optimizer step and rank, the images of the batch and a digest of every parameter, and that
fails rank 1 once, early in the second epoch (after the first checkpoint), so Tune retries the trial. Checked:
  (a) in every epoch the two ranks trained on disjoint shards that together are the whole epoch;
  (b) after every step both ranks hold identical parameters;
  (c) the AP the trial reported equals a single-process evaluation of its saved checkpoint;
  (d) the retried trial resumed from its last checkpoint (epoch 1), and Tune saw each evaluation once;
plus the `workers_per_trial` MLflow param and Tune checkpoints in the one-process format.
"""

import hashlib
import json
import os
import socket
import sys
from collections import Counter
from pathlib import Path

import pytest
import ray
import ray.cloudpickle
import torch
import yaml
from test_sweep_e2e import TINY, trial_results

from lt_models.data.synthetic.generate import generate_benchmark
from lt_models.engine.distributed import eval_batches
from lt_models.errors import ConfigError
from pipelines.config import identity
from pipelines.config.load import load_experiment_config, parse_config
from pipelines.config.spec import compute
from pipelines.tune import stage1 as pretrain
from pipelines.tune import sweep
from pipelines.tune import workers as train_workers
from pipelines.tune.cluster import trial_resources

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import this module by name

EPOCHS = 2


# ---- config: resources.workers_per_trial / cpus_per_worker / gpus_per_worker (fast) ------------------------------


def _cfg(**resources):
    return parse_config(
        {"name": "x", "data": {"train": "t.json", "val": "v.json"}, "resources": resources},
        source="x.yaml",
        check_data=False,
    )


def _error(**resources) -> str:
    with pytest.raises(ConfigError) as exc:
        _cfg(**resources)
    return str(exc.value)


def test_workers_per_trial_resources_are_checked_once_with_the_field_and_the_fix():
    assert _cfg().resources.workers_per_trial == 1 and not _cfg().resources.distributed
    assert _error(workers_per_trial=8, gpus_per_trial=8).startswith(
        "x.yaml: resources: gpus_per_trial = 8 with workers_per_trial = 8: a multi-worker trial's GPUs belong to its "
        "workers; set gpus_per_worker: 1 and gpus_per_trial: 0"
    )
    assert "resources: cpus_per_worker is ignored: workers_per_trial is 1" in _error(cpus_per_worker=2)
    assert "resources: gpus_per_worker is ignored" in _error(gpus_per_worker=1)
    msg = _error(workers_per_trial=2, gpus_per_worker=0.5)
    assert msg.startswith("x.yaml: resources.gpus_per_worker: each worker drives exactly one GPU") and "got 0.5" in msg
    assert "resources.workers_per_trial" in _error(workers_per_trial=0)
    for cfg in (_cfg(), _cfg(workers_per_trial=2, cpus_per_worker=3, gpus_per_worker=1)):  # as Ray tasks get it
        assert type(cfg).model_validate_json(cfg.model_dump_json()) == cfg
    assert "resources.cpus_per_worker" in _error(workers_per_trial=2, cpus_per_worker=0)


def test_a_multi_worker_trial_asks_tune_for_its_driver_and_ray_train_for_its_workers():
    one = _cfg(cpus_per_trial=8, gpus_per_trial=1)
    assert trial_resources(one) == {"cpu": 8.0, "gpu": 1.0}  # unchanged: the trial trains in its own process
    assert compute(one) == ("cuda" if torch.cuda.is_available() else "cpu", 8)
    cfg = _cfg(cpus_per_trial=0.5, workers_per_trial=8, cpus_per_worker=4, gpus_per_worker=1, custom={"node2": 1})
    assert trial_resources(cfg) == {"cpu": 0.5, "gpu": 0.0, "node2": 1.0}  # the Train driver only
    scaling = train_workers.scaling_config(cfg)
    assert scaling.num_workers == 8 and scaling.use_gpu
    assert scaling.resources_per_worker == {"CPU": 4.0, "GPU": 1.0, "node2": 1.0}
    # GPU workers train on CUDA even when their driver's node has no GPU (here: this CPU machine), and the workers
    # then take their own device from Ray Train
    assert compute(cfg, worker=True) == ("cuda", 4)
    assert compute(_cfg(workers_per_trial=2, cpus_per_worker=3), worker=True) == ("cpu", 3)
    cpu = train_workers.scaling_config(_cfg(workers_per_trial=2))
    assert not cpu.use_gpu and cpu.resources_per_worker == {"CPU": 1.0}


def test_stage1_key_tells_a_multi_worker_stage1_from_a_one_process_one(tmp_path):
    train = tmp_path / "t.json"
    train.write_text("{}")
    (tmp_path / "images").mkdir()
    raw = {"name": "x", "data": {"train": str(train), "val": str(train)}}
    one = parse_config(raw, check_data=False)
    two = parse_config(dict(raw, resources={"workers_per_trial": 2}), check_data=False)
    assert "workers_per_trial" not in identity.stage1_identity(one)  # existing caches keep their keys
    assert identity.stage1_identity(two)["workers_per_trial"] == 2  # total batch 2 x batch_size: other weights
    assert identity.stage1_key(one) != identity.stage1_key(two)


def test_evaluation_batches_are_the_single_process_batches_dealt_round_robin():
    single = eval_batches(10, 3, 0, 1)
    assert single == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert eval_batches(10, 3, 0, 2) == [single[0], single[2]] and eval_batches(10, 3, 1, 2) == [single[1], single[3]]
    assert eval_batches(2, 3, 1, 2) == []  # a rank may get no batch; it still takes part in the gather


def test_a_workers_divergence_or_input_error_reaches_the_trial_as_itself():
    import pickle

    from ray.exceptions import RayTaskError
    from ray.train import WorkerGroupError

    from lt_models.engine.loop import NonFiniteLossError
    from lt_models.errors import AnnotationError

    nan = NonFiniteLossError(7, 1, {"loss_classifier": float("nan")}, 0.01)
    back = pickle.loads(pickle.dumps(nan))  # how it travels from a Ray Train worker
    assert type(back) is NonFiniteLossError and (back.iteration, back.epoch, back.lr) == (7, 1, 0.01)
    assert str(back) == str(nan)
    wrapped = RayTaskError("train", "traceback", WorkerGroupError("rank 1 failed", {1: back}))
    assert train_workers._worker_error(wrapped) is back  # -> TrialDivergedError and its marker in the trainable
    bad = AnnotationError("x.json: image 3: bad box; fix the file")
    assert train_workers._worker_error(WorkerGroupError("rank 0 failed", {0: bad})) is bad  # -> exit code 2
    other = WorkerGroupError("rank 0 failed", {0: RuntimeError("boom")})
    assert train_workers._worker_error(other) is other


# ---- a real 2-worker sweep (slow) --------------------------------------------------------------------------------


def recording_loop(config):
    """`train_workers.worker_loop` with a recorder around the engine's epochs, run on each Ray Train worker: one
    JSON line per optimizer step in <data>/../records/rank<r>.jsonl; rank 1 of the first attempt fails once after
    its first step of the second epoch."""
    import ray.train

    from lt_models.engine import loop as engine

    rank = ray.train.get_context().get_world_rank()
    records = Path(config["spec"]["train_ann"]).parents[1] / "records"
    attempt = "resumed" if config.get("resume") is not None else "first"
    stage = config["spec"]["stage"]
    real = engine.train_one_epoch

    def hooked(model, optimizer, data_loader, device, epoch, **kw):
        batch = {}

        class Recorded:
            def __len__(self):
                return len(data_loader)

            def __iter__(self):
                for images, targets in data_loader:
                    batch["ids"] = [int(t["image_id"]) for t in targets]
                    yield images, targets

        real_step = optimizer.step

        def step(*args, **kwargs):
            out = real_step(*args, **kwargs)
            digest = hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes() for p in model.parameters()))
            line = {
                "stage": stage,
                "attempt": attempt,
                "rank": rank,
                "epoch": epoch,
                "ids": batch["ids"],
                "params": digest.hexdigest(),
            }
            with open(records / f"rank{rank}.jsonl", "a") as f:
                f.write(json.dumps(line) + "\n")
            if stage == "stage2" and epoch == 1 and rank == 1 and attempt == "first":
                try:
                    os.close(os.open(records / "fault.claim", os.O_CREAT | os.O_EXCL))  # once
                except FileExistsError:
                    return out
                raise RuntimeError("injected fault on rank 1 in epoch 2")
            return out

        optimizer.step = step
        try:
            return real(model, optimizer, Recorded(), device, epoch, **kw)
        finally:
            del optimizer.step

    engine.train_one_epoch = hooked
    try:
        train_workers.worker_loop(config)  # the real loop: only the trial's process has the recorder swapped in
    finally:
        engine.train_one_epoch = real


def recording_trial(config, experiment, stage1=None, shared=None):
    """The production trainable, with the recording loop on its Ray Train workers."""
    from pipelines.tune import trainable as tr
    from pipelines.tune import workers as tw

    real = tw.worker_loop
    tw.worker_loop = recording_loop
    try:
        tr.train_trial(config, experiment, stage1, shared)
    finally:
        tw.worker_loop = real


@pytest.fixture(scope="module")
def two_worker_sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    generate_benchmark(root / "data", preset=TINY, seed=0)
    (root / "records").mkdir()
    raw = {
        "name": "ddp",
        "seed": 0,
        "data": {
            "train": str(root / "data/train.json"),
            "val": str(root / "data/val.json"),
            "hierarchy": str(root / "data/hierarchy.json"),
        },
        "model": {"backbone": "tiny", "image_size": 64},
        "stage1": {"epochs": 1, "batch_size": 4, "lr": 0.02, "warmup": 5},
        "stage2": {
            "epochs": EPOCHS,
            "batch_size": 4,
            "lr": 0.01,
            "warmup": 2,
            "sampler": "nonbalance",
            "loss": "concurrent_softmax",
        },
        "resources": {"cpus_per_trial": 1, "workers_per_trial": 2, "cpus_per_worker": 1},
        "scheduler": {"type": "fifo"},
        "search": {"configs": [{"loss": "concurrent_softmax"}]},
        "run": {"storage_path": str(root / "results"), "max_failures": 1, "checkpoints_to_keep": 1},
    }
    (root / "ddp.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_experiment_config(root / "ddp.yaml")
    # the Train driver (1 CPU) and its 2 workers (1 CPU each): 3 logical CPUs on this 2-core machine
    # with the dashboard: Ray Train V2's placement-group cleaner asks the State API whether the controller lives
    ray.init(num_cpus=3, include_dashboard=True, dashboard_port=_free_port(), log_to_driver=False)
    try:
        # stage 1 in this process (as `ltsweep train` trains it; a sweep runs the same function in a Ray task), so
        # that its Ray Train workers get the recording loop too; the sweep then reuses it
        real, train_workers.worker_loop = train_workers.worker_loop, recording_loop
        try:
            stage1 = pretrain.ensure_stage1(cfg, use_ray=False)
        finally:
            train_workers.worker_loop = real
        assert stage1.trained
        summary = sweep.run_sweep(cfg, trainable_fn=recording_trial, verbose=0, register=False)
    finally:
        ray.shutdown()
    lines = [
        json.loads(line) for r in (0, 1) for line in (root / "records" / f"rank{r}.jsonl").read_text().splitlines()
    ]
    assert not summary.stage1[0].trained  # the sweep's trials restored the 2-worker stage 1
    return cfg, summary, lines


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _steps(lines, **match):
    return [x for x in lines if all(x[k] == v for k, v in match.items())]


@pytest.mark.slow
def test_ranks_train_on_disjoint_shards_of_each_epoch(two_worker_sweep):
    cfg, _, lines = two_worker_sweep
    n = len(json.loads(Path(cfg.data.train).read_text())["images"])
    padded = -(-n // 2) * 2  # each rank gets ceil(n / 2) draws: the epoch padded by wrap-around (samplers.shard)
    checked = 0
    for stage, attempt, epoch in {(x["stage"], x["attempt"], x["epoch"]) for x in lines}:
        if (stage, attempt, epoch) == ("stage2", "first", 1):
            continue  # the epoch the injected fault cut short
        ids = [
            Counter(i for x in _steps(lines, stage=stage, attempt=attempt, epoch=epoch, rank=r) for i in x["ids"])
            for r in (0, 1)
        ]
        assert sum(ids[0].values()) == sum(ids[1].values()) == padded // 2
        assert len(set(ids[0]) & set(ids[1])) <= padded - n  # only the wrap-around padding repeats an image
        assert len(set(ids[0]) | set(ids[1])) >= n - (padded - n)  # non-balance: every image of the epoch is seen
        checked += 1
    assert checked == 1 + EPOCHS  # stage 1's epoch, stage 2's epoch 0 (first attempt), epoch 1 (resumed)


@pytest.mark.slow
def test_parameters_are_identical_on_both_ranks_after_every_step(two_worker_sweep):
    _, _, lines = two_worker_sweep
    by_step: dict = {}
    for x in lines:
        key = (x["stage"], x["attempt"], x["epoch"])
        by_step.setdefault(key, {0: [], 1: []})[x["rank"]].append(x["params"])
    for key, ranks in by_step.items():
        steps = min(len(ranks[0]), len(ranks[1]))
        assert steps > 0 and ranks[0][:steps] == ranks[1][:steps], key
        assert len(set(ranks[0])) == len(ranks[0])  # and every step changed them


@pytest.mark.slow
def test_retried_trial_resumes_from_its_last_checkpoint(two_worker_sweep):
    _, summary, lines = two_worker_sweep
    resumed_epochs = sorted({x["epoch"] for x in _steps(lines, stage="stage2", attempt="resumed")})
    assert resumed_epochs == [1]  # epoch 0 was not trained again: the retry restored the epoch-1 checkpoint
    assert _steps(lines, stage="stage2", attempt="first", epoch=1, rank=1)  # the fault came after a step there
    [trial] = summary.trials
    results = trial_results(trial.path)
    assert [r["epoch"] for r in results] == [1, 2]  # Tune saw each evaluation once, across the retry
    assert [r["training_iteration"] for r in results] == [1, 2]
    steps_per_epoch = len(_steps(lines, stage="stage2", attempt="resumed", epoch=1, rank=0))
    assert trial.error is None and results[-1]["iteration"] == EPOCHS * steps_per_epoch


@pytest.mark.slow
def test_reported_ap_equals_a_single_process_evaluation_of_the_checkpoint(two_worker_sweep):
    from lt_models import engine
    from lt_models.data.datasets import LVISDetection
    from lt_models.engine import build
    from lt_models.engine.inference import load_detector
    from lt_models.engine.spec import TrainSpec

    _, summary, _ = two_worker_sweep
    [trial] = summary.trials
    reported = trial_results(trial.path)[-1]
    ckpt = max(Path(trial.path).glob("checkpoint_*"))  # Tune's latest checkpoint of the trial: the last evaluation
    assert json.loads((ckpt / "metrics.json").read_text())["epoch"] == reported["epoch"] == EPOCHS
    assert sorted(os.listdir(ckpt)) == [
        "checkpoint.pt",
        "matches.npz",
        "metrics.json",
        "replicates.npz",
        "run.json",
        "spec.json",
    ]
    spec = TrainSpec.from_dict(json.loads(Path(ckpt, "spec.json").read_text()))
    train_ds = LVISDetection(spec.train_ann, hierarchy_file=spec.hierarchy_file, train=True)
    val_ds = LVISDetection(spec.val_ann, hierarchy_file=spec.hierarchy_file, train=False)
    model, _ = load_detector(ckpt)
    loader = build.val_loader(val_ds, spec, torch.device("cpu"), 0, 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as on the workers (cpus_per_worker: 1)
    try:
        res = engine.evaluate(
            model,
            loader,
            val_ds,
            spec.val_ann,
            torch.device("cpu"),
            frequency=dict(zip(train_ds.cat_ids, train_ds.frequency)),
        )
    finally:
        torch.set_num_threads(threads)
    assert reported["AP"] > 0
    for key in ("AP", "AP50", "APr", "APc", "APf"):
        assert res[key] == pytest.approx(reported[key], abs=1e-12), key


@pytest.mark.slow
def test_every_trial_run_records_workers_per_trial_in_mlflow(two_worker_sweep):
    from pipelines.mlflow_io.client import open_store
    from pipelines.names import ROLE_TAG, ROLE_TRIAL

    cfg, summary, _ = two_worker_sweep
    client = open_store(summary.tracking_uri)
    exp = client.get_experiment_by_name(cfg.name)
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get(ROLE_TAG) == ROLE_TRIAL]
    assert len(runs) == 1 and runs[0].data.params["workers_per_trial"] == "2"
    assert runs[0].info.status == "FINISHED"
