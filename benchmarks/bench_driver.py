"""The sweep driver at a thousand trials: its CPU and memory per report, and the summary, report and compare.

A multi-node Ray cluster is started on this machine (``ray start --head`` plus ``--nodes - 1`` worker nodes, each a
raylet of its own), and this process drives one sweep on it through the product's path (``pipelines.tune.sweep
.run_sweep``: Tune, ``scheduler.type: asha_configs`` over configurations with 3 seeds each, the product's default
``run.checkpoints_to_keep``, the MLflow callback and writer, the TensorBoard and CSV loggers, the summary and the
HTML report). MLflow is an ``mlflow server`` on 127.0.0.1 (sqlite backend, started here), as a team runs it for a
sweep of this size (docs/clusters.md); ``--tracking sqlite`` has the driver write the default sqlite file itself,
so that the store's own work (SQLAlchemy, sqlite) is the driver's too. Only the trainable is a
stand-in: no training; each evaluation reports a closed-form metric of (λ, seed, evaluation) with the real
``tune.report(..., checkpoint=...)`` call and a small checkpoint directory, as the real trainable does. The stand-in
has no model, so the best-model step is left out. Afterwards ``ltsweep compare`` runs on the sweep.

Measured (this process is the driver):
  driver_cpu_s_per_report  the driver process's CPU time (user + system, ``time.process_time``) from the first report
                           Tune delivered to the last, over the reports in between: what each report costs the
                           driver once the sweep runs (its start-up and end are timed separately);
                           ``driver_ms_per_report`` is the same in ms, ``driver_cpu_s`` the whole sweep's
  mlflow_ms_per_report     wall time of the MLflow callback logging a report (its ``on_trial_result``, called
                           once Tune registered the report's checkpoint), per report
  driver_peak_mb           the driver's peak resident memory (``ru_maxrss``)
  summary_s / report_s     the sweep summary (``summarize``) and the HTML report with its aggregates
                           (``log_sweep_report``) of all the trials, as the sweep's end runs them
  compare_s                ``compare_sweeps`` on the sweep (reading every trial run back from MLflow)
  trials_per_min           trials over the sweep's wall time
  driver_ms_per_report_by_part
                           the same steady-state CPU by part (the driver's main thread, ``time.thread_time``):
                           Tune's own step, Tune's experiment snapshots (``save_to_dir``; ``num_to_keep`` forces
                           one whenever a trial has checkpointed that often since the last), the MLflow callback,
                           the JSON, TensorBoard and CSV loggers, asha_configs, the rest of the main thread, and the
                           process's other threads
  driver_gc_s              the sweep's time in Python's cyclic garbage collector (every thread of the driver), and
  driver_gc_longest_s      its longest single collection
  ended_threads_cpu_s      the whole sweep's CPU of the Python threads that ended, by kind (the six largest)
  live_threads_cpu_s       the CPU of the threads alive after compare, by OS thread name ("python": the main
                           thread and unnamed ones), from /proc (the six largest)
  anchor_plain_tune        the anchor, in the same run and cluster: plain Tune on the same trials (its per-trial
                           ASHA, the same num_to_keep and actor reuse, no callbacks or loggers), its driver CPU per
                           report and its time in the garbage collector measured the same way (``--no-anchor`` skips it)
Goals: the driver adds at most 20 ms per report, stays under 2 GB, and the summary, report and compare each take at
most 10 s at 1,000 trials.

Usage: python benchmarks/bench_driver.py [--configs 334] [--seeds 3] [--max-t 4] [--nodes 3] [--cpus-per-node 4]
           [--tracking server|sqlite] [--checkpoints-to-keep N] [--out DIR] [--no-anchor]
           (--configs 334 x --seeds 3 = 1,002 trials)
Last stdout line: {"benchmark": "driver", "nodes", "tracking", "checkpoints_to_keep", "trials", "finished", "reports",
"driver_cpu_s_per_report", "driver_ms_per_report", "driver_cpu_s", "mlflow_ms_per_report", "driver_peak_mb",
"summary_s", "report_s", "compare_s", "trials_per_min", "sweep_s", "driver_ms_per_report_by_part",
"driver_gc_s", "driver_gc_longest_s", "ended_threads_cpu_s", "live_threads_cpu_s", "anchor_plain_tune": {"trials",
"reports", "driver_ms_per_report", "driver_gc_s", "driver_gc_longest_s", "trials_per_min", "sweep_s"}, "goals_met"}
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from local_cluster import RAY, cluster_env, free_port, new_temp_dir, node_ports, start_worker_node, stop_cluster
from local_mlflow import start_server, stop_process_group, wait_healthy

from lt_models.data.synthetic.generate import generate_benchmark
from pipelines.config.run_settings import RunSettings

GOALS = {"driver_ms_per_report": 20.0, "driver_peak_mb": 2048.0, "summary_s": 10.0, "report_s": 10.0, "compare_s": 10.0}


def stand_in_trial(config, experiment, stage1=None, shared=None):
    """The trainable's stand-in: per evaluation a closed-form AP of (λ, seed, evaluation), reported with a checkpoint
    directory as the real trainable reports, resumable from its last checkpoint."""
    import tempfile as tf

    from ray import tune

    start = 0
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            start = json.loads(Path(d, "state.json").read_text())["evaluation"]
    lam, seed = float(config["lam"]), experiment.trial_seed(config)
    for it in range(start + 1, experiment.evals_per_trial + 1):
        ap = 0.3 - 0.1 * (lam - 0.7) ** 2 + 0.02 * np.sin(7.0 * seed + lam) + 0.01 * it
        metrics = {"AP": ap, "AP50": ap + 0.2, "APr": ap * 0.5, "APc": ap * 0.9, "APf": ap * 1.1, "loss": 1.0 / it}
        metrics.update(epoch=it, iteration=10 * it, images=80 * it, seed=seed, pretrain_sha256="")
        with tf.TemporaryDirectory() as d:
            Path(d, "state.json").write_text(json.dumps({"evaluation": it}))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))


def anchor_trial(config):
    """The stand-in for plain Tune (the anchor): the same reports and checkpoints, its λ, seed and length in the
    config."""
    import types

    experiment = types.SimpleNamespace(evals_per_trial=config["max_t"], trial_seed=lambda c: c["seed"])
    stand_in_trial(config, experiment)


def start_cluster(nodes: int, cpus: int) -> tuple[str, dict, list[str]]:
    """``ray start --head`` and ``nodes - 1`` worker nodes on 127.0.0.1 (``local_cluster``); the head's address,
    the environment of every ``ray`` command on it and the nodes' temp dirs (what stops them)."""
    env = {**cluster_env(), "RAY_AUTH_MODE": "disabled"}
    temps = [new_temp_dir("ltsd-") for _ in range(nodes)]
    gcs = f"127.0.0.1:{free_port()}"
    head = [RAY, "start", "--head", "--port", gcs.split(":")[1], "--num-cpus", str(cpus), "--temp-dir", temps[0],
            "--include-dashboard", "false", "--ray-client-server-port", str(free_port()), *node_ports(),
            "--disable-usage-stats"]  # fmt: skip
    out = subprocess.run(head, env=env, timeout=300, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"ray start --head failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    for temp in temps[1:]:
        start_worker_node(gcs, cpus, temp, env)
    return gcs, env, temps


def timed(owner, name: str, log: list, cpu: list | None = None, snaps: list | None = None, snap=None) -> None:
    """Wrap ``owner.name`` so that each call's wall time is appended to ``log`` (and, with ``cpu``, the process's
    CPU time when the call returns; with ``snaps``, ``snap()`` then)."""
    fn = getattr(owner, name)

    @functools.wraps(fn)
    def wrapper(*args, **kw):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kw)
        finally:
            log.append(time.perf_counter() - t0)
            if cpu is not None:
                cpu.append(time.process_time())
            if snaps is not None:
                snaps.append(snap())

    setattr(owner, name, wrapper)


