"""LVIS/COCO-format annotations -> torch Dataset with multi-hot targets.

Boxes of one image whose IoU is >= 0.95 (or that are identical) are one physical object carrying several
labels (the concurrent-softmax paper's explicit multi-label case, §3). `group_duplicate_boxes` states the rule
that decides which boxes merge; the dataset uses it, and `lt_models.data.rate_matrix` applies the same rule vectorised
over all images (tests/test_concurrency_vectorised.py keeps the two in step).

Label space: categories are sorted by id; contiguous label ``l = index + 1`` in 1..C; column 0 of every
K = C+1 tensor is background.

Primary label of a merged object (`target["labels"]`, used by single-label losses): the most specific label,
i.e. labels that are an ancestor (in the hierarchy, when one is given) of another label of the same object are
dropped, and among the rest the one from the annotation with the smallest id wins. Without a hierarchy this
is simply the label of the smallest annotation id. The merged object's box is that annotation's box.

Reading and validation of the JSON (`lt_models.data.lvis_json.load_lvis_json`) run once, when the dataset's
annotation store (`lt_models.data.store`) is built; the dataset then maps the store's columns.

Frequency buckets and the class hierarchy follow `lt_models.data.annotations`; the long-tail statistics of a file
(`ltsweep data stats`) are in `lt_models.data.stats`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from lt_models.data.annotations import (
    COMMON_MAX,
    RARE_MAX,
    load_hierarchy,
    name_to_cat_id,
)
from lt_models.data.lvis_json import load_lvis_json
from lt_models.data.store import META as STORE_META
from lt_models.data.store import AnnotationStore, ensure_store, open_store, store_key
from lt_models.data.store_columns import (
    dataset_options,
    derive_arrays,
    raw_columns_from_lvis,
)
from lt_models.errors import AnnotationError

# ---------------------------------------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------------------------------------


def default_image_dir(ann_file: str | os.PathLike, image_dir: str | os.PathLike | None) -> Path:
    """The image folder of a dataset: `image_dir`, by default ``images/`` beside the annotation file."""
    return Path(image_dir) if image_dir is not None else Path(ann_file).parent / "images"


def dataset_store(
    ann_file: str | os.PathLike,
    image_dir: str | os.PathLike | None = None,
    hierarchy_file: str | os.PathLike | None = None,
    expand_parents: bool = False,
    skip_invalid: bool = False,
    rare_max: int = RARE_MAX,
    common_max: int = COMMON_MAX,
    cache_root: str | os.PathLike | None = None,
) -> AnnotationStore:
    """The annotation store (`lt_models.data.store`) of a dataset: read, validated and merged once.

    ``ann_file`` is an LVIS/COCO JSON file or a store directory (``ltsweep data convert-openimages --store``).
    With ``cache_root`` the store is cached in ``<cache_root>/<store_key>/`` and memory-mapped (built once by
    whichever process needs it first, then shared); without it the arrays are built in memory (a one-off
    command). A store directory whose options match is used as it is; otherwise its derived arrays are rebuilt
    (into the cache when there is one).
    """
    ann_file = Path(ann_file)
    hier = None if hierarchy_file is None else Path(hierarchy_file)
    options = dataset_options(image_dir, skip_invalid, expand_parents, hier, rare_max, common_max)
    if (ann_file / STORE_META).is_file():
        given = open_store(ann_file)
        if all(
            given.meta.get("options", {}).get(k) == v
            for k, v in options.items()
            if k not in ("image_dir", "skip_invalid")
        ):
            return given

        def build() -> tuple[dict, dict]:
            return _derived_store(given, hier, options, raw_store=str(ann_file.resolve()))
    else:

        def build() -> tuple[dict, dict]:
            data = load_lvis_json(ann_file, image_dir=image_dir, skip_invalid=skip_invalid)
            skipped, reasons = data.pop("invalid_skipped"), data.pop("invalid_reasons")
            raw, categories, extra = raw_columns_from_lvis(data)
            meta = {
                "categories": categories,
                "extra": extra,
                "invalid_skipped": skipped,
                "invalid_reasons": reasons,
                "source": [str(ann_file.resolve()), ann_file.stat().st_size, ann_file.stat().st_mtime_ns],
            }
            del data
            arrays, derived_meta = _derived_store(AnnotationStore(ann_file, raw, meta), hier, options, raw_store=None)
            return dict(raw, **arrays), dict(meta, **derived_meta)

    if cache_root is None:
        arrays, meta = build()
        if meta.get("raw_store"):
            arrays = dict(open_store(meta["raw_store"]).arrays, **arrays)
        return AnnotationStore(ann_file, arrays, meta)
    key = store_key(ann_file, **options)
    return ensure_store(Path(cache_root) / key, key, build)


def dataset_store_key(
    ann_file: str | os.PathLike,
    image_dir: str | os.PathLike | None = None,
    hierarchy_file: str | os.PathLike | None = None,
    expand_parents: bool = False,
    skip_invalid: bool = False,
    rare_max: int = RARE_MAX,
    common_max: int = COMMON_MAX,
) -> str:
    """The folder name (`lt_models.data.store.store_key`) under a cache root of the store that `LVISDetection` with
    these arguments maps (``image_dir`` None: its default folder)."""
    return store_key(
        ann_file,
        **dataset_options(
            default_image_dir(ann_file, image_dir), skip_invalid, expand_parents, hierarchy_file, rare_max, common_max
        ),
    )


def _derived_store(raw: AnnotationStore, hier: Path | None, options: dict, raw_store: str | None):
    """(derived arrays, their meta) over a raw store's columns with these options."""
    categories = raw.meta["categories"]
    hierarchy = load_hierarchy(hier, name_to_cat_id(categories)) if hier is not None else {}
    arrays, frequency = derive_arrays(
        raw.arrays,
        categories,
        hierarchy,
        options["expand_parents"],
        options["iou_thr"],
        options["rare_max"],
        options["common_max"],
    )
    meta: dict[str, Any] = {
        k: raw.meta[k] for k in ("categories", "extra", "invalid_skipped", "invalid_reasons", "source") if k in raw.meta
    }
    meta.update(
        frequency=frequency, hierarchy=[[p, cs] for p, cs in hierarchy.items()], options=options, raw_store=raw_store
    )
    return arrays, meta


