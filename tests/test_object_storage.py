"""Sweeps on object storage: `run.storage_path: s3://bucket/prefix` against moto's S3 server on 127.0.0.1.

The server (moto's ThreadedMotoServer, a real HTTP endpoint) runs in this process on a free port; every process
(Ray workers, subprocess drivers) reaches it through the endpoint override in the URI. Checked:
  - the storage helpers (join/resolve with the query, AWS_ENDPOINT_URL, put/get, upload/download) and the
    object-storage lock (mutual exclusion, a stale holder's marker is broken), and two concurrent stage-1 trainings
    on one key train once;
  - a tiny sweep (the fault benchmark's TINY config) writes its trial checkpoints, the sweep record and the stage-1
    cache into the bucket, and its trials finish;
  - the sweep's driver (a subprocess with its own local Ray) is killed with SIGKILL once a trial checkpoint is in the
    bucket, and `--resume` finishes every trial from the bucket: one MLflow run per trial, no epoch reported twice.
"""

import hashlib
import json
import logging
import os
import re
import shutil
import socket
import threading
from pathlib import Path

import pytest
import yaml

# the tiny sweep of the fault tests, its bounded wait and its subprocess driver
from faults.common import REPO, TINY, Workspace, config_dict, wait_for
from faults.processes import Driver
from pipelines.storage import location as storage
from pipelines.storage import stage1_cache
from pipelines.tune import stage1 as pretrain

BUCKET = "ltsweep-test"
EPOCHS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3:
    """moto's S3 server on 127.0.0.1 with one bucket; `uri(prefix)` names a storage_path in it."""

    def __init__(self):
        from moto.server import ThreadedMotoServer

        self.port = _free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        import boto3

        self._client = boto3.client("s3", endpoint_url=f"http://{self.endpoint}", region_name="us-east-1")
        self._client.create_bucket(Bucket=BUCKET)

    def client(self):
        return self._client

    def uri(self, prefix: str) -> str:
        return f"s3://{BUCKET}/{prefix}?endpoint_override={self.endpoint}&scheme=http"

    def keys(self, prefix: str) -> list[str]:
        """Every object key below bucket/prefix/, relative to it."""
        out, token = [], None
        while True:
            kw = {"ContinuationToken": token} if token else {}
            page = self.client().list_objects_v2(Bucket=BUCKET, Prefix=f"{prefix}/", **kw)
            # (pyarrow also writes empty "folder/" marker objects: not files)
            out += [o["Key"][len(prefix) + 1 :] for o in page.get("Contents", []) if not o["Key"].endswith("/")]
            if not page.get("IsTruncated"):
                return sorted(out)
            token = page["NextContinuationToken"]

    def read(self, key: str) -> bytes:
        return self.client().get_object(Bucket=BUCKET, Key=key)["Body"].read()


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        storage.CACHE_ENV: str(tmp_path_factory.mktemp("node-cache")),
    }  # the node-local stage-1 copies
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    server = S3()
    yield server
    server.server.stop()
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


# ---- the helpers and the lock ------------------------------------------------------------------------------------
def test_annotation_stores_are_published_and_fetched_once_per_node(s3, tmp_path):
    """The driver builds the stores once and copies them to the bucket; a node without them downloads them (into its
    cache folder, complete) instead of parsing the JSON; the copy maps the same arrays."""
    import numpy as np
    from test_engine import small_spec, write_tiny_benchmark

    from lt_models.data.store import open_store
    from pipelines.storage import annotation_stores

    bench = write_tiny_benchmark(tmp_path / "bench")
    uri = s3.uri("stores")
    spec = small_spec(bench, annotation_cache=str(annotation_stores.cache_dir(uri)))
    built = annotation_stores.build_and_publish(uri, spec)
    assert sorted(k.split("/")[0] for k in s3.keys("stores/annotations") if k.endswith("meta.json")) == sorted(
        st.path.name for st in built
    )
    for st in built:  # another node: nothing in its cache folder
        shutil.rmtree(st.path)
    annotation_stores.fetch(uri, spec)
    for st in built:
        copy = open_store(st.path, key=st.path.name)
        assert all(np.array_equal(copy[a], st[a]) for a in st.meta["arrays"])


