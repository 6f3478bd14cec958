"""The annotations layer: JSON reading, frequency buckets and the one hierarchy parser / closure."""

import json

import pytest

from lt_models.data.annotations import (
    category_frequencies,
    frequency_buckets,
    hierarchy_ancestors,
    hierarchy_descendants,
    load_hierarchy,
    name_to_cat_id,
    read_json,
)
from lt_models.errors import AnnotationError

# Categories as `convert_openimages` writes them: `name` = DisplayName, `mid` = the Open Images LabelName.
CATS = [
    {"id": 1, "name": "Fruit", "mid": "/m/fruit"},
    {"id": 2, "name": "Apple", "mid": "/m/apple"},
    {"id": 3, "name": "Banana", "mid": "/m/banana"},
    {"id": 4, "name": "Granny Smith", "mid": "/m/granny"},
    {"id": 5, "name": "Car", "mid": "/m/car"},
]


def _tree(key):
    """The same hierarchy keyed by category names or by MIDs; /m/vehicle is not a category (transparent)."""
    k = {c["mid"]: c[key] for c in CATS}
    return {
        "LabelName": "/m/0bl9f",
        "Subcategory": [
            {
                "LabelName": k["/m/fruit"],
                "Subcategory": [
                    {"LabelName": k["/m/apple"], "Subcategory": [{"LabelName": k["/m/granny"]}]},
                    {"LabelName": k["/m/banana"]},
                ],
            },
            {"LabelName": "/m/vehicle", "Subcategory": [{"LabelName": k["/m/car"]}]},
            {"LabelName": k["/m/banana"], "Part": [{"LabelName": k["/m/fruit"]}]},
        ],
    }  # "Part" is not is-a


@pytest.mark.parametrize("key", ["name", "mid"])
def test_parser_accepts_names_and_mids(tmp_path, key):
    path = tmp_path / "h.json"
    path.write_text(json.dumps(_tree(key)))
    assert load_hierarchy(path, name_to_cat_id(CATS)) == {1: [2, 3], 2: [4]}
    assert load_hierarchy(_tree(key), name_to_cat_id(CATS)) == {1: [2, 3], 2: [4]}  # a parsed tree works too


def test_both_key_styles_give_the_same_parents(tmp_path):
    names = name_to_cat_id(CATS)
    by_name, by_mid = load_hierarchy(_tree("name"), names), load_hierarchy(_tree("mid"), names)
    assert by_name == by_mid
    assert hierarchy_ancestors(by_name) == hierarchy_ancestors(by_mid) == {2: {1}, 3: {1}, 4: {1, 2}}
    assert hierarchy_descendants(by_mid) == {1: {2, 3, 4}, 2: {4}}


def test_name_to_cat_id_maps_names_and_mids():
    assert name_to_cat_id(CATS[:2]) == {"Fruit": 1, "/m/fruit": 1, "Apple": 2, "/m/apple": 2}
    assert name_to_cat_id([{"id": 7, "name": "x"}, {"id": 8}]) == {"x": 7}  # no name: nothing to match


def test_closure_reaches_a_cycle_start():
    assert hierarchy_ancestors({10: [20], 20: [10]}) == {10: {10, 20}, 20: {10, 20}}


def test_parser_errors_name_file_and_field(tmp_path):
    path = tmp_path / "h.json"
    names = name_to_cat_id(CATS)
    path.write_text(json.dumps({"LabelName": "/m/x", "Subcategory": [{"LabelName": "/m/y"}]}))
    with pytest.raises(AnnotationError, match=r"h.json: no hierarchy LabelName matches a category name or MID"):
        load_hierarchy(path, names)
    path.write_text(
        json.dumps(
            {"LabelName": "Fruit", "Subcategory": [{"LabelName": "Apple", "Subcategory": [{"LabelName": "Fruit"}]}]}
        )
    )
    with pytest.raises(AnnotationError, match=r"h.json: hierarchy cycle at LabelName 'Fruit'"):
        load_hierarchy(path, names)
    path.write_text(json.dumps({"LabelName": "Fruit", "Subcategory": [{"LabelName": "/m/fruit"}]}))
    with pytest.raises(AnnotationError, match="hierarchy cycle"):  # the same class under its name and its MID
        load_hierarchy(path, names)
    path.write_text(json.dumps({"LabelName": "Fruit", "Subcategory": {"LabelName": "Apple"}}))
    with pytest.raises(AnnotationError, match="field 'Subcategory' must be a list"):
        load_hierarchy(path, names)


def test_read_json_errors(tmp_path):
    with pytest.raises(AnnotationError, match=r"none.json: hierarchy file not found"):
        read_json(tmp_path / "none.json", "hierarchy")
    with pytest.raises(AnnotationError, match="is a directory"):
        read_json(tmp_path)
    (tmp_path / "bad.json").write_text('{"a": [}')
    with pytest.raises(AnnotationError, match=r"bad.json: malformed JSON at line 1 column"):
        read_json(tmp_path / "bad.json")
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(AnnotationError, match="not a UTF-8 text file"):
        read_json(tmp_path / "bin.json")


def test_category_frequencies_keep_the_file_buckets():
    cats = [{"id": 1, "frequency": "f"}, {"id": 2}, {"id": 3, "frequency": "x"}]
    assert category_frequencies(cats, {1: 3, 2: 50, 3: 500}) == ["f", "c", "f"]
    assert frequency_buckets([10, 11, 100, 101]) == ["r", "c", "c", "f"]
