"""Fidelity: do the papers' findings hold on the synthetic `study` benchmark? Paired effects over seeds, 95% CIs.

Per seed, one shared stage 1 (non-balance sampling + conventional softmax CE, all layers) and from it:
  Study 1 (concurrent-softmax paper, Table 3): stage 2 with concurrent softmax, sampler non-balance vs soft-balance
          λ ∈ {0.5, 0.7, 1.0, 1.5}. Findings: APr and AP of λ = 0.7, and of the best λ (highest mean AP over the
          seeds, picked after the fact, so its effect is optimistic), minus non-balance. Paper: soft-balance beats
          non-balance (57.04 vs 38.16 mAP at λ = 0.7; the table reports mAP only). Table 3's non-balance and
          class-aware rows equal Table 1's softmax-loss rows, so the paper varied the sampler under the
          conventional softmax; here every arm trains concurrent softmax, and only the sampler differs.
  Study 2 (ACSL paper, Table 2): decoupled stage 2 that trains only the classifier (as the paper's §4.2), with the
          non-balance sampler for every arm (§4.2 / §4.3 name no sampler for the second stage): ACSL ξ ∈ {0.3,
          0.7}, conventional softmax, BCE. Findings: APr of ACSL minus softmax and minus BCE (paper: ACSL higher;
          Table 2's baseline is softmax, 4.30 / 7.38 APr at 1x / 2x vs 17.65 / 18.64 at ξ = 0.3 / 0.7), and APf of
          ACSL minus softmax, whose paper direction is "drops by less than 1 AP point": effect > -0.01 (Table 2:
          29.27 / 29.37 vs 29.28 / 28.17). The BCE comparison is the paper's motivation (§3, Fig 3), not a table
          row. Our softmax baseline is a decoupled stage 2 like the ACSL arms (the paper's is a 1x / 2x one-stage
          model), so the comparison isolates the loss.
  Study 3 (concurrent-softmax paper, Table 4 / §5.5): the hybrid run (stage 1 + soft-balance λ = 0.7 + concurrent
          softmax: study 1's arm, the table's "Soft-balance*") vs a one-stage run from scratch with the same sampler
          and loss and the same total epochs. Findings: AP and APr of hybrid minus one-stage (paper: hybrid
          higher). The paper's one-stage balanced rows are class-aware from ImageNet (64.68 mAP at 7 epochs, 62.85
          at 14), its hybrids train more epochs in total (14+7, 20+7: 65.60, 65.92; soft-balance 67.09,
          Soft-balance* 68.23), and §5.5 argues the gain is not from the extra epochs because longer class-aware
          training loses mAP. Equal total epochs here removes that question. Table 4 reports mAP only; APr is our
          addition.

Statistics (pipelines.analysis.evidence, the product's): every run keeps the AP, APr, APc and APf of 1000 bootstrap
draws of the validation images (the same draws for every run). Per arm, the mean over seeds with its seeds x images
95% interval. Per finding, the paired differences d_s = arm(s) - baseline(s) over seeds (same seed = same stage 1
and the same sampler draws) and over the same image draws: effect = mean(d) with its 95% interval, and the two-sided
p-value of "no effect beyond the threshold" (0, or -0.01 for the APf drop). The 12 findings are one family: Holm's
correction at family-wise 5% gives each its verdict, "holds" (the paper's direction), "contradicts" or "cannot tell".

Schedule (tiny backbone, 128 px, batch 8): stage 1 6 epochs (lr 0.02, x0.1 for the last epoch); every stage 2
4 epochs (a fresh lr 0.02, x0.1 for the last epoch; soft-balance draws as many images per epoch as the dataset has); the
one-stage run 10 epochs (lr 0.02, x0.1 for the last one). Runs evaluate once, at their end.

Cost: 11 runs per seed (stage 1, 5 study-1 arms, 4 decoupled study-2 arms, the one-stage run), 36 full-network
epochs and 16 classifier-only epochs per seed. About 50-60 minutes for 3 seeds on 2 CPU cores (--workers 2, one
torch thread per run; measured ~24 train img/s per run with two runs side by side on idle cores, ~60 img/s for a
classifier-only epoch); other work on the same cores stretches it (about 1.5-2x while two other trainings ran).
With a GPU (device auto picks CUDA) the same benchmark runs in minutes. Each finished run's metrics are cached
under --cache (one JSON per run name and seed, written atomically), so a rerun after a crash skips them; only the
stage-1 checkpoints stay on disk.

    python benchmarks/bench_fidelity.py [--seeds 0 1 2] [--data data/study] [--data-seeds] [--workers 2]
                                        [--cache DIR] [--out benchmarks/results/fidelity.json] [--quick]
--data-seeds: seed s trains and evaluates on its own draw of the benchmark (<data>-data<s>, generated with data
seed s), so the spread over seeds counts the data draw as well as the training seed; without it every seed shares
the draw in --data (data seed 0), and the intervals count training seeds and validation images only.
--quick: a tiny preset and a 1-epoch schedule in a temp dir (unless --data), to test the script in minutes; it
writes no JSON file unless --out is given.
Progress lines (run, minutes, AP) go to stderr. Last stdout line:
  {"benchmark": "fidelity", "commit" (the code that trained the runs), "report_commit", "seeds": [...],
   "data_seeds": [...], "intervals", "correction", "findings": [{"name", "metric",
   "effect", "ci_low", "ci_high", "p_value", "p_holm", "verdict", "why", "threshold", "method", "paper"}, ...],
   "ablations": []}
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
import tempfile
import time
from collections import Counter, defaultdict
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from lt_models.atomic import write_json_atomic
from lt_models.data.sampler_spec import SamplerSpec
from lt_models.data.synthetic.generate import generate_benchmark
from lt_models.data.synthetic.layout import PRESETS
from lt_models.engine.spec import STAGE1_SAMPLER, TrainSpec
from lt_models.evaluation.bootstrap import REPLICATES_FILE, read_replicates
from lt_models.losses.registry import LossSpec
from pipelines.analysis import evidence

LAMBDAS = (0.5, 0.7, 1.0, 1.5)
VERDICT_WORDS = {"better": "holds", "worse": "contradicts", "cannot tell": "cannot tell"}
CORRECTION = "Holm over the findings, family-wise 5%: holds / contradicts when the corrected test rejects no effect"
HYBRID_LAM = 0.7
XIS = (0.3, 0.7)
METRICS = ("AP", "APr", "APc", "APf")
REPLICATES = 1000  # bootstrap draws of the validation images per run (lt_models.evaluation.bootstrap)
KEEP = ("AP", "AP50", "AP75", "APr", "APc", "APf", "loss", "epoch", "iteration", "train_img_per_s")
# (schedule of stage 1, of every stage 2; the one-stage run trains stage1 + stage2 epochs from scratch)
FULL = {
    "stage1": dict(epochs=6, lr=0.02, warmup=50, lr_steps=(5,)),
    "stage2": dict(epochs=4, lr=0.02, warmup=20, lr_steps=(3,)),
    "batch_size": 8,
    "image_size": 128,
}
QUICK = {
    "stage1": dict(epochs=1, lr=0.02, warmup=5, lr_steps=()),
    "stage2": dict(epochs=1, lr=0.02, warmup=5, lr_steps=()),
    "batch_size": 8,
    "image_size": 64,
}
# ~180 train / 44 val images, 12 leaves + 3 parents, every r/c/f bucket filled: for --quick only
QUICK_PRESET = dataclasses.replace(
    PRESETS["demo"],
    name="fidelity_quick",
    families=3,
    appearances=4,
    t_max=180,
    t_min=2,
    q=4,
    val_min=2,
    n_confusable=1,
    n_two_leaf=1,
    workers=1,
)


# Runs ------------------------------------------------------------------------------------------------------------
def arms() -> dict[str, tuple[str, SamplerSpec, LossSpec, str | bool]]:
    """Run name -> (stage, sampler, loss, decoupled). Stage-2 runs start from the seed's "stage1"."""
    nb, cs = SamplerSpec("nonbalance"), LossSpec("concurrent_softmax")
    out = {"stage1": ("stage1", STAGE1_SAMPLER, LossSpec("softmax"), False), "nonbalance": ("stage2", nb, cs, False)}
    out.update({f"softbalance_{lam}": ("stage2", SamplerSpec("softbalance", lam=lam), cs, False) for lam in LAMBDAS})
    out.update({f"cls_acsl_{xi}": ("stage2", nb, LossSpec("acsl", xi=xi), "cls") for xi in XIS})
    out.update(
        {
            "cls_softmax": ("stage2", nb, LossSpec("softmax"), "cls"),
            "cls_bce": ("stage2", nb, LossSpec("bce"), "cls"),
            "one_stage": ("one_stage", SamplerSpec("softbalance", lam=HYBRID_LAM), cs, False),
        }
    )
    return out


