"""Pruning sweep trials: the training loss in the trial's MLflow run reported to Optuna's MedianPruner.

The flow polls the trial's ``loss`` history while its experiment runs and stops the
experiment when the pruner says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from diffusion.config import SweepParams

LOSS_METRIC = "loss"


def pruning(cfg: SweepParams) -> bool:
    """Optuna prunes single-objective studies only."""
    return cfg.pruning and len(cfg.objectives) == 1


def make_pruner(cfg: SweepParams, train_steps: int) -> Any:
    """The study's pruner: a median pruner that ignores the first quarter of training, or none."""
    import optuna

    if not pruning(cfg):
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=train_steps // 4)


@dataclass
class LossReporter:
    """Reports the training loss in the trial's MLflow run to Optuna; True when the trial should stop."""

    trial: Any
    client: Any
    run_id: str
    last_step: int = -1

    def __call__(self) -> bool:
        history = self.client.get_metric_history(self.run_id, LOSS_METRIC)
        new = sorted((m.step, m.value) for m in history if m.step > self.last_step and math.isfinite(m.value))
        for step, value in new:
            self.trial.report(value, step)
            self.last_step = step
        return bool(new) and self.trial.should_prune()
