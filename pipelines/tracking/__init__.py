"""Writing to MLflow from the sweep's driver: the Tune callback, the sweep and trial runs, the stage-1 run, the
artifacts, lineage and the registered best model."""
