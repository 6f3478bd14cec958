"""`ltsweep data synth|stats|convert-openimages` in-process: exit codes and one-line error messages."""

import csv
import json

import numpy as np
import pytest
from PIL import Image

from pipelines.cli import main


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["data", "synth", "--preset", "demo", "--out", str(out), "--seed", "0"]) == 0
    return out


def test_synth_writes_the_demo_benchmark(demo, capsys):
    for name in ("train.json", "val.json", "hierarchy.json"):
        assert (demo / name).is_file()
    train = json.loads((demo / "train.json").read_text())
    assert len(list((demo / "images").glob("train_*.png"))) == len(train["images"])
    freq = [c["frequency"] for c in train["categories"]]
    assert all(freq.count(b) > 0 for b in "rcf")


def test_stats_on_the_demo(demo, capsys):
    assert main(["data", "stats", str(demo / "train.json"), "--lam", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "imbalance magnitude (Fig 2)" in out and "rare 1" in out.replace("rare 10", "rare 1")
    assert "most concurrent label pairs" in out and "crimson_circle" in out  # a twin pair is among them
    assert "parent-only labels (Fig 3b)" in out and "n/a" not in out.split("parent-only labels")[1][:40]
    assert "soft-balance λ=0.5" in out and "class-aware (λ=1)" in out
    for name in ("imbalance", "confusion", "parent_only", "soft_balance"):
        assert (demo / f"train_{name}.png").is_file()


def test_stats_no_plots(tmp_path, capsys):
    ann = _small(tmp_path)
    assert main(["data", "stats", str(ann), "--no-plots"]) == 0
    assert "imbalance magnitude" in capsys.readouterr().out
    assert not list(tmp_path.glob("*.png"))


def _small(tmp_path, mutate=None):
    """Two images with files in <dir>/images (so `data stats` checks them), three annotations."""
    data = {
        "images": [
            {"id": 1, "file_name": "1.png", "width": 40, "height": 30},
            {"id": 2, "file_name": "2.png", "width": 40, "height": 30},
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 5, "bbox": [1, 1, 10, 10]},
            {"id": 2, "image_id": 1, "category_id": 6, "bbox": [1, 1, 10, 10]},
            {"id": 3, "image_id": 2, "category_id": 5, "bbox": [20, 5, 10, 20]},
        ],
        "categories": [{"id": 5, "name": "cat"}, {"id": 6, "name": "animal"}],
    }
    (tmp_path / "images").mkdir(exist_ok=True)
    for img in data["images"]:
        Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / "images" / img["file_name"])
    if mutate:
        mutate(tmp_path, data)
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(data))
    return ann


