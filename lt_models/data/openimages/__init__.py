"""lt_models.data.openimages."""
