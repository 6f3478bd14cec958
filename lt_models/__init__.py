"""Pure torch + numpy: the data, losses, detector, training engine and evaluation of long-tail detection. Never imports
Ray, MLflow or `pipelines`."""
