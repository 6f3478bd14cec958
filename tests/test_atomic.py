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


def test_remove_dir_renames_away_first(tmp_path, monkeypatch):
    """A kill during the deletion (simulated: rmtree never runs) leaves nothing under the directory's name, only a
    hidden .del entry that recover_dir removes."""
    import shutil

    from lt_models.atomic import recover_dir, remove_dir

    d = tmp_path / "checkpoint_epoch0001"
    d.mkdir()
    (d / "checkpoint.pt").write_bytes(b"x")
    monkeypatch.setattr(shutil, "rmtree", lambda *a, **k: None)  # killed right after the rename
    remove_dir(d)
    monkeypatch.undo()
    assert not d.exists() and [p.suffix for p in tmp_path.iterdir()] == [".del"]
    assert recover_dir(tmp_path) and list(tmp_path.iterdir()) == []


def test_recover_dir_puts_back_an_interrupted_swap_and_drops_temp(tmp_path):
    """atomic_dir replacing a directory is two renames; a kill between them leaves the old one in .old and the new
    one in .tmp. recover_dir restores the old one under its name and removes the incomplete new one."""
    from lt_models.atomic import recover_dir

    old = tmp_path / ".checkpoint_epoch0003.ab12cd.old"
    (old / "checkpoint_epoch0003").mkdir(parents=True)
    (old / "checkpoint_epoch0003" / "checkpoint.pt").write_bytes(b"old")
    (tmp_path / ".checkpoint_epoch0003.ef34gh.tmp").mkdir()
    (tmp_path / ".result.json.zz99.tmp").write_text("{")  # a temp file of atomic_path
    (tmp_path / "keep.me").write_text("user file")
    done = recover_dir(tmp_path)
    assert (tmp_path / "checkpoint_epoch0003" / "checkpoint.pt").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_epoch0003", "keep.me"]
    assert any(line.startswith("restored") for line in done)
    # with the final directory present, a leftover .old copy is just removed
    (old / "checkpoint_epoch0003").mkdir(parents=True)
    recover_dir(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_epoch0003", "keep.me"]
