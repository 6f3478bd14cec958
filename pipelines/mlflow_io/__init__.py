"""pipelines.mlflow_io."""
