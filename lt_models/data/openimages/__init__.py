"""Open Images challenge CSVs + class hierarchy -> LVIS-format JSON (row by row) or an annotation store (streaming)."""
