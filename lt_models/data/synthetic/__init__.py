"""The synthetic long-tail multi-label benchmark: a class layout, rendered PNGs and LVIS-format JSON."""
