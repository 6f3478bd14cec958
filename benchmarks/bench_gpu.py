"""One GPU check: the papers' detector on a GPU with AMP, a 2-trial sweep on it, and a 2-worker NCCL trial.

Three parts, all through the product's own paths, on a synthetic benchmark written as JPEG files (so the data loader
decodes JPEGs, as it does on LVIS):
  1. throughput: R50-FPN at 800 / 1333 px, AMP (float16 autocast + GradScaler), batch 4, 4 loader workers, one
     epoch of ``--images`` training images through ``lt_models.engine.loop.train``: images/s, the share of step time
     spent waiting on the loader, peak GPU memory (``torch.cuda.max_memory_allocated``) and GPU utilisation
     (``nvidia-smi`` sampled every 0.5 s while it trains);
  2. a 2-trial sweep (``ltsweep sweep`` in-process: Ray Tune, MLflow, one shared stage 1), each trial on half the GPU:
     wall time and whether both trials finished;
  3. with at least 2 GPUs: one trial on 2 Ray Train workers (DDP over NCCL, one GPU each) against 1 worker: total
     images/s and the speedup; with fewer GPUs these keys are null and ``ddp_skipped`` says why.
The whole check is sized for at most 8 minutes on one H100.

``--cpu-smoke``: the same three parts on the CPU with the tiny backbone at 64 px and a handful of images (the
GPU-only figures are null), so that ``make test`` runs this script and it never rots.

Usage: python benchmarks/bench_gpu.py [--cpu-smoke] [--images 256] [--sweep-images 64] [--out DIR]
Last stdout line: {"benchmark": "gpu", "mode", "device", "gpus", "backbone", "image_size", "amp", "train_images",
"img_per_s", "loader_wait_fraction", "peak_mem_gb", "gpu_util_mean", "gpu_util_samples", "sweep_trials",
"sweep_finished", "sweep_s", "ddp_workers", "ddp1_img_per_s", "ddp2_img_per_s", "ddp_speedup", "ddp_skipped",
"minutes"}
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import yaml
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lt_models.data.synthetic.generate import generate_benchmark
from lt_models.engine.loop import train
from lt_models.engine.spec import TrainSpec

GPU_SETTING = {"backbone": "resnet50_fpn", "image_size": 800, "batch_size": 4, "workers": 4, "scale": 6.25}
SMOKE_SETTING = {"backbone": "tiny", "image_size": 64, "batch_size": 4, "workers": 1, "scale": 1.0}


def jpeg_benchmark(src: Path, dst: Path, scale: float, max_train: int | None) -> Path:
    """A copy of the synthetic benchmark in ``src`` with JPEG images ``scale`` times larger (boxes scaled too)."""
    (dst / "images").mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        data = json.loads((src / f"{split}.json").read_text())
        if split == "train" and max_train is not None:
            keep = {im["id"] for im in data["images"][:max_train]}
            data["images"] = [im for im in data["images"] if im["id"] in keep]
            data["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
        for im in data["images"]:
            img = Image.open(src / "images" / im["file_name"]).convert("RGB")
            w, h = round(im["width"] * scale), round(im["height"] * scale)
            name = Path(im["file_name"]).with_suffix(".jpg").name
            img.resize((w, h), Image.BILINEAR).save(dst / "images" / name, quality=90)
            im.update(file_name=name, width=w, height=h)
        for a in data["annotations"]:
            a["bbox"] = [v * scale for v in a["bbox"]]
            a["area"] = a["area"] * scale * scale
        (dst / f"{split}.json").write_text(json.dumps(data))
    shutil.copy(src / "hierarchy.json", dst / "hierarchy.json")
    return dst


class GpuSampler:
    """Samples ``nvidia-smi``'s GPU utilisation (%) of every GPU every ``period`` seconds while it runs."""

    def __init__(self, period: float = 0.5):
        self.period, self.samples = period, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        cmd = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
        while not self._stop.is_set():
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=5).stdout
                self.samples += [float(x) for x in out.split()]
            except (OSError, ValueError, subprocess.TimeoutExpired):
                return  # no nvidia-smi: no utilisation figure
            self._stop.wait(self.period)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=10)


def throughput(data: Path, out: Path, setting: dict, device: str) -> dict:
    """Part 1: one epoch of stage-1 training over the JPEG benchmark; img/s, loader wait, memory, utilisation."""
    spec = TrainSpec(
        train_ann=str(data / "train.json"),
        val_ann=str(data / "val.json"),
        train_image_dir=str(data / "images"),
        val_image_dir=str(data / "images"),
        backbone=setting["backbone"],
        image_size=setting["image_size"],
        batch_size=setting["batch_size"],
        workers=setting["workers"],
        epochs=1,
        eval_every=1,
        lr=0.01,
        warmup=20,
        device=device,
        progress=False,
        keep_checkpoints=1,
        replicates=0,
    )
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with GpuSampler() as gpu:
        metrics = train(spec, out)
    util = gpu.samples if device == "cuda" else []
    return {
        "img_per_s": round(metrics["train_img_per_s"], 2),
        "loader_wait_fraction": round(metrics["loader_wait_fraction"], 4),
        "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
        "gpu_util_mean": round(sum(util) / len(util), 1) if util else None,
        "gpu_util_samples": len(util),
    }


