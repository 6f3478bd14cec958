"""The stage-0 cache: the pretrained backbone of :mod:`lt_models.engine.stage0`, content-addressed like the stage-1
checkpoint, in ``<storage_path>/stage0/<sha256>/``:

    backbone.pt   the body's state dict (what ``model.weights`` takes)
    meta.json     sha256, the spec, the code fingerprint, the metrics and the sha256 of backbone.pt

The key is the sha256 of the canonical ``Stage0Spec`` identity (every field but ``num_threads``), the source of the
modules that determine the weights (``lt_models/engine/stage0.py``, ``lt_models/data/synthetic/*.py``,
``lt_models/modeling/backbones.py``) and the torch and torchvision versions. An entry is trained under the lock
``<sha256>.lock`` (:func:`pipelines.storage.location.lock`), so two processes never train the same stage 0 twice (the
second waits and reuses the first one's), into a temp directory that is renamed into place when complete
(:func:`lt_models.atomic.atomic_dir`), so a reader sees a whole entry or none. Before reuse, backbone.pt is checked
against the digest meta.json recorded: a damaged entry is a :class:`Stage0CacheError` that names it and the fix
(``force=True`` / ``ltsweep stage0 --force`` trains it again and swaps it in). Local (or NFS) storage only:
``model.weights`` is a local file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lt_models.atomic import atomic_dir, write_json_atomic
from lt_models.engine.stage0 import Stage0Spec, pretrain_backbone
from lt_models.errors import ConfigError
from pipelines.storage import location as storage

log = logging.getLogger(__name__)

WEIGHTS_FILE = "backbone.pt"
META_FILE = "meta.json"
RECIPE = "stage0: balanced synthetic crops, TinyBody + linear head, SGD + cosine, cross-entropy"
# the lt_models sources that determine the weights (globs below the lt_models package)
CODE_GLOBS = ("engine/stage0.py", "data/synthetic/*.py", "modeling/backbones.py")


class Stage0CacheError(RuntimeError):
    """A stage-0 cache entry is damaged (its message names the entry and the fix)."""


@dataclass
class Stage0Weights:
    """A stage-0 cache entry: ``path`` = ``<storage>/stage0/<sha256>``; ``weights`` is its backbone.pt."""

    sha256: str
    path: Path
    trained: bool  # True if this call trained it, False if it was reused
    spec: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def weights(self) -> Path:
        return self.path / WEIGHTS_FILE


def stage0_root(storage_path: storage.Location) -> Path:
    """``<storage_path>/stage0`` (absolute); a ConfigError for object storage."""
    if storage.is_uri(storage_path):
        raise ConfigError(
            f"storage path {storage.display(storage_path)}: stage 0 is cached on local or shared (NFS) storage "
            "only, since model.weights is a local file; give a directory, e.g. --storage-path results"
        )
    return Path(storage_path).expanduser().absolute() / "stage0"


def code_fingerprint() -> str:
    """sha256 of the torch / torchvision versions and the path and source of every module in ``CODE_GLOBS``."""
    import torch
    import torchvision

    import lt_models

    root = Path(lt_models.__file__).parent
    h = hashlib.sha256(f"torch {torch.__version__} torchvision {torchvision.__version__}".encode())
    for path in sorted({p for pattern in CODE_GLOBS for p in root.glob(pattern)}):
        h.update(f"\n{path.relative_to(root).as_posix()}\n".encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def stage0_identity(spec: Stage0Spec) -> dict[str, Any]:
    """Everything that determines the stage-0 weights."""
    return {"recipe": RECIPE, "spec": spec.identity(), "code": code_fingerprint()}


def stage0_key(spec: Stage0Spec) -> str:
    canonical = json.dumps(stage0_identity(spec), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def file_sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def verify_stage0(path: Path) -> str | None:
    """None when the entry at ``path`` is complete and backbone.pt matches the digest its meta.json recorded; else
    one line saying what is wrong."""
    meta, weights = path / META_FILE, path / WEIGHTS_FILE
    try:
        expected = json.loads(meta.read_text())["files"][WEIGHTS_FILE]
    except (OSError, ValueError, KeyError, TypeError):
        return f"stage-0 cache {path}: {META_FILE} is missing or unreadable"
    if not weights.is_file():
        return f"stage-0 cache {path}: {WEIGHTS_FILE} is missing"
    found = file_sha256(weights)
    if found != expected:
        return f"stage-0 cache {weights} is corrupt: expected sha256 {expected[:12]}…, found {found[:12]}…"
    return None


def find_stage0(spec: Stage0Spec, storage_path: storage.Location) -> Stage0Weights | None:
    """The verified cache entry of ``spec``, or None when there is none. A damaged entry raises
    :class:`Stage0CacheError` naming it and the fix."""
    sha = stage0_key(spec)
    path = stage0_root(storage_path) / sha
    if not path.exists():
        return None
    problem = verify_stage0(path)
    if problem is not None:
        raise Stage0CacheError(
            f"{problem}; delete {path} or rerun with --force (ensure_stage0(force=True)) to train it again"
        )
    info = json.loads((path / META_FILE).read_text())
    return Stage0Weights(sha, path, trained=False, spec=info.get("spec", {}), metrics=info.get("metrics", {}))


def ensure_stage0(
    spec: Stage0Spec,
    storage_path: storage.Location,
    *,
    force: bool = False,
    progress: bool | None = None,
    lock_timeout: float = -1,
) -> Stage0Weights:
    """The stage-0 backbone of ``spec``: reused from the cache when there, else trained once (under the lock, into a
    temp dir renamed into place) and cached. ``force`` trains it again and replaces the entry (also a damaged one).
    ``progress``: tqdm bars (None: on a terminal); ``lock_timeout`` < 0 waits for another trainer forever."""
    spec.validate()
    sha = stage0_key(spec)
    final = stage0_root(storage_path) / sha
    found = None if force else find_stage0(spec, storage_path)
    if found is not None:
        log.info("stage 0: reusing %s", final)
        return found
    with storage.lock(final, timeout=lock_timeout):
        if not force:  # another process may have trained it while we waited for the lock
            found = find_stage0(spec, storage_path)
            if found is not None:
                log.info("stage 0: %s was trained by another process meanwhile; reusing it", final)
                return found
        log.info("stage 0: training %s (preset %s, %d epochs)", sha[:12], spec.preset, spec.epochs)
        with atomic_dir(final) as tmp:  # --force: the old entry is swapped out only on success
            metrics = pretrain_backbone(spec, tmp / WEIGHTS_FILE, progress=progress)
            meta = {
                "sha256": sha,
                "identity": stage0_identity(spec),
                "spec": spec.to_dict(),
                "metrics": metrics,
                "trained_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "files": {WEIGHTS_FILE: file_sha256(tmp / WEIGHTS_FILE)},
            }
            write_json_atomic(tmp / META_FILE, meta, indent=2, sort_keys=True)  # last: the entry is complete
    log.info("stage 0: trained %s in %.1fs", final, metrics["seconds"])
    return Stage0Weights(sha, final, trained=True, spec=spec.to_dict(), metrics=metrics)