def test_locations_keep_their_query_and_local_paths_stay_paths(tmp_path):
    uri = "s3://b/p?endpoint_override=h:1&scheme=http"
    assert storage.join(uri, "pretrain", "abc") == "s3://b/p/pretrain/abc?endpoint_override=h:1&scheme=http"
    assert storage.parent(storage.join(uri, "x")) == uri and storage.name(storage.join(uri, "x")) == "x"
    assert storage.display(uri) == "s3://b/p"
    assert storage.join(tmp_path, "a") == tmp_path / "a" and storage.as_location("results") == Path("results")
    assert storage.as_location(uri) == uri  # not Path's "s3:/b/p"
    assert storage.node_local_dir(tmp_path) == tmp_path
    from pipelines.config.run_settings import RunSettings

    run = RunSettings(storage_path=uri)
    assert run.storage_path == uri and RunSettings.model_validate_json(run.model_dump_json()).storage_path == uri
    assert RunSettings(storage_path="res").storage_path == Path("res")


def test_tracking_uri_is_required_on_object_storage():
    from lt_models.errors import ConfigError
    from pipelines.mlflow_io.client import default_tracking_uri

    with pytest.raises(ConfigError, match=r"run.tracking_uri is required .*s3://b/p\)"):
        default_tracking_uri("s3://b/p?endpoint_override=h:1")


def test_put_get_and_directories_through_pyarrow(s3, tmp_path, monkeypatch):
    from lt_models.errors import ConfigError

    base = s3.uri("helpers")
    storage.write_json(storage.join(base, "a", "rec.json"), {"x": 1})
    assert storage.is_file(storage.join(base, "a", "rec.json")) and storage.exists(storage.join(base, "a"))
    assert storage.read_json(storage.join(base, "a", "rec.json")) == {"x": 1}
    assert s3.keys("helpers") == ["a/rec.json"]
    (tmp_path / "src" / "sub").mkdir(parents=True)
    (tmp_path / "src" / "sub" / "w.bin").write_bytes(b"\0" * 1000)
    storage.upload_dir(tmp_path / "src", storage.join(base, "dir"))
    assert storage.list_files(storage.join(base, "dir")) == ["sub/w.bin"]
    storage.download_dir(storage.join(base, "dir"), tmp_path / "back")
    assert (tmp_path / "back" / "sub" / "w.bin").read_bytes() == b"\0" * 1000
    copy = storage.local_copy(storage.join(base, "dir"))
    assert copy.is_relative_to(storage.cache_root()) and (copy / "sub" / "w.bin").stat().st_size == 1000
    storage.delete_dir(storage.join(base, "dir"))
    assert s3.keys("helpers") == ["a/rec.json"]
    # the trainable's divergence marker, on the filesystem Tune hands a trial (here: the same S3 filesystem)
    from pipelines.tune.trainable import DIVERGED_MARKER, read_diverged_marker, write_diverged_marker

    fs, marker = storage.resolve(storage.join(base, "trial_0", DIVERGED_MARKER))
    assert read_diverged_marker(fs, marker) is None
    write_diverged_marker(fs, marker, "loss became nan")
    assert read_diverged_marker(fs, marker) == "loss became nan"
    assert s3.keys("helpers/trial_0") == [DIVERGED_MARKER]  # no temp file left behind
    # the endpoint from AWS_ENDPOINT_URL instead of the URI's query, as pyarrow and Ray take it
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{s3.endpoint}")
    monkeypatch.setattr(storage, "_FILESYSTEMS", {})
    assert storage.read_json(f"s3://{BUCKET}/helpers/a/rec.json") == {"x": 1}
    with pytest.raises(ConfigError, match="bucket 'no-such-bucket' does not exist"):
        storage.check_storage("s3://no-such-bucket/x")


