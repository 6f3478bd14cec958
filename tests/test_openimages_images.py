"""Open Images conversion: image sizes from the user's image folder (headers only) or from an image-sizes CSV."""

import csv
import json

import numpy as np
import pytest
from PIL import Image, ImageFile

import lt_models.data.openimages.convert as oi
from lt_models.data.openimages.convert import convert_openimages
from lt_models.errors import AnnotationError
from pipelines.cli import main

MIDS = {"/m/apple": "Apple", "/m/car": "Car", "/m/toy": "Toy"}
HIER = {
    "LabelName": "/m/0bl9f",
    "Subcategory": [{"LabelName": "/m/apple"}, {"LabelName": "/m/car"}, {"LabelName": "/m/toy"}],
}
# ImageID -> (width, height, file suffix); img_e appears in the labels CSV only
SIZES = {
    "img_a": (40, 30, ".jpg"),
    "img_b": (17, 23, ".png"),
    "img_c": (64, 8, ".jpeg"),
    "img_d": (9, 50, ".jpg"),
    "img_e": (12, 12, ".png"),
}


def _dump(path, cols, rows):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        w.writerows(rows)
    return path


def _inputs(d):
    """Challenge-style CSVs without ImageWidth/ImageHeight columns: (boxes, labels, classes, hierarchy)."""
    boxes = [(iid, "/m/car", 0.25, 0.75, 0.5, 1.0) for iid in ("img_a", "img_b", "img_c", "img_d")]
    boxes.append(("img_a", "/m/toy", 0.25, 0.75, 0.5, 1.0))
    b = _dump(d / "boxes.csv", ["ImageID", "LabelName", "XMin", "XMax", "YMin", "YMax"], boxes)
    lab = _dump(d / "labels.csv", ["ImageID", "LabelName", "Confidence"], [("img_e", "/m/apple", 1)])
    c = _dump(d / "classes.csv", ["LabelName", "DisplayName"], MIDS.items())
    (d / "hierarchy.json").write_text(json.dumps(HIER))
    return b, lab, c, d / "hierarchy.json"


def _image_folder(d):
    d.mkdir()
    rng = np.random.default_rng(0)
    for iid, (w, h, ext) in SIZES.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / f"{iid}{ext}")
    return d


def _sizes(out):
    return {i["oi_image_id"]: (i["width"], i["height"]) for i in json.loads(out.read_text())["images"]}


def test_sizes_from_an_image_folder_match_pil_without_decoding(tmp_path, monkeypatch):
    files = _inputs(tmp_path)
    photos = _image_folder(tmp_path / "photos")
    monkeypatch.setattr(oi, "_HEADER_CHUNK", 2)  # several thread-pool tasks
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("pixels decoded"))
    out = tmp_path / "out" / "oi.json"
    s = convert_openimages(*files, out, image_dir=photos)
    monkeypatch.undo()
    expected = {}
    for iid, (_, _, ext) in SIZES.items():
        with Image.open(photos / f"{iid}{ext}") as im:
            expected[iid] = im.size
    assert _sizes(out) == expected and s["images"] == 5
    anns = json.loads(out.read_text())["annotations"]
    assert anns[1]["bbox"] == [17 * 0.25, 23 * 0.5, 17 * 0.5, 23 * 0.5]  # img_b: normalised x its 17x23 pixels


def test_cli_images_option(tmp_path, capsys):
    files = _inputs(tmp_path)
    photos = _image_folder(tmp_path / "photos")
    args = [
        "data",
        "convert-openimages",
        "--boxes",
        str(files[0]),
        "--labels",
        str(files[1]),
        "--classes",
        str(files[2]),
        "--hierarchy",
        str(files[3]),
        "--out",
        str(tmp_path / "oi.json"),
        "--images",
        str(photos),
    ]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 5
    assert _sizes(tmp_path / "oi.json")["img_c"] == (64, 8)


