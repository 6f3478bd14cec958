"""Ray Tune: the sweep, its Tuner and trainable, stage 1, multi-worker runs on Ray Train, asha_configs, the callbacks
and the cluster."""
