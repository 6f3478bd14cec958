"""``scheduler.type: asha_configs``: successive halving over *configurations*, each judged on its mean over seeds.

Tune's ASHAScheduler (``scheduler.type: asha``) judges each trial alone, the moment it reaches a rung, against
whatever the rung holds so far. With repeated seeds (``search.seeds``) that goes wrong twice:
  - the first trials to reach a rung meet a nearly empty rung and go on almost regardless of their value, so far
    more than 1/η of the trials continue;
  - a trial competes with other seeds' trials, so the seed's own luck (every seed has its own stage-1 checkpoint)
    decides: a weak seed's trials all stop, and no configuration keeps all its seeds to the end, so none has a
    full-schedule mean to be ranked by.

This scheduler follows the promotion rule of asynchronous successive halving (Li et al., "A System for Massively
Parallel Hyperparameter Tuning", MLSys 2020, Algorithm 2: promote a member of the top ⌊n/η⌋ of a rung that was not
promoted yet, where n is the rung's size), with the unit changed from a trial to a configuration:
  - Rungs are at grace_period·η^k (in ``scheduler.time_attr`` units) below max_t, as in Tune's ASHA. A trial that
    reaches a rung is paused (Tune checkpoints it and frees its slot) unless its configuration is promoted already.
  - A configuration's value at a rung is the mean of ``scheduler.metric`` over its seeds. It joins the rung when
    every one of its seeds reported there (a seed whose trial errored is left out of the mean).
  - Every trial of the grid starts before a promoted one goes on, and a rung's promotions are decided only once
    no live trial is still on its way there: a finite grid's rung is known in full, so the number promoted is
    ⌊n/η⌋ of the whole rung, not of its first arrivals.
  - A promoted configuration's seeds all resume together from their checkpoints.
  - When nothing can run and no configuration has reached max_t (⌊n/η⌋ = 0 on a small rung), the best one of the
    highest rung is promoted, so the sweep always ends with a configuration that ran the full schedule.
  - The trials still paused at the end are stopped: the summary lists them as stopped early.

With one seed a configuration is a trial, and this is promotion-based ASHA. It needs ``search.algorithm: basic``
(the whole grid is known). ``search.max_concurrent_trials`` counts running trials; paused ones take no slot.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from typing import Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from pipelines.config.space import trial_values

logger = logging.getLogger(__name__)


def rung_milestones(grace_period: float, reduction_factor: float, max_t: float) -> list[float]:
    """grace·η^k for k = 0, 1, ... while below max_t (the budget at which promotions are decided)."""
    out, r = [], float(grace_period)
    while r < max_t:
        out.append(r)
        r *= reduction_factor
    return out


def config_key(config: dict[str, Any]) -> str:
    """A trial's configuration: its searched values without the seed, as canonical JSON."""
    values = {k: v for k, v in trial_values(config).items() if k != "seed"}
    return json.dumps(values, sort_keys=True, default=str)


_ACTIVE = (Trial.RUNNING, Trial.PENDING)
_LIVE = (*_ACTIVE, Trial.PAUSED)