def data_dir(data: Path, seed: int, data_seeds: bool) -> Path:
    """The benchmark a seed trains on: the shared draw, or with --data-seeds its own draw ``<data>-data<seed>``."""
    return data.with_name(f"{data.name}-data{seed}") if data_seeds else data


def make_spec(name: str, seed: int, data: Path, sched: dict, device: str) -> TrainSpec:
    stage, sampler, loss, decoupled = arms()[name]
    if stage == "one_stage":  # same total epochs as the hybrid, stage 1's learning rate, one LR drop before the end
        s1, s2 = sched["stage1"], sched["stage2"]
        epochs = s1["epochs"] + s2["epochs"]
        hp = dict(epochs=epochs, lr=s1["lr"], warmup=s1["warmup"], lr_steps=(epochs - 1,) if s1["lr_steps"] else ())
    else:
        hp = dict(sched[stage])
    return TrainSpec(
        train_ann=str(data / "train.json"),
        val_ann=str(data / "val.json"),
        train_image_dir=str(data / "images"),
        val_image_dir=str(data / "images"),
        hierarchy_file=str(data / "hierarchy.json"),
        stage=stage,
        backbone="tiny",
        image_size=sched["image_size"],
        sampler=sampler,
        loss=loss,
        decoupled=decoupled,
        batch_size=sched["batch_size"],
        eval_every=hp["epochs"],
        seed=seed,
        num_threads=1,
        device=device,
        progress=False,
        keep_checkpoints=1,
        replicates=0 if stage == "stage1" else REPLICATES,
        **hp,
    )


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)


