"""LVIS v1 image paths: no `file_name`, the path comes from `coco_url`, the image folder is the COCO root."""

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import search_spaces
from lt_models.data.datasets import LVISDetection
from lt_models.data.lvis_json import image_file_name
from lt_models.errors import AnnotationError

URL = "http://images.cocodataset.org"
# (image id, COCO split, width, height); LVIS v1 val mixes train2017 and val2017 images
TRAIN_IMAGES = [(9, "train2017", 24, 16), (25, "train2017", 20, 30)]
VAL_IMAGES = [(139, "val2017", 18, 12), (30, "train2017", 16, 22), (285, "val2017", 26, 14)]
CATS = [
    {"id": 1, "name": "aerosol_can", "synset": "aerosol.n.02", "frequency": "c"},
    {"id": 3, "name": "apple", "synset": "apple.n.01", "frequency": "f"},
]


def _lvis_v1(images: list[tuple]) -> dict:
    """An LVIS v1-shaped file: images carry `coco_url` / `flickr_url` but no `file_name`."""
    recs, anns = [], []
    for iid, split, w, h in images:
        recs.append(
            {
                "id": iid,
                "coco_url": f"{URL}/{split}/{iid:012d}.jpg",
                "flickr_url": "http://farm.example/x.jpg",
                "width": w,
                "height": h,
                "license": 1,
                "date_captured": "2013-11-14 16:28:13",
                "neg_category_ids": [],
                "not_exhaustive_category_ids": [],
            }
        )
        anns.append(
            {
                "id": len(anns) + 1,
                "image_id": iid,
                "category_id": 3,
                "bbox": [1.0, 2.0, 8.0, 6.0],
                "area": 48.0,
                "segmentation": [[1, 2, 9, 2, 9, 8]],
            }
        )
    return {"info": {"version": "1.0"}, "images": recs, "annotations": anns, "categories": CATS}


def _coco_tree(root, images: list[tuple]) -> dict[int, np.ndarray]:
    """Write one tiny image per record as <root>/<split>/<id>.jpg (PNG bytes: lossless); returns the pixels."""
    pixels = {}
    for iid, split, w, h in images:
        arr = np.random.default_rng(iid).integers(0, 256, (h, w, 3), dtype=np.uint8)
        (root / split).mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(root / split / f"{iid:012d}.jpg", format="PNG")
        pixels[iid] = arr
    return pixels


@pytest.fixture
def lvis_v1(tmp_path):
    """(train.json, val.json, COCO root, {image id: pixels}) laid out as detectron2 expects."""
    coco = tmp_path / "coco"
    pixels = _coco_tree(coco, TRAIN_IMAGES + VAL_IMAGES)
    (tmp_path / "lvis").mkdir()
    train, val = tmp_path / "lvis" / "lvis_v1_train.json", tmp_path / "lvis" / "lvis_v1_val.json"
    train.write_text(json.dumps(_lvis_v1(TRAIN_IMAGES)))
    val.write_text(json.dumps(_lvis_v1(VAL_IMAGES)))
    return train, val, coco, pixels


def test_train_and_val_images_load_from_the_coco_root(lvis_v1):
    train, val, coco, pixels = lvis_v1
    for ann, images in ((train, TRAIN_IMAGES), (val, VAL_IMAGES)):
        ds = LVISDetection(ann, image_dir=coco, train=False)
        assert [ds.image_info(i)["file_name"] for i in range(len(ds))] == [f"{s}/{i:012d}.jpg" for i, s, _, _ in images]
        for k, (iid, _, w, h) in enumerate(images):
            image, target = ds[k]
            assert image.shape == (3, h, w)
            expected = torch.from_numpy(pixels[iid]).permute(2, 0, 1).float() / 255
            torch.testing.assert_close(image, expected, rtol=0, atol=0)
            assert int(target["image_id"]) == iid


def test_missing_image_names_the_resolved_path(lvis_v1):
    _, val, coco, _ = lvis_v1
    gone = coco / "val2017" / f"{285:012d}.jpg"
    gone.unlink()
    with pytest.raises(AnnotationError) as exc:
        LVISDetection(val, image_dir=coco, train=False)
    msg = str(exc.value)
    assert "\n" not in msg and str(val) in msg and str(gone) in msg
    assert "image id 285" in msg and "coco_url" in msg and "COCO root" in msg
    # skip_invalid drops only that image
    ds = LVISDetection(val, image_dir=coco, train=False, skip_invalid=True)
    assert ds.image_ids.tolist() == [139, 30]
    assert ds.skipped_reasons == {"missing image file": 1, "annotation of skipped image": 1}


def test_split_folder_as_image_dir_is_a_clear_error(lvis_v1):
    """The old preset layout (image_dir = .../train2017) resolves to train2017/train2017/...: say so."""
    train, _, coco, _ = lvis_v1
    with pytest.raises(AnnotationError, match=r"train2017/train2017/000000000009\.jpg does not exist.*COCO root"):
        LVISDetection(train, image_dir=coco / "train2017")


def test_image_removed_after_loading_is_a_one_line_error(lvis_v1):
    train, _, coco, _ = lvis_v1
    ds = LVISDetection(train, image_dir=coco)
    path = coco / "train2017" / f"{25:012d}.jpg"
    path.unlink()
    with pytest.raises(AnnotationError, match="image id 25") as exc:
        ds[1]
    assert str(path) in str(exc.value) and "\n" not in str(exc.value)


def test_file_name_wins_over_coco_url():
    """LVIS v0.5 / COCO / synthetic records keep today's behaviour: `file_name` relative to the image folder."""
    v05 = {"file_name": "COCO_val2014_000000397133.jpg", "coco_url": f"{URL}/val2014/COCO_val2014_000000397133.jpg"}
    assert image_file_name(v05) == "COCO_val2014_000000397133.jpg"
    assert image_file_name({"file_name": "train_000001.png"}) == "train_000001.png"
    assert image_file_name({"coco_url": f"{URL}/val2017/000000000139.jpg?dl=1"}) == "val2017/000000000139.jpg"
    assert image_file_name({"coco_url": "", "file_name": ""}) is None


def test_lvis_preset_points_both_image_dirs_at_the_coco_root():
    text = search_spaces.path("lvis_r50").read_text()
    data = yaml.safe_load(text)["data"]
    assert data["image_dir"] == data["val_image_dir"] == "data/coco"
    assert "COCO root" in text and "train2017/ and val2017/" in text