class MainThreadCPU:
    """Where the driver's main thread spends its CPU (``time.thread_time``): each part is a set of wrapped methods.
    Calls nested inside another measured call count only for the innermost part, so the parts add up; what is left
    of Tune's ``step`` is Tune's own work."""

    def __init__(self) -> None:
        self.total: dict[str, float] = {}
        self._stack: list[float] = []  # the CPU the calls under way spent in measured calls nested in them

    def wrap(self, owner, name: str, part: str) -> None:
        fn = getattr(owner, name)
        self.total.setdefault(part, 0.0)

        @functools.wraps(fn)
        def wrapper(*args, **kw):
            t0 = time.thread_time()
            self._stack.append(0.0)
            try:
                return fn(*args, **kw)
            finally:
                spent, nested = time.thread_time() - t0, self._stack.pop()
                self.total[part] += spent - nested
                if self._stack:
                    self._stack[-1] += spent

        setattr(owner, name, wrapper)

    def wrap_background(self, owner, name: str, part: str) -> None:
        """A function that runs on another thread: its own thread's CPU, kept apart from the main thread's."""
        fn = getattr(owner, name)
        self.background = {part: 0.0}
        lock = threading.Lock()

        @functools.wraps(fn)
        def wrapper(*args, **kw):
            t0 = time.thread_time()
            try:
                return fn(*args, **kw)
            finally:
                with lock:
                    self.background[part] += time.thread_time() - t0

        setattr(owner, name, wrapper)

    def snapshot(self) -> dict[str, float]:
        background = {f"background:{k}": v for k, v in getattr(self, "background", {}).items()}
        return {**self.total, **background, "main_thread": time.thread_time(), "process": time.process_time()}


