"""Reading and checking evaluation inputs: LVIS-format ground truth and COCO-results detections.

Shared by `lt_models.evaluation.lvis`, `lt_models.evaluation.openimages` and `lt_models.evaluation.per_class`.
`GroundTruth` holds the ground truth as flat arrays, images and categories indexed in sorted-id order (as lvis-api
does). Unreadable input gives an `AnnotationError` naming the file, the entry and the fix; the slow `_diagnose_*`
paths run only on bad input.
"""

from __future__ import annotations

import collections
import itertools
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from operator import attrgetter, itemgetter, methodcaller
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from lt_models.data.annotations import FREQ_LABELS, frequency_buckets, read_json
from lt_models.errors import AnnotationError

Frequency = Mapping[Any, str] | Sequence[str] | None
# COCO results: a list of {image_id, category_id, bbox, score}, or the path of such a JSON file (streamed)
Detections = Sequence[Mapping[str, Any]] | str | Path


def _load_gt(gt: str | Path | Mapping[str, Any]) -> tuple[Mapping[str, Any], str]:
    if isinstance(gt, (str, Path)):
        data, source = read_json(gt, "ground-truth annotations"), str(gt)
    elif isinstance(gt, Mapping):
        data, source = gt, "ground truth (dict)"
    else:
        raise TypeError(f"gt must be a path or an LVIS-format dict, got {type(gt).__name__}")
    if not isinstance(data, Mapping):
        raise AnnotationError(f"{source}: top level must be an object with images/annotations/categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise AnnotationError(f"{source}: missing list field '{key}'; fix: use an LVIS/COCO-format JSON")
    return data, source


def _resolve_frequency(
    cats: list[dict], cat_ids: list, frequency: Frequency, source: str, required: bool
) -> list[str] | None:
    """'r'/'c'/'f' per sorted category: the override, else each category's `frequency`, else `image_count`."""
    if frequency is not None:
        if isinstance(frequency, Mapping):
            missing = [c for c in cat_ids if c not in frequency]
            if missing:
                raise AnnotationError(
                    f"frequency override: no bucket for category id(s) {missing[:5]} of {source};"
                    f" fix: give one of 'r'/'c'/'f' for every category"
                )
            freq = [frequency[c] for c in cat_ids]
        else:
            freq = list(frequency)
            if len(freq) != len(cat_ids):
                raise AnnotationError(
                    f"frequency override has {len(freq)} entries but {source} has "
                    f"{len(cat_ids)} categories; fix: one 'r'/'c'/'f' per sorted category id"
                )
        where = "frequency override"
    else:
        by_id = {c["id"]: c for c in cats}
        if all("frequency" in by_id[c] for c in cat_ids):
            freq, where = [by_id[c]["frequency"] for c in cat_ids], f"{source} categories[].frequency"
        elif all("image_count" in by_id[c] for c in cat_ids):
            freq = frequency_buckets([by_id[c]["image_count"] for c in cat_ids])
            where = f"{source} categories[].image_count"
        elif required:
            lacking = [c for c in cat_ids if "frequency" not in by_id[c]][:5]
            raise AnnotationError(
                f"{source}: categories {lacking} have no 'frequency' (and no 'image_count'), so APr/APc/APf are "
                f"undefined; fix: pass frequency= to evaluate_lvis (e.g. "
                f"lt_models.data.annotations.frequency_buckets(training image counts)) or add 'frequency' to categories"
            )
        else:
            return None
    bad = [(c, f) for c, f in zip(cat_ids, freq) if f not in FREQ_LABELS]
    if bad:
        raise AnnotationError(f"{where}: category {bad[0][0]} has frequency {bad[0][1]!r}; fix: use 'r', 'c' or 'f'")
    return list(freq)


class GroundTruth:
    """Ground truth as flat arrays. Images and categories are indexed in sorted-id order, as lvis-api does."""

    def __init__(self, gt: str | Path | Mapping[str, Any], frequency: Frequency = None, require_frequency: bool = True):
        data, source = _load_gt(gt)
        self.data, self.source = data, source
        try:
            img_ids = sorted({im["id"] for im in data["images"]})
            cat_ids = sorted({c["id"] for c in data["categories"]})
        except KeyError as exc:
            raise AnnotationError(f"{source}: an image or category has no 'id'; fix: give every entry an id") from exc
        self.img_ids, self.cat_ids = img_ids, cat_ids
        self.img_index = {i: k for k, i in enumerate(img_ids)}
        self.cat_index = {c: k for k, c in enumerate(cat_ids)}
        self.n_img, self.n_cat = len(img_ids), len(cat_ids)
        self.cats = {c["id"]: c for c in data["categories"]}
        self.frequency = _resolve_frequency(data["categories"], cat_ids, frequency, source, require_frequency)

        anns = data["annotations"]
        n = len(anns)
        try:
            img = np.fromiter(map(self.img_index.__getitem__, map(itemgetter("image_id"), anns)), np.int64, n)
            cat = np.fromiter(map(self.cat_index.__getitem__, map(itemgetter("category_id"), anns)), np.int64, n)
            box = np.array(list(map(itemgetter("bbox"), anns)), np.float64).reshape(n, 4)
            if all(map(methodcaller("__contains__", "area"), anns)):
                area = np.fromiter(map(itemgetter("area"), anns), np.float64, n)
            else:  # COCO-style files without area: the box area
                area = np.fromiter(
                    (a["area"] if "area" in a else a["bbox"][2] * a["bbox"][3] for a in anns), np.float64, n
                )
        except (KeyError, TypeError, ValueError) as exc:
            self._diagnose_anns(anns)
            raise AnnotationError(f"{source}: annotations could not be read ({exc})") from exc
        ignore = np.fromiter(map(methodcaller("get", "ignore", 0), anns), bool, n)
        ann_id = np.fromiter(map(methodcaller("get", "id", -1), anns), np.int64, n)
        group_of = np.fromiter(map(methodcaller("get", "isgroupof", 0), anns), bool, n)
        if not (np.isfinite(box).all() and not np.isnan(area).any()):
            bad = int(np.flatnonzero(~np.isfinite(box).all(1) | np.isnan(area))[0])
            raise AnnotationError(f"{source}: annotations[{bad}] has a non-finite bbox/area; fix: drop or repair it")
        self.ann_img, self.ann_cat, self.ann_box, self.ann_area = img, cat, box, area
        self.ann_ignore, self.ann_id, self.ann_group_of = ignore, ann_id, group_of

        def pair_keys(field: str) -> np.ndarray:
            imgs = [im for im in data["images"] if im.get(field)]
            cats = list(itertools.chain.from_iterable(im[field] for im in imgs))
            known = np.fromiter((c in self.cat_index for c in cats), bool, len(cats))
            ci = np.fromiter((self.cat_index[c] for c, k in zip(cats, known) if k), np.int64, int(known.sum()))
            ii = np.repeat([self.img_index[im["id"]] for im in imgs], [len(im[field]) for im in imgs])
            return np.unique(ci * self.n_img + ii[known])

        self.neg_keys = pair_keys("neg_category_ids")
        self.nel_keys = pair_keys("not_exhaustive_category_ids")
        self.pos_label_keys = pair_keys("pos_category_ids")

    def _diagnose_anns(self, anns: list) -> None:
        """Raise an AnnotationError naming the first unreadable annotation (slow path, bad input only)."""
        for j, a in enumerate(anns):
            where = f"{self.source}: annotations[{j}]"
            if not isinstance(a, Mapping):
                raise AnnotationError(
                    f"{where} is not an object; fix: annotations are {{image_id, category_id, bbox, area}} objects"
                )
            for field, index, kind in (
                ("image_id", self.img_index, "images"),
                ("category_id", self.cat_index, "categories"),
            ):
                if field not in a:
                    raise AnnotationError(f"{where} has no '{field}'; fix: every annotation needs {field}")
                if a[field] not in index:
                    raise AnnotationError(
                        f"{where} (id {a.get('id')}) has {field} {a[field]!r}, which is not in "
                        f"'{kind}'; fix: add the entry to '{kind}' or drop the annotation"
                    )
            b = a.get("bbox")
            if not isinstance(b, (list, tuple)) or len(b) != 4:
                raise AnnotationError(f"{where} (id {a.get('id')}) has bbox {b!r}; fix: bbox must be [x, y, w, h]")
            try:
                float(a["area"] if "area" in a else b[2] * b[3])
                [float(v) for v in b]
            except (TypeError, ValueError) as exc:
                raise AnnotationError(
                    f"{where} (id {a.get('id')}) has a non-numeric bbox/area; fix: numbers only"
                ) from exc


def detection_arrays(dets: Detections, g: GroundTruth | None, source: str):
    """(image index, category index, score, xywh box) arrays of COCO-results detections, validated. ``dets``: a
    list of dicts, or the path of a COCO-results JSON, streamed (:func:`stream_detection_arrays`)."""
    if isinstance(dets, (str, Path)):
        return stream_detection_arrays(dets, g)
    return _arrays(dets, g, source)


def stream_detection_arrays(path: str | Path, g: GroundTruth | None):
    """:func:`detection_arrays` of a COCO-results JSON file. A JSON list is read ``STREAM_BLOCK`` bytes at a time and
    cut after its last complete detection; msgspec decodes each piece into typed records (no dicts), which become
    arrays. An object with ``annotations`` is read whole."""
    parts, start, source = [], 0, str(path)
    try:
        with open(path, "rb") as fh:
            if fh.read(4096).lstrip()[:1] != b"[":
                return _arrays(_results_list(read_json(path, "detections"), path), g, source)
            fh.seek(0)
            for piece, decoded in _list_pieces(fh, source):
                records = decoded if decoded is not None else _decode_piece(piece, g, source, start)
                parts.append(_arrays(records, g, source, start, get=attrgetter))
                start += len(records)
    except OSError as exc:
        raise AnnotationError(f"{path}: cannot read the detections ({exc.strerror or exc}); fix: the path") from exc
    if not parts:
        return _arrays([], g, source)
    cols = [np.concatenate([p[i] for p in parts]) if parts[0][i] is not None else None for i in range(4)]
    return tuple(cols)


STREAM_BLOCK = 16 << 20  # bytes of a results file read at a time


class _Det(msgspec.Struct):
    """One COCO-results detection as msgspec decodes it (other fields are skipped)."""

    image_id: Any
    category_id: Any
    bbox: tuple[float, float, float, float]
    score: float


_DECODER = msgspec.json.Decoder(list[_Det])


def _list_pieces(fh, source: str):
    """The text of a JSON list's elements in pieces (``e1, e2, ..., ek``), each cut after a complete element, with
    its records when they decoded.

    A cut is a ``},`` that ends an element: one inside an element (after a nested object, e.g. an RLE mask) leaves
    the piece's last element unclosed, which msgspec rejects as malformed, so the cut moves to an earlier ``},``
    (a few tries, then the piece waits for more text). A type error is a real error: the piece goes on as it is."""
    buf = fh.read(STREAM_BLOCK).lstrip()[1:]  # after "["
    while more := fh.read(STREAM_BLOCK):
        buf += more
        cut = buf.rfind(b"},")
        decoded: list | bool | None = False
        for _ in range(8):
            if cut <= 0 or (decoded := _try_decode(buf[: cut + 1])) is not False:
                break
            cut = buf.rfind(b"},", 0, cut)
        if cut > 0 and decoded is not False:
            yield buf[: cut + 1], decoded
            buf = buf[cut + 2 :]
    tail = buf.rstrip()
    if not tail.endswith(b"]"):
        raise AnnotationError(f"{source}: the JSON list is not closed; fix: write the file again (truncated?)")
    if tail[:-1].strip():
        yield tail[:-1], None


def _try_decode(piece: bytes) -> list | None | bool:
    """The records of ``piece``; None when it holds complete JSON values of a wrong type (reported by the caller);
    False when it is no sequence of complete values (a cut inside an element)."""
    try:
        return _DECODER.decode(b"[" + piece + b"]")
    except msgspec.ValidationError:
        return None
    except msgspec.DecodeError:
        return False


def _decode_piece(piece: bytes, g: GroundTruth | None, source: str, start: int) -> list:
    try:
        return _DECODER.decode(b"[" + piece + b"]")
    except msgspec.ValidationError as exc:
        try:  # a wrong field: the dict path names the detection and the fix
            _diagnose_dets(msgspec.json.decode(b"[" + piece + b"]"), g, source, start)
        except msgspec.DecodeError:
            pass
        raise AnnotationError(f"{source}: after detection #{start}: {exc}; fix: COCO results fields") from exc
    except msgspec.DecodeError as exc:
        raise AnnotationError(
            f"{source}: invalid JSON after detection #{start} ({exc}); fix: write the file again (truncated?)"
        ) from exc


def _results_list(data: Any, path: str | Path) -> list:
    """The detections of a COCO-results file's content: the list itself, or an object's ``annotations``."""
    if isinstance(data, Mapping) and isinstance(data.get("annotations"), list):
        data = data["annotations"]
    if not isinstance(data, list):
        raise AnnotationError(
            f"{path}: top level is a {type(data).__name__}; fix: COCO results are a JSON list "
            f"of {{image_id, category_id, bbox, score}}"
        )
    return data


def _arrays(dets: Sequence[Any], g: GroundTruth | None, source: str, start: int = 0, get: Any = itemgetter):
    """The arrays of ``dets``: dicts (``get`` itemgetter) or msgspec records (``get`` attrgetter); ``start``: the
    number of the first of them in its file."""
    n = len(dets)
    if n == 0:
        z = np.zeros(0, np.int64)
        return z, z.copy(), np.zeros(0), np.zeros((0, 4))
    try:  # C-level iteration (map/itemgetter): ~1.5 M detections in about a second
        ids = map(get("image_id"), dets)
        cids = map(get("category_id"), dets)
        img: np.ndarray | None
        cat: np.ndarray | None
        if g is not None:
            img = np.fromiter(map(g.img_index.__getitem__, ids), np.int64, n)
            cat = np.fromiter(map(g.cat_index.__getitem__, cids), np.int64, n)
        else:
            img = cat = None
            collections.deque(zip(ids, cids), maxlen=0)  # presence check
        score = np.fromiter(map(get("score"), dets), np.float64, n)
        bbs = list(map(get("bbox"), dets))
        if not (np.fromiter(map(len, bbs), np.int64, n) == 4).all():
            raise ValueError("bbox length")
        box = np.fromiter(itertools.chain.from_iterable(bbs), np.float64, 4 * n).reshape(n, 4)
    except (KeyError, TypeError, ValueError, AttributeError):
        _diagnose_dets(_plain(dets), g, source, start)
        raise
    if not (np.isfinite(score).all() and np.isfinite(box).all()):
        _diagnose_dets(_plain(dets), g, source, start)
    return img, cat, score, box


def _plain(dets: Sequence[Any]) -> Iterable[Any]:
    """``dets`` as dicts (msgspec records converted), for the diagnosis."""
    return (msgspec.structs.asdict(d) if isinstance(d, msgspec.Struct) else d for d in dets)


def _diagnose_dets(dets: Iterable[Any], g: GroundTruth | None, source: str, start: int = 0) -> None:
    """Find the first bad detection and raise an AnnotationError naming it (slow path, only on bad input);
    ``start``: the number of the first of ``dets`` in its file."""
    for i, d in enumerate(dets, start):
        where = f"{source}: detection #{i}"
        if not isinstance(d, Mapping):
            raise AnnotationError(
                f"{where} is a {type(d).__name__}, not an object; fix: COCO results are a list "
                f"of {{image_id, category_id, bbox, score}}"
            )
        for key in ("image_id", "category_id", "bbox", "score"):
            if key not in d:
                raise AnnotationError(
                    f"{where} has no '{key}'; fix: COCO results need image_id, category_id, bbox [x, y, w, h] and score"
                )
        b = d["bbox"]
        if (
            not isinstance(b, (list, tuple))
            or len(b) != 4
            or not all(isinstance(v, numbers.Real) and math.isfinite(v) for v in b)
        ):
            raise AnnotationError(f"{where} has bbox {b!r}; fix: bbox must be 4 finite numbers [x, y, w, h]")
        s = d["score"]
        if isinstance(s, bool) or not isinstance(s, numbers.Real) or not math.isfinite(s):
            raise AnnotationError(f"{where} has score {s!r}; fix: score must be a finite number")
        if g is not None:
            if d["image_id"] not in g.img_index:
                raise AnnotationError(
                    f"{where} has image_id {d['image_id']!r}, which is not an image of "
                    f"{g.source}; fix: evaluate against the ground truth the detector ran on"
                )
            if d["category_id"] not in g.cat_index:
                raise AnnotationError(
                    f"{where} has category_id {d['category_id']!r}, which is not a category of "
                    f"{g.source}; fix: map labels back to dataset category ids "
                    f"(label_to_cat_id) before writing results"
                )
    raise AnnotationError(
        f"{source}: detections could not be read; fix: COCO results list of {{image_id, category_id, bbox, score}}"
    )


def load_detections(path: str | Path, gt: str | Path | Mapping[str, Any] | None = None) -> list[dict]:
    """Read a COCO-results JSON (a list of {image_id, category_id, bbox [x,y,w,h], score}) and validate it.

    With ``gt``, image and category ids must exist in the ground truth. Raises AnnotationError naming the file,
    the detection and the fix.
    """
    data = _results_list(read_json(path, "detections"), path)
    g = GroundTruth(gt, require_frequency=False) if gt is not None else None
    detection_arrays(data, g, str(path))
    return data
