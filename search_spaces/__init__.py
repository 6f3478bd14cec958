"""Packaged sweep configs (YAML). `path("demo")` -> the file's path; `names()` -> what is available."""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent


def names() -> list[str]:
    return sorted(p.stem for p in HERE.glob("*.yaml"))


def path(name: str) -> Path:
    """Path of the packaged search space `name` (with or without .yaml)."""
    p = HERE / (name if name.endswith(".yaml") else f"{name}.yaml")
    if not p.is_file():
        raise FileNotFoundError(f"no packaged search space {name!r}; available: {', '.join(names())}")
    return p
