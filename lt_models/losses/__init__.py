"""lt_models.losses."""
