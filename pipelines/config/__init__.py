"""Experiment configs: the YAML's pydantic models, the search space, loading with one-line errors, and the one road
from a config to the engine's TrainSpec."""
