"""Training throughput of the detectors on this CPU, and the share of step time spent waiting on the data loader.

Measures, with the real data path (synthetic demo benchmark -> LVISDetection -> non-balance sampler -> DataLoader
-> lt_models.engine.train_one_epoch):
  * ``tiny`` at 128 px (batch 8, the demo schedule's batch), plus the anchor: the same network with torchvision's
    stock single-label ``RoIHeads`` (softmax CE), so the cost of the multi-hot RoI heads shows as a ratio;
  * ``resnet50_fpn`` at 800 px (batch 2, a few iterations: the papers' setting, for scale).
Goal (issue 5): tiny >= 14 img/s on 2 cores with loader wait < 10% of step time.

Usage: python benchmarks/bench_train.py [--threads 2] [--workers 0] [--tiny-iters 30] [--r50-iters 2] [--data DIR]
Last stdout line: {"benchmark": "train", "tiny_img_per_s": ..., "r50_img_per_s": ..., "loader_wait_fraction": ...}
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from torchvision.models.detection.roi_heads import RoIHeads

from lt_models.datasets import LVISDetection, collate_detection
from lt_models.detector import build_detector
from lt_models.engine import RandomHorizontalFlip, build_optimizer, train_one_epoch
from lt_models.samplers import NonBalanceSampler
from lt_models.synthetic import generate_benchmark


def stock_roi_heads(model):
    """Swap in torchvision's own RoIHeads (single-label softmax CE) with the same modules: the anchor."""
    h = model.roi_heads
    model.roi_heads = RoIHeads(h.box_roi_pool, h.box_head, h.box_predictor, 0.5, 0.5,
                               h.fg_bg_sampler.batch_size_per_image, h.fg_bg_sampler.positive_fraction, None,
                               h.score_thresh, h.nms_thresh, h.detections_per_img)
    return model


def measure(model, ds, batch_size, iters, warmup, workers, seed=0):
    """img/s and loader-wait share over `iters` timed iterations after `warmup` untimed ones."""
    torch.manual_seed(seed)
    sampler = NonBalanceSampler(len(ds), seed=seed)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers,
                                         collate_fn=collate_detection, persistent_workers=workers > 0)
    opt = build_optimizer(model, lr=0.001)
    dev = torch.device("cpu")
    train_one_epoch(model, opt, loader, dev, 0, grad_clip=10.0, progress=False, max_iters=warmup)
    stats = train_one_epoch(model, opt, loader, dev, 1, grad_clip=10.0, progress=False, max_iters=iters)
    return stats["img_per_s"], stats["loader_wait_fraction"], stats["iterations"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--tiny-iters", type=int, default=30)
    ap.add_argument("--tiny-batch", type=int, default=8)
    ap.add_argument("--r50-iters", type=int, default=2)
    ap.add_argument("--data", type=str, default=None, help="an existing synthetic benchmark dir (default: generate)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data) if args.data else Path(tmp)
        if not (data / "train.json").exists():
            generate_benchmark(data, "demo", seed=0)
        ds = LVISDetection(data / "train.json", transforms=RandomHorizontalFlip())
        print(f"threads={args.threads} workers={args.workers} train images={len(ds)} classes={ds.num_classes}")

        torch.manual_seed(0)
        tiny = build_detector(ds.num_classes, "tiny")
        tiny_ips, wait, n = measure(tiny, ds, args.tiny_batch, args.tiny_iters, 3, args.workers)
        print(f"tiny 128px batch {args.tiny_batch}: {tiny_ips:.1f} img/s over {n} it, loader wait {wait:.1%}")

        torch.manual_seed(0)
        anchor = stock_roi_heads(build_detector(ds.num_classes, "tiny"))
        anchor_ips, anchor_wait, _ = measure(anchor, ds, args.tiny_batch, args.tiny_iters, 3, args.workers)
        print(f"anchor (same net, torchvision RoIHeads, softmax CE): {anchor_ips:.1f} img/s, loader wait "
              f"{anchor_wait:.1%}; multi-hot heads run at {tiny_ips / anchor_ips:.2f}x the anchor")

        small_ips, _, _ = measure(tiny, ds, 2, args.tiny_iters, 2, args.workers)
        print(f"tiny 128px batch 2: {small_ips:.1f} img/s")

        torch.manual_seed(0)
        r50 = build_detector(ds.num_classes, "resnet50_fpn")
        t = time.perf_counter()
        r50_ips, r50_wait, n = measure(r50, ds, 2, args.r50_iters, 1, args.workers)
        print(f"resnet50_fpn 800px batch 2: {r50_ips:.3f} img/s over {n} it (loader wait {r50_wait:.1%}, "
              f"{time.perf_counter() - t:.0f} s); tiny is {tiny_ips / r50_ips:.0f}x faster")

    print(json.dumps({"benchmark": "train", "tiny_img_per_s": round(tiny_ips, 2), "r50_img_per_s": round(r50_ips, 3),
                      "loader_wait_fraction": round(wait, 4)}))


if __name__ == "__main__":
    main()