def count_thread_cpu() -> dict[str, float]:
    """From now on, every Python thread that ends adds its CPU time (``time.thread_time`` over its run) under its
    kind (its class, or its target's name), and every thread started is named after its kind in the OS, so that
    ``live_threads_cpu_s`` can tell the threads still alive apart."""
    import ctypes

    libc = ctypes.CDLL(None)
    by_kind: dict[str, float] = {}
    lock = threading.Lock()
    run = threading.Thread.run

    def counted_run(thread):
        target = getattr(thread, "_target", None)
        kind = type(thread).__name__ if target is None else getattr(target, "__qualname__", "?")
        libc.prctl(15, kind.encode()[:15], 0, 0, 0)  # PR_SET_NAME
        t0 = time.thread_time()
        try:
            return run(thread)
        finally:
            with lock:
                by_kind[kind] = by_kind.get(kind, 0.0) + time.thread_time() - t0

    threading.Thread.run = counted_run  # type: ignore[method-assign]
    return by_kind


def live_threads_cpu_s() -> dict[str, float]:
    """CPU seconds of this process's threads alive now, summed by OS thread name (the six largest)."""
    by_name: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for tid in os.listdir("/proc/self/task"):
        try:
            stat = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
            name = Path(f"/proc/self/task/{tid}/comm").read_text().strip()
        except OSError:
            continue
        by_name[name] = by_name.get(name, 0.0) + (int(stat[11]) + int(stat[12])) / tick
    return {k: round(v, 1) for k, v in sorted(by_name.items(), key=lambda kv: -kv[1])[:6]}


class GCTime:
    """Seconds this process spends in the cyclic garbage collector (any thread) while in the ``with`` block, and its
    longest single collection."""

    def __init__(self) -> None:
        self.total = 0.0
        self.longest = 0.0
        self._started: dict[int, float] = {}

    def __call__(self, phase: str, info: dict) -> None:
        now = time.perf_counter()
        if phase == "start":
            self._started[threading.get_ident()] = now
            return
        took = now - self._started.pop(threading.get_ident(), now)
        self.total += took
        self.longest = max(self.longest, took)

    def __enter__(self) -> GCTime:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self)

    def figures(self) -> dict[str, float]:
        return {"driver_gc_s": round(self.total, 2), "driver_gc_longest_s": round(self.longest, 3)}


def measure_parts(parts: MainThreadCPU) -> None:
    """Tune's step (with its experiment snapshots apart), the product's callbacks and asha_configs."""
    from ray.train._internal import storage
    from ray.tune.execution.tune_controller import TuneController

    from pipelines.tracking import callback
    from pipelines.tune import asha, callbacks

    parts.wrap(TuneController, "step", "tune_own")
    # the snapshot's upload of the driver's staging directory to the storage path, on Tune's syncer thread
    parts.wrap_background(storage, "_upload_to_fs_path", "tune_snapshot_upload_thread")
    parts.wrap(TuneController, "save_to_dir", "tune_experiment_snapshots")
    # the MLflow callback's own hooks (MLflowSweepCallback holds each report until Tune registers its checkpoint,
    # then hands it to these)
    for name in ("on_trial_start", "on_trial_restore", "on_trial_result", "on_trial_complete", "on_trial_error"):
        parts.wrap(callback._MLflowEvents, name, "mlflow_callback")
    for klass in (callbacks.JsonLogger, callbacks.TBXLogger, callbacks.CSVLogger):
        for name in ("log_trial_start", "log_trial_result", "log_trial_end"):
            parts.wrap(klass, name, "loggers")
    for name in ("on_trial_result", "choose_trial_to_run", "on_trial_complete", "on_trial_add"):
        parts.wrap(asha.ConfigASHA, name, "asha_configs")


