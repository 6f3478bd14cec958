"""Training throughput of the detectors on this CPU, and the share of step time spent waiting on the data loader.

Measures, with the real data path (synthetic demo benchmark -> LVISDetection -> non-balance sampler -> DataLoader
-> lt_models.engine.loop.train_one_epoch):
  * ``tiny`` at 128 px (batch 8, the demo schedule's batch), plus the anchor: the same network with torchvision's
    stock single-label ``RoIHeads`` (softmax CE), so the cost of the multi-hot RoI heads shows as a ratio;
  * ``tiny`` with torchvision's ``MultiScaleRoIAlign`` instead of ours (``GridRoIAlign``, the same numbers through
    ``grid_sample``): the ratio is what the pooler's backward saves;
  * inference of ``tiny`` (eval mode, score threshold 1e-4, 1,000 detections per image as the evaluation keeps)
    with the detector's ``batched_nms_top`` and with torchvision's ``batched_nms`` then the top ones (the anchor),
    the same detections required, on the demo data (30 classes) and on ``lvislike`` (327 classes, ``tiny`` trained
    ``--tiny-iters`` iterations on it);
  * ``resnet50_fpn`` at 800 px (batch 2, a few iterations: the papers' setting, for scale).
  * multi-worker training (issue 15): ``tiny`` at 128 px, batch 8 per worker, as a Ray Train ``TorchTrainer`` (the
    path of ``resources.workers_per_trial``: DDP over gloo, each worker its own shard of the epoch, one torch thread
    per worker) with 1 and with 2 workers in the same run: total img/s and their ratio; and the communication share
    of a 2-worker step: the time gradient all-reduces are in flight (a DDP communication hook records each bucket's
    launch and completion; their union) over the step time; and the exposed share, 1 - (step time without the
    all-reduce, under ``DistributedDataParallel.no_sync``) / (normal step time): what backward does not hide.
Goal (issue 5): tiny >= 14 img/s on 2 cores with loader wait < 10% of step time.

Usage: python benchmarks/bench_train.py [--threads 2] [--workers 0] [--tiny-iters 30] [--r50-iters 2]
           [--ddp-iters 20] [--infer-images 16] [--data DIR]
Last stdout line: {"benchmark": "train", "tiny_img_per_s": ..., "tiny_tv_roialign_img_per_s": ...,
                   "roialign_speedup": ..., "infer_s_per_img": ..., "infer_tv_nms_s_per_img": ..., "nms_speedup": ...,
                   "infer_lvislike_s_per_img": ..., "infer_lvislike_tv_nms_s_per_img": ..., "nms_speedup_lvislike": ...,
                   "r50_img_per_s": ..., "loader_wait_fraction": ...,
                   "ddp1_img_per_s": ..., "ddp2_img_per_s": ..., "ddp2_speedup": ..., "ddp2_comm_share": ...,
                   "ddp2_comm_exposed_share": ...}
"""

from __future__ import annotations

import argparse
import json
import socket
import tempfile
import time
from pathlib import Path

import torch
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops import boxes as box_ops

from lt_models.data.datasets import LVISDetection, collate_detection
from lt_models.data.samplers import NonBalanceSampler
from lt_models.data.synthetic.generate import generate_benchmark
from lt_models.data.transforms import RandomHorizontalFlip
from lt_models.engine.build import build_optimizer
from lt_models.engine.loop import train_one_epoch
from lt_models.modeling import detector as detector_module
from lt_models.modeling.detector import build_detector


def stock_roi_heads(model):
    """Swap in torchvision's own RoIHeads (single-label softmax CE) with the same modules: the anchor."""
    h = model.roi_heads
    model.roi_heads = RoIHeads(
        h.box_roi_pool,
        h.box_head,
        h.box_predictor,
        0.5,
        0.5,
        h.fg_bg_sampler.batch_size_per_image,
        h.fg_bg_sampler.positive_fraction,
        None,
        h.score_thresh,
        h.nms_thresh,
        h.detections_per_img,
    )
    return model


