"""CSV files as record batches of string columns (pyarrow), with the line number of each batch's first row.

The streaming Open Images converter (`lt_models.data.openimages.streaming`) reads its CSVs through these: `batches`
yields the chosen columns as strings, ``block_size`` bytes of CSV at a time (a header line, then one line per row, as
``csv.DictReader`` counts them; empty lines are skipped by both); `floats` parses a string column as Python's
``float`` would (Arrow's cast, or Python itself for a batch Arrow refuses); `lookup` maps each row through a
function called once per distinct value of the batch; `release_memory` returns freed memory to the OS.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from lt_models.errors import AnnotationError


def batches(path: Path, columns: list[str], block_size: int, bar=None) -> Iterator[tuple[int, dict[str, pa.Array]]]:
    """(line of the batch's first row, column -> string array) per record batch; `bar` (tqdm) advances by the
    bytes read."""
    convert = pacsv.ConvertOptions(include_columns=columns, column_types={c: pa.string() for c in columns})
    line = 2
    with pa.OSFile(str(path)) as f:
        try:
            for batch in pacsv.open_csv(
                f, read_options=pacsv.ReadOptions(block_size=block_size), convert_options=convert
            ):
                yield line, {c: batch.column(c) for c in columns}
                line += batch.num_rows
                if bar is not None:
                    bar.update(f.tell() - bar.n)
        except pa.ArrowInvalid as e:
            raise AnnotationError(
                f"{path}: unreadable CSV after line {line - 1} ({e}); fix the file (every row "
                f"needs the header's number of fields)"
            ) from None


def floats(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(float64 values, parsed mask) of a string column as Python's float() reads it (NaN where it fails)."""
    try:
        return pc.cast(arr, pa.float64()).to_numpy(zero_copy_only=False), np.ones(len(arr), bool)
    except pa.ArrowInvalid:
        out, ok = np.full(len(arr), np.nan), np.ones(len(arr), bool)
        for i, s in enumerate(arr.to_pylist()):
            try:
                out[i] = float(s)
            except (TypeError, ValueError):
                ok[i] = False
        return out, ok


def lookup(values: pa.Array, key: Callable[[str], int]) -> np.ndarray:
    """int64 ``key(value)`` of every row, calling `key` once per distinct value (in order of first appearance)."""
    enc = pc.dictionary_encode(values)
    table = np.fromiter((key(s) for s in enc.dictionary.to_pylist()), np.int64, len(enc.dictionary))
    return table[enc.indices.to_numpy(zero_copy_only=False)]


def release_memory() -> None:
    """Give freed memory back to the OS between phases of a large conversion: Arrow's pool, and glibc's heap
    (``malloc_trim``), which many per-batch temporaries fragment (the Open Images converter kept about 0.6 GB
    more at full size without it)."""
    pa.default_memory_pool().release_unused()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
