"""`ray job submit` of a tiny sweep to a real two-node local cluster (`ray start` with token auth), as in the README.

The test starts a head node and a second node (`ray start --address=<head>`, its own ports, worker-port range and
--temp-dir, and the only node with the custom resource `node2`) from this venv's `ray` (so the cluster's, and the
job's, Python is the venv's), submits `python -m pipelines sweep <tiny config>` with `--working-dir .` (the
repository root) and `resources.custom: {node2: 0.5}`, waits for the job, and checks that it SUCCEEDED, that its
MLflow runs exist, and (from Ray's state API) that every trial actor and the stage-1 task ran on the second node, the
trials restoring the stage-1 checkpoint from the shared storage_path. The cluster is always stopped afterwards.

It runs in CI. Locally it can be skipped with LTSWEEP_SKIP_CLUSTER=1 (ignored when CI=true).

Teardown stops exactly this cluster: every process whose command line names one of its nodes' private --temp-dirs,
plus their descendants (the job's driver). Plain `ray stop` would kill every Ray process on the machine, including other
users' sessions, so it is only added as a last safety net in CI, where the machine is ours.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml
from local_cluster import RAY, cluster_env, free_port, node_ports, stop_cluster  # the nodes of a local cluster

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
SKIP = os.environ.get("LTSWEEP_SKIP_CLUSTER") == "1" and os.environ.get("CI") != "true"


def _run(cmd: list[str], env: dict, timeout: float, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, timeout=timeout, capture_output=True, text=True, **kw)


def _get(address: str, token: str, path: str, timeout: float = 30):
    req = urllib.request.Request(address + path, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def _alive_nodes(address: str, token: str) -> list[dict]:
    """The cluster's ALIVE nodes from the state API: node_id, resources_total, ..."""
    data = _get(address, token, "/api/v0/nodes?limit=100&detail=true")["data"]["result"]["result"]
    return [n for n in data if n["state"] == "ALIVE"]


@pytest.fixture(scope="module")
def cluster():
    if SKIP:
        pytest.skip("LTSWEEP_SKIP_CLUSTER=1: the `ray job submit` cluster test is skipped locally (never in CI)")
    env = cluster_env()
    ray = RAY
    # 1. a token (kept in ~/.ray/auth_token; an existing one is reused)
    out = _run([ray, "get-auth-token", "--generate"], env, 120)
    assert out.returncode == 0, out.stderr
    token = out.stdout.strip()
    assert token
    # 2. the head node, with token auth, the dashboard on 127.0.0.1, 1 CPU and no `node2` resource. Each node has its
    #    own short temp dir (unix socket paths must stay < 108 bytes) that identifies its processes for the teardown.
    temp_dir = tempfile.mkdtemp(prefix="ltsray-", dir="/tmp")
    temp_dir2 = tempfile.mkdtemp(prefix="ltsray2-", dir="/tmp")
    dash, gcs = free_port(), free_port()
    start = [
        ray,
        "start",
        "--head",
        "--port",
        str(gcs),
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(dash),
        "--num-cpus",
        "1",
        "--temp-dir",
        temp_dir,
        "--ray-client-server-port",
        str(free_port()),
        *node_ports(),
        "--disable-usage-stats",
    ]
    # 3. the second node on this host: 2 CPUs and the custom resource `node2` that the sweep's trials request
    start2 = [
        ray,
        "start",
        "--address",
        f"127.0.0.1:{gcs}",
        "--num-cpus",
        "2",
        "--resources",
        '{"node2": 1}',
        "--temp-dir",
        temp_dir2,
        *node_ports(),
        "--disable-usage-stats",
    ]
    env_token = {**env, "RAY_AUTH_MODE": "token"}
    try:
        for cmd in (start, start2):
            out = _run(cmd, env_token, 300)
            assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        address = f"http://127.0.0.1:{dash}"
        # 4. wait (bounded) until the dashboard's API answers an authenticated request and lists both nodes
        deadline = time.monotonic() + 180
        while True:
            try:
                nodes = _alive_nodes(address, token)
                if len(nodes) == 2:
                    break
            except (urllib.error.URLError, OSError, KeyError, ValueError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"Ray dashboard at {address} not ready (or not 2 nodes) after 180 s")
            time.sleep(0.5)
        node2 = [n["node_id"] for n in nodes if "node2" in n["resources_total"]]
        assert len(node2) == 1, nodes
        yield {
            "address": address,
            "env": env_token,
            "token": token,
            "ray": ray,
            "temp_dir": temp_dir,
            "node2": node2[0],
        }
    finally:
        stop_cluster(temp_dir2)
        stop_cluster(temp_dir)
        if os.environ.get("CI") == "true":
            _run([ray, "stop", "--force"], env, 120)
        shutil.rmtree(temp_dir2, ignore_errors=True)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    """A 2-trial hybrid sweep (1 stage-1 epoch, 2 stage-2 epochs) on a ~50-image synthetic benchmark at 64 px."""
    from faults.common import TINY
    from lt_models.data.synthetic.generate import generate_benchmark

    root = tmp_path_factory.mktemp("cluster_job")
    generate_benchmark(root / "data", preset=TINY, seed=0)
    name = f"cluster-job-{uuid.uuid4().hex[:6]}"
    cfg = {
        "name": name,
        "data": {
            "train": str(root / "data/train.json"),
            "val": str(root / "data/val.json"),
            "hierarchy": str(root / "data/hierarchy.json"),
        },
        "model": {"backbone": "tiny", "image_size": 64},
        "stage1": {"epochs": 1, "batch_size": 4, "lr": 0.02, "warmup": 5},
        "stage2": {
            "epochs": 2,
            "batch_size": 4,
            "lr": 0.01,
            "warmup": 2,
            "samples_per_epoch": 16,
            "loss": "acsl",
            "xi": 0.5,
        },
        "eval": {"every": 1},
        "resources": {"cpus_per_trial": 1, "custom": {"node2": 0.5}},  # only the second node has `node2`
        "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2, "max_t": 2},
        "search": {"num_samples": 1, "max_concurrent_trials": 2},
        "space": {"lam": {"grid": [0.0, 1.0]}},
        "run": {"storage_path": str(root / "results"), "max_failures": 0, "checkpoints_to_keep": 1},
    }
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return {"config": path, "name": name, "results": root / "results"}


