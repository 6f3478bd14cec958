"""Population-based training over the searched stage-2 hyperparameters (``scheduler.type: pbt`` / ``pb2``),
seed-aware.

Tune's ``PopulationBasedTraining`` runs the trials of ``space`` as the population. Every ``perturbation_interval``
(in ``scheduler.time_attr`` units) a member in the bottom ``quantile_fraction`` of the population copies the
checkpoint of a member in the top fraction (exploit) and perturbs the copied values (explore): a value of a grid or
choice moves to a neighbouring value (or is drawn again with ``resample_probability``), a value of a range is
multiplied by 0.8 or 1.2 (or drawn again). The trial then goes on from that checkpoint with its new values: the
engine restores the weights, optimizer, schedule and RNG states and builds the sampler and the loss from the new
values, so the next epoch draws with the new λ (``lt_models.engine.loop``; a resume with a new λ equals a
``stage2.lam_schedule`` run bit for bit). Every evaluation reports the λ and ξ it trained with, so each trial's
schedule is a metric series in MLflow, and the best trial's schedule replays as ``stage2.lam_schedule``.

``pb2`` is Tune's PB2: the same exploit step, but the explored values come from a Gaussian-process bandit fitted to
the population's score changes, within bounds (the min and max of a grid / choice, the bounds of a range), so λ and
ξ take values between the grid's points.

With ``search.seeds`` the population is configurations x seeds, and one noisy number never decides an exploit:

- the population is ranked by configuration (the members that hold the same values), on the mean of the members'
  last scores; the bottom and top ``quantile_fraction`` of the configurations are the candidates;
- a member of a bottom configuration copies the member **of its own seed** in the best top configuration that has
  one, and only when the verdict rule says its configuration is worse: the paired differences over the seeds that
  both configurations hold (their last scores) give a Student-t 95% interval entirely below zero
  (``pipelines.analysis.evidence``, seeds only). Otherwise it keeps training as it is;
- the members of one configuration that copy the same better configuration at the same time take the same explored
  values (drawn once, for the first of them), so a configuration's seeds move together and stay one group.

With or without seeds, a member that has used its budget (``scheduler.max_t``, default the evaluations per trial)
copies nothing, and a member whose checkpoint is at the end of its budget is not copied: Tune's PBT would otherwise
let a member end with another's weights after its own last report, or train an epoch a second time.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import numpy as np
from ray.tune.experiment import Trial
from ray.tune.schedulers import PopulationBasedTraining
from ray.tune.schedulers.pb2 import PB2

from lt_models.errors import ConfigError
from pipelines.analysis import evidence
from pipelines.config.experiment import ExperimentConfig
from pipelines.config.sections import TIME_ATTRS
from pipelines.config.space import SpaceParam


def hyperparam_mutations(cfg: ExperimentConfig) -> dict[str, Any]:
    """Each searched key's domain: the list of a grid / choice, the Tune range of the others."""
    return {k: list(p.args) if p.is_list else p.to_tune() for k, p in cfg.space.items()}


def hyperparam_bounds(cfg: ExperimentConfig) -> dict[str, list[float]]:
    """PB2's bounds of each searched key: [min, max] of a grid / choice, the bounds of a range."""
    return {k: _bounds(p) for k, p in cfg.space.items()}


def _bounds(p: SpaceParam) -> list[float]:
    values = [float(v) for v in p.values_to_check()]
    return [min(values), max(values)]


