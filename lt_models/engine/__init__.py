"""lt_models.engine."""