def run_one(job: dict) -> dict:
    """Train one run in a worker process, cache its metrics atomically, return the cache record."""
    from lt_models.engine.loop import train

    out_dir = Path(job["out_dir"])
    shutil.rmtree(out_dir, ignore_errors=True)  # a crashed attempt's leftovers
    t0 = time.perf_counter()
    metrics = train(TrainSpec.from_dict(job["spec"]), out_dir, init_checkpoint=job["init_checkpoint"])
    record = {
        "name": job["name"],
        "seed": job["seed"],
        "commit": job["commit"],
        "spec": job["spec"],
        "minutes": (time.perf_counter() - t0) / 60,
        "metrics": {k: metrics[k] for k in KEEP if k in metrics},
        "per_class": {str(k): v for k, v in metrics.get("per_class", {}).items()},
    }
    if job["name"] == "stage1":
        record["checkpoint_dir"] = metrics["checkpoint_dir"]
    else:  # only the metrics and their image-bootstrap replicates are needed
        reps = read_replicates((Path(metrics["checkpoint_dir"]) / REPLICATES_FILE).read_bytes())
        record["replicates"] = {m: [float(v) for v in reps[m]] for m in METRICS}
        shutil.rmtree(out_dir, ignore_errors=True)
    write_json_atomic(job["cache_file"], record, indent=1)
    return record


def _cached(path: Path, spec: dict) -> dict | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if record.get("spec") == spec else None


