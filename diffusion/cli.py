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

from diffusion import interrupt

PARENT = os.getppid()  # at start: a stage run by DVC stops when DVC dies (diffusion.interrupt)

STAGES = {
    "validate": "diffusion.stages.validate",
    "prepare": "diffusion.stages.prepare",
    "train_vae": "diffusion.stages.train_vae",
    "encode": "diffusion.stages.encode",
    "encode_text": "diffusion.stages.encode_text",
    "train": "diffusion.stages.train",
    "train_classifier": "diffusion.stages.train_classifier",
    "train_digit_classifier": "diffusion.stages.train_digit_classifier",
    "fit_schedule": "diffusion.stages.fit_schedule",
    "sample": "diffusion.stages.sample",
    "evaluate": "diffusion.stages.evaluate",
}
# Stages that run as ``<stage>.distributed`` processes (diffusion.training.launch), one per GPU.
DISTRIBUTED = ("train", "sample")
TOOLS = {
    "promote": "diffusion.promote",
    "unlock": "diffusion.dvc_locks",
    "generate": "diffusion.generate",
    "reference": "diffusion.evaluation.reference_files",
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

    # SIGINT and SIGTERM stop every stage the same way, whatever its parent ignores; under DVC,
    # so does DVC's death (SIGTERM kills DVC outright, which would leave the stage running).
    main = os.environ.get("RANK", "0") == "0"
    try:
        with interrupt.handled():
            if "DVC_STAGE" in os.environ and "WORLD_SIZE" not in os.environ:  # ranks die with their launcher
                interrupt.stop_with_dvc(PARENT)
            return _run_stage(args.stage, args.params, argv, main)
    except interrupt.Stopped as stop:
        if main:
            print(f"diffusion {args.stage}: {stop}" + ("" if stop.detail else "; run it again"), file=sys.stderr, flush=True)
        return stop.exit_code


def _run_stage(name: str, params_file: str, argv: list[str], main: bool) -> int:
    from diffusion.config import ConfigError, load_params
    from diffusion.errors import UserError

    try:
        params = load_params(params_file)
    except ConfigError as err:
        print(f"diffusion {name}: error: {err}", file=sys.stderr)
        return 2
    processes = getattr(params, name).distributed if name in DISTRIBUTED else 1
    if processes > 1 and "WORLD_SIZE" not in os.environ:  # launch the ranks (not under torchrun already)
        from diffusion.training.launch import launch

        try:
            return launch([sys.executable, "-m", "diffusion.cli", *argv], processes, key=f"{name}.distributed")
        except interrupt.Stopped as stop:
            return stop.exit_code  # the ranks were stopped too; rank 0 says where
    stage = importlib.import_module(STAGES[name])
    try:
        stage.run(params)
    except UserError as err:
        if interrupt.requested():  # a rank that stopped left the others' collectives: they stop too
            raise interrupt.Stopped(interrupt.requested()) from None
        # In a distributed job an error is said once: by rank 0 when every rank raises it, else by the
        # rank that failed (or the launcher, for a rank that died).
        if not getattr(err, "said_elsewhere", False) and (main or not getattr(err, "every_rank", False)):
            print(f"diffusion {name}: error: {err}", file=sys.stderr)
        return 1
    finally:
        # The process ends here. Its final garbage collections walk every object that
        # torch and MLflow created (BENCHMARKS.md measures the cost); frozen
        # objects are skipped, while atexit handlers and file closing still run.
        gc.freeze()
    return 0


if __name__ == "__main__":
    sys.exit(main())
