"""Errors for bad user input. Each message names the file, the offending id/field and the fix.

The CLI prints these as one line (exit code 2) instead of a traceback.
"""

from __future__ import annotations

from collections.abc import Callable


class LtsweepInputError(ValueError):
    """Base class: a user-produced file or setting is wrong."""


class AnnotationError(LtsweepInputError):
    """An annotation/CSV/detections file is malformed or inconsistent."""


class ConfigError(LtsweepInputError):
    """An experiment or search-space config is invalid."""


def check_spec_options(spec, kind: str, reads: dict[str, tuple[str, ...]], checks: dict[str, Callable]) -> None:
    """Check a frozen spec dataclass (``SamplerSpec``, ``LossSpec``) in place: ``spec.name`` is a known ``kind``,
    every option that is set is one that this ``kind`` reads (``reads[name]``), and it passes its owner's range
    check (``checks[option]``, whose return value replaces it)."""
    if spec.name not in reads:
        raise ConfigError(f"{kind} = {spec.name!r}: unknown {kind}; choose one of {', '.join(reads)}")
    for option, check in checks.items():
        value = getattr(spec, option)
        if value is None:
            continue
        if option not in reads[spec.name]:
            users = [n for n, opts in reads.items() if option in opts]
            raise ConfigError(
                f"{option} is ignored by {kind} {spec.name!r}, which reads "
                f"{', '.join(reads[spec.name]) or 'none'}; remove {option} or use {kind} "
                f"{' / '.join(users)}"
            )
        object.__setattr__(spec, option, check(value))
