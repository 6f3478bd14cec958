"""A team's deployment: one `mlflow server` on PostgreSQL with its artifacts in object storage, and sweeps against it.

The servers are real and local: PostgreSQL (Debian's package; `.ci/run` installs it) in a fresh cluster on
127.0.0.1, moto's S3 server (the bucket), and `mlflow server --backend-store-uri postgresql://…
--artifacts-destination s3://…`. Two sweeps run at once, each a `python -m pipelines sweep` driver with its own Ray,
both tracking to the server. Checked: nothing is lost or doubled (one parent, one stage-1 run and one run per
trial in each experiment, all FINISHED), the nested runs and the sweep metrics, the artifacts are objects in the
bucket, the registered model loads from `models:/…` and predicts, and `ltsweep compare` and `ltsweep confirm` work
against the server.
"""

import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_object_storage import BUCKET, S3, _free_port, s3  # noqa: F401 (the S3 server fixture)

from faults.common import REPO, TINY, Workspace, config_dict
from faults.processes import Driver
from lt_models.data.synthetic.generate import generate_benchmark

pytestmark = pytest.mark.slow


def _pg_tool(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))), None)
    if found is None:
        pytest.fail(f"PostgreSQL's {name} is not installed: `apt-get install postgresql` (.ci/run installs it)")
    return found


@pytest.fixture(scope="module")
def postgres():
    """A fresh PostgreSQL cluster on 127.0.0.1 (trust auth), database `mlflow`. PostgreSQL refuses to run as
    root, so under root the `postgres` system user runs it, in a directory it owns."""
    root = Path(tempfile.mkdtemp(prefix="ltsweep-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port, data = _free_port(), root / "data"
    opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run([*as_user, _pg_tool("initdb"), "-D", str(data), "-U", "ltsweep", "-A", "trust", "--no-sync"],
                   check=True, capture_output=True)  # fmt: skip
    subprocess.run([*as_user, _pg_tool("pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-o", opts, "-w", "start"],
                   check=True, capture_output=True)  # fmt: skip
    try:
        subprocess.run([_pg_tool("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "ltsweep", "mlflow"],
                       check=True, capture_output=True)  # fmt: skip
        yield f"postgresql://ltsweep@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run([*as_user, _pg_tool("pg_ctl"), "-D", str(data), "-m", "fast", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def server(postgres, s3, tmp_path_factory):  # noqa: F811
    """`mlflow server` on the PostgreSQL database with its artifacts in s3://<bucket>/mlflow; its URL."""
    log_path = tmp_path_factory.mktemp("mlflow_pg") / "server.log"
    port = _free_port()
    env = dict(os.environ, MLFLOW_S3_ENDPOINT_URL=f"http://{s3.endpoint}", MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", postgres, "--artifacts-destination",
           f"s3://{BUCKET}/mlflow", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]  # fmt: skip
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        assert proc.poll() is None, f"mlflow server exited:\n{log_path.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.read().strip() == b"OK":
                    break
        except OSError:
            assert time.monotonic() < deadline, f"mlflow server never answered:\n{log_path.read_text()[-3000:]}"
            time.sleep(0.5)  # polling a server that is starting: no event to wait on
    yield url
    os.killpg(proc.pid, 15)
    proc.wait(timeout=60)


@pytest.fixture(scope="module")
def two_sweeps(server, tmp_path_factory):
    """Sweeps `team-a` and `team-b` (2 trials each) run at the same time, tracking to the server."""
    root = tmp_path_factory.mktemp("pg_sweeps")
    generate_benchmark(root / "data", preset=TINY, seed=0)
    ws = Workspace(root, root / "data", root / "stage1-unused")  # each sweep trains (and logs) its own stage 1
    drivers, stores = {}, {}
    for name in ("team-a", "team-b"):
        stores[name] = ws.store(name)
        cfg = config_dict(ws, stores[name], name)
        cfg["run"]["tracking_uri"] = server
        path = stores[name] / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        drivers[name] = Driver([str(path)], stores[name] / "driver.log")
    codes = {name: d.wait() for name, d in drivers.items()}
    assert codes == {"team-a": 0, "team-b": 0}, {n: d.output()[-2000:] for n, d in drivers.items()}
    return {"url": server, "stores": stores}


def _client(url: str):
    from mlflow import MlflowClient

    return MlflowClient(url)


def test_two_sweeps_at_once_lose_nothing_and_nest_their_runs(two_sweeps, s3):  # noqa: F811
    client = _client(two_sweeps["url"])
    for name in ("team-a", "team-b"):
        exp = client.get_experiment_by_name(name)
        runs = client.search_runs([exp.experiment_id])
        roles = sorted(r.data.tags["ltsweep.role"] for r in runs)
        assert roles == ["pretrain", "sweep", "trial", "trial"], (name, roles)
        assert {r.info.status for r in runs} == {"FINISHED"}
        parent = next(r for r in runs if r.data.tags["ltsweep.role"] == "sweep")
        trials = [r for r in runs if r.data.tags["ltsweep.role"] == "trial"]
        assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {parent.info.run_id}
        assert sorted(r.data.params["lam"] for r in trials) == ["0.0", "1.0"]
        assert parent.data.metrics["trials"] == 2 and "AP" in parent.data.metrics
        assert all(len(client.get_metric_history(r.info.run_id, "AP")) == 2 for r in trials)  # one per epoch
    keys = s3.keys("mlflow")  # the proxied artifacts are objects in the bucket
    assert sum(k.endswith("sweep_report.html") for k in keys) == 2
    assert any(k.endswith("per_class_ap.json") for k in keys) and any(k.endswith("MLmodel") for k in keys)


def test_the_registered_model_loads_from_the_registry(two_sweeps):
    import mlflow

    mlflow.set_tracking_uri(two_sweeps["url"])
    model = mlflow.pyfunc.load_model("models:/team-a/latest")
    out = model.predict(np.zeros((64, 64, 3), np.uint8))
    assert set(out) >= {"boxes", "category_ids", "scores"}


def test_compare_and_confirm_work_against_the_server(two_sweeps, tmp_path):
    url, store = two_sweeps["url"], two_sweeps["stores"]["team-a"]
    cmp = subprocess.run(
        [sys.executable, "-m", "pipelines", "compare", "team-a", "team-b", "--tracking-uri", url, "--json",
         "--out", str(tmp_path / "compare.png")],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert cmp.returncode == 0, cmp.stderr[-2000:]
    rows = json.loads(cmp.stdout)
    assert [r["sweep"] for r in rows] == ["team-a", "team-b"] and (tmp_path / "compare.png").is_file()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # its own local Ray, never another
    env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="ltsc-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    conf = subprocess.run(
        [sys.executable, "-m", "pipelines", "confirm", "team-a", "--top", "1", "--seeds", "2",
         "--storage-path", str(store), "--tracking-uri", url],
        cwd=REPO, capture_output=True, text=True, timeout=900, env=env,
    )  # fmt: skip
    shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    assert conf.returncode == 0, (conf.stdout[-2000:], conf.stderr[-2000:])
    exp = _client(url).get_experiment_by_name("team-a-confirm")
    trials = _client(url).search_runs([exp.experiment_id], "tags.`ltsweep.role` = 'trial'")
    assert len(trials) >= 2 and {r.info.status for r in trials} == {"FINISHED"}