def torchvision_pooler(model):
    """The same detector with torchvision's MultiScaleRoIAlign (same levels, output and sampling ratio)."""
    p = model.roi_heads.box_roi_pool
    model.roi_heads.box_roi_pool = MultiScaleRoIAlign(
        p.featmap_names, p.output_size, p.sampling_ratio, canonical_scale=p.canonical_scale
    )
    return model


def torchvision_top(boxes, scores, labels, iou: float, top: int):
    """The anchor of ``batched_nms_top``: torchvision's batched_nms over every candidate, then the ``top`` best."""
    return box_ops.batched_nms(boxes, scores, labels, iou)[:top]


def inference_s_per_img(model, images: list, torchvision_nms: bool):
    """Seconds per image of eval-mode inference on ``images`` (1,000 detections per image kept, as the evaluation
    pass does) and the detections; ``torchvision_nms``: torchvision's batched_nms over every candidate, then the top
    ones."""
    fast = detector_module.batched_nms_top
    if torchvision_nms:
        detector_module.batched_nms_top = torchvision_top
    cap = model.roi_heads.detections_per_img
    model.eval()
    model.roi_heads.detections_per_img = 1000
    try:
        t = time.perf_counter()
        with torch.no_grad():
            out = [model([img])[0] for img in images]
        return (time.perf_counter() - t) / len(images), out
    finally:
        detector_module.batched_nms_top = fast
        model.roi_heads.detections_per_img = cap
        model.train()


def tiny_variant(ds, args, change) -> tuple[float, float, int]:
    """``measure`` of ``tiny`` as ``change`` (a function of the model) alters it, from the same initial weights."""
    torch.manual_seed(0)
    model = change(build_detector(ds.num_classes, "tiny"))
    return measure(model, ds, args.tiny_batch, args.tiny_iters, 3, args.workers)


def compare_nms(model, ds, n_images: int, what: str) -> tuple[float, float]:
    """Inference seconds per image with ``batched_nms_top`` and with the anchor on the same ``n_images`` images of
    ``ds`` (drawn once: the dataset flips at random); exits unless the detections are identical."""
    images = [ds[i][0] for i in range(n_images)]
    fast_s, dets = inference_s_per_img(model, images, torchvision_nms=False)
    tv_s, dets_tv = inference_s_per_img(model, images, torchvision_nms=True)
    if not all(all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(dets, dets_tv)):
        raise SystemExit(f"{what}: batched_nms_top and torchvision's batched_nms gave different detections")
    print(
        f"inference on {what} ({n_images} images, {sum(len(d['scores']) for d in dets)} detections, identical): "
        f"{fast_s * 1000:.0f} ms/img with batched_nms_top, {tv_s * 1000:.0f} ms/img with torchvision's "
        f"batched_nms ({tv_s / fast_s:.2f}x)"
    )
    return fast_s, tv_s


def nms_on_lvislike(data: Path, args) -> tuple[float, float]:
    """The same comparison with a vocabulary of LVIS's kind: ``tiny`` trained ``--tiny-iters`` iterations on the
    ``lvislike`` preset (327 classes), whose scores, still spread over the classes, leave thousands of candidates
    above the evaluation's 1e-4 threshold per image, as in the first evaluations of a sweep."""
    generate_benchmark(data, "lvislike", seed=0)
    ds = LVISDetection(data / "train.json", transforms=RandomHorizontalFlip())
    torch.manual_seed(0)
    model = build_detector(ds.num_classes, "tiny")
    measure(model, ds, args.tiny_batch, args.tiny_iters, 0, args.workers)
    return compare_nms(model, ds, args.infer_images, f"lvislike ({ds.num_classes} classes)")


def measure(model, ds, batch_size, iters, warmup, workers, seed=0):
    """img/s and loader-wait share over `iters` timed iterations after `warmup` untimed ones."""
    torch.manual_seed(seed)
    sampler = NonBalanceSampler(len(ds), seed=seed)
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_detection,
        persistent_workers=workers > 0,
    )
    opt = build_optimizer(model, lr=0.001)
    dev = torch.device("cpu")
    train_one_epoch(model, opt, loader, dev, 0, grad_clip=10.0, progress=False, max_iters=warmup)
    stats = train_one_epoch(model, opt, loader, dev, 1, grad_clip=10.0, progress=False, max_iters=iters)
    return stats["img_per_s"], stats["loader_wait_fraction"], stats["iterations"]