def sweep_config(data: Path, root: Path, name: str, setting: dict, gpu: bool, **sections) -> Path:
    """A small sweep over the JPEG benchmark (stage 1 of 1 epoch, one stage-2 epoch per trial)."""
    raw = {
        "name": name,
        "data": {"train": str(data / "train.json"), "val": str(data / "val.json"), "image_dir": str(data / "images")},
        "model": {"backbone": setting["backbone"], "image_size": setting["image_size"]},
        "stage1": {"epochs": 1, "batch_size": setting["batch_size"], "lr": 0.01, "warmup": 10},
        "stage2": {"epochs": 1, "batch_size": setting["batch_size"], "lr": 0.01, "warmup": 5},
        "resources": {"cpus_per_trial": 1, "gpus_per_trial": 0.5 if gpu else 0},
        "scheduler": {"type": "fifo"},
        "search": {"max_concurrent_trials": 2},
        "space": {"lam": {"grid": [0.5, 1.0]}},
        "run": {"storage_path": str(root / "results"), "max_failures": 0},
    }
    raw.update(sections)
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def run_sweep(config: Path) -> tuple[float, list]:
    from pipelines.config.load import load_experiment_config
    from pipelines.tune import sweep

    t0 = time.perf_counter()
    summary = sweep.run_sweep(load_experiment_config(config), verbose=0, progress=False, register=False)
    return time.perf_counter() - t0, summary.trials


def ddp(data: Path, root: Path, setting: dict) -> dict:
    """Part 3: one trial on 1 and on 2 Ray Train workers, one GPU each (NCCL); their training img/s."""
    out: dict = {"ddp_workers": 2}
    for workers in (1, 2):
        res = {"workers_per_trial": workers, "cpus_per_worker": 1, "gpus_per_worker": 1}
        cfg = sweep_config(data, root, f"ddp{workers}", setting, True, resources=res, space={"lam": {"grid": [1.0]}})
        _, trials = run_sweep(cfg)
        last = json.loads(Path(trials[0].path, "result.json").read_text().splitlines()[-1])
        out[f"ddp{workers}_img_per_s"] = round(float(last["train_img_per_s"]), 2)
    out["ddp_speedup"] = round(out["ddp2_img_per_s"] / out["ddp1_img_per_s"], 3) if out["ddp1_img_per_s"] else None
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny backbone on the CPU: checks the script, not a GPU")
    ap.add_argument("--images", type=int, default=None, help="training images of part 1 (256; smoke 16)")
    ap.add_argument("--sweep-images", type=int, default=None, help="training images of parts 2 and 3 (64; smoke 8)")
    ap.add_argument("--out", type=Path, default=None, help="work dir (default: a temp dir, removed)")
    args = ap.parse_args()
    gpus = torch.cuda.device_count()
    if not args.cpu_smoke and gpus == 0:
        print("bench_gpu: no CUDA device; run with --cpu-smoke to check the script on the CPU", file=sys.stderr)
        return 2
    setting = SMOKE_SETTING if args.cpu_smoke else GPU_SETTING
    n_train = args.images or (16 if args.cpu_smoke else 256)
    n_sweep = args.sweep_images or (8 if args.cpu_smoke else 64)
    device = "cpu" if args.cpu_smoke else "cuda"
    t0 = time.perf_counter()
    root = args.out or Path(tempfile.mkdtemp(prefix="bench_gpu_"))
    try:
        src = root / "synthetic"
        if not (src / "train.json").is_file():
            generate_benchmark(src, preset="demo", seed=0)
        big = jpeg_benchmark(src, root / "jpeg", setting["scale"], n_train)
        small = jpeg_benchmark(src, root / "jpeg_sweep", setting["scale"], n_sweep)
        part1 = throughput(big, root / "train", setting, device)
        print(f"throughput: {part1}", file=sys.stderr, flush=True)
        import ray

        ray.init(num_cpus=4 if args.cpu_smoke else None, include_dashboard=False, log_to_driver=False)
        try:
            sweep_s, trials = run_sweep(sweep_config(small, root, "gpu-sweep", setting, not args.cpu_smoke))
            print(f"sweep: {sweep_s:.1f} s, {len(trials)} trials", file=sys.stderr, flush=True)
            part3 = (
                ddp(small, root, setting)
                if gpus >= 2
                else {k: None for k in ("ddp_workers", "ddp1_img_per_s", "ddp2_img_per_s", "ddp_speedup")}
            )
        finally:
            ray.shutdown()
    finally:
        if args.out is None:
            shutil.rmtree(root, ignore_errors=True)
    payload = {
        "benchmark": "gpu",
        "mode": "cpu-smoke" if args.cpu_smoke else "gpu",
        "device": torch.cuda.get_device_name(0) if gpus and not args.cpu_smoke else "cpu",
        "gpus": gpus,
        "backbone": setting["backbone"],
        "image_size": setting["image_size"],
        "amp": device == "cuda",
        "train_images": n_train,
        **part1,
        "sweep_trials": len(trials),
        "sweep_finished": sum(t.error is None and not t.interrupted for t in trials),
        "sweep_s": round(sweep_s, 1),
        **part3,
        "ddp_skipped": None if gpus >= 2 else f"{gpus} GPU(s): the 2-worker NCCL trial needs 2",
        "minutes": round((time.perf_counter() - t0) / 60, 2),
    }
    print(json.dumps(payload))
    return 0 if payload["sweep_finished"] == payload["sweep_trials"] == 2 else 1


if __name__ == "__main__":
    sys.exit(main())