def test_the_object_storage_lock_excludes_and_breaks_a_stale_holder(s3):
    where = s3.uri("locks/key")
    inside, most, entries = [0], [0], []
    guard = threading.Lock()

    def contender(i):
        for n in range(3):
            with storage.lock(where, poll_s=0.05):
                with guard:
                    inside[0] += 1
                    most[0] = max(most[0], inside[0])
                # a round trip to the store inside the critical section (the other contenders keep trying)
                storage.write_text(storage.join(s3.uri("locks"), "owner"), f"{i}-{n}")
                entries.append(storage.read_text(storage.join(s3.uri("locks"), "owner")))
                with guard:
                    inside[0] -= 1

    threads = [threading.Thread(target=contender, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert most[0] == 1 and sorted(entries) == sorted(f"{i}-{n}" for i in range(4) for n in range(3))
    assert s3.keys("locks/key.lock") == []  # every marker was removed on release
    # a holder that crashed leaves its marker; once it stays unchanged for stale_s, it is removed and the lock taken
    s3.client().put_object(Bucket=BUCKET, Key="locks/key.lock/0-crashed-host-1-dead", Body=b"{}")
    with pytest.raises(TimeoutError, match="0-crashed-host-1-dead"):
        with storage.lock(where, timeout=0.3, stale_s=60, poll_s=0.05):
            pass
    with storage.lock(where, timeout=30, stale_s=0.5, poll_s=0.05):
        assert "0-crashed-host-1-dead" not in s3.keys("locks/key.lock")
    assert s3.keys("locks/key.lock") == []


@pytest.fixture
def stage1_cfg(s3, tmp_path, monkeypatch):
    """A stage-1 config on the bucket (a tiny fake dataset) and a fake trainer that records its calls."""
    from pipelines.config.load import load_experiment_config

    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "train.json").write_text(json.dumps({"images": [{"id": 1}], "annotations": [], "categories": []}))
    (data / "val.json").write_text("{}")
    (data / "images" / "a.png").write_bytes(b"x" * 10)
    raw = {
        "name": "p",
        "data": {"train": str(data / "train.json"), "val": str(data / "val.json")},
        "stage1": {"epochs": 2},
        "stage2": {"epochs": 3},
        "run": {"storage_path": s3.uri(f"lock-{tmp_path.name}"), "tracking_uri": "sqlite:///unused.db"},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    calls, contended = [], threading.Event()

    def train_stage1_into(cfg, out_dir):
        calls.append(out_dir)
        assert contended.wait(60), "the second driver never found the lock held"
        (out_dir / "checkpoint").mkdir()
        (out_dir / "checkpoint" / "checkpoint.pt").write_bytes(b"weights")
        return {"AP": 0.25}

    real_break = storage._ObjectLock._break_stale

    def break_stale(self, others):  # called each time a contender finds the lock held and backs off
        contended.set()
        return real_break(self, others)

    monkeypatch.setattr(pretrain, "train_stage1_into", train_stage1_into)
    monkeypatch.setattr(storage._ObjectLock, "_break_stale", break_stale)
    return load_experiment_config(tmp_path / "c.yaml"), calls


def test_two_concurrent_stage1_trainings_on_s3_train_once(stage1_cfg, s3):
    (cfg, calls), results, start = stage1_cfg, {}, threading.Barrier(2)

    def driver(name):
        start.wait()
        results[name] = pretrain.ensure_stage1(cfg, use_ray=False)

    threads = [threading.Thread(target=driver, args=(n,)) for n in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(calls) == 1  # one trained while the other waited at the lock, then reused it
    assert sorted(r.trained for r in results.values()) == [False, True]
    a, b = results.values()
    assert a.sha256 == b.sha256 and a.path == b.path and storage.is_uri(a.path)
    prefix = storage.display(a.path).split(f"{BUCKET}/", 1)[1]
    assert s3.keys(prefix) == ["checkpoint/checkpoint.pt", "meta.json"]
    assert json.loads(s3.read(f"{prefix}/meta.json"))["files"] == {
        "checkpoint.pt": hashlib.sha256(b"weights").hexdigest()
    }
    assert pretrain.verify_stage1(a.path) is None
    local = Path(stage1_cache.local_stage1(str(a.checkpoint_dir)))  # what a trial restores: a verified node-local copy
    assert (local / "checkpoint.pt").read_bytes() == b"weights" and local.is_relative_to(storage.cache_root())


# ---- real sweeps -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    from lt_models.data.synthetic.generate import generate_benchmark

    root = tmp_path_factory.mktemp("object_storage")
    generate_benchmark(root / "data", preset=TINY, seed=0)
    return Workspace(root, root / "data", root / "unused")


def write_config(ws, s3, name: str, prefix: str, **kw) -> Path:
    raw = config_dict(ws, ws.root, name, epochs=EPOCHS, **kw)
    raw["run"] = {
        "storage_path": s3.uri(prefix),
        "tracking_uri": f"sqlite:///{ws.root / 'mlflow.db'}",
        "max_failures": 1,
        "checkpoints_to_keep": 1,
        "ray_num_cpus": 2,
    }
    path = ws.root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def reported_epochs(s3, trial_prefix: str) -> list[int]:
    text = s3.read(f"{trial_prefix}/result.json").decode()
    return [json.loads(line)["epoch"] for line in text.splitlines() if line.strip()]


def trial_runs(ws, name: str) -> dict[str, list]:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{ws.root / 'mlflow.db'}")
    exp = client.get_experiment_by_name(name)
    out = {}
    for run in client.search_runs([exp.experiment_id], "tags.`ltsweep.role` = 'trial'"):
        out.setdefault(run.data.tags["ltsweep.trial_id"], []).append(run)
    return out


def latest_experiment_state(s3, exp: str) -> dict[str, dict]:
    """trial dir name -> its run metadata in the newest experiment state Tune's driver uploaded to the bucket: what a
    resumed driver restores (a checkpoint the driver had not recorded there yet does not count)."""
    states = [k for k in s3.keys(exp) if re.fullmatch(r"experiment_state-[^/]+\.json", k)]
    if not states:
        return {}
    data = json.loads(s3.read(f"{exp}/{max(states)}"))
    out = {}
    for trial_json, meta_json in data["trial_data"]:
        trial, meta = json.loads(trial_json), json.loads(meta_json)
        out[trial["relative_logdir"]] = meta
    return out


@pytest.fixture(scope="module")
def killed_and_resumed(ws, s3):
    """A 2-trial sweep on the bucket run by a `python -m pipelines sweep` subprocess (its own local Ray), killed with
    SIGKILL once Tune recorded a trial checkpoint in the bucket while that trial had epochs left, then `--resume`d by
    a new process."""
    path = write_config(ws, s3, "s3-sweep", "study", lams=(0.0, 1.0), max_concurrent=2)
    exp = "study/s3-sweep"

    def a_recorded_checkpoint_with_epochs_left():
        # Tune's driver uploads the experiment state and the trials' result.json files in one background sync, in no
        # fixed order: wait until both arrived, so the kill does not fall into an unfinished upload (see
        # docs/reliability.md)
        keys = set(s3.keys(exp))
        return {
            trial: meta["last_result"]["training_iteration"]
            for trial, meta in latest_experiment_state(s3, exp).items()
            if (meta.get("last_result") or {}).get("checkpoint_dir_name")
            and meta["last_result"]["training_iteration"] < EPOCHS
            and f"{trial}/result.json" in keys
            and len(reported_epochs(s3, f"{exp}/{trial}")) >= meta["last_result"]["training_iteration"]
        }

    driver = Driver([str(path), "--no-register"], ws.root / "driver-1.log")
    try:
        checkpointed = wait_for(
            a_recorded_checkpoint_with_epochs_left,
            600,
            "a trial checkpoint recorded in the bucket",
            poll=0.05,
            alive=driver.check_alive,
        )
        driver.kill9()
    finally:
        if driver.proc.poll() is None:
            driver.kill9()
        leaked = driver.cleanup()
    resumed = Driver([str(path), "--resume", "--no-register"], ws.root / "driver-2.log")
    try:
        rc = resumed.wait(600)
    finally:
        leaked += resumed.cleanup()
    return {
        "path": path,
        "exp": exp,
        "killed_rc": driver.proc.returncode,
        "checkpointed": checkpointed,
        "rc": rc,
        "first": driver.output(),
        "out": resumed.output(),
        "leaked": leaked,
    }


@pytest.mark.slow
def test_a_sweep_keeps_everything_in_the_bucket(killed_and_resumed, ws, s3):
    from pipelines.commands.confirm import load_sweep_config
    from pipelines.config.load import load_experiment_config
    from pipelines.tune.sweep import SWEEP_RECORD

    r = killed_and_resumed
    assert r["rc"] == 0, r["out"][-3000:]
    keys = s3.keys("study")
    [sha] = {k.split("/")[1] for k in keys if k.startswith("pretrain/") and k.endswith("/meta.json")}
    meta = json.loads(s3.read(f"study/pretrain/{sha}/meta.json"))
    assert meta["files"] and all(f"pretrain/{sha}/checkpoint/{f}" in keys for f in meta["files"])
    assert "stage 1: training" in r["first"] and "(reused)" in r["out"]  # trained once, into the bucket
    assert f"s3-sweep/{SWEEP_RECORD}" in keys and "s3-sweep/tuner.pkl" in keys
    trials = {k.split("/")[1] for k in keys if re.match(r"s3-sweep/[^/]+/result\.json$", k)}
    assert len(trials) == 2
    for trial in trials:  # Tune's trial checkpoints and results are in the bucket
        assert any(re.match(rf"s3-sweep/{re.escape(trial)}/checkpoint_\d+/", k) for k in keys), (trial, keys)
    assert not Path("s3:").exists() and not (REPO / "s3:").exists()  # nothing went to a local "s3:" folder
    # the annotation stores the driver built are published, arrays and meta.json, for trials on other nodes
    stores = {k.split("/")[1] for k in keys if re.fullmatch(r"annotations/[0-9a-f]{64}/meta\.json", k)}
    assert len(stores) == 2  # the training and the validation set
    for key in stores:
        meta = json.loads(s3.read(f"study/annotations/{key}/meta.json"))
        assert meta["key"] == key and all(f"annotations/{key}/{a}.npy" in keys for a in meta["arrays"])
    # the trials restored a node-local copy of stage 1, checked against meta.json
    copies = [
        p.parent for p in storage.cache_root().rglob("meta.json") if json.loads(p.read_text()).get("sha256") == sha
    ]  # (the cache holds other files too)
    assert copies and pretrain.verify_stage1(copies[0]) is None
    # the sweep record is what `ltsweep confirm` reads back
    recorded = load_sweep_config("s3-sweep", s3.uri("study"))
    assert recorded.fingerprint() == load_experiment_config(r["path"]).fingerprint()
    assert recorded.run.storage_path == s3.uri("study")  # the URI survives the record (not folded into a Path)


@pytest.mark.slow
def test_the_sweep_resumes_from_the_bucket_after_its_driver_is_killed(killed_and_resumed, ws, s3):
    """The trials whose checkpoint Tune had recorded in the bucket continue from it: no epoch is reported again
    (progress lines, MLflow, result.json). Any other trial restarts from its last recorded state (Tune uploads the
    experiment state in the background, see docs/reliability.md), so it may report epochs again, but it ends complete
    too."""
    from mlflow import MlflowClient

    r = killed_and_resumed
    assert r["killed_rc"] == -9 and r["leaked"] == [] and r["rc"] == 0, r["out"][-3000:]
    assert r["checkpointed"], "the driver was not killed mid-sweep"
    trials = {k.split("/")[0] for k in s3.keys(r["exp"]) if k.endswith("/result.json")}
    assert len(trials) == 2 and set(r["checkpointed"]) <= trials
    continued = []
    for trial, evals in r["checkpointed"].items():  # these continued from their checkpoints, not from scratch
        tag = re.match(r".*?_([0-9a-f]{5}_\d{5})_", trial).group(1)  # the trial id, as the progress lines show it
        after = [int(e) for e in re.findall(rf"\[{tag} [^\]]*\] evaluation (\d+)/", r["out"])]
        assert all(e > evals for e in after), (trial, evals, after)
        continued += after
    assert continued, "no checkpointed trial went on after the resume"
    runs = trial_runs(ws, "s3-sweep")  # one MLflow run per trial, finished
    assert len(runs) == 2 and all(len(v) == 1 and v[0].info.status == "FINISHED" for v in runs.values())
    client = MlflowClient(f"sqlite:///{ws.root / 'mlflow.db'}")
    every = list(range(1, EPOCHS + 1))
    for trial in trials:
        tag = re.match(r".*?_([0-9a-f]{5}_\d{5})_", trial).group(1)
        epochs = reported_epochs(s3, f"{r['exp']}/{trial}")
        [run] = runs[tag]
        logged = [int(m.value) for m in client.get_metric_history(run.info.run_id, "epoch")]
        if trial in r["checkpointed"]:  # MLflow (written by the driver at each report) holds each epoch once;
            # result.json ends with the epochs after the resume, and may miss the lines from before the kill
            # (Tune uploads it in the background; see docs/reliability.md)
            assert sorted(logged) == every and epochs == every[-len(epochs) :], (trial, epochs, logged)
            assert len(epochs) >= EPOCHS - r["checkpointed"][trial], (trial, epochs)
        else:
            assert sorted(set(logged)) == every and epochs[-1] == EPOCHS, (trial, epochs, logged)
