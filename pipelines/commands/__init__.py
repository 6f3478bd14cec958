"""`ltsweep confirm`, `ltsweep demo` and `ltsweep train`: commands built on the sweep."""
