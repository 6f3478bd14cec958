"""pipelines.config."""
