"""Errors for bad user input. Each message names the file, the offending id/field and the fix.

The CLI prints these as one line (exit code 2) instead of a traceback.
"""


class LtsweepInputError(ValueError):
    """Base class: a user-produced file or setting is wrong."""


class AnnotationError(LtsweepInputError):
    """An annotation/CSV/detections file is malformed or inconsistent."""


class ConfigError(LtsweepInputError):
    """An experiment or search-space config is invalid."""
