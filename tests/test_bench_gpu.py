"""benchmarks/bench_gpu.py in its CPU smoke mode: the GPU check's three parts run end to end (JPEG data, the training
throughput, a 2-trial sweep) and print the pinned keys, so the script never rots before a GPU runs it."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEYS = {
    "benchmark", "mode", "device", "gpus", "backbone", "image_size", "amp", "train_images", "img_per_s",
    "loader_wait_fraction", "peak_mem_gb", "gpu_util_mean", "gpu_util_samples", "sweep_trials", "sweep_finished",
    "sweep_s", "ddp_workers", "ddp1_img_per_s", "ddp2_img_per_s", "ddp_speedup", "ddp_skipped", "minutes",
}  # fmt: skip


def test_cpu_smoke_runs_every_part_and_prints_the_pinned_keys(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/bench_gpu.py"), "--cpu-smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(out) == KEYS
    assert out["mode"] == "cpu-smoke" and out["device"] == "cpu" and out["amp"] is False
    assert out["img_per_s"] > 0 and 0 <= out["loader_wait_fraction"] <= 1
    assert out["sweep_trials"] == out["sweep_finished"] == 2
    assert out["peak_mem_gb"] is None and out["ddp2_img_per_s"] is None and "needs 2" in out["ddp_skipped"]
    jpegs = list((tmp_path / "jpeg" / "images").glob("*.jpg"))
    assert len(jpegs) > out["train_images"]  # the training images and the validation images, as JPEG files
