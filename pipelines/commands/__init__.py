"""pipelines.commands."""