def steady_breakdown(first: dict[str, float], last: dict[str, float], reports: int) -> dict[str, float]:
    """ms of driver CPU per report between the first and the last report, by part; tune_snapshot_upload_thread:
    Tune's syncer thread copying the snapshot to the storage path; other_threads: the rest of the process's CPU
    outside its main thread (Ray's core threads, TensorBoard's writer threads)."""
    d = {k: last[k] - first[k] for k in last}
    out = {k: d[k] for k in first if k not in ("main_thread", "process") and not k.startswith("background:")}
    out["main_thread_other"] = d["main_thread"] - sum(out.values())
    background = {k.split(":", 1)[1]: d[k] for k in first if k.startswith("background:")}
    out.update(background)
    out["other_threads"] = d["process"] - d["main_thread"] - sum(background.values())
    return {k: round(1000 * v / max(reports - 1, 1), 2) for k, v in out.items()}


def sweep_config(
    root: Path, data: Path, configs: int, seeds: int, max_t: int, tracking_uri: str | None, keep: int
) -> Path:
    """``configs`` λ values x ``seeds`` seeds, one-stage (the stand-in trains nothing), asha_configs over them,
    tracked to ``tracking_uri`` (None: the default sqlite file beside the results); ``keep``:
    run.checkpoints_to_keep."""
    raw = {
        "name": "driver",
        "data": {"train": str(data / "train.json"), "val": str(data / "val.json")},
        "model": {"backbone": "tiny", "image_size": 64},
        "stage1": None,
        "stage2": {"epochs": max_t},
        "resources": {"cpus_per_trial": 1},
        "scheduler": {"type": "asha_configs", "grace_period": 1, "reduction_factor": 3, "max_t": max_t},
        "search": {"seeds": list(range(seeds))},
        "space": {"lam": {"grid": [round(float(x), 6) for x in np.linspace(0.0, 1.5, configs)]}},
        "report": {"replicates": 0},
        "run": {"storage_path": str(root / "results"), "max_failures": 0, "checkpoints_to_keep": keep},
    }
    if tracking_uri:
        raw["run"]["tracking_uri"] = tracking_uri
    path = root / "driver.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def drive(cfg_path: Path) -> dict:
    """Run the sweep in this process with the timers in place; the measured figures."""
    import ray

    from pipelines.config.load import load_experiment_config
    from pipelines.tracking import best_model, callback, writer
    from pipelines.tune import sweep

    times: dict[str, list] = {"mlflow": [], "summary": [], "report": [], "cpu": []}
    parts = MainThreadCPU()
    measure_parts(parts)
    threads = count_thread_cpu()
    snaps: list[dict[str, float]] = []
    timed(callback._MLflowEvents, "on_trial_result", times["mlflow"], times["cpu"], snaps, parts.snapshot)
    timed(sweep, "summarize", times["summary"])
    timed(writer, "log_sweep_report", times["report"])
    best_model.log_best_model_safely = lambda *a, **k: None  # the stand-in has no model to log
    cfg = load_experiment_config(cfg_path)
    cpu0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    with GCTime() as gc_time:
        summary = sweep.run_sweep(cfg, trainable_fn=stand_in_trial, verbose=0, progress=False, register=False)
    cpu1, sweep_s = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - t0
    reports = len(times["mlflow"])
    cpu_s = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    steady = (times["cpu"][-1] - times["cpu"][0]) / (reports - 1) if reports > 1 else float("nan")
    from mlflow import MlflowClient

    from pipelines.analysis.compare import compare_sweeps

    t1 = time.perf_counter()
    compare_sweeps(MlflowClient(summary.tracking_uri), ["driver"], cfg_path.parent / "compare.png", quiet=True)
    compare_s = time.perf_counter() - t1
    live = live_threads_cpu_s()
    ray.shutdown()
    return {
        "trials": len(summary.trials),
        "finished": sum(t.error is None for t in summary.trials),
        "reports": reports,
        "driver_cpu_s_per_report": round(steady, 5),
        "driver_ms_per_report": round(1000 * steady, 2),
        "driver_cpu_s": round(cpu_s, 1),
        "mlflow_ms_per_report": round(1000 * sum(times["mlflow"]) / max(reports, 1), 2),
        "driver_peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "summary_s": round(sum(times["summary"]), 2),
        "report_s": round(sum(times["report"]), 2),
        "compare_s": round(compare_s, 2),
        "trials_per_min": round(len(summary.trials) / (sweep_s / 60), 1),
        "driver_ms_per_report_by_part": steady_breakdown(snaps[0], snaps[-1], reports) if snaps else {},
        "sweep_s": round(sweep_s, 1),
        **gc_time.figures(),
        "ended_threads_cpu_s": {k: round(v, 1) for k, v in sorted(threads.items(), key=lambda kv: -kv[1])[:6]},
        "live_threads_cpu_s": live,
    }


