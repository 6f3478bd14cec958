"""pipelines.analysis."""
