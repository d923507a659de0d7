"""The ``diffusion`` command: one sub-command per pipeline stage.

params.yaml is validated first (pydantic and PyYAML only, no torch import), so a
bad key fails in well under two seconds with one line naming it; only then is the
stage module imported and run.
"""

from __future__ import annotations

import argparse
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
    from diffusion.train import NonFiniteLossError

    return (ConfigError, CheckpointError, DatasetError, NonFiniteLossError)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="diffusion", description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=list(STAGES), help="pipeline stage to run")
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