def timed_allreduce(intervals: list, bucket):
    """DDP communication hook: the default all-reduce of one gradient bucket, recording when it was launched and when
    its result was ready."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    start = time.perf_counter()

    def done(fut):
        intervals.append((start, time.perf_counter()))
        return fut.value()

    return allreduce_hook(None, bucket).then(done)


def union_length(intervals: list) -> float:
    """Seconds covered by the union of (start, end) intervals."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def ddp_worker(config: dict) -> None:
    """One Ray Train worker: tiny at 128 px, batch 8 on this rank's shard; img/s of all ranks (the engine's
    train_one_epoch sums them), then per-step times with and without the gradient all-reduce."""
    import ray.train
    import torch.distributed as dist

    from lt_models.engine.distributed import wrap

    torch.set_num_threads(1)
    ctx = ray.train.get_context()
    rank, ws = ctx.get_world_rank(), ctx.get_world_size()
    ds = LVISDetection(Path(config["data"]) / "train.json", transforms=RandomHorizontalFlip())
    torch.manual_seed(0)
    model = build_detector(ds.num_classes, "tiny")
    ddp = wrap(model, torch.device("cpu"), ws)
    intervals: list = []  # (start, end) of every gradient all-reduce: from DDP handing a bucket over to its result
    if ws > 1:
        ddp.register_comm_hook(intervals, timed_allreduce)
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=config["batch"],
        collate_fn=collate_detection,
        sampler=NonBalanceSampler(len(ds), seed=0, rank=rank, world_size=ws),
    )
    opt = build_optimizer(model, lr=0.001)
    dev, iters = torch.device("cpu"), config["iters"]
    kw = dict(grad_clip=10.0, progress=False, world_size=ws)
    train_one_epoch(ddp, opt, loader, dev, 0, max_iters=3, **kw)  # warm-up
    intervals.clear()
    synced = train_one_epoch(ddp, opt, loader, dev, 1, max_iters=iters, **kw)
    comm = union_length(intervals)
    out = {"img_per_s": synced["img_per_s"], "loader_wait": synced["loader_wait_fraction"]}
    if ws > 1:
        dist.barrier()
        with ddp.no_sync():  # the same steps without the gradient all-reduce (nor the loss all-reduce)
            local = train_one_epoch(ddp, opt, loader, dev, 2, grad_clip=10.0, progress=False, max_iters=iters)
        t_sync = synced["time"] / synced["iterations"]
        t_local = local["time"] / local["iterations"]
        out.update(
            step_s=t_sync,
            step_no_sync_s=t_local,
            comm_share=comm / synced["time"],
            comm_exposed_share=max(0.0, 1.0 - t_local / t_sync),
        )
    if rank == 0:  # the workers run on this machine: rank 0 hands its numbers back through a file
        Path(config["out"]).write_text(json.dumps(out))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure_workers(data: Path, workers: int, iters: int, batch: int) -> dict:
    """Rank 0's numbers of a `workers`-worker Ray Train run of :func:`ddp_worker` (1 CPU per worker)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    with tempfile.TemporaryDirectory() as store:
        out = Path(store) / "rank0.json"
        trainer = TorchTrainer(
            ddp_worker,
            train_loop_config={"data": str(data), "iters": iters, "batch": batch, "out": str(out)},
            torch_config=TorchConfig(backend="gloo"),
            scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(name=f"bench{workers}", storage_path=store),
        )
        trainer.fit()
        return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--tiny-iters", type=int, default=30)
    ap.add_argument("--tiny-batch", type=int, default=8)
    ap.add_argument("--r50-iters", type=int, default=2)
    ap.add_argument("--ddp-iters", type=int, default=20, help="timed iterations per worker of the Ray Train runs")
    ap.add_argument("--infer-images", type=int, default=16, help="images of the inference timing")
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

        anchor_ips, anchor_wait, _ = tiny_variant(ds, args, stock_roi_heads)
        print(
            f"anchor (same net, torchvision RoIHeads, softmax CE): {anchor_ips:.1f} img/s, loader wait "
            f"{anchor_wait:.1%}; multi-hot heads run at {tiny_ips / anchor_ips:.2f}x the anchor"
        )

        tv_ips, _, _ = tiny_variant(ds, args, torchvision_pooler)
        print(
            f"same net with torchvision's MultiScaleRoIAlign: {tv_ips:.1f} img/s; GridRoIAlign runs at "
            f"{tiny_ips / tv_ips:.2f}x"
        )

        infer_s, infer_tv_s = compare_nms(tiny, ds, args.infer_images, "demo")
        wide_s, wide_tv_s = nms_on_lvislike(Path(tmp) / "lvislike", args)

        small_ips, _, _ = measure(tiny, ds, 2, args.tiny_iters, 2, args.workers)
        print(f"tiny 128px batch 2: {small_ips:.1f} img/s")

        torch.manual_seed(0)
        r50 = build_detector(ds.num_classes, "resnet50_fpn")
        t = time.perf_counter()
        r50_ips, r50_wait, n = measure(r50, ds, 2, args.r50_iters, 1, args.workers)
        print(
            f"resnet50_fpn 800px batch 2: {r50_ips:.3f} img/s over {n} it (loader wait {r50_wait:.1%}, "
            f"{time.perf_counter() - t:.0f} s); tiny is {tiny_ips / r50_ips:.0f}x faster"
        )

        import ray

        # the dashboard serves the State API, which Ray Train V2's placement-group cleaner polls
        ray.init(num_cpus=2, include_dashboard=True, dashboard_port=free_port(), log_to_driver=False)
        try:
            one = measure_workers(data, 1, args.ddp_iters, args.tiny_batch)
            two = measure_workers(data, 2, args.ddp_iters, args.tiny_batch)
        finally:
            ray.shutdown()
        speedup = two["img_per_s"] / one["img_per_s"]
        print(
            f"Ray Train, tiny 128px batch {args.tiny_batch} per worker, 1 thread per worker: 1 worker "
            f"{one['img_per_s']:.1f} img/s, 2 workers {two['img_per_s']:.1f} img/s (x{speedup:.2f}); 2-worker step "
            f"{two['step_s'] * 1000:.0f} ms, all-reduce in flight {two['comm_share']:.1%} of it; "
            f"{two['step_no_sync_s'] * 1000:.0f} ms without the all-reduce (exposed communication "
            f"{two['comm_exposed_share']:.1%})"
        )

    print(
        json.dumps(
            {
                "benchmark": "train",
                "tiny_img_per_s": round(tiny_ips, 2),
                "tiny_tv_roialign_img_per_s": round(tv_ips, 2),
                "roialign_speedup": round(tiny_ips / tv_ips, 3),
                "infer_s_per_img": round(infer_s, 4),
                "infer_tv_nms_s_per_img": round(infer_tv_s, 4),
                "nms_speedup": round(infer_tv_s / infer_s, 3),
                "infer_lvislike_s_per_img": round(wide_s, 4),
                "infer_lvislike_tv_nms_s_per_img": round(wide_tv_s, 4),
                "nms_speedup_lvislike": round(wide_tv_s / wide_s, 3),
                "r50_img_per_s": round(r50_ips, 3),
                "loader_wait_fraction": round(wait, 4),
                "ddp1_img_per_s": round(one["img_per_s"], 2),
                "ddp2_img_per_s": round(two["img_per_s"], 2),
                "ddp2_speedup": round(speedup, 3),
                "ddp2_comm_share": round(two["comm_share"], 4),
                "ddp2_comm_exposed_share": round(two["comm_exposed_share"], 4),
            }
        )
    )


if __name__ == "__main__":
    main()
