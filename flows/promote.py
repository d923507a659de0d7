"""promote: the best trial's model (or a given run's) becomes ``challenger``, maybe ``champion``.

The flow twin of ``diffusion promote``; both call :func:`diffusion.registry.promote`.

    prefect deployment run 'promote/promote' -p study=diffusion-sweep
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from diffusion import registry
from diffusion.config import load_params
from diffusion.tracking import tracking_uri


@flow(name="promote")
def promote(
    name: str = "diffusion",
    run_id: str | None = None,
    study: str | None = None,
    experiment: str | None = None,
    repo: str = ".",
) -> dict[str, Any]:
    """Register and alias a model; ``study`` picks that sweep's best trial, ``run_id`` a run.

    ``experiment`` defaults to params.yaml's ``tracking.experiment``.
    """
    root = Path(repo).resolve()
    experiment = experiment or load_params(root / "params.yaml").tracking.experiment
    result = registry.promote(name, run_id=run_id, study=study, experiment=experiment, tracking_uri=tracking_uri(root))
    get_run_logger().info(result.message)
    return asdict(result)


if __name__ == "__main__":
    promote()