class LVISDetection(Dataset):
    """LVIS/COCO-format detection dataset with merged multi-label objects, over an annotation store.

    ``__getitem__(i) -> (image float32 [3,H,W] in [0,1], target)``; target has ``boxes`` float32 [n,4] xyxy,
    ``labels`` int64 [n] (primary contiguous label), ``multi_hot`` float32 [n,K] and ``image_id``.
    ``train=True`` drops images without a (non-crowd) object, as torchvision's references do; ``train=False``
    keeps every image in file order (evaluation). `transforms(image, target) -> (image, target)` is optional.
    ``ann_file`` and ``cache_root``: see `dataset_store` (with a cache_root a trial maps the shared store and holds
    only the index of its images). The JSON reader and its validation run when the store is built.
    """

    def __init__(
        self,
        ann_file: str | os.PathLike,
        image_dir: str | os.PathLike | None = None,
        hierarchy_file: str | os.PathLike | None = None,
        expand_parents: bool = False,
        train: bool = True,
        skip_invalid: bool = False,
        transforms: Callable | None = None,
        rare_max: int = RARE_MAX,
        common_max: int = COMMON_MAX,
        cache_root: str | os.PathLike | None = None,
    ):
        self.ann_file = Path(ann_file)
        self.image_dir = default_image_dir(ann_file, image_dir)
        if expand_parents and hierarchy_file is None:
            raise ValueError("expand_parents=True needs hierarchy_file")
        self.store = dataset_store(
            ann_file,
            image_dir=self.image_dir,
            hierarchy_file=hierarchy_file,
            expand_parents=expand_parents,
            skip_invalid=skip_invalid,
            rare_max=rare_max,
            common_max=common_max,
            cache_root=cache_root,
        )
        meta = self.store.meta
        self.num_skipped: int = int(meta.get("invalid_skipped", 0))
        self.skipped_reasons: dict = dict(meta.get("invalid_reasons", {}))
        self.transforms = transforms
        self.categories: list[dict] = meta["categories"]
        self.cat_ids: list[int] = [int(c["id"]) for c in self.categories]
        self.num_classes: int = len(self.cat_ids)
        self.cat_id_to_label: dict[int, int] = {cid: i + 1 for i, cid in enumerate(self.cat_ids)}
        self.label_to_cat_id: list[int] = [-1] + self.cat_ids
        self.class_names: list[str] = [c["name"] for c in self.categories]
        self.hierarchy: dict[int, list[int]] = self.store.hierarchy
        self.frequency: list[str] = list(meta["frequency"])
        a = self.store.arrays
        self._obj_indptr, self._pair_indptr = a["obj_indptr"], a["pair_indptr"]
        n_images = len(a["image_id"])
        rows = np.flatnonzero(np.diff(self._obj_indptr) > 0) if train else None
        # every image kept (evaluation, or training where every image has an object): no index, no copies; the
        # trial reads the store's own pages, which all trials on the node share
        self._rows: np.ndarray | None = None if rows is None or len(rows) == n_images else rows
        self._len = n_images if self._rows is None else len(self._rows)
        if self._rows is None:
            self.image_ids: np.ndarray = a["image_id"]
            self._indptr, self._csr_labels = a["label_indptr"], a["label_ids"]
        else:  # the samplers' CSR over this dataset's images
            self.image_ids = np.asarray(a["image_id"][self._rows])
            lp = a["label_indptr"]
            sizes = (lp[1:] - lp[:-1])[self._rows]
            self._indptr = np.r_[0, np.cumsum(sizes)].astype(np.int64)
            take = np.repeat(lp[self._rows], sizes) + np.arange(int(sizes.sum())) - np.repeat(self._indptr[:-1], sizes)
            self._csr_labels = np.asarray(a["label_ids"][take])
            self._indptr.flags.writeable = self._csr_labels.flags.writeable = False

    def __len__(self) -> int:
        return self._len

    def _row(self, i: int) -> int:
        """The store row (image table) of item i."""
        return int(i) if self._rows is None else int(self._rows[i])

    def image_info(self, i: int) -> dict:
        """{id, file_name, width, height} of item i."""
        row = self._row(i)
        a = self.store.arrays
        return {
            "id": int(a["image_id"][row]),
            "file_name": self.store.file_name(row),
            "width": float(a["width"][row]),
            "height": float(a["height"][row]),
        }

    def label_csr(self) -> tuple[np.ndarray, np.ndarray]:
        """(indptr int64 [n_images+1], labels int64 [nnz]): 0-based classes (label-1) present in each image.
        Read-only arrays (often the store's own memory-mapped pages): copy them to modify them."""
        return self._indptr, self._csr_labels

    def image_counts(self) -> np.ndarray:
        """int64 [C]: images of this dataset containing each class (after merge / parent expansion)."""
        return np.bincount(self._csr_labels, minlength=self.num_classes).astype(np.int64)

    def target(self, i: int) -> dict:
        """The target of item i without decoding the image."""
        row = self._row(i)
        o0, o1 = int(self._obj_indptr[row]), int(self._obj_indptr[row + 1])
        p0, p1 = int(self._pair_indptr[o0]), int(self._pair_indptr[o1])
        a = self.store.arrays
        obj_rows = np.repeat(np.arange(o1 - o0), np.diff(self._pair_indptr[o0 : o1 + 1]))
        multi_hot = torch.zeros(o1 - o0, self.num_classes + 1, dtype=torch.float32)
        multi_hot[torch.from_numpy(obj_rows), torch.from_numpy(np.array(a["pair_label"][p0:p1]))] = 1.0
        return {
            "boxes": torch.from_numpy(np.array(a["obj_box"][o0:o1])),
            "labels": torch.from_numpy(np.array(a["obj_primary"][o0:o1])),
            "multi_hot": multi_hot,
            "image_id": torch.tensor(int(self.image_ids[i]), dtype=torch.int64),
        }

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict]:
        img = self.image_info(i)
        if not img["file_name"]:
            raise AnnotationError(
                f"{self.ann_file}: image id {img['id']}: no 'file_name' (or 'coco_url') field; fix the annotation file"
            )
        path = self.image_dir / img["file_name"]
        try:
            with Image.open(path) as pil:
                pixels = np.array(pil.convert("RGB"))  # uint8 [H, W, 3], writable copy
        except FileNotFoundError:  # removed after the dataset was built
            raise AnnotationError(
                f"{self.ann_file}: image id {img['id']}: image file {path} does not exist; "
                f"restore it or fix the image folder ({self.image_dir})"
            ) from None
        if pixels.shape[:2] != (int(img["height"]), int(img["width"])):
            raise AnnotationError(
                f"{self.ann_file}: image id {img['id']}: fields 'width'/'height' = "
                f"{img['width']:g}x{img['height']:g} but {path} is "
                f"{pixels.shape[1]}x{pixels.shape[0]}; fix the annotation file"
            )
        # numpy, not torch ops: torch's intra-op thread pool makes this tiny conversion slow in loader workers
        image = torch.from_numpy(
            np.ascontiguousarray(np.divide(pixels, np.float32(255), dtype=np.float32).transpose(2, 0, 1))
        )
        target = self.target(i)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def collate_detection(batch: Sequence[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """Detection batches stay lists: images differ in size and targets in length (torchvision convention)."""
    images, targets = zip(*batch) if len(batch) else ((), ())
    return list(images), list(targets)
