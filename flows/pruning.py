"""Pruning sweep trials: the train stage's ``val_loss`` (or ``train_kid``) reported to Optuna's MedianPruner.

Trials differ in ``diffusion.schedule``, ``prediction`` and ``loss``, so their training
losses are on different scales. ``val_loss`` is comparable across the whole search
space: the train stage logs it to the trial's MLflow run every ``train.val_every``
steps, a held-out eps-MSE under one fixed reference schedule and weighting. The flow
polls that history while the trial's experiment runs and stops the experiment when
the pruner says so. With ``sweep.prune_on: train_kid`` it is the KID of the EMA model's
samples instead, logged every ``train.eval_every`` steps (:func:`diffusion.stages.train.sample_quality`):
what the study ranks on (FID), at the cost of sampling and Inception features during training.

The warm-up is each trial's own: the pruner itself has none (``n_warmup_steps=0``)
and a trial's reporter asks it only from a quarter of that trial's ``train.steps``
(which the search space may change), not the base config's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from diffusion.config import SweepParams

VAL_LOSS_METRIC = "val_loss"  # sweep.prune_on's default; the other choice is train_kid
# Complete trials before the pruner compares at all, and the share of a trial's own
# steps before it asks the pruner.
STARTUP_TRIALS = 2
WARMUP_FRACTION = 0.25


def pruning(cfg: SweepParams) -> bool:
    """Optuna prunes single-objective studies only."""
    return cfg.pruning and len(cfg.objectives) == 1


def make_pruner(cfg: SweepParams) -> Any:
    """The study's pruner: a median pruner without a warm-up of its own, or none."""
    import optuna

    if not pruning(cfg):
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=STARTUP_TRIALS, n_warmup_steps=0)


@dataclass
class PruningReporter:
    """Reports ``metric`` (``sweep.prune_on``) in the trial's MLflow run to Optuna; True when the trial should stop.

    Every new point is reported; the pruner is asked only from ``warmup_steps`` on.
    Called once more after the experiment ends, :meth:`report` adds the last points.
    """

    trial: Any
    client: Any
    run_id: str
    warmup_steps: int
    metric: str = VAL_LOSS_METRIC
    last_step: int = -1

    @classmethod
    def for_trial(
        cls, trial: Any, client: Any, run_id: str, train_steps: int, metric: str = VAL_LOSS_METRIC
    ) -> PruningReporter:
        """The reporter of a trial that trains ``train_steps`` steps (its own, not the base config's)."""
        return cls(trial, client, run_id, warmup_steps=math.ceil(train_steps * WARMUP_FRACTION), metric=metric)

    def report(self) -> bool:
        """Report the points logged since the last call; whether there were any."""
        history = self.client.get_metric_history(self.run_id, self.metric)
        new = sorted((m.step, m.value) for m in history if m.step > self.last_step and math.isfinite(m.value))
        for step, value in new:
            self.trial.report(value, step)
            self.last_step = step
        return bool(new)

    def __call__(self) -> bool:
        return self.report() and self.last_step >= self.warmup_steps and bool(self.trial.should_prune())