def run_all(
    seeds: list[int], data: Path, data_seeds: bool, cache: Path, sched: dict, workers: int, device: str
) -> dict:
    """(name, seed) -> cache record for every run; stage 1 first, then the longest runs first."""
    order = list(arms())
    priority = {n: (0 if n == "stage1" else 1 if n == "one_stage" else 3 if n.startswith("cls_") else 2) for n in order}
    jobs, done = {}, {}
    commit = _commit()
    for seed in seeds:
        for name in order:
            spec = make_spec(name, seed, data_dir(data, seed, data_seeds), sched, device).to_dict()
            key = (name, seed)
            stem = f"{name}__seed{seed}" + ("__dataseed" if data_seeds else "")
            jobs[key] = {
                "name": name,
                "seed": seed,
                "commit": commit,
                "spec": spec,
                "out_dir": str(cache / stem),
                "cache_file": str(cache / f"{stem}.json"),
                "init_checkpoint": None,
            }
            record = _cached(cache / f"{stem}.json", spec)
            if record is not None:
                done[key] = record
    for seed in seeds:  # a cached stage 1 is usable only with its checkpoint, unless nothing needs it any more
        s1 = done.get(("stage1", seed))
        needed = any((n, seed) not in done and arms()[n][0] == "stage2" for n in order)
        if s1 is not None and needed and not (Path(s1["checkpoint_dir"]) / "checkpoint.pt").is_file():
            del done[("stage1", seed)]
    pending = {k: j for k, j in jobs.items() if k not in done}
    print(
        f"{len(done)} of {len(jobs)} runs cached in {cache}; {len(pending)} to train with {workers} workers",
        file=sys.stderr,
        flush=True,
    )
    failed: dict = {}
    t_start = time.perf_counter()
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker) as ex:
        running = {}
        while pending or running:
            for key in [k for k in pending if arms()[k[0]][0] == "stage2" and ("stage1", k[1]) in failed]:
                failed[key] = "its stage 1 failed"
                del pending[key]
            ready = sorted(
                (k for k in pending if arms()[k[0]][0] != "stage2" or ("stage1", k[1]) in done),
                key=lambda k: (priority[k[0]], k[1], order.index(k[0])),
            )
            for key in ready[: max(0, workers - len(running))]:
                job = pending.pop(key)
                if arms()[key[0]][0] == "stage2":
                    job["init_checkpoint"] = done[("stage1", key[1])]["checkpoint_dir"]
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
                    print(f"FAILED {key[0]} seed {key[1]}: {failed[key]}", file=sys.stderr, flush=True)
                    continue
                m = done[key]["metrics"]
                print(
                    f"[{len(done)}/{len(jobs)}] {key[0]} seed {key[1]}: {done[key]['minutes']:.1f} min, "
                    f"AP {m['AP']:.3f} APr {m['APr']:.3f} APf {m['APf']:.3f} (elapsed "
                    f"{(time.perf_counter() - t_start) / 60:.1f} min)",
                    file=sys.stderr,
                    flush=True,
                )
    if failed:
        raise SystemExit(
            "runs failed (rerun to retry them; finished runs are cached): "
            + "; ".join(f"{n} seed {s}: {why}" for (n, s), why in sorted(failed.items()))
        )
    return done


# Statistics ------------------------------------------------------------------------------------------------------
def _num(x) -> float | None:
    return round(float(x), 6) if x is not None and math.isfinite(float(x)) else None


def _reps(arm: dict, metric: str):
    """[seeds, R] image-bootstrap replicates of an arm's metric (the same image draws for every run)."""
    return np.asarray(arm["reps"][metric], dtype=np.float64)


def arm_stat(arm: dict, metric: str) -> evidence.Interval:
    """The arm's mean over the seeds with its seeds x images 95% interval."""
    return evidence.interval(arm["values"][metric], _reps(arm, metric))


def paired(a: dict, b: dict, metric: str, threshold: float = 0.0) -> evidence.Interval:
    """a - b over the seeds (same seed = same stage 1 and sampler draws) and the same image draws, minus the
    finding's ``threshold`` (the paper's claim is "above the threshold")."""
    d = np.asarray(a["values"][metric]) - np.asarray(b["values"][metric]) - threshold
    return evidence.interval(d, _reps(a, metric) - _reps(b, metric) - threshold)


