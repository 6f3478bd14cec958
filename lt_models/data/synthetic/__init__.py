"""lt_models.data.synthetic."""