def test_sizes_from_a_csv(tmp_path, capsys):
    files = _inputs(tmp_path)
    rows = [(iid, "train", h, w) for iid, (w, h, _) in SIZES.items()] + [("img_other", "train", 1, 1)]
    sizes = _dump(tmp_path / "sizes.csv", ["ImageID", "Subset", "ImageHeight", "ImageWidth"], rows)
    out = tmp_path / "oi.json"
    convert_openimages(*files, out, image_sizes=sizes)  # no image anywhere
    assert _sizes(out) == {iid: (w, h) for iid, (w, h, _) in SIZES.items()}
    assert (
        main(
            [
                "data",
                "convert-openimages",
                "--boxes",
                str(files[0]),
                "--labels",
                str(files[1]),
                "--classes",
                str(files[2]),
                "--hierarchy",
                str(files[3]),
                "--out",
                str(tmp_path / "cli.json"),
                "--image-sizes",
                str(sizes),
            ]
        )
        == 0
    )
    assert _sizes(tmp_path / "cli.json") == _sizes(out)
    # an image missing from the CSV falls back to the image folder
    _dump(sizes, ["ImageID", "ImageWidth", "ImageHeight"], [("img_a", 40, 30)])
    convert_openimages(*files, out, image_sizes=sizes, image_dir=_image_folder(tmp_path / "photos"))
    assert _sizes(out)["img_b"] == (17, 23)


def test_bad_sizes_csv(tmp_path):
    files = _inputs(tmp_path)
    sizes = _dump(tmp_path / "sizes.csv", ["ImageID", "Width", "Height"], [("img_a", 1, 1)])
    with pytest.raises(AnnotationError, match=r"sizes\.csv: missing column 'ImageWidth'"):
        convert_openimages(*files, tmp_path / "oi.json", image_sizes=sizes)
    _dump(sizes, ["ImageID", "ImageWidth", "ImageHeight"], [("img_a", 40, "x")])
    with pytest.raises(AnnotationError, match=r"sizes\.csv: line 2 \(ImageID img_a\): fields 'ImageWidth'"):
        convert_openimages(*files, tmp_path / "oi.json", image_sizes=sizes)


def test_missing_image_names_id_path_and_fix(tmp_path, capsys):
    files = _inputs(tmp_path)
    photos = _image_folder(tmp_path / "photos")
    (photos / "img_c.jpeg").unlink()
    out = tmp_path / "oi.json"
    with pytest.raises(AnnotationError) as exc:
        convert_openimages(*files, out, image_dir=photos)
    msg = str(exc.value)
    assert "ImageID img_c: no image size" in msg and str(photos / "img_c.jpg") in msg
    assert "--image-sizes" in msg and "--images" in msg and "\n" not in msg
    assert not out.exists()
    s = convert_openimages(*files, out, image_dir=photos, skip_invalid=True)
    assert s["images"] == 4 and s["invalid_reasons"] == {"box of skipped image": 1, "no image size": 1}
    args = [
        "data",
        "convert-openimages",
        "--boxes",
        str(files[0]),
        "--labels",
        str(files[1]),
        "--classes",
        str(files[2]),
        "--hierarchy",
        str(files[3]),
        "--out",
        str(out),
        "--images",
        str(tmp_path / "nope"),
    ]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"{tmp_path / 'nope'}: image folder not found" in err


def test_unreadable_header_names_the_file(tmp_path):
    files = _inputs(tmp_path)
    photos = _image_folder(tmp_path / "photos")
    (photos / "img_d.jpg").write_bytes(b"not an image at all")
    with pytest.raises(
        AnnotationError,
        match=r"ImageID img_d: cannot read the image size from the header of "
        r".*photos/img_d\.jpg \(UnidentifiedImageError",
    ):
        convert_openimages(*files, tmp_path / "oi.json", image_dir=photos)
    s = convert_openimages(*files, tmp_path / "oi.json", image_dir=photos, skip_invalid=True)
    assert s["invalid_reasons"] == {"box of skipped image": 1, "unreadable image": 1}
