"""The annotation store: a dataset's annotations as memory-mapped numpy files, built once, shared by every trial.

A store is a directory of ``<array>.npy`` files (the columns of `lt_models.data.store_columns`) and ``meta.json``
(format version, categories, buckets, hierarchy, the options it was built with, where it came from, and each array's
dtype, shape and byte size). It is written by `write_store` inside `lt_models.atomic.atomic_dir`, so it appears complete
under its final name or not at all, and `open_store` maps its files read-only (``np.load(mmap_mode="r")``): trial
processes on one node share the same page-cache pages instead of each parsing the JSON into its own heap.

`open_store` refuses (`StoreError`, naming the file and the fix) a store without ``meta.json``, of another format
version, built for other inputs than the caller expects (its ``key``), or with an array file whose size is not the
size recorded when it was written (a truncated copy); `ensure_store` rebuilds such a store under a file lock, so two
trials that find it missing build it once.

Where stores live: `cached_store` keys a store by the JSON file's resolved path, size and modification time, the
image folder and the dataset options (`store_key`), in ``<cache_root>/<key>/``; a sweep puts cache_root next to its
stage-1 cache (``<run.storage_path>/annotations``, shared storage on a cluster). A store written by
``ltsweep data convert-openimages --store DIR`` can be given in place of the JSON file (``data.train: DIR``);
when the dataset asks for other options than the ones it was written with (``expand_parents``, a merge IoU) the
derived arrays are rebuilt into the cache, reading the raw columns from the original store.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lt_models.atomic import atomic_dir
from lt_models.errors import AnnotationError

STORE_VERSION = 1
META = "meta.json"


class StoreError(AnnotationError):
    """An annotation store is missing, incomplete, truncated or built for other inputs."""


class AnnotationStore:
    """A store opened read-only: ``arrays`` (name -> memory-mapped array), ``meta`` (its meta.json) and ``path``."""

    def __init__(self, path: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]):
        self.path, self.arrays, self.meta = path, arrays, meta

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]

    @property
    def categories(self) -> list[dict]:
        return self.meta["categories"]

    @property
    def hierarchy(self) -> dict[int, list[int]]:
        return {int(p): [int(c) for c in cs] for p, cs in self.meta["hierarchy"]}

    def file_name(self, row: int) -> str:
        off = self.arrays["name_offsets"]
        return bytes(self.arrays["name_bytes"][int(off[row]) : int(off[row + 1])]).decode()

    def csr_row(self, name: str, row: int) -> list[int]:
        """Row of a CSR pair ``<name>_indptr`` / ``<name>_ids`` (the federated lists) as a list."""
        ptr = self.arrays[f"{name}_indptr"]
        return self.arrays[f"{name}_ids"][int(ptr[row]) : int(ptr[row + 1])].tolist()


def store_key(ann_file: str | os.PathLike, **options: Any) -> str:
    """sha256 naming a cached store: the format version, the annotation file's resolved path, size and mtime (a
    store directory: its own meta's ``source``), and every option that changes the arrays."""
    path = Path(ann_file).resolve()
    if (path / META).is_file():
        source: Any = json.loads((path / META).read_text()).get("source")
    else:
        st = path.stat()
        source = [str(path), st.st_size, st.st_mtime_ns]
    blob = json.dumps(
        {
            "version": STORE_VERSION,
            "source": source,
            "options": {k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in options.items()},
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def write_store(path: str | os.PathLike, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> Path:
    """Write arrays + meta as a store directory at `path`, atomically (a reader sees all of it or nothing)."""
    path = Path(path)
    with atomic_dir(path) as tmp:
        shapes: dict[str, Any] = {}
        for name, array in arrays.items():
            array = np.ascontiguousarray(array)
            np.save(tmp / f"{name}.npy", array, allow_pickle=False)
            shapes[name] = {
                "dtype": array.dtype.str,
                "shape": list(array.shape),
                "bytes": (tmp / f"{name}.npy").stat().st_size,
            }
        full = dict(meta, version=STORE_VERSION, arrays=shapes)
        (tmp / META).write_text(json.dumps(full, separators=(",", ":"), default=_jsonable))
    return path


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    raise TypeError(f"not JSON-serialisable: {type(x).__name__}")


def open_store(path: str | os.PathLike, key: str | None = None) -> AnnotationStore:
    """Map a store read-only; `StoreError` when it is incomplete, truncated, of another version, or (`key` given)
    built for other inputs. Raw arrays of a store that only holds derived ones (``meta["raw_store"]``) are mapped
    from the store it names."""
    path = Path(path)
    meta_file = path / META
    if not meta_file.is_file():
        raise StoreError(
            f"{path}: not an annotation store ({META} is missing: an incomplete build or a wrong path); "
            "fix: point data.train / --store at a store written by ltsweep, or delete the folder "
            "so that it is rebuilt"
        )
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as e:
        raise StoreError(f"{meta_file}: unreadable ({e.msg}); delete {path} so that it is rebuilt") from None
    if meta.get("version") != STORE_VERSION:
        raise StoreError(
            f"{path}: store format version {meta.get('version')!r}, this ltsweep reads version "
            f"{STORE_VERSION}; rebuild it (delete the folder, or rerun the conversion)"
        )
    if key is not None and meta.get("key") != key:
        raise StoreError(
            f"{path}: built for other inputs (key {str(meta.get('key'))[:12]}…, expected {key[:12]}…); "
            "delete it so that it is rebuilt"
        )
    arrays: dict[str, np.ndarray] = {}
    if meta.get("raw_store"):
        arrays.update(open_store(meta["raw_store"]).arrays)
    for name, info in meta["arrays"].items():
        f = path / f"{name}.npy"
        size = f.stat().st_size if f.is_file() else None
        if size != info["bytes"]:
            raise StoreError(
                f"{f}: {'missing' if size is None else f'{size} bytes'}, the store recorded "
                f"{info['bytes']} (truncated or partly copied); delete {path} so that it is rebuilt, "
                "or copy it again"
            )
        array = np.load(f, mmap_mode="r", allow_pickle=False)
        if array.dtype.str != info["dtype"] or list(array.shape) != info["shape"]:
            raise StoreError(
                f"{f}: dtype/shape {array.dtype.str} {list(array.shape)} differ from the store's record "
                f"{info['dtype']} {info['shape']}; delete {path} so that it is rebuilt"
            )
        arrays[name] = array
    return AnnotationStore(path, arrays, meta)


def ensure_store(
    path: str | os.PathLike, key: str, build: Callable[[], tuple[dict, dict]], log: Callable[[str], None] | None = None
) -> AnnotationStore:
    """Open the store at `path` built for `key`, or build it (``build() -> (arrays, meta)``) under the file lock
    ``<path>.lock`` when it is missing or unusable (the reason is logged). Concurrent callers build it once."""
    from filelock import FileLock

    log = log or (lambda msg: print(f"ltsweep: {msg}", file=sys.stderr, flush=True))
    path = Path(path)
    try:
        return open_store(path, key)
    except StoreError as e:
        reason = str(e)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{path}.lock"):
        try:
            return open_store(path, key)  # another process built it while we waited
        except StoreError as e:
            reason = str(e) if (path / META).exists() else reason
        first = not path.exists()
        log(
            f"building the annotation store {path}"
            + (" (first use of this dataset with these options)" if first else f" ({reason.split(';')[0]})")
        )
        arrays, meta = build()
        write_store(path, arrays, dict(meta, key=key))
        return open_store(path, key)