def drive_anchor(root: Path, configs: int, seeds: int, max_t: int, keep: int) -> dict:
    """The anchor, on the same cluster: plain Tune with the same trials (λ grid x seeds, 1 CPU each), its own
    per-trial ASHA (same grace period, η and max_t), the same ``CheckpointConfig(num_to_keep)`` and actor reuse, and
    no callbacks or loggers. The driver's CPU per report between the first report and the last, as above."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    cpu: list[float] = []

    class Clock(tune.Callback):
        def on_trial_result(self, *args, **kw):
            cpu.append(time.process_time())

    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    ray.init(address=os.environ["RAY_ADDRESS"])
    grid = [round(float(x), 6) for x in np.linspace(0.0, 1.5, configs)]
    tuner = tune.Tuner(
        tune.with_resources(anchor_trial, {"cpu": 1}),
        param_space={"lam": tune.grid_search(grid), "seed": tune.grid_search(list(range(seeds))), "max_t": max_t},
        tune_config=tune.TuneConfig(
            metric="AP",
            mode="max",
            scheduler=ASHAScheduler(max_t=max_t, grace_period=1, reduction_factor=3),
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name="anchor",
            storage_path=str(root / "anchor"),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=keep),
            callbacks=[Clock()],
            verbose=0,
        ),
    )
    logging.getLogger("ray.tune").setLevel(logging.ERROR)  # no loggers: "result.json not found" per trial
    t0 = time.perf_counter()
    with GCTime() as gc_time:
        results = tuner.fit()
    sweep_s = time.perf_counter() - t0
    ray.shutdown()
    steady = (cpu[-1] - cpu[0]) / (len(cpu) - 1) if len(cpu) > 1 else float("nan")
    return {
        "trials": len(results),
        "reports": len(cpu),
        "driver_ms_per_report": round(1000 * steady, 2),
        **gc_time.figures(),
        "trials_per_min": round(len(results) / (sweep_s / 60), 1),
        "sweep_s": round(sweep_s, 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", type=int, default=334, help="λ values (x --seeds = trials)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--max-t", type=int, default=4, help="evaluations of a full-length trial")
    ap.add_argument("--nodes", type=int, default=3, help="Ray nodes started on this machine (1 head + workers)")
    ap.add_argument("--cpus-per-node", type=int, default=4, help="logical CPUs each node offers (trials in flight)")
    ap.add_argument("--tracking", choices=("server", "sqlite"), default="server",
                    help="server: an `mlflow server` (sqlite backend) as a team runs it; sqlite: the driver writes "
                         "the default sqlite file itself")  # fmt: skip
    ap.add_argument("--out", type=Path, default=None, help="work dir (default: a temp dir, removed)")
    ap.add_argument("--checkpoints-to-keep", type=int, default=None,
                    help="run.checkpoints_to_keep of the sweep and the anchor (default: the product's); above --max-t "
                         "no trial checkpoints that often, so Tune never forces a snapshot")  # fmt: skip
    ap.add_argument("--no-anchor", dest="anchor", action="store_false",
                    help="skip the anchor (plain Tune on the same trials, no callbacks) after the sweep")  # fmt: skip
    args = ap.parse_args()
    keep = args.checkpoints_to_keep or RunSettings().checkpoints_to_keep
    root = args.out or Path(tempfile.mkdtemp(prefix="bench_driver_"))
    temps: list[str] = []
    server = None
    try:
        generate_benchmark(root / "data", preset="demo", seed=0)
        if args.tracking == "server":
            server = start_server(root / "mlflow_server", workers=1)
        uri = server.url if server else None
        cfg_path = sweep_config(root, root / "data", args.configs, args.seeds, args.max_t, uri, keep)
        address, env, temps = start_cluster(args.nodes, args.cpus_per_node)
        if server:
            wait_healthy(server)
        os.environ.update({"RAY_ADDRESS": address, "RAY_AUTH_MODE": "disabled"})
        res = drive(cfg_path)
        if args.anchor:
            res["anchor_plain_tune"] = drive_anchor(root, args.configs, args.seeds, args.max_t, keep)
    finally:
        for temp in reversed(temps):  # this cluster's nodes only, never other Ray sessions on the machine
            stop_cluster(temp)
            shutil.rmtree(temp, ignore_errors=True)
        if server:
            stop_process_group(server.proc)
        if args.out is None:
            shutil.rmtree(root, ignore_errors=True)
    met = {k: res[k] <= goal for k, goal in GOALS.items()}
    payload = {"benchmark": "driver", "nodes": args.nodes, "tracking": args.tracking, "checkpoints_to_keep": keep}
    payload.update({**res, "goals_met": met})
    print(json.dumps(payload))
    return 0 if res["finished"] == res["trials"] else 1


if __name__ == "__main__":
    sys.exit(main())
