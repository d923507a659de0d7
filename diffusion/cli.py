"""The ``diffusion`` command: one sub-command per pipeline stage, and ``promote``.

params.yaml is validated first (pydantic and PyYAML only, no torch import), so a
bad key fails in well under two seconds with one line naming it; only then is the
stage module imported and run. ``diffusion promote`` is not a stage: it reads no
params.yaml and talks to the MLflow model registry (:mod:`diffusion.registry`).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import sys

STAGES = {
    "prepare": "diffusion.stages.prepare",
    "train": "diffusion.stages.train",
    "sample": "diffusion.stages.sample",
    "evaluate": "diffusion.stages.evaluate",
}


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the user's input, not our bug: print one line, no traceback."""
    from diffusion.checkpoint import CheckpointError
    from diffusion.config import ConfigError
    from diffusion.data import DatasetError
    from diffusion.metrics import MetricsError
    from diffusion.train import NonFiniteLossError

    return (ConfigError, CheckpointError, DatasetError, MetricsError, NonFiniteLossError)


def promote(argv: list[str]) -> int:
    """``diffusion promote``: the best run's model (or ``--run-id``'s) becomes challenger, maybe champion."""
    parser = argparse.ArgumentParser(
        prog="diffusion promote",
        description="Register a run's model as 'challenger'; move 'champion' to it only if its FID is lower.",
    )
    parser.add_argument("--name", default="diffusion", help="registered model name (default: diffusion)")
    parser.add_argument("--run-id", help="the run whose FID and model to promote (default: the lowest FID)")
    parser.add_argument("--study", help="pick the best trial of this sweep (an Optuna study name)")
    parser.add_argument("--experiment", default="diffusion", help="MLflow experiment to search (default: diffusion)")
    args = parser.parse_args(argv)

    from diffusion import registry

    try:
        result = registry.promote(args.name, run_id=args.run_id, study=args.study, experiment=args.experiment)
    except registry.RegistryError as err:
        print(f"diffusion promote: error: {err}", file=sys.stderr)
        return 1
    print(result.message)
    return 0


def main(argv: list[str] | None = None) -> int:
    """The ``diffusion`` console command; the process exits with what it returns."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["promote"]:
        return promote(argv[1:])
    parser = argparse.ArgumentParser(prog="diffusion", description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=list(STAGES), help="pipeline stage to run (or: promote, see `diffusion promote -h`)")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = parser.parse_args(argv)

    from diffusion.config import ConfigError, load_params

    try:
        params = load_params(args.params)
    except ConfigError as err:
        print(f"diffusion {args.stage}: error: {err}", file=sys.stderr)
        return 2
    stage = importlib.import_module(STAGES[args.stage])
    try:
        stage.run(params)
    except _user_errors() as err:
        print(f"diffusion {args.stage}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"diffusion {args.stage}: interrupted; run it again to resume", file=sys.stderr)
        return 130
    finally:
        # The process ends here. Its final garbage collections walk every object that
        # torch and MLflow created (1 to 1.4 s a stage, every trial pays three); frozen
        # objects are skipped, while atexit handlers and file closing still run.
        gc.freeze()
    return 0


if __name__ == "__main__":
    sys.exit(main())
