"""Multi-worker trials under a scheduler on a cluster that holds one of them at a time.

Each multi-worker trial asks Tune only for its Ray Train driver; Ray Train reserves the workers itself. On a
3-CPU Ray (a 1-CPU driver + 2 workers of 1 CPU each = 3 CPUs per trial) Tune would start a driver per CPU, the
drivers would hold the CPUs the workers need, and nothing would ever train. `ResourcesConfig.trials_that_fit` and
`cluster.concurrent_trials_cap` cap the sweep (and the stage-1 runs of several seeds) at what fits.

Fast: the packing rule on hand-made clusters, the error when nothing fits, and how the cap meets
`search.max_concurrent_trials`. Slow: a real sweep (2 seeds, 2 configurations, `asha_configs`, 2 workers per
trial) in a child process with a time limit, so that a deadlock fails the test instead of hanging it. Checked: it
finishes; stage 1 of both seeds trained; the losing configuration's trials stopped at the first rung, the winning
one's were paused there and resumed from their checkpoints to the end; no Ray Train controller outlived its run.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lt_models.errors import ConfigError
from pipelines.config.load import parse_config
from pipelines.config.resources import ResourcesConfig


def _res(**kw) -> ResourcesConfig:
    return ResourcesConfig(**kw)


# ---- how many multi-worker trials fit at once (fast) --------------------------------------------------------------


def test_trials_that_fit_counts_the_driver_and_every_worker_bundle():
    cpu2 = _res(workers_per_trial=2, cpus_per_worker=1, cpus_per_trial=1)  # 3 CPUs a trial
    assert cpu2.trials_that_fit([{"CPU": 3}]) == 1
    assert cpu2.trials_that_fit([{"CPU": 2}]) == 0
    assert cpu2.trials_that_fit([{"CPU": 8}]) == 2  # 8 // 3
    assert cpu2.trials_that_fit([{"CPU": 2}, {"CPU": 2}]) == 1  # a trial's bundles may sit on different nodes
    half = _res(workers_per_trial=2, cpus_per_worker=1, cpus_per_trial=0.5)
    assert half.trials_that_fit([{"CPU": 5}]) == 2  # 2 x 2.5
    # the papers' preset: 8 one-GPU workers a trial, 1 CPU each; nodes of 8 GPUs and 16 CPUs
    gpu8 = _res(workers_per_trial=8, gpus_per_worker=1, cpus_per_worker=1, cpus_per_trial=1)
    assert gpu8.trials_that_fit([{"CPU": 16, "GPU": 8}]) == 1
    assert gpu8.trials_that_fit([{"CPU": 16, "GPU": 8}] * 2) == 2
    assert gpu8.trials_that_fit([{"CPU": 16, "GPU": 4}] * 2) == 1  # workers spread over two 4-GPU nodes
    assert gpu8.trials_that_fit([{"CPU": 64, "GPU": 7}]) == 0  # CPUs are no use without the eighth GPU
    # a custom resource (pins trials to some nodes) is needed by the driver and by every worker
    pinned = _res(workers_per_trial=2, cpus_per_worker=1, cpus_per_trial=1, custom={"trainer": 1})
    assert pinned.trials_that_fit([{"CPU": 64}, {"CPU": 3, "trainer": 3}]) == 1
    assert pinned.trials_that_fit([{"CPU": 64, "trainer": 2}]) == 0


def test_a_cluster_that_fits_no_trial_is_a_config_error_naming_the_fields(monkeypatch):
    import ray

    from pipelines.tune import cluster

    cfg = parse_config(
        {
            "name": "x",
            "data": {"train": "t.json", "val": "v.json"},
            "resources": {"workers_per_trial": 4, "cpus_per_worker": 1},
        },
        source="x.yaml",
        check_data=False,
    )
    monkeypatch.setattr(
        ray,
        "nodes",
        lambda: [
            {"Alive": True, "Resources": {"CPU": 4.0, "memory": 1e9}},
            {"Alive": False, "Resources": {"CPU": 64.0}},
        ],
    )
    with pytest.raises(ConfigError) as exc:
        cluster.concurrent_trials_cap(cfg)
    msg = str(exc.value)
    assert "workers_per_trial = 4" in msg and "{'CPU': 4.0}" in msg and "lower workers_per_trial" in msg
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": 11.0}}])
    assert cluster.concurrent_trials_cap(cfg) == 2  # 11 // (1 + 4)
    one = parse_config({"name": "x", "data": {"train": "t.json", "val": "v.json"}}, source="x.yaml", check_data=False)
    assert cluster.concurrent_trials_cap(one) is None  # one-process trials: Tune schedules them itself


@pytest.mark.parametrize(
    "wanted, fit, expected, noted",
    [(None, 2, 2, True), (5, 2, 2, True), (1, 2, 1, False), (3, None, 3, False), (None, None, None, False)],
)
def test_the_cap_lowers_max_concurrent_trials_and_says_so(monkeypatch, capsys, wanted, fit, expected, noted):
    from pipelines.tune import cluster

    search = {} if wanted is None else {"max_concurrent_trials": wanted}
    cfg = parse_config(
        {"name": "x", "data": {"train": "t.json", "val": "v.json"}, "search": search}, source="x.yaml", check_data=False
    )
    monkeypatch.setattr(cluster, "concurrent_trials_cap", lambda c: fit)
    assert cluster.max_concurrent(cfg) == expected
    assert ("note: at most" in capsys.readouterr().out) == noted


# ---- a real sweep that only fits one multi-worker trial at a time (slow) ------------------------------------------


def run_scenario(root: Path) -> dict:
    """The sweep, in this (child) process; returns what the test checks."""
    import socket

    import ray
    import yaml
    from ray.util.state import list_actors
    from test_sweep_e2e import TINY, trial_results

    from lt_models.data.synthetic.generate import generate_benchmark
    from pipelines.config.load import load_experiment_config
    from pipelines.tune import sweep

    generate_benchmark(root / "data", preset=TINY, seed=0)
    raw = {
        "name": "ddp_sched",
        "data": {
            "train": str(root / "data/train.json"),
            "val": str(root / "data/val.json"),
            "hierarchy": str(root / "data/hierarchy.json"),
        },
        "model": {"backbone": "tiny", "image_size": 64},
        "stage1": {"epochs": 1, "batch_size": 4, "lr": 0.02, "warmup": 5},
        "stage2": {"epochs": 2, "batch_size": 4, "lr": 0.01, "warmup": 2, "sampler": "nonbalance"},
        "resources": {"cpus_per_trial": 1, "workers_per_trial": 2, "cpus_per_worker": 1},
        "scheduler": {"type": "asha_configs", "grace_period": 1, "reduction_factor": 2},
        "search": {"seeds": [0, 1], "configs": [{"loss": "concurrent_softmax"}, {"loss": "acsl"}]},
        "run": {"storage_path": str(root / "results"), "max_failures": 0, "checkpoints_to_keep": 1},
    }
    (root / "sched.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_experiment_config(root / "sched.yaml")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # 3 logical CPUs: exactly one trial (or one stage-1 run) with its workers
    ray.init(num_cpus=3, include_dashboard=True, dashboard_port=port, log_to_driver=False)
    try:
        summary = sweep.run_sweep(cfg, verbose=0, register=False)
        # this session's own dashboard (other Ray sessions on the machine must not make the lookup ambiguous)
        here = f"http://127.0.0.1:{port}"
        controllers = [a.state for a in list_actors(here, filters=[("class_name", "=", "TrainController")], limit=1000)]
    finally:
        ray.shutdown()
    return {
        "interrupted": summary.interrupted,
        "stage1_trained": sorted(seed for seed, c in summary.stage1.items() if c.trained),
        "trials": [
            {
                "loss": t.config["loss"],
                "seed": t.config["seed"],
                "error": t.error,
                "epochs": [r["epoch"] for r in trial_results(t.path)],
                "iterations": [r["iteration"] for r in trial_results(t.path)],
            }
            for t in summary.trials
        ],
        "controllers": controllers,
    }


@pytest.mark.slow
def test_a_sweep_of_multi_worker_trials_runs_them_one_at_a_time_and_pauses_and_resumes_them(tmp_path):
    proc = subprocess.run(
        [sys.executable, __file__, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=Path(__file__).parent,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "note: at most 1 trial(s) at a time" in proc.stdout
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not out["interrupted"] and out["stage1_trained"] == [0, 1]  # both seeds' stage 1, one after the other
    trials = out["trials"]
    assert len(trials) == 4 and all(t["error"] is None for t in trials)
    by_loss: dict = {}
    for t in trials:
        by_loss.setdefault(t["loss"], []).append(t)
    ends = {loss: sorted(t["epochs"][-1] for t in ts) for loss, ts in by_loss.items()}
    assert sorted(ends.values()) == [[1, 1], [2, 2]]  # one configuration stopped at the rung, one went on
    for t in trials:
        assert t["epochs"] == list(range(1, len(t["epochs"]) + 1))  # a resumed trial went on, never started over
        assert t["iterations"] == sorted(set(t["iterations"]))
    assert out["controllers"] and "ALIVE" not in out["controllers"]  # each Train run's controller went with it


if __name__ == "__main__":  # run as a script: the tests' and benchmarks' modules as conftest.py puts them
    sys.path.insert(0, str(Path(__file__).parent))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    print(json.dumps(run_scenario(Path(sys.argv[1]))), flush=True)
