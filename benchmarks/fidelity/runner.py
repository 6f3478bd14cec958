"""Training the fidelity arms in worker processes, each finished run cached as one JSON record.

A record holds the run's spec, the commit that trained it, its minutes and its *views*: the metrics of one
evaluation with, where the LVIS matching allows it, 1000 bootstrap replicates over the validation images (the same
draws for every run: ``lt_models.evaluation.bootstrap.replicate_weights``):
  ``lvis``       LVIS AP over every class (the run's own evaluation and replicates)
  ``leaves``     LVIS AP over the leaf classes only (the same detections): losses that train on different label
                 sets (one label per RoI, or the multi-hot row with the parents) are scored on the same classes
  ``oi``         the Open Images challenge AP@0.5 with the hierarchy, every detection also counted for its
                 ancestors (the hierarchy expanded for every loss); no replicates (seeds-only intervals)
  ``<view>@<scores>`` the same for another inference-scores rule (``Arm.rescore``), from the same weights.
Stage-1 runs keep their checkpoint for their stage-2 arms and record their own ``lvis`` values.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

from lt_models.atomic import write_json_atomic
from lt_models.engine.spec import TrainSpec
from lt_models.evaluation.bootstrap import REPLICATES_FILE, read_replicates, replicate_weights, weighted_ap
from lt_models.evaluation.matches import MATCHES_FILE, Matches

METRICS = ("AP", "AP50", "APr", "APc", "APf")


def leaf_cat_ids(data: Path) -> list[int]:
    """Category ids of the leaves of ``data``'s hierarchy (the classes without children)."""
    tree = json.loads((data / "hierarchy.json").read_text())
    names: list[str] = []

    def walk(node: dict) -> None:
        subs = node.get("Subcategory") or []
        if not subs and node is not tree:
            names.append(node["LabelName"])
        for s in subs:
            walk(s)

    walk(tree)
    by_name = {c["name"]: c["id"] for c in json.loads((data / "train.json").read_text())["categories"]}
    return sorted(by_name[n] for n in set(names))


def _num(x) -> float | None:
    x = float(x)
    return x if np.isfinite(x) and x > -1 else None


def _lvis_views(m: Matches, leaves: list[int], replicates: int, own: dict | None = None) -> dict:
    """``lvis`` and ``leaves`` views of one matching (``own``: the run's own values and replicates, reused)."""
    weights = replicate_weights(m.n_images, replicates)
    out = {}
    for view, mm in (("lvis", m), ("leaves", m.select(leaves))):
        if view == "lvis" and own is not None:
            out[view] = own
            continue
        one = weighted_ap(mm, np.ones((mm.n_images, 1)), threads=1)
        reps = weighted_ap(mm, weights, threads=1)
        out[view] = {
            "values": {k: _num(one[k][0]) for k in METRICS},
            "reps": {k: [float(v) for v in reps[k]] for k in METRICS},
        }
    return out


def _oi_view(res: dict) -> dict:
    return {"values": {k: _num(res[k]) for k in METRICS if k in res}}


def evaluate_views(ckpt: Path, metrics: dict, rescore: tuple[str, ...], leaves: list[int], replicates: int) -> dict:
    """Every view of a trained stage-2 / one-stage run (see the module docstring)."""
    from lt_models.engine.reevaluate import evaluate_checkpoint

    reps = read_replicates((ckpt / REPLICATES_FILE).read_bytes())
    own = {
        "values": {k: _num(metrics[k]) for k in METRICS},
        "reps": {k: [float(v) for v in reps[k]] for k in METRICS},
    }
    views = _lvis_views(Matches.load(ckpt / MATCHES_FILE), leaves, replicates, own)
    views["oi"] = _oi_view(evaluate_checkpoint(ckpt, metrics=("openimages",), expand_detections=True)["openimages"])
    for rule in rescore:
        res = evaluate_checkpoint(ckpt, scores=rule, metrics=("lvis", "openimages"), expand_detections=True)
        for view, v in _lvis_views(res["lvis"]["matches"], leaves, replicates).items():
            views[f"{view}@{rule}"] = v
        views[f"oi@{rule}"] = _oi_view(res["openimages"])
    return views


def init_worker() -> None:
    import torch

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)


