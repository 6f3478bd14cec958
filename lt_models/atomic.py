"""Atomic file writes: nothing a user produced is ever left half-written.

Every writer in ltsweep goes through `atomic_path`: write to a temp file in the destination's directory, then
`os.replace` it onto the destination (atomic on POSIX); on any error the temp file is removed and the destination
is untouched. Directories appear with `atomic_dir` (complete, under their final name, or not at all) and disappear
with `remove_dir` (renamed away first, then deleted). A kill at any moment leaves only hidden `.<name>.*.tmp`,
`.old` or `.del` entries, which `recover_dir` cleans up (or puts back) on the next start.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temp file name next to `path`; on clean exit move it onto `path`, else delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)
    return Path(path)


def write_json_atomic(path: str | os.PathLike, obj: Any, **dump_kwargs: Any) -> Path:
    """`json.dump(obj, **dump_kwargs)` to `path` atomically (compact separators unless `indent` is given)."""
    if "indent" not in dump_kwargs:
        dump_kwargs.setdefault("separators", (",", ":"))
    with atomic_path(path) as tmp:
        with open(tmp, "w") as fh:
            json.dump(obj, fh, **dump_kwargs)
    return Path(path)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp directory next to `path`; on clean exit it becomes `path` (an existing `path` is swapped out
    and then removed), else it is deleted. A reader never sees a half-filled directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def remove_dir(path: str | os.PathLike) -> None:
    """Delete a directory so that its name disappears at once: rename it to a hidden `.<name>.*.del` beside it,
    then delete that. A kill during the deletion leaves no damaged directory under the real name."""
    path = Path(path)
    if not path.exists():
        return
    gone = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".del", dir=path.parent))
    os.replace(path, gone / path.name)
    shutil.rmtree(gone, ignore_errors=True)


def _hidden_name(entry: Path) -> str | None:
    """`<name>` of a hidden `.<name>.<random>.<tmp|old|del>` entry made here, else None."""
    if not entry.name.startswith(".") or entry.suffix not in (".tmp", ".old", ".del"):
        return None
    parts = entry.name[1:].rsplit(".", 2)
    return parts[0] if len(parts) == 3 else None


def recover_dir(parent: str | os.PathLike) -> list[str]:
    """Clean up what a kill left in `parent` (call it before writing there again; it must be the only writer):
    incomplete temp files and directories (`.tmp`) and half-deleted ones (`.del`) are removed; a directory that
    `atomic_dir` had moved aside (`.old`) is put back under its name when the swap did not finish, else removed.
    Returns what it did, one line per entry."""
    parent = Path(parent)
    done: list[str] = []
    if not parent.is_dir():
        return done
    for entry in sorted(parent.iterdir()):
        name = _hidden_name(entry)
        if name is None:
            continue
        final = parent / name
        if entry.suffix == ".old" and (entry / name).exists() and not final.exists():
            os.replace(entry / name, final)
            done.append(f"restored {final} (a replacement was interrupted)")
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        done.append(f"removed {entry}")
    return done
