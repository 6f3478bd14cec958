"""lt_models.modeling."""
