"""Atomic writes: a failure mid-write leaves the previous file/directory intact and no temp debris."""
import pytest

from lt_models.atomic import atomic_dir, atomic_path, write_json_atomic


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    dest = tmp_path / "a.json"
    write_json_atomic(dest, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(dest) as tmp:
            open(tmp, "w").write("{half")
            raise RuntimeError("crash mid-write")
    assert dest.read_text() == '{"v":1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_atomic_dir_swaps_in_new_contents_and_keeps_old_on_failure(tmp_path):
    dest = tmp_path / "ckpt"
    with atomic_dir(dest) as d:
        (d / "x").write_text("1")
    with atomic_dir(dest) as d:
        (d / "y").write_text("2")
    assert sorted(p.name for p in dest.iterdir()) == ["y"]
    with pytest.raises(RuntimeError):
        with atomic_dir(dest) as d:
            (d / "z").write_text("3")
            raise RuntimeError("crash")
    assert sorted(p.name for p in dest.iterdir()) == ["y"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