class ConfigASHA(FIFOScheduler):
    """See the module docstring. ``seeds``: every configuration's training seeds (``ExperimentConfig.seeds``);
    ``max_running``: at most this many trials run at once (None: as many as the resources allow).

    Tune asks ``choose_trial_to_run`` at every step of its loop; with a thousand trials a full look at them each
    time cost the driver more than Tune's own step. What can change the answer is an event this scheduler sees (a
    trial added, reported, ended, errored or removed, a promotion) or the search running out of trials, so an
    answer of "none" is kept until one of those happens; and a rung's ranking is kept until a value is recorded
    there or the set of errored trials changes."""

    # defaults for a scheduler pickled (tuner.pkl) before these caches existed
    _events = 0  # events seen so far
    _idle_at: tuple[int, bool, int, int] | None = None  # (events, search finished, active, trials) at the last "none"
    _rank_cache: dict[int, list[tuple[str, float]]] | None = None  # rung -> _ranked(rung)

    def __init__(
        self,
        *,
        metric: str,
        mode: str,
        time_attr: str,
        max_t: float,
        grace_period: float,
        reduction_factor: float,
        seeds: list[int],
        max_running: int | None = None,
        default_seed: int = 0,
        verbose: bool = True,
    ):
        super().__init__()
        self._metric, self._mode, self._time_attr = metric, mode, time_attr
        self.max_t, self.eta = float(max_t), float(reduction_factor)
        self.milestones = rung_milestones(grace_period, reduction_factor, max_t)
        self.seeds, self.default_seed = [int(s) for s in seeds], int(default_seed)
        self.max_running, self.verbose = max_running, verbose
        self._key: dict[str, str] = {}  # trial id -> configuration
        self._by_seed: dict[str, dict[int, str]] = {}  # configuration -> {seed: trial id}
        self._dead: set[str] = set()  # errored trials (left out of their configuration's mean)
        self._values: list[dict[str, float]] = [{} for _ in self.milestones]  # per rung: trial id -> metric
        self._promoted: list[dict[str, None]] = [{} for _ in self.milestones]  # per rung: configurations, in order
        self._reached: dict[str, int] = {}  # trial id -> rungs it reached (its values are in _values[:n])
        self._held: list[str] = []  # trials added but not started yet
        self._full: set[str] = set()  # configurations with a trial that reached max_t

    def set_search_properties(self, metric: str | None, mode: str | None, **spec) -> bool:
        """Tune passes TuneConfig's metric and mode: they must be the ones this scheduler ranks by."""
        return metric in (None, self._metric) and mode in (None, self._mode)

    # ---- bookkeeping -------------------------------------------------------------------------------------------
    def _changed(self, rung: int | None = None) -> None:
        """An event: the cached "none" answer is stale; with ``rung``, so is that rung's ranking (-1: every rung)."""
        self._events += 1
        if self._rank_cache is not None and rung is not None:
            if rung < 0:
                self._rank_cache.clear()
            else:
                self._rank_cache.pop(rung, None)

    def on_trial_add(self, tune_controller, trial: Trial):
        self._changed()
        if trial.trial_id in self._key:
            return  # Tune re-adds a failed trial that it retries: it restarts from its checkpoint, as it is
        key, seed = config_key(trial.config), int(trial_values(trial.config).get("seed", self.default_seed))
        self._key[trial.trial_id] = key
        self._by_seed.setdefault(key, {})[seed] = trial.trial_id
        last = trial.last_result or {}
        if self._time_attr in last:  # restored by --resume: rebuild its rungs from its last result
            self._record(trial.trial_id, last, restored=True)
            if float(last[self._time_attr]) >= self.max_t:
                self._full.add(key)
        if trial.status in (Trial.PENDING, Trial.PAUSED):
            # Tune starts every PENDING trial that fits the resources; this scheduler chooses instead. A restored
            # trial that waits at a rung stays paused until its configuration is promoted; the others are held
            # until a slot is free.
            trial.set_status(Trial.PAUSED)
            if self._cleared(trial.trial_id):
                self._held.append(trial.trial_id)

    def _record(self, trial_id: str, result: dict, restored: bool = False) -> None:
        t, value = float(result[self._time_attr]), result.get(self._metric)
        if value is None:
            raise ValueError(
                f"trial {trial_id} reported no {self._metric!r}: scheduler.metric must be a reported metric"
            )
        key = self._key[trial_id]
        for k, m in enumerate(self.milestones):
            if t >= m and trial_id not in self._values[k]:
                self._values[k][trial_id] = float(value)
                self._reached[trial_id] = k + 1
                self._changed(k)
            if restored and t > m and key not in self._promoted[k]:
                self._promoted[k][key] = None  # it ran past rung k before the sweep stopped

    def on_trial_complete(self, tune_controller, trial: Trial, result: dict):
        self._changed()

    def on_trial_error(self, tune_controller, trial: Trial):
        self._changed()

    def on_trial_remove(self, tune_controller, trial: Trial):
        self._changed()
        if trial.trial_id in self._held:
            self._held.remove(trial.trial_id)

    # ---- the rule -----------------------------------------------------------------------------------------------
    def _rung_mean(self, k: int, key: str) -> float | None:
        """The configuration's mean at rung k, or None while one of its seeds has not reported there."""
        ids = self._by_seed.get(key, {})
        vals = []
        for seed in self.seeds:
            tid = ids.get(seed)
            if tid is not None and tid in self._dead:
                continue
            if tid is None or tid not in self._values[k]:
                return None
            vals.append(self._values[k][tid])
        return sum(vals) / len(vals) if vals else None

    def _ranked(self, k: int) -> list[tuple[str, float]]:
        """The configurations complete at rung k, best first."""
        if self._rank_cache is None:
            self._rank_cache = {}
        if k not in self._rank_cache:
            means = [(key, m) for key in self._by_seed if (m := self._rung_mean(k, key)) is not None]
            self._rank_cache[k] = sorted(means, key=lambda km: km[1], reverse=self._mode == "max")
        return self._rank_cache[k]

    def _promote(self, k: int, key: str, mean: float, n: int) -> None:
        self._changed()
        self._promoted[k][key] = None
        if self.verbose:
            name = " ".join(f"{f}={v}" for f, v in json.loads(key).items())
            print(
                f"ASHA: promoted {name} from rung {k + 1} ({self._time_attr} {self.milestones[k]:g}): mean "
                f"{self._metric} {mean:.4f} over its seeds; promoted {len(self._promoted[k])} of the {n} "
                "configurations there",
                flush=True,
            )

    def _next_rung(self, trial_id: str) -> int:
        """How many rungs the trial reached (rungs are reached in order: the next one's index)."""
        return self._reached.get(trial_id, 0)

    def _decide(self, tune_controller) -> None:
        """Promote, at every rung that no live trial is still on its way to, the configurations in the top ⌊n/η⌋
        not promoted yet. On its way to rung k: cleared to go on, with rungs below k recorded (held trials are on
        their way to the first rung, and so are the trials the search has not created yet)."""
        trials = tune_controller.get_trials()
        # errored for good (Tune also calls on_trial_error before a retry, so the status is what tells)
        dead = {t.trial_id for t in trials if t.status == Trial.ERROR}
        if dead != self._dead:
            self._dead = dead
            self._changed(-1)
        rungs = len(self.milestones)
        waiting = set() if tune_controller.search_alg.is_finished() else {0}
        cleared, known = self._clearance(), self._key
        for t in trials:
            if len(waiting) >= rungs:  # every rung has a trial on its way: nothing to promote (runs every step)
                break
            if t.status in _LIVE and t.trial_id in known and cleared(t.trial_id):
                waiting.add(self._next_rung(t.trial_id))
        for k in range(rungs):
            if k in waiting:
                continue
            ranked = self._ranked(k)
            for key, mean in ranked[: math.floor(len(ranked) / self.eta)]:
                if key not in self._promoted[k]:
                    self._promote(k, key, mean, len(ranked))

    def _cleared(self, trial_id: str) -> bool:
        """May the trial go on: is its configuration promoted at every rung it reached?"""
        key = self._key[trial_id]
        return all(key in self._promoted[k] for k in range(self._next_rung(trial_id)))

    def _clearance(self) -> Callable[[str], bool]:
        """:meth:`_cleared` for one pass over many trials (a thousand at every step of Tune's loop), while the
        promotions stay as they are: the configurations promoted at every rung below each rung, intersected once."""
        below: list[set[str]] = []
        for k in range(len(self.milestones)):
            below.append(set(self._promoted[k]) if k == 0 else below[-1].intersection(self._promoted[k]))
        key_of, reached = self._key, self._reached

        def cleared(trial_id: str) -> bool:
            n = reached.get(trial_id, 0)
            return n == 0 or key_of[trial_id] in below[n - 1]

        return cleared

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        if self._time_attr not in result:
            return TrialScheduler.CONTINUE
        self._record(trial.trial_id, result)
        if float(result[self._time_attr]) >= self.max_t:
            self._full.add(self._key[trial.trial_id])
            return TrialScheduler.STOP
        if not self._cleared(trial.trial_id):
            self._decide(tune_controller)
        return TrialScheduler.CONTINUE if self._cleared(trial.trial_id) else TrialScheduler.PAUSE

    def choose_trial_to_run(self, tune_controller) -> Trial | None:
        trials = tune_controller.get_trials()
        # Tune marks a trial PAUSED only once its checkpoint is saved, after on_trial_result: no event tells, so the
        # number of running and pending trials is part of the state
        active = sum(1 for t in trials if t.status in _ACTIVE)
        state = (self._events, bool(tune_controller.search_alg.is_finished()), active, len(trials))
        if state == self._idle_at:
            return None  # nothing happened since the last "none"
        chosen = self._choose(tune_controller, trials, active)
        self._idle_at = state if chosen is None and state[0] == self._events else None
        return chosen

    def _choose(self, tune_controller, trials: list[Trial], active: int) -> Trial | None:
        """The trial to start or resume, given Tune's ``trials`` and how many of them are ``active``."""
        if self.max_running is not None and active >= self.max_running:
            return None
        if self._held:  # start every trial of the grid before the promoted ones go on
            return {t.trial_id: t for t in trials}[self._held.pop(0)]
        self._decide(tune_controller)
        paused = [t for t in trials if t.status == Trial.PAUSED]
        cleared = self._clearance()  # after _decide: its promotions count
        ready = [t for t in paused if cleared(t.trial_id)]
        if ready:  # the furthest along first
            return max(ready, key=lambda t: float((t.last_result or {}).get(self._time_attr, 0)))
        if active or not paused or not tune_controller.search_alg.is_finished():
            return None
        # nothing can run: make sure some configuration runs the full schedule, else the search is over
        if self.milestones and not self._promoted[-1] and not self._full:
            for k in reversed(range(len(self.milestones))):
                ranked = [(key, m) for key, m in self._ranked(k) if key not in self._promoted[k]]
                if ranked:
                    self._promote(k, *ranked[0], len(self._ranked(k)))
                    return self._choose(tune_controller, trials, active)
        for t in paused:
            tune_controller.stop_trial(t)
        return None

    def debug_string(self) -> str:
        rungs = ", ".join(
            f"rung {k + 1} ({m:g}): {len(self._ranked(k))} configurations, {len(self._promoted[k])} promoted"
            for k, m in enumerate(self.milestones)
        )
        return f"ASHA over configurations (η = {self.eta:g}): {rungs}"
