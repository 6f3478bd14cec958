"""pipelines.tune."""
