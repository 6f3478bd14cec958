"""lt_models.data."""
