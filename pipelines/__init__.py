"""The only package that knows Ray and MLflow: configs, storage, Tune sweeps, MLflow tracking, analysis and the
`ltsweep` command."""
