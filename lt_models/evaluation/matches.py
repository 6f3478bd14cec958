"""The matched detections of one LVIS evaluation, kept so that AP can be recomputed under image weights.

LVIS AP is a function of the matching: per category, the detections in score order, each a true positive (TP), a
false positive (FP) or ignored at each of the 10 IoU thresholds, and the number of non-ignored ground-truth boxes
per (category, image). ``Matches`` holds exactly that for area "all" (what AP, APr, APc and APf use), so that
``lt_models.evaluation.bootstrap`` recomputes AP on resampled validation images without running the evaluator
again. ``evaluate_lvis(..., keep_matches=True)`` returns it; the engine writes it beside each checkpoint
(``matches.npz``).
"""

from __future__ import annotations

import dataclasses
import io
import os
from pathlib import Path

import numpy as np

from lt_models.atomic import write_bytes_atomic
from lt_models.errors import AnnotationError

MATCHES_FILE = "matches.npz"
_ARRAYS = ("img_ids", "cat_ids", "frequency", "det_cat", "det_img", "tp", "fp", "gt_cat", "gt_img", "gt_n")
_OPTIONAL = ("det_score",)  # absent from files written before scores were kept


@dataclasses.dataclass
class Matches:
    """The matching of one evaluation, area "all".

    ``img_ids`` [I] and ``cat_ids`` [K]: the sorted ids (image index i, category index k); ``frequency`` [K]: the
    r/c/f bucket of each category. Detections [D], in the evaluator's accumulate order (category, score
    descending, image, input order), only those that count at some threshold: ``det_cat``, ``det_img`` (indices),
    ``tp`` / ``fp`` (bit t set: TP / FP at IoU threshold t; neither: ignored at t). Ground truth: ``gt_n`` [P]
    non-ignored boxes of category ``gt_cat`` in image ``gt_img`` (one entry per pair with at least one).
    ``det_score`` [D]: each detection's score (what pooled AP and calibration rank by); None in files written
    before it was kept."""

    img_ids: np.ndarray
    cat_ids: np.ndarray
    frequency: np.ndarray
    det_cat: np.ndarray
    det_img: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    gt_cat: np.ndarray
    gt_img: np.ndarray
    gt_n: np.ndarray
    det_score: np.ndarray | None = None

    @property
    def n_images(self) -> int:
        return len(self.img_ids)

    @property
    def n_categories(self) -> int:
        return len(self.cat_ids)

    def scores(self) -> np.ndarray:
        """``det_score``, or an AnnotationError naming the fix when this matching was saved without scores."""
        if self.det_score is None:
            raise AnnotationError(
                "this matching holds no detection scores (written before ltsweep kept them); evaluate the "
                "checkpoint again (ltsweep eval) to write a matches.npz with scores"
            )
        return self.det_score

    def num_gt(self) -> np.ndarray:
        """Non-ignored ground-truth boxes per category [K]."""
        return np.bincount(self.gt_cat, weights=self.gt_n, minlength=self.n_categories).astype(np.int64)

    def select(self, cat_ids) -> Matches:
        """The matching restricted to the categories ``cat_ids`` (every image kept): the AP of a label set, e.g. the
        leaf classes only, so that losses trained on different label sets are scored on the same classes. Raises
        AnnotationError for an id this evaluation did not score."""
        wanted = np.asarray(sorted(set(int(c) for c in cat_ids)), dtype=self.cat_ids.dtype)
        missing = np.setdiff1d(wanted, self.cat_ids)
        if len(missing):
            raise AnnotationError(
                f"categories {missing[:5].tolist()} were not scored by this evaluation; select among its cat_ids"
            )
        keep = np.isin(self.cat_ids, wanted)
        new_index = np.cumsum(keep) - 1  # old category index -> new one (where kept)
        d, g = keep[self.det_cat], keep[self.gt_cat]
        return dataclasses.replace(
            self,
            cat_ids=self.cat_ids[keep],
            frequency=self.frequency[keep],
            det_cat=new_index[self.det_cat[d]].astype(self.det_cat.dtype),
            det_img=self.det_img[d],
            tp=self.tp[d],
            fp=self.fp[d],
            det_score=None if self.det_score is None else self.det_score[d],
            gt_cat=new_index[self.gt_cat[g]].astype(self.gt_cat.dtype),
            gt_img=self.gt_img[g],
            gt_n=self.gt_n[g],
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Write the arrays as one .npz file, atomically."""
        buf = io.BytesIO()
        arrays = {k: getattr(self, k) for k in _ARRAYS + _OPTIONAL if getattr(self, k) is not None}
        np.savez_compressed(buf, **arrays)
        path = Path(path)
        write_bytes_atomic(path, buf.getvalue())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Matches:
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in _ARRAYS}
                arrays.update({k: z[k] for k in _OPTIONAL if k in z.files})
        except (OSError, KeyError, ValueError) as exc:
            raise AnnotationError(
                f"{path}: not a matches file written by ltsweep ({exc}); rerun the evaluation that wrote it"
            ) from None
        return cls(**arrays)


def same_images(matches: list[Matches]) -> None:
    """Raise unless every evaluation scored the same validation images and categories (the bootstrap resamples
    images jointly across them)."""
    if not matches:
        return
    first = matches[0]
    for m in matches[1:]:
        if not (np.array_equal(m.img_ids, first.img_ids) and np.array_equal(m.cat_ids, first.cat_ids)):
            raise AnnotationError(
                f"evaluations on different validation sets ({m.n_images} vs {first.n_images} images, "
                f"{m.n_categories} vs {first.n_categories} categories) cannot be compared image by image; "
                "compare runs that evaluated the same data.val"
            )
