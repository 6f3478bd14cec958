"""The fidelity benchmark (``benchmarks/bench_fidelity.py``): do the papers' tables hold on the LVIS-like synthetic
benchmark?

Modules:
  plan      the arms (one run per seed each), their schedule and their TrainSpec
  runner    training the arms in worker processes, evaluating their views, the per-run cache
  findings  the papers' findings as paired comparisons of arms, their intervals and Holm-corrected verdicts
  table     the README / docs tables, regenerated from fidelity.json
"""