def findings(table: dict[str, dict]) -> list[dict]:
    """table[arm] = {"values": {metric: [per seed]}, "reps": {metric: [per seed [R]]}} (same seed order for every
    arm). The findings are one family: their verdicts are corrected together (Holm, family-wise 5%)."""
    best = max(LAMBDAS, key=lambda lam: np.mean(table[f"softbalance_{lam}"]["values"]["AP"]))
    cs1 = "concurrent-softmax paper Table 3"
    rows = [
        (
            "soft-balance λ=0.7 vs non-balance",
            "softbalance_0.7",
            "nonbalance",
            m,
            0.0,
            f"{cs1}: 57.04 vs 38.16 mAP" + ("" if m == "AP" else " (APr not reported)"),
        )
        for m in ("APr", "AP")
    ]
    rows += [
        (
            f"soft-balance best λ={best} vs non-balance",
            f"softbalance_{best}",
            "nonbalance",
            m,
            0.0,
            f"{cs1}: best λ=0.7, soft-balance above non-balance for λ >= 0.3 (mAP)",
        )
        for m in ("APr", "AP")
    ]
    table2 = {0.3: (17.65, 29.27), 0.7: (18.64, 29.37)}  # ACSL paper Table 2: (APr, APf) at ξ
    for xi in XIS:
        rows.append(
            (
                f"ACSL ξ={xi} vs softmax",
                f"cls_acsl_{xi}",
                "cls_softmax",
                "APr",
                0.0,
                f"ACSL paper Table 2: APr {table2[xi][0]} ACSL vs 4.30 (1x) / 7.38 (2x) softmax",
            )
        )
        rows.append(
            (
                f"ACSL ξ={xi} vs BCE",
                f"cls_acsl_{xi}",
                "cls_bce",
                "APr",
                0.0,
                "ACSL paper §3 / Fig 3: BCE over-suppresses tail classifiers (no table row)",
            )
        )
    for xi in XIS:
        rows.append(
            (
                f"ACSL ξ={xi} vs softmax, APf drop < 1 point",
                f"cls_acsl_{xi}",
                "cls_softmax",
                "APf",
                -0.01,
                f"ACSL paper Table 2: APf {table2[xi][1]} ACSL vs 29.28 (1x) / 28.17 (2x) softmax",
            )
        )
    rows += [
        (
            "hybrid (stage 1 + soft-balance λ=0.7) vs one-stage, equal epochs",
            f"softbalance_{HYBRID_LAM}",
            "one_stage",
            m,
            0.0,
            "concurrent-softmax paper Table 4 / §5.5: hybrid 65.60-68.23 vs one-stage "
            "class-aware 62.85-64.68 mAP" + ("" if m == "AP" else " (APr not reported)"),
        )
        for m in ("AP", "APr")
    ]
    shifted = [paired(table[arm], table[base], metric, thr) for _, arm, base, metric, thr, _ in rows]
    words = evidence.verdicts(shifted)  # "better" = above the paper's threshold
    out = []
    for (name, _, _, metric, thr, paper), iv, v in zip(rows, shifted, words):
        out.append(
            {
                "name": name,
                "metric": metric,
                "effect": _num(iv.estimate + thr),
                "ci_low": _num(iv.low + thr),
                "ci_high": _num(iv.high + thr),
                "p_value": _sig(v.p),
                "p_holm": _sig(v.p_holm),
                "verdict": VERDICT_WORDS[v.word],
                "why": v.reason,
                "threshold": thr,
                "method": f"{iv.method}, {iv.n_seeds} seeds, {iv.replicates} image draws",
                "paper": paper,
            }
        )
    return out


def _sig(x: float) -> float | None:
    """A p-value to 4 significant digits: a small one stays positive (the computed floor is 1e-12), never 0."""
    return float(f"{x:.4g}") if math.isfinite(x) else None


def _fmt(x: float | None, sign: str = "") -> str:
    return "-" if x is None else f"{x:{sign}.3f}"


def _p(p: float | None) -> str:
    """A p-value as printed: never 0.000, which would read as certainty."""
    return "-" if p is None else "<0.001" if p < 0.001 else f"{p:.3f}"


def val_instances(data: Path) -> dict[str, list[int]]:
    """Validation instances per class, grouped by the training r/c/f bucket."""
    val = json.loads((data / "val.json").read_text())
    train = json.loads((data / "train.json").read_text())
    n = Counter(a["category_id"] for a in val["annotations"])
    out = defaultdict(list)
    for c in train["categories"]:
        out[c["frequency"]].append(n[c["id"]])
    return out


