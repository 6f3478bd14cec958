"""A sweep's annotation stores (`lt_models.data.store`) on its storage: built once by the driver, mapped by every trial.

Memory maps need a file system, so a trial always maps a node-local folder, `cache_dir`:
``<run.storage_path>/annotations`` itself when storage_path is a directory (shared storage on a cluster: one build
serves every node), else this node's cache folder of ``<storage URI>/annotations``
(`pipelines.storage.location.node_local_dir`).

With an object-storage URI the driver publishes what it built (`build_and_publish`): each store is copied to
``<storage_path>/annotations/<key>/``, its arrays first and ``meta.json`` last, so a store with ``meta.json`` there is
complete. A trial, a Ray Train worker or the stage-1 task on another node then downloads it once per node (`fetch`,
under the same file lock as `lt_models.data.store.ensure_store`, into a temp folder renamed into place) instead of
parsing the JSON again. A store that is not published (an older sweep, a failed upload) is simply built on the node
from the JSON, which gives the same arrays.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipelines.storage import location as storage

SUBDIR = "annotations"


def cache_dir(storage_path: Any) -> Path:
    """The node-local folder of a sweep's annotation stores (see the module docstring)."""
    return storage.node_local_dir(storage.join(storage_path, SUBDIR))


def _datasets(data) -> list[dict[str, Any]]:
    """`LVISDetection`'s arguments for the training and the validation set of a TrainSpec or of `cfg.data`."""

    def field(*names):
        return next(getattr(data, n) for n in names if hasattr(data, n))

    def opt(value):
        return None if value is None else str(value)

    common = dict(
        hierarchy_file=opt(field("hierarchy_file", "hierarchy")),
        expand_parents=data.expand_parents,
        skip_invalid=data.skip_invalid,
    )
    return [
        dict(common, ann_file=str(field("train_ann", "train")), image_dir=opt(field("train_image_dir", "image_dir"))),
        dict(common, ann_file=str(field("val_ann", "val")), image_dir=opt(field("val_image_dir"))),
    ]


def build_and_publish(storage_path: Any, data) -> list:
    """Build (or open) the training and validation stores of `data` (`cfg.data` or a TrainSpec) in `cache_dir`,
    and copy them to object storage when storage_path is a URI; returns the opened stores (train, val)."""
    from lt_models.data.datasets import dataset_store, default_image_dir

    stores = [
        dataset_store(
            d["ann_file"],
            image_dir=default_image_dir(d["ann_file"], d["image_dir"]),
            hierarchy_file=d["hierarchy_file"],
            expand_parents=d["expand_parents"],
            skip_invalid=d["skip_invalid"],
            cache_root=cache_dir(storage_path),
        )
        for d in _datasets(data)
    ]
    if storage.is_uri(storage_path):
        for store in stores:
            if store.path.parent == cache_dir(storage_path):  # not a store directory given as data.train
                _publish(store.path, storage.join(storage_path, SUBDIR, store.path.name))
    return stores


def _publish(local: Path, remote) -> None:
    from pyarrow import fs as pafs

    from lt_models.data.store import META

    if storage.is_file(storage.join(remote, META)):
        return
    fs, path = storage.resolve(remote)
    fs.create_dir(path, recursive=True)
    for f in sorted(local.iterdir()):
        if f.name != META:
            pafs.copy_files(
                str(f), f"{path}/{f.name}", source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs
            )
    storage.write_text(storage.join(remote, META), (local / META).read_text())


def fetch(storage_path: Any, spec) -> None:
    """On object storage: download the published stores `spec`'s datasets will map into this node's `cache_dir`,
    once per node. Nothing to do on a file system, or when a store is already here or not published."""
    if not storage.is_uri(storage_path) or spec.annotation_cache is None:
        return
    from filelock import FileLock

    from lt_models.atomic import atomic_dir
    from lt_models.data.datasets import dataset_store_key
    from lt_models.data.store import META

    for d in _datasets(spec):
        key = dataset_store_key(**d)
        local = Path(spec.annotation_cache) / key
        remote = storage.join(storage_path, SUBDIR, key)
        if (local / META).is_file() or not storage.is_file(storage.join(remote, META)):
            continue
        with FileLock(f"{local}.lock"):
            if not (local / META).is_file():
                with atomic_dir(local) as tmp:
                    storage.download_dir(remote, tmp)
