"""`ltsweep train` with `resources.workers_per_trial: 2`: the run trains on 2 Ray Train workers (gloo) on a local
Ray, exactly as a sweep's trial would, and leaves its last checkpoint in OUT. Before, `ltsweep train` trained such
a config in one process at the per-worker batch with the total batch's lr.

Run as the user runs it: the CLI in a child process (it starts and ends its own Ray)."""

import json
import os
import subprocess
import sys

import pytest
import yaml
from test_sweep_e2e import TINY

from lt_models.data.synthetic.generate import generate_benchmark


@pytest.mark.slow
def test_ltsweep_train_trains_a_multi_worker_config_on_its_workers(tmp_path):
    from lt_models.engine.inference import load_detector

    generate_benchmark(tmp_path / "data", preset=TINY, seed=0)
    raw = {
        "name": "train_ddp",
        "seed": 0,
        "data": {
            "train": str(tmp_path / "data/train.json"),
            "val": str(tmp_path / "data/val.json"),
            "hierarchy": str(tmp_path / "data/hierarchy.json"),
        },
        "model": {"backbone": "tiny", "image_size": 64},
        "stage1": None,
        "stage2": {"epochs": 1, "batch_size": 4, "lr": 0.01, "warmup": 2, "sampler": "nonbalance"},
        "resources": {"workers_per_trial": 2, "cpus_per_worker": 1},
        "run": {"storage_path": str(tmp_path / "results")},
    }
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    env = {**os.environ, "RAY_ADDRESS": ""}  # a local Ray, whatever the caller's environment says
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "train", str(tmp_path / "train.yaml"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "result.json").read_text())
    m = summary["metrics"]
    assert summary["stage"] == "one_stage" and m["epoch"] == 1
    # every step took 4 images on each of the 2 workers (the last step of the epoch may be short): more than one
    # process's 4 a step
    assert 4 * m["iteration"] < m["images"] <= 8 * m["iteration"]
    assert summary["checkpoint"] == str(out / "one_stage" / "checkpoint")
    model, labels = load_detector(out / "one_stage" / "checkpoint")  # rank 0's checkpoint, the one-process format
    assert len(labels) > 1 and sum(p.numel() for p in model.parameters()) > 0
    assert (out / "per_class_ap.csv").is_file()
    assert not list((tmp_path / "results" / "train").glob(".ray_train-*"))  # the Train run's scratch is gone