class _SeedAware:
    """Ranks configurations over their seeds and exploits only on a verdict (module docstring); mixed into Tune's
    ``PopulationBasedTraining`` and ``PB2``."""

    _trial_state: dict
    _hyperparam_mutations: dict
    _quantile_fraction: float

    def __init__(self, *, seeds: list[int], default_seed: int, max_t: int | None = None, **kw):
        super().__init__(**kw)
        self._seeds, self._default_seed, self._max_t = list(seeds), default_seed, max_t
        self._explored: dict[tuple, tuple[dict, dict]] = {}

    def _seed_of(self, trial: Trial) -> int:
        return int(trial.config.get("seed", self._default_seed))

    def _config_of(self, trial: Trial) -> tuple:
        return tuple((k, trial.config.get(k)) for k in sorted(self._hyperparam_mutations))

    def _groups(self) -> dict[tuple, list[Trial]]:
        """The running members with a score, by configuration."""
        groups: dict[tuple, list[Trial]] = {}
        for trial, state in self._trial_state.items():
            if state.last_score is not None and not np.isnan(state.last_score) and not trial.is_finished():
                groups.setdefault(self._config_of(trial), []).append(trial)
        return groups

    def _group_score(self, members: list[Trial]) -> float:
        return float(np.mean([self._trial_state[t].last_score for t in members]))

    def _quantiles(self) -> tuple[list[Trial], list[Trial]]:
        if len(self._seeds) < 2:
            return super()._quantiles()  # type: ignore[misc]
        groups = sorted(self._groups().values(), key=self._group_score)
        if len(groups) <= 1:
            return [], []
        n = min(int(np.ceil(len(groups) * self._quantile_fraction)), len(groups) // 2)
        lower = [t for g in groups[:n] for t in g]
        upper = [t for g in groups[len(groups) - n :] for t in g]
        return lower, upper

    def donor(self, trial: Trial, upper: list[Trial]) -> Trial | None:
        """The member of ``trial``'s seed in the best top configuration that the verdict rule says is better."""
        groups = self._groups()
        score = {t: float(self._trial_state[t].last_score or 0.0) for g in groups.values() for t in g}
        mine = {self._seed_of(t): score[t] for t in groups.get(self._config_of(trial), [])}
        candidates = {self._config_of(t) for t in upper}
        for config in sorted(candidates, key=lambda c: -self._group_score(groups[c])):
            theirs = {self._seed_of(t): t for t in groups[config]}
            shared = sorted(set(mine) & set(theirs))
            if self._seed_of(trial) not in theirs or len(shared) < 2:
                continue
            diff = [score[theirs[s]] - mine[s] for s in shared]  # PBT's scores are "higher is better"
            if evidence.verdicts([evidence.interval(diff)])[0].word == "better":
                return theirs[self._seed_of(trial)]
        return None

    def _spent(self, trial: Trial, when: str) -> bool:
        """Has ``trial`` used its whole budget (``max_t``) at its last result / its last perturbation point?"""
        state = self._trial_state[trial]
        return self._max_t is not None and getattr(state, when) >= self._max_t

    def _checkpoint_or_exploit(self, trial, tune_controller, upper_quantile, lower_quantile):
        parent = super()._checkpoint_or_exploit
        if trial not in lower_quantile:
            return parent(trial, tune_controller, upper_quantile, lower_quantile)
        # a member at the end of its budget copies nothing (it would train again, or end with another's weights
        # after its own last report), nor is a donor whose checkpoint is at the end of its budget copied
        donors = [t for t in upper_quantile if not self._spent(t, "last_perturbation_time")]
        if len(self._seeds) >= 2:
            donor = self.donor(trial, donors)
            donors = [donor] if donor is not None else []  # none: not worse by the verdict rule
        if not donors or self._spent(trial, "last_train_time"):
            return parent(trial, tune_controller, upper_quantile, [])
        return parent(trial, tune_controller, donors, [trial])

    def _get_new_config(self, trial: Trial, trial_to_clone: Trial) -> tuple[dict, dict]:
        """The explored values, drawn once per (configuration, donor configuration, time) for all their seeds."""
        if len(self._seeds) < 2:
            return super()._get_new_config(trial, trial_to_clone)  # type: ignore[misc]
        key = (self._config_of(trial), self._config_of(trial_to_clone), self._trial_state[trial].last_train_time)
        if key not in self._explored:
            self._explored[key] = super()._get_new_config(trial, trial_to_clone)  # type: ignore[misc]
        new, operations = self._explored[key]
        return {**new, "seed": trial_to_clone.config.get("seed", self._default_seed)}, operations


class SeedAwarePBT(_SeedAware, PopulationBasedTraining):
    """Tune's PBT, seed-aware (module docstring)."""


class SeedAwarePB2(_SeedAware, PB2):
    """Tune's PB2, seed-aware (module docstring)."""


def pbt_scheduler(cfg: ExperimentConfig) -> PopulationBasedTraining:
    """The PBT or PB2 scheduler of ``cfg`` (seed-aware with two or more ``search.seeds``)."""
    s = cfg.scheduler
    common: dict[str, Any] = dict(
        seeds=cfg.seeds,
        default_seed=cfg.seed,
        max_t=s.max_t or cfg.evals_per_trial,  # evaluations unless time_attr says otherwise (then max_t is required)
        time_attr=TIME_ATTRS[s.time_attr],
        perturbation_interval=s.perturbation_interval,
        quantile_fraction=s.quantile_fraction,
        synch=False,
    )
    if s.type == "pb2":
        if importlib.util.find_spec("sklearn") is None:
            raise ConfigError(
                "scheduler.type pb2 fits its Gaussian-process bandit with scikit-learn, which is not installed: "
                "pip install -e '.[pb2]' (or use scheduler.type: pbt)"
            )
        return SeedAwarePB2(hyperparam_bounds=hyperparam_bounds(cfg), **common)
    return SeedAwarePBT(
        hyperparam_mutations=hyperparam_mutations(cfg), resample_probability=s.resample_probability, **common
    )
