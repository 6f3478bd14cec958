"""Several processes opening one new sqlite MLflow store at the same moment (two sweep drivers on one new
``storage_path``): every one of them must get a working client, and the store must end up with one experiment and
every process's run.

The workers are separate interpreters (the venv's python): each imports MLflow first, then waits for a go-file, so
the slow imports are done before the race and the store is opened by all of them within a few milliseconds.
Creating a store's schema takes seconds (MLflow's alembic migrations), so that test is marked slow; the tests with
stubs below check the lock bookkeeping without MLflow.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import filelock
import mlflow
import pytest

from lt_models.errors import ConfigError
from pipelines.mlflow_io import client as mlflow_store
from pipelines.mlflow_io.client import make_client, open_store

N_PROCS = 4
ROUNDS = 3

_WORKER = textwrap.dedent("""
    import json, sys, time, traceback
    from pathlib import Path

    import mlflow  # noqa: F401 - the slow imports happen before the race
    from pipelines.mlflow_io.client import get_or_create_experiment, make_client

    work, me, rounds = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    (work / f"ready-{me}").touch()
    failed = False
    for r in range(rounds):
        go = work / f"go-{r}"
        deadline = time.monotonic() + 120
        while not go.exists():
            if time.monotonic() > deadline:
                sys.exit("no go-file")
            time.sleep(0.001)
        uri = go.read_text()
        report = {"round": r, "ok": True}
        try:
            client = make_client(uri)
            exp_id = get_or_create_experiment(client, "race", uri)
            report["run"] = client.create_run(exp_id, run_name=f"w{me}").info.run_id
        except BaseException:  # noqa: BLE001 - reported to the test
            failed = True
            report.update(ok=False, error=traceback.format_exc(limit=3))
        print(json.dumps(report), flush=True)
    sys.exit(1 if failed else 0)
""")


@pytest.mark.slow
def test_new_sqlite_store_opened_by_racing_processes(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    work = tmp_path / "work"
    work.mkdir()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(work), str(i), str(ROUNDS)],
            cwd=repo,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(N_PROCS)
    ]
    try:
        deadline = time.monotonic() + 120
        while len(list(work.glob("ready-*"))) < N_PROCS:
            assert time.monotonic() < deadline, "workers did not start"
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            time.sleep(0.01)
        uris = []
        for r in range(ROUNDS):
            uri = f"sqlite:///{tmp_path / f'round{r}' / 'mlflow.db'}"  # a fresh store each round
            uris.append(uri)
            tmp = work / f"go-{r}.tmp"
            tmp.write_text(uri)
            tmp.rename(work / f"go-{r}")  # appears atomically, with its contents
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    reports = [[json.loads(line) for line in out.splitlines() if line.startswith("{")] for out, _ in outs]
    errors = [
        f"worker {i} round {rep['round']}: {rep['error']}"
        for i, reps in enumerate(reports)
        for rep in reps
        if not rep["ok"]
    ]
    assert not errors, "\n".join(errors)
    assert [p.returncode for p in procs] == [0] * N_PROCS, [err[-2000:] for _, err in outs]
    assert all(len(reps) == ROUNDS for reps in reports)

    for r, uri in enumerate(uris):
        client = open_store(uri)
        exps = [e for e in client.search_experiments() if e.name == "race"]
        assert len(exps) == 1, f"round {r}: {len(exps)} experiments named 'race'"
        runs = client.search_runs([exps[0].experiment_id])
        assert sorted(run.info.run_id for run in runs) == sorted(reps[r]["run"] for reps in reports)
        assert len(runs) == N_PROCS


# --------------------------------------------------------------------------------------------------------------
# the lock bookkeeping, with stubs for MlflowClient and FileLock (no MLflow store is created)
class _StubClient:
    def __init__(self, tracking_uri):
        self.tracking_uri = tracking_uri

    def search_experiments(self, max_results=None):
        return []


@pytest.fixture
def stubs(monkeypatch):
    """Counts lock acquisitions; ``stubs["fail"]`` is raised by ``acquire`` when set."""
    state = {"acquired": [], "fail": None}

    class StubLock:
        def __init__(self, path, timeout=-1):
            self.path = path

        def acquire(self):
            if state["fail"] is not None:
                raise state["fail"]
            state["acquired"].append(self.path)

        def release(self):
            pass

    monkeypatch.setattr(mlflow, "MlflowClient", _StubClient)
    monkeypatch.setattr(filelock, "FileLock", StubLock)
    monkeypatch.setattr(mlflow_store, "_READY", set())
    return state


def test_lock_is_taken_once_per_process_and_uri(tmp_path, stubs):
    uri_a = f"sqlite:///{tmp_path / 'a' / 'mlflow.db'}"
    uri_b = f"sqlite:///{tmp_path / 'b' / 'mlflow.db'}"
    for _ in range(3):
        assert make_client(uri_a).tracking_uri == uri_a
    make_client(uri_b)
    (tmp_path / "b" / "mlflow.db").touch()  # the stub created no database
    assert open_store(uri_b).tracking_uri == uri_b  # readers share the bookkeeping
    assert stubs["acquired"] == [f"{tmp_path / 'a' / 'mlflow.db'}.lock", f"{tmp_path / 'b' / 'mlflow.db'}.lock"]
    make_client("http://127.0.0.1:5000")  # no lock for a server
    assert len(stubs["acquired"]) == 2


def test_open_store_refuses_a_missing_store_without_creating_anything(tmp_path, stubs):
    db = tmp_path / "results" / "mlflow.db"
    with pytest.raises(ConfigError, match="does not exist"):
        open_store(f"sqlite:///{db}")
    assert not (tmp_path / "results").exists() and stubs["acquired"] == []


def test_reader_without_a_writable_directory_opens_without_the_lock(tmp_path, stubs):
    db = tmp_path / "mlflow.db"
    db.touch()
    uri = f"sqlite:///{db}"
    stubs["fail"] = PermissionError(13, "Permission denied", f"{db}.lock")
    assert open_store(uri).tracking_uri == uri  # a reader of a read-only results directory
    assert uri not in mlflow_store._READY
    with pytest.raises(PermissionError):  # a writer could not write the store either
        make_client(uri)
    stubs["fail"] = filelock.Timeout(f"{db}.lock")
    with pytest.raises(filelock.Timeout):  # a hung lock holder is reported, also to readers
        open_store(uri)
