"""``diffusion promote``: the command-line face of :func:`diffusion.registry.promote`."""

from __future__ import annotations

import argparse
import sys

from diffusion import registry
from diffusion.errors import UserError


def main(argv: list[str]) -> int:
    """``diffusion promote``: the best run's model (or ``--run-id``'s) becomes challenger, maybe champion."""
    parser = argparse.ArgumentParser(
        prog="diffusion promote",
        description="Register a run's model as 'challenger'; move 'champion' to it only if its FID is lower beyond the noise (evaluate.confidence).",
    )
    parser.add_argument("--name", default="diffusion", help="registered model name (default: diffusion)")
    parser.add_argument("--run-id", help="the run whose FID and model to promote (default: the lowest FID)")
    parser.add_argument("--study", help="pick the best trial of this sweep (an Optuna study name)")
    parser.add_argument("--experiment", default="diffusion", help="MLflow experiment to search (default: diffusion)")
    args = parser.parse_args(argv)

    try:
        result = registry.promote(args.name, run_id=args.run_id, study=args.study, experiment=args.experiment)
    except UserError as err:  # a RegistryError, or a store that does not answer: one line
        print(f"diffusion promote: error: {err}", file=sys.stderr)
        return 1
    print(result.message)
    return 0