def run_one(job: dict) -> dict:
    """Train one run in a worker process, evaluate its views, cache the record atomically and return it."""
    from lt_models.engine.loop import train

    out_dir = Path(job["out_dir"])
    shutil.rmtree(out_dir, ignore_errors=True)  # a crashed attempt's leftovers
    t0 = time.perf_counter()
    metrics = train(TrainSpec.from_dict(job["spec"]), out_dir, init_checkpoint=job["init_checkpoint"])
    ckpt = Path(metrics["checkpoint_dir"])
    record = {
        "name": job["name"],
        "seed": job["seed"],
        "commit": job["commit"],
        "spec": job["spec"],
        "train_minutes": (time.perf_counter() - t0) / 60,
    }
    if job["stage"] == "stage1":
        record["checkpoint_dir"] = str(ckpt)
        record["views"] = {"lvis": {"values": {k: _num(metrics[k]) for k in METRICS}}}
    else:
        record["views"] = evaluate_views(ckpt, metrics, tuple(job["rescore"]), job["leaves"], job["replicates"])
        shutil.rmtree(out_dir, ignore_errors=True)
    record["minutes"] = (time.perf_counter() - t0) / 60
    write_json_atomic(job["cache_file"], record, indent=1)
    return record


def _set_fields(d):
    """A spec dict without its unset (None) fields, at every level: a field added to the spec later, unset, leaves
    a record written before it valid."""
    if isinstance(d, dict):
        return {k: _set_fields(v) for k, v in d.items() if v is not None}
    return d


@functools.cache
def _content(path: str) -> str:
    """The sha256 of a weights file's tensors (names, dtypes, shapes, values): its identity. The stage-0 cache key
    also hashes the generator's source, so a refactor that leaves the weights identical moves them to a new path,
    and two torch.save files of the same tensors need not be byte-identical."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError):
        return "missing:" + path
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].contiguous()
        h.update(f"{name} {t.dtype} {tuple(t.shape)}\n".encode())
        h.update(t.numpy().tobytes())
    return "tensors-sha256:" + h.hexdigest()


def _identity(spec: dict | None) -> dict | None:
    out = _set_fields(spec)
    if isinstance(out, dict) and out.get("weights"):
        out = {**out, "weights": _content(out["weights"])}
    return out


def cached(path: Path, spec: dict) -> dict | None:
    """The cache record at ``path`` if it was written for this very spec (weights compared by content)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if _identity(record.get("spec")) != _identity(spec):
        return None
    return record


def run_jobs(jobs: dict, done: dict, parents: dict, workers: int, log=print) -> dict:
    """Run ``jobs`` ((name, seed) -> job) in ``workers`` processes, stage 1s first, each stage 2 once its parent
    ((name, seed) -> parent key, from ``parents``) is done; return the failures ((name, seed) -> why)."""
    pending = {k: j for k, j in jobs.items() if k not in done}
    failed: dict = {}
    t_start = time.perf_counter()
    order = list(jobs)
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=init_worker) as ex:
        running: dict = {}
        while pending or running:
            for key in [k for k in pending if parents.get(k) in failed]:
                failed[key] = f"its stage 1 {parents[key][0]} failed"
                del pending[key]
            ready = [k for k in pending if parents.get(k) is None or parents[k] in done]
            ready.sort(key=lambda k: (parents.get(k) is not None, -jobs[k]["epochs"], order.index(k)))
            for key in ready[: max(0, workers - len(running))]:
                job = pending.pop(key)
                if parents.get(key) is not None:
                    job["init_checkpoint"] = done[parents[key]]["checkpoint_dir"]
                running[ex.submit(run_one, job)] = key
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                key = running.pop(fut)
                try:
                    done[key] = fut.result()
                except Exception as e:
                    failed[key] = f"{type(e).__name__}: {e}"
                    log(f"FAILED {key[0]} seed {key[1]}: {failed[key]}")
                    continue
                v = done[key]["views"]["lvis"]["values"]
                log(
                    f"[{len(done)}/{len(jobs)}] {key[0]} seed {key[1]}: {done[key]['minutes']:.1f} min, AP "
                    f"{v['AP']} APr {v['APr']} (elapsed {(time.perf_counter() - t_start) / 60:.1f} min)"
                )
    return failed


def stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
