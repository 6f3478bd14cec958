"""pipelines.storage."""
