"""pipelines.tracking."""