def ensure_benchmark(data: Path, preset, seed: int) -> None:
    """Generate the benchmark in ``data`` with data seed ``seed`` unless it is there; print its validation counts."""
    if not (data / "train.json").is_file():
        s = generate_benchmark(data, preset=preset, seed=seed)
        print(
            f"generated {s['preset']} (data seed {seed}) in {data}: {s['train_images']} train / {s['val_images']} "
            f"val images, {s['categories']} classes, buckets {s['buckets']}",
            file=sys.stderr,
            flush=True,
        )
    inst = val_instances(data)
    print(
        f"{data}: validation instances per class (min / mean / max): "
        + ", ".join(f"{b} ({len(v)} classes) {min(v)} / {np.mean(v):.1f} / {max(v)}" for b, v in sorted(inst.items())),
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--data", type=Path, default=None, help="benchmark dir (default data/study; --quick: a temp dir)")
    ap.add_argument("--workers", type=int, default=2, help="runs in parallel, one torch thread each")
    ap.add_argument("--cache", type=Path, default=None, help="per-run metrics (default <data>/fidelity_runs)")
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON copy (default benchmarks/results/fidelity.json; --quick: none unless given)",
    )
    ap.add_argument(
        "--data-seeds",
        action="store_true",
        help="seed s trains on its own draw of the benchmark, <data>-data<s> (generated with data seed s), so the "
        "intervals count the data draw too",
    )
    ap.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda")
    ap.add_argument("--quick", action="store_true", help="tiny preset and schedule: a smoke test of the script")
    args = ap.parse_args()
    if len(set(args.seeds)) < 2:
        ap.error("--seeds: give at least 2 distinct seeds (3 or more for a useful CI)")
    if args.workers < 1:
        ap.error("--workers: at least 1")
    tmp = None
    if args.data is None and args.quick:
        tmp = Path(tempfile.mkdtemp(prefix="fidelity_quick_"))
    data = args.data or (tmp / "study" if tmp else Path("data/study"))
    cache = args.cache or data / "fidelity_runs"
    out = args.out or (None if args.quick else Path("benchmarks/results/fidelity.json"))
    sched = QUICK if args.quick else FULL
    seeds = sorted(set(args.seeds))
    t0 = time.perf_counter()
    try:
        for d, data_seed in sorted({(data_dir(data, s, args.data_seeds), s if args.data_seeds else 0) for s in seeds}):
            ensure_benchmark(d, QUICK_PRESET if args.quick else "study", data_seed)
        done = run_all(seeds, data, args.data_seeds, cache, sched, args.workers, args.device)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    table = {
        a: {
            "values": {m: [done[(a, s)]["metrics"][m] for s in seeds] for m in METRICS},
            "reps": {m: [done[(a, s)]["replicates"][m] for s in seeds] for m in METRICS},
        }
        for a in arms()
        if a != "stage1"
    }
    print(f"\nfidelity, {len(seeds)} seeds {seeds}, {(time.perf_counter() - t0) / 60:.1f} min; mean [95% interval]")
    print(f"{'arm':<20}" + "".join(f"{m:>24}" for m in METRICS))
    for a, row in table.items():
        print(f"{a:<20}" + "".join(f"{arm_stat(row, m).text():>24}" for m in METRICS))
    result = findings(table)
    print(f"\n{'finding':<66}{'metric':>6}{'effect':>9}{'95% interval':>20}{'p':>8}{'Holm p':>8}  verdict")
    for f in result:
        ci = f"[{_fmt(f['ci_low'], '+')}, {_fmt(f['ci_high'], '+')}]"
        print(
            f"{f['name']:<66}{f['metric']:>6}{f['effect']:>+9.3f}{ci:>20}{_p(f['p_value']):>8}"
            f"{_p(f['p_holm']):>8}  {f['verdict']}"
        )
    print(f"intervals: {result[0]['method'] if result else '-'}; verdicts: {CORRECTION}")
    commits = sorted({str(done[(a, s)].get("commit")) for a in arms() for s in seeds})
    payload = {
        "benchmark": "fidelity",
        "commit": commits[0] if len(commits) == 1 else commits,  # the code that trained the runs
        "report_commit": _commit(),  # the code that computed the statistics
        "seeds": seeds,
        "data_seeds": seeds if args.data_seeds else [0],
        "intervals": "seeds x images (pipelines.analysis.evidence)",
        "correction": CORRECTION,
        "findings": result,
        "ablations": [],
    }
    if out is not None:
        write_json_atomic(out, payload, indent=1)
    print(json.dumps(payload))


def _commit() -> str | None:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


if __name__ == "__main__":
    main()