def test_ray_job_submit_runs_a_sweep_with_mlflow_runs(cluster, tiny_sweep):
    from mlflow import MlflowClient

    env = {**cluster["env"], "RAY_API_SERVER_ADDRESS": cluster["address"]}
    # the cluster refuses requests without the token
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(cluster["address"] + "/api/jobs/", timeout=10)
    assert exc.value.code == 401

    job_id = f"ltsweep-test-{uuid.uuid4().hex[:8]}"
    submit = [
        cluster["ray"],
        "job",
        "submit",
        "--submission-id",
        job_id,
        "--working-dir",
        ".",
        "--",
        "python",
        "-m",
        "pipelines",
        "sweep",
        str(tiny_sweep["config"]),
    ]
    out = _run(submit, env, 900, cwd=REPO)  # blocks (tailing the job's logs) until the job ends
    logs = out.stdout[-6000:] + out.stderr[-3000:]
    req = urllib.request.Request(
        f"{cluster['address']}/api/jobs/{job_id}", headers={"Authorization": f"Bearer {cluster['token']}"}
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        info = json.loads(r.read())
    assert info["status"] == "SUCCEEDED", f"job {job_id}: {info.get('status')} {info.get('message')}\n{logs}"
    assert out.returncode == 0, logs
    assert "Uploading package" in logs  # --working-dir . went up as a package (.venv, data, results ignored)

    # the job's MLflow runs: one parent, one nested run per trial with metrics at each evaluation, one stage-1 run
    db = tiny_sweep["results"] / "mlflow.db"
    assert db.is_file(), logs
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name(tiny_sweep["name"])
    assert exp is not None
    runs = client.search_runs([exp.experiment_id])
    by_role: dict[str, list] = {}
    for r in runs:
        by_role.setdefault(r.data.tags.get("ltsweep.role"), []).append(r)
    assert len(by_role["sweep"]) == 1 and by_role["sweep"][0].info.status == "FINISHED"
    assert len(by_role["pretrain"]) == 1
    trials = by_role["trial"]
    assert len(trials) == 2
    parent_id = by_role["sweep"][0].info.run_id
    for r in trials:
        assert r.info.status == "FINISHED"
        assert r.data.tags["mlflow.parentRunId"] == parent_id
        assert r.data.params["pretrain_sha256"] == by_role["pretrain"][0].data.tags["ltsweep.pretrain_sha256"]
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "AP")]
        assert steps == list(range(1, int(r.data.tags["ltsweep.iterations"]) + 1)) and steps
        assert {a.path for a in client.list_artifacts(r.info.run_id)} >= {"per_class_ap.csv", "ap_by_frequency.png"}
    assert "sweep_report.html" in {a.path for a in client.list_artifacts(parent_id)}

    # every trial actor and the stage-1 task ran on the second node (the only one with `node2`); the trials restored
    # stage 1 from the shared storage_path (one content-addressed checkpoint dir, named by its sha256)
    def listed(kind: str) -> list[dict]:
        return _get(cluster["address"], cluster["token"], f"/api/v0/{kind}?limit=10000&detail=true")["data"]["result"][
            "result"
        ]

    trial_actors = [a for a in listed("actors") if a["class_name"] == "ImplicitFunc"]  # Tune's function trainable
    trial_tasks = [t for t in listed("tasks") if t["name"].startswith("train_trial.")]
    stage1 = [t for t in listed("tasks") if t["name"] == "_train_stage1_task"]
    assert trial_actors and {a["node_id"] for a in trial_actors} == {cluster["node2"]}, trial_actors
    assert {t["name"] for t in trial_tasks} >= {"train_trial.train"}, trial_tasks
    assert {t["node_id"] for t in trial_tasks} == {cluster["node2"]}, trial_tasks
    assert [t["node_id"] for t in stage1] == [cluster["node2"]], stage1
    pretrain_dirs = [p.name for p in (tiny_sweep["results"] / "pretrain").iterdir() if p.is_dir()]
    assert pretrain_dirs == [by_role["pretrain"][0].data.tags["ltsweep.pretrain_sha256"]]
    assert {r.data.params["pretrain_sha256"] for r in trials} == set(pretrain_dirs)
