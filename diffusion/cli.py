"""The ``diffusion`` command: one sub-command per pipeline stage, and the tools in :data:`TOOLS`.

params.yaml is validated first (pydantic and PyYAML only, no torch import), so a
bad key fails at once with one line naming it; only then is the
stage module imported and run. A tool (``diffusion promote``, ``diffusion generate``)
is not a stage: its module parses its own arguments (``main(argv)``) and reads no
params.yaml. Both tables name modules, imported only when their sub-command runs, so a
stage's process loads what that stage needs and nothing else (dvc.yaml's deps are that,
less the modules that cannot change the stage's numbers; tests/test_dvc_deps.py checks).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import sys

STAGES = {
    "validate": "diffusion.stages.validate",
    "prepare": "diffusion.stages.prepare",
    "train_vae": "diffusion.stages.train_vae",
    "encode": "diffusion.stages.encode",
    "train": "diffusion.stages.train",
    "train_classifier": "diffusion.stages.train_classifier",
    "sample": "diffusion.stages.sample",
    "evaluate": "diffusion.stages.evaluate",
}
# Stages that run as ``<stage>.distributed`` processes (diffusion.training.launch), one per GPU.
DISTRIBUTED = ("train", "sample")
TOOLS = {
    "promote": "diffusion.promote",
    "unlock": "diffusion.dvc_locks",
    "generate": "diffusion.generate",
}


def main(argv: list[str] | None = None) -> int:
    """The ``diffusion`` console command; the process exits with what it returns."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] and argv[0] in TOOLS:
        return importlib.import_module(TOOLS[argv[0]]).main(argv[1:])
    parser = argparse.ArgumentParser(prog="diffusion", description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=list(STAGES), help=f"pipeline stage to run (or a tool: {', '.join(TOOLS)}; see `diffusion <tool> -h`)")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = parser.parse_args(argv)

    from diffusion.config import ConfigError, load_params
    from diffusion.errors import UserError

    try:
        params = load_params(args.params)
    except ConfigError as err:
        print(f"diffusion {args.stage}: error: {err}", file=sys.stderr)
        return 2
    processes = getattr(params, args.stage).distributed if args.stage in DISTRIBUTED else 1
    if processes > 1 and "WORLD_SIZE" not in os.environ:  # launch the ranks (not under torchrun already)
        from diffusion.training.launch import launch

        return launch([sys.executable, "-m", "diffusion.cli", *argv], processes, key=f"{args.stage}.distributed")
    stage = importlib.import_module(STAGES[args.stage])
    try:
        stage.run(params)
    except UserError as err:
        # In a distributed job an error is said once: by rank 0 when every rank raises it, else by the
        # rank that failed (or the launcher, for a rank that died).
        main = os.environ.get("RANK", "0") == "0"
        if not getattr(err, "said_elsewhere", False) and (main or not getattr(err, "every_rank", False)):
            print(f"diffusion {args.stage}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"diffusion {args.stage}: interrupted; run it again to resume", file=sys.stderr)
        return 130
    finally:
        # The process ends here. Its final garbage collections walk every object that
        # torch and MLflow created (BENCHMARKS.md measures the cost); frozen
        # objects are skipped, while atexit handlers and file closing still run.
        gc.freeze()
    return 0


if __name__ == "__main__":
    sys.exit(main())
