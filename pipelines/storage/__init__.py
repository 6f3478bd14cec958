"""Where a sweep keeps its files (a directory or an object store) and the caches it keeps there: annotation stores
and stage-1 checkpoints."""
