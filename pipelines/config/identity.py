"""What identifies a run's inputs: the dataset fingerprint (training annotation bytes and image list), the training
code's fingerprint, and the stage-1 identity whose sha256 keys the shared stage-1 checkpoint."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from pipelines.config.experiment import ExperimentConfig, canonical_json

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


_FINGERPRINTS: dict[tuple, str] = {}


def dataset_fingerprint(cfg: ExperimentConfig) -> str:
    """sha256 of the training annotation file's bytes plus the sorted training image list (paths below the image
    folder, and sizes).

    Cached per (path, size, mtime) within a process: LVIS's train JSON is ~1 GB."""
    train = Path(cfg.data.train)
    st = train.stat()
    key = (str(train), str(cfg.data.image_dir), st.st_size, st.st_mtime_ns)
    if key not in _FINGERPRINTS:
        _FINGERPRINTS[key] = _fingerprint(cfg)
    return _FINGERPRINTS[key]


def _fingerprint(cfg: ExperimentConfig) -> str:
    h = hashlib.sha256()
    train = Path(cfg.data.train)
    with open(train / "meta.json" if train.is_dir() else train, "rb") as f:  # an annotation store: its meta
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    image_dir = Path(cfg.data.image_dir) if cfg.data.image_dir else train.parent / "images"
    for rel, size in _image_files(image_dir):
        h.update(f"\n{rel}\t{size}".encode())
    return h.hexdigest()


def _image_files(root: Path) -> list[tuple[str, int]]:
    """(path relative to root, size) of every image below root, sorted by path: a flat folder, or a COCO root with
    train2017/ and val2017/ (LVIS v1 resolves images through `coco_url` below it)."""
    out = []
    for dirpath, _, files in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        for name in files:
            if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                out.append(((rel_dir / name).as_posix(), os.stat(os.path.join(dirpath, name)).st_size))
    return sorted(out)


def frequency_source(cfg: ExperimentConfig) -> str:
    """Whose counts the rare / common / frequent buckets of every evaluation come from (the engine always passes
    the training set's buckets): recorded on the MLflow runs."""
    return f"training set {cfg.data.train}: categories[].frequency, else its image counts"


def stage1_identity(cfg: ExperimentConfig) -> dict[str, Any]:
    """Everything that determines the stage-1 weights (paths excluded: the data enters via its fingerprint)."""
    if cfg.stage1 is None:
        raise ValueError("this config has no stage1 section (one-stage trials); there is nothing to pretrain")
    model = cfg.model.model_dump(mode="json")
    if cfg.model.weights is not None:  # the initial weights matter by content, not by path
        model["weights"] = hashlib.sha256(Path(cfg.model.weights).read_bytes()).hexdigest()
    identity = {
        "recipe": "stage1: non-balance sampler + stage1.loss, all layers",
        "model": model,
        "stage1": cfg.stage1.model_dump(mode="json", exclude={"workers"}),
        "seed": cfg.seed,
        "dataset_fingerprint": dataset_fingerprint(cfg),
        "expand_parents": cfg.data.expand_parents,
        "code": code_fingerprint(),
    }
    if cfg.resources.workers_per_trial > 1:  # trained on several workers: a total batch of workers x batch_size
        identity["workers_per_trial"] = cfg.resources.workers_per_trial
    if cfg.eval.metric != "lvis":  # the cached stage-1 metrics are in this metric
        identity["eval_metric"] = cfg.eval.metric
    uses_rate = cfg.stage1.loss == "concurrent_softmax"  # r_ij depends on the hierarchy and its leaf/parent rate
    if cfg.data.hierarchy is not None and (cfg.data.expand_parents or uses_rate):  # parents change labels or r_ij
        identity["hierarchy"] = hashlib.sha256(Path(cfg.data.hierarchy).read_bytes()).hexdigest()
    if uses_rate:
        identity["hierarchy_rate"] = cfg.data.hierarchy_rate
    return identity


def code_fingerprint() -> str:
    """sha256 of the training code (every lt_models module's source) and the torch/torchvision versions: an edited
    dataset, sampler, loss, detector or engine must not reuse a checkpoint trained by the old code."""
    import torch
    import torchvision

    import lt_models

    h = hashlib.sha256(f"torch {torch.__version__} torchvision {torchvision.__version__}".encode())
    root = Path(lt_models.__file__).parent
    for path in sorted(root.rglob("*.py")):
        h.update(f"\n{path.relative_to(root).as_posix()}\n".encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def stage1_key(cfg: ExperimentConfig) -> str:
    return hashlib.sha256(canonical_json(stage1_identity(cfg)).encode()).hexdigest()