CASES = {
    # case: (mutation, pieces of the error line, what --skip-invalid reports)
    "unknown category_id": (
        lambda t, d: d["annotations"][1].update(category_id=9),
        ["annotation id 2", "'category_id' = 9"],
        "skipped 1 invalid records: unknown category id 1",
    ),
    "zero width box": (
        lambda t, d: d["annotations"][2].update(bbox=[20, 5, 0, 20]),
        ["annotation id 3", "'bbox'", "width or height <= 0"],
        "skipped 1 invalid records: bad box 1",
    ),
    "box outside image": (
        lambda t, d: d["annotations"][2].update(bbox=[35, 5, 10, 20]),
        ["annotation id 3", "'bbox'", "outside the 40x30 image"],
        "skipped 1 invalid records: bad box 1",
    ),
    "missing image file": (
        lambda t, d: (t / "images" / "2.png").unlink(),
        ["image id 2", "'file_name' = '2.png'", "does not exist"],
        "skipped 2 invalid records: annotation of skipped image 1, missing image file 1",
    ),
    "duplicate image id": (
        lambda t, d: d["images"].append(dict(d["images"][0])),
        ["image id 1", "duplicate 'id'"],
        "skipped 1 invalid records: duplicate image id 1",
    ),
    "duplicate annotation id": (
        lambda t, d: d["annotations"].append(dict(d["annotations"][2])),
        ["annotation id 3", "duplicate 'id'"],
        "skipped 1 invalid records: duplicate annotation id 1",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_stats_bad_input_exits_2_with_one_line(tmp_path, capsys, case):
    mutate, needles, skipped = CASES[case]
    ann = _small(tmp_path, mutate)
    assert main(["data", "stats", str(ann), "--no-plots"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"ltsweep: error: {ann}: ") and "\n" not in err
    for needle in needles:
        assert needle in err
    assert "--skip-invalid" in err
    assert main(["data", "stats", str(ann), "--no-plots", "--skip-invalid"]) == 0
    assert skipped in capsys.readouterr().out


def test_stats_malformed_json_and_missing_file(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [}')
    assert main(["data", "stats", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: malformed JSON at line 1 column" in err
    assert main(["data", "stats", str(tmp_path / "none.json")]) == 2
    assert "none.json: annotations file not found" in capsys.readouterr().err


def test_convert_openimages_cli(tmp_path, capsys):
    with open(tmp_path / "boxes.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["ImageID", "LabelName", "XMin", "XMax", "YMin", "YMax", "IsGroupOf", "ImageWidth", "ImageHeight"])
        w.writerow(["i1", "/m/a", 0.1, 0.5, 0.1, 0.5, 0, 100, 100])
        w.writerow(["i1", "/m/b", 0.1, 1.5, 0.1, 0.5, 0, 100, 100])  # XMax > 1
    (tmp_path / "labels.csv").write_text("ImageID,LabelName,Confidence\ni1,/m/b,0\n")
    (tmp_path / "classes.csv").write_text("/m/a,A\n/m/b,B\n")
    (tmp_path / "h.json").write_text(json.dumps({"LabelName": "r", "Subcategory": [{"LabelName": "/m/a"}]}))
    args = [
        "data",
        "convert-openimages",
        "--boxes",
        str(tmp_path / "boxes.csv"),
        "--labels",
        str(tmp_path / "labels.csv"),
        "--classes",
        str(tmp_path / "classes.csv"),
        "--hierarchy",
        str(tmp_path / "h.json"),
        "--out",
        str(tmp_path / "oi.json"),
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "boxes.csv: line 3 (ImageID i1): field 'XMax' = 1.5 is outside [0, 1]" in err
    assert not (tmp_path / "oi.json").exists()
    assert main(args + ["--skip-invalid"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["invalid_skipped"] == 1 and summary["annotations"] == 1
    d = json.loads((tmp_path / "oi.json").read_text())
    assert d["images"][0]["neg_category_ids"] == [2]


def _oi_split(d, counts):
    """CSVs of one Open Images split in folder d: class MID -> number of images with one box of it."""
    d.mkdir()
    with open(d / "boxes.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["ImageID", "LabelName", "XMin", "XMax", "YMin", "YMax", "ImageWidth", "ImageHeight"])
        for mid, n in counts.items():
            for i in range(n):
                w.writerow([f"{mid[3:]}{i}", mid, 0.1, 0.5, 0.1, 0.5, 10, 10])
    (d / "labels.csv").write_text("ImageID,LabelName,Confidence\n")
    (d / "classes.csv").write_text("/m/a,A\n/m/b,B\n/m/c,C\n")
    (d / "h.json").write_text(json.dumps({"LabelName": "r", "Subcategory": [{"LabelName": "/m/a"}]}))
    return [
        "data",
        "convert-openimages",
        "--boxes",
        str(d / "boxes.csv"),
        "--labels",
        str(d / "labels.csv"),
        "--classes",
        str(d / "classes.csv"),
        "--hierarchy",
        str(d / "h.json"),
        "--out",
        str(d / "oi.json"),
    ]


def test_convert_openimages_cli_train_ann(tmp_path, capsys):
    """Val converted with --train-ann gets the training buckets (f, c, r), not its own (r, r, c)."""
    assert main(_oi_split(tmp_path / "train", {"/m/a": 101, "/m/b": 11, "/m/c": 1})) == 0
    assert json.loads(capsys.readouterr().out)["frequency_source"] == "self: image_count"
    train_json = tmp_path / "train" / "oi.json"
    val_args = _oi_split(tmp_path / "val", {"/m/a": 2, "/m/b": 1, "/m/c": 12})
    assert main(val_args + ["--train-ann", str(train_json)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["frequency_source"] == f"train: {train_json} image_count"
    assert summary["buckets"] == {"r": 1, "c": 1, "f": 1}
    val = json.loads((tmp_path / "val" / "oi.json").read_text())
    assert val["frequency_source"] == summary["frequency_source"]
    assert [(c["frequency"], c["image_count"]) for c in val["categories"]] == [("f", 2), ("c", 1), ("r", 12)]
    # a training file without one of the classes: exit 2, one line naming both files, the MID and the fix
    (tmp_path / "val" / "classes.csv").write_text("/m/a,A\n/m/b,B\n/m/c,C\n/m/d,D\n")
    assert main(val_args + ["--train-ann", str(train_json)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"ltsweep: error: {train_json}: no category with mid '/m/d'") and "\n" not in err
    assert str(tmp_path / "val" / "oi.json") in err and "--train-ann" in err
    with pytest.raises(SystemExit):
        main(["data", "convert-openimages", "--help"])
    assert "--train-ann" in capsys.readouterr().out
