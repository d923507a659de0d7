"""The sweep's Optuna study: where it is stored, what it searches, what it minimises.

- **Storage**: ``sweep.storage``: a journal file in ``.optuna/`` by default, an RDB URL
  (``sqlite:///...``, ``postgresql://...``) or ``journal:<path>`` for many workers.
  Opening a study of an existing name continues it.
- **Search space**: one ``suggest_*`` per dimension of ``sweep.space``, less the
  dimensions that mean nothing for the config (:func:`searched_space`: guidance for an
  unconditional model, U-Net arguments for a transformer).
- **Objectives**: ``fid`` (``metrics/evaluate.json``); ``sampling_cost``, the sampler's
  network evaluations per image (:func:`diffusion.sampling.table.network_evaluations`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from diffusion.config import Params, SearchDim, SweepParams
from diffusion.models.configs import FAMILY_OF, family
from diffusion.sampling.table import network_evaluations
from flows.pruning import make_pruner

STUDY_DIR = Path(".optuna")
JOURNAL = "journal.log"


def open_storage(storage: str | None, root: Path) -> Any:
    """``None`` or ``journal:<path>``: a journal file (relative to the repo); else an RDB URL for Optuna."""
    if storage is not None and not storage.startswith("journal:"):
        return storage
    import optuna
    from optuna.storages.journal import JournalFileBackend

    path = Path(storage.removeprefix("journal:")) if storage else STUDY_DIR / JOURNAL
    path = path if path.is_absolute() else root / path
    path.parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def open_study(cfg: SweepParams, root: Path, study_name: str, storage: str | None, concurrency: int):
    """Create the study, or load it when one of that name exists (its trials go on counting)."""
    import optuna

    return optuna.create_study(
        study_name=study_name,
        storage=open_storage(storage, root),
        directions=["minimize"] * len(cfg.objectives),
        sampler=optuna.samplers.TPESampler(constant_liar=concurrency > 1),
        pruner=make_pruner(cfg),
        load_if_exists=True,
    )


def _label(choice: Any) -> Any:
    """Optuna's categorical choices are scalars: a list choice (``channel_mult``) travels as JSON."""
    return json.dumps(choice) if isinstance(choice, (list, dict)) else choice


SUGGEST: dict[str, Callable[[Any, str, SearchDim], Any]] = {
    "categorical": lambda trial, key, dim: {_label(c): c for c in dim.choices}[
        trial.suggest_categorical(key, [_label(c) for c in dim.choices])
    ],
    "int": lambda trial, key, dim: trial.suggest_int(key, int(dim.low), int(dim.high), log=dim.log),
    "float": lambda trial, key, dim: trial.suggest_float(key, dim.low, dim.high, log=dim.log),
}


# key -> (the param it acts through, whether that param's value lets it act, why not). A
# dimension whose param the space itself searches is kept: some trials may use it.
NEEDS: dict[str, tuple[str, Callable[[Params], bool], str]] = {
    key: ("model.class_conditional", lambda params: params.model.class_conditional,
          "classifier-free guidance needs a class-conditional model, and model.class_conditional is false")
    for key in ("sample.guidance_scale", "sample.guidance_interval")
}


def searched_space(params: Params) -> tuple[dict[str, SearchDim], dict[str, str]]:
    """``sweep.space`` less the dimensions that have no meaning for ``params`` (:data:`NEEDS`),
    and those dropped, each with why."""
    space, dropped = dict(params.sweep.space), {}
    for key, (through, acts, why) in NEEDS.items():
        if key in space and through not in space and not acts(params):
            dropped[key] = why
            del space[key]
    if "model.name" not in space:  # else every choice takes them (diffusion.config checks)
        name, takes = params.model.name, family(params.model.name).overridable
        for key in [k for k in space if k.startswith("model.overrides.")]:
            if key.removeprefix("model.overrides.") not in takes:
                dropped[key] = f"{name} (a {FAMILY_OF[name]}) has no such argument; it takes {', '.join(takes)}"
                del space[key]
    return space, dropped


def suggest(trial: Any, space: Mapping[str, SearchDim]) -> dict[str, Any]:
    """One value per dimension: the trial's params.yaml overrides."""
    return {key: SUGGEST[dim.type](trial, key, dim) for key, dim in space.items()}


# Each objective from the trial's metrics/evaluate.json and its validated params; all minimised.
OBJECTIVES: dict[str, Callable[[Mapping[str, float], Params], float]] = {
    "fid": lambda metrics, params: float(metrics["fid"]),
    "sampling_cost": lambda metrics, params: float(
        network_evaluations(params.sample.sampler, params.sample.steps, params.sample.guidance_scale)
    ),
}
