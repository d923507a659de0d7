"""kill -9 at random moments of every stage, N times: `python tests/kill_loop.py --runs N`.

In a real temporary git + DVC repository of the tiny params (conftest's TINY_PARAMS), one
uninterrupted `dvc repro` is the reference and times each stage. Then each run starts
`dvc repro` from scratch, picks a stage and a moment in it (seeded), sends SIGKILL to the
whole process group there, and recovers as `make pipeline` does: `diffusion unlock`, then
`dvc repro` to the end. It records the stage hit, the training steps lost (the step the
progress bar had reached minus the step training resumed from: at most
train.checkpoint_every), whether `models/model.pt` equals the reference's bit for bit, and
whether every output of dvc.yaml exists with `dvc status` clean. The figures are in
RELIABILITY.md; tests/test_pipeline.py runs one such kill in the suite.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from conftest import TINY_PARAMS, make_pipeline_repo, pipeline_env, run_in
from faults import dvc_repro_killed

STAGES = ("validate", "prepare", "train_vae", "encode", "train", "train_classifier", "fit_schedule", "sample", "evaluate")
RESUMED = re.compile(r"train: resuming from \S+ at step (\d+)")


@dataclass
class Outcome:
    """One kill and its recovery."""

    stage: str | None  # the stage the kill hit (None: dvc repro ended first)
    resumed_from: int | None  # the step training resumed from (None: train did not run again)
    steps_lost: int  # training steps done again after the resume
    model: dict[str, torch.Tensor] | None  # the tensors of models/model.pt at the end
    outputs: bool  # every output of dvc.yaml exists, and `dvc status` is clean
    error: str | None = None  # what the recovering `dvc repro` said, if it failed


def model_tensors(repo: Path) -> dict[str, torch.Tensor]:
    return torch.load(repo / "models/model.pt", map_location="cpu", weights_only=True)["state_dict"]


def equal(a: dict[str, torch.Tensor] | None, b: dict[str, torch.Tensor]) -> bool:
    """Bit for bit: the same names, and each tensor equal."""
    return a is not None and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def outputs_complete(repo: Path) -> bool:
    """Every outs, metrics and plots file of dvc.yaml's stages exists, and DVC sees nothing to run."""
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"].values()
    files = [next(iter(o)) if isinstance(o, dict) else o for s in stages for k in ("outs", "metrics", "plots") for o in s.get(k, [])]
    return all((repo / f).exists() for f in files) and "up to date" in run_in(repo, "dvc", "status").stdout


def reference(folder: Path, params: dict) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The uninterrupted run: its model's tensors and each stage's duration (s)."""
    repo = make_pipeline_repo(folder, params)
    run = dvc_repro_killed(repo, pipeline_env(repo))
    assert list(run.starts) == list(STAGES) and outputs_complete(repo), run.output[-3000:]
    ends = [*list(run.starts.values())[1:], run.seconds]
    durations = {s: end - run.starts[s] for s, end in zip(run.starts, ends)}
    return model_tensors(repo), durations


def kill_and_recover(repo: Path, stage: str, after_s: float = 0.0, at_step: int | None = None) -> Outcome:
    """`dvc repro` in ``repo`` killed ``after_s`` into ``stage`` (or at training step
    ``at_step``: :func:`faults.dvc_repro_killed`), then `diffusion unlock` and `dvc repro` to
    the end, as `make pipeline` does."""
    killed = dvc_repro_killed(repo, pipeline_env(repo), stage, after_s, at_step)
    run_in(repo, "diffusion", "unlock")
    finished = run_in(repo, "dvc", "repro", check=False)
    if finished.returncode != 0:
        said = " ".join((finished.stdout + finished.stderr).split())
        return Outcome(killed.killed_in, None, 0, None, False, error=said[-400:])
    again = finished.stdout
    resumed = RESUMED.search(again)
    resumed_from = int(resumed.group(1)) if resumed else 0 if "Running stage 'train'" in again else None
    lost = killed.step - resumed_from if killed.step is not None and resumed_from is not None else 0
    return Outcome(killed.killed_in, resumed_from, lost, model_tensors(repo), outputs_complete(repo))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    every = TINY_PARAMS["train"]["checkpoint_every"]
    with tempfile.TemporaryDirectory(prefix="kill-loop-") as tmp:
        expected, durations = reference(Path(tmp) / "reference", TINY_PARAMS)
        print("reference:", json.dumps({s: round(d, 1) for s, d in durations.items()}), flush=True)
        outcomes = []
        for n in range(args.runs):
            stage = rng.choice(STAGES)
            after_s = rng.uniform(0, durations[stage])
            repo = make_pipeline_repo(Path(tmp) / f"run-{n}", TINY_PARAMS)
            outcome = kill_and_recover(repo, stage, after_s)
            if outcome.error is None:
                shutil.rmtree(repo)
            else:  # kept for a look: the repository the recovery failed in
                repo = shutil.move(repo, tempfile.mkdtemp(prefix=f"kill-loop-failed-{n}-"))
            outcomes.append(outcome)
            print(f"run {n}: kill {after_s:.1f} s into {stage}: hit {outcome.stage}, {outcome.steps_lost} steps lost, "
                  f"bit for bit: {equal(outcome.model, expected)}, every output: {outcome.outputs}"
                  + (f"; the recovery failed, {repo} kept: {outcome.error}" if outcome.error else ""), flush=True)
    hit = collections.Counter(o.stage or "(none: it had ended)" for o in outcomes)
    lost = max(o.steps_lost for o in outcomes)
    same = sum(equal(o.model, expected) for o in outcomes)
    complete = sum(o.outputs for o in outcomes)
    print(f"{args.runs} runs; stages hit: {dict(hit)}; max steps lost: {lost} (checkpoint_every {every}); "
          f"bit for bit: {same}/{args.runs}; every output: {complete}/{args.runs}")
    return 0 if lost <= every and same == complete == args.runs else 1


if __name__ == "__main__":
    sys.exit(main())
