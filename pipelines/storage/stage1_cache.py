"""The stage-1 cache on storage: `<storage_path>/pretrain/<sha256>/` with `checkpoint/` and `meta.json` (the file
digests of the checkpoint, written last), verified before use, and a node-local copy on object storage."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from pipelines.storage import location as storage


@dataclass
class Stage1Checkpoint:
    sha256: str
    path: storage.Location  # <storage>/pretrain/<sha256> (a Path, or a URI on object storage)
    trained: bool  # True if this call trained it, False if it was reused
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def checkpoint_dir(self) -> storage.Location:
        return storage.join(self.path, "checkpoint")


def pretrain_root(storage_path: storage.Location) -> storage.Location:
    return storage.join(storage_path, "pretrain")


def file_digests(checkpoint_dir: storage.Location) -> dict[str, str]:
    """sha256 of every file of a stage-1 checkpoint directory, local or on object storage (relative path -> hex
    digest)."""
    out = {}
    for rel in storage.list_files(checkpoint_dir):
        h = hashlib.sha256()
        with storage.open_input(checkpoint_dir, rel) as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        out[rel] = h.hexdigest()
    return out


def verify_stage1(path: storage.Location) -> str | None:
    """None when the stage-1 cache at ``path`` is complete and its files match the digests its meta.json recorded;
    else one line saying what is wrong (path, expected and found)."""
    info = storage.read_json(storage.join(path, "meta.json"))
    expected = info.get("files")
    if not expected:
        return f"stage-1 cache {storage.display(path)} records no file digests (written by an older ltsweep)"
    found = file_digests(storage.join(path, "checkpoint"))
    for name, digest in expected.items():
        got = found.get(name)
        if got != digest:
            return (
                f"stage-1 cache {storage.display(storage.join(path, 'checkpoint', name))} is corrupt: expected "
                f"sha256 {digest[:12]}…, found " + (f"{got[:12]}…" if got else "no such file")
            )
    return None


def local_stage1(checkpoint_dir: str) -> str:
    """The stage-1 checkpoint dir a trial restores, readable on this node: ``checkpoint_dir`` itself on local or
    NFS storage; on object storage a node-local copy of its ``<sha256>/`` (meta.json and checkpoint/), downloaded
    once per node and verified against meta.json's digests (:func:`pipelines.storage.location.local_copy`)."""
    if not storage.is_uri(checkpoint_dir):
        return checkpoint_dir
    return str(storage.local_copy(storage.parent(checkpoint_dir), verify=verify_stage1) / "checkpoint")
