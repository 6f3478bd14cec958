"""The MLflow store: opening a client, and reading sweeps back from it."""
