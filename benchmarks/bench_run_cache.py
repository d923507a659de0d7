"""What DVC's run cache saves a sweep: a trial that changes only ``sample.*`` against a full trial.

One ``train_sweep`` flow run of two trials on the same config, against a real Prefect
server, in a fresh copy of a prepared repository (prepare done, nothing trained):

    full         trial 0 trains, samples and evaluates
    sample-only  trial 1 changes only ``sample.seed``: DVC restores ``train`` from its
                 run cache, then samples and evaluates

A new ``sample.seed`` changes the samples but not their cost, so the difference is what
the run cache saves (training and its logging, less the checkout of train's outputs).
Each trial's time is its MLflow run's, from the trial task's start to its end: the
``dvc exp run --temp`` with its copy of the repository, the stages, reading the
experiment back. The flow's own start, the study and the plots are not in it. Rounds
repeat the pair, each in a fresh copy; the figure is the median.

    python benchmarks/bench_run_cache.py                     # 1 round, the test suite's tiny config
    python benchmarks/bench_run_cache.py --rounds 3 --steps 750
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench_orchestration import env_for, fresh, machine, prefect_server, sh, stop, template_repo, tiny_params

from diffusion.tracking import default_tracking_uri

KINDS = ("full", "sample-only")
SPACE = {"sample.seed": {"type": "categorical", "choices": [0, 1]}}
ENQUEUE = [{"sample.seed": 0}, {"sample.seed": 1}]


def sweep_code(repo: Path) -> str:
    return f"from flows.sweep import train_sweep; train_sweep(n_trials=2, enqueue={ENQUEUE!r}, repo={str(repo)!r})"


def trial_seconds(repo: Path) -> dict[str, float]:
    """Each trial's MLflow run, start to end; checks that the second trial's model came from the first."""
    from mlflow import MlflowClient

    client = MlflowClient(default_tracking_uri(repo))
    exp = client.get_experiment_by_name("diffusion")
    runs = {run.data.tags["sweep.trial"]: run for run in client.search_runs([exp.experiment_id], "tags.`sweep.study` = 'bench'")
            if "sweep.trial" in run.data.tags}
    full, sample_only = runs["0"], runs["1"]
    if sample_only.data.tags.get("train.model_run_id") != full.info.run_id:
        raise RuntimeError("trial 1 trained again: DVC's run cache did not restore train")
    return {kind: (run.info.end_time - run.info.start_time) / 1000 for kind, run in zip(KINDS, (full, sample_only))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--steps", type=int, default=30, help="training steps (default: 30, the tests' tiny config)")
    args = parser.parse_args(argv)

    print(machine())
    work = Path(tempfile.mkdtemp(prefix="bench-run-cache-"))
    os.environ["PREFECT_HOME"] = str(work / "prefect-home")  # importing prefect (flows) creates it
    server = None
    times: dict[str, list[float]] = {kind: [] for kind in KINDS}
    try:
        params = {**tiny_params(args.steps), "sweep": {"study_name": "bench", "n_trials": 2, "space": SPACE}}
        template = template_repo(work / "template", params)
        server, prefect_env = prefect_server(work / "prefect-home")
        for round_ in range(args.rounds):
            repo = fresh(template, work, f"round-{round_}")
            start = time.perf_counter()
            sh([sys.executable, "-c", sweep_code(repo)], repo, env_for(repo, **prefect_env))
            trials = trial_seconds(repo)
            for kind, seconds in trials.items():
                times[kind].append(seconds)
            print(f"round {round_}: full {trials['full']:6.1f} s, sample-only {trials['sample-only']:6.1f} s "
                  f"(flow run {time.perf_counter() - start:.1f} s)  load {os.getloadavg()[0]:.1f}", flush=True)
            shutil.rmtree(repo, ignore_errors=True)
    finally:
        if server is not None:
            stop(server)
        shutil.rmtree(work, ignore_errors=True)

    full, sample_only = (statistics.median(times[kind]) for kind in KINDS)
    saved = full - sample_only
    print(f"\n{'trial':<13} {'wall s':>8}")
    print(f"{'full':<13} {full:8.1f}")
    print(f"{'sample-only':<13} {sample_only:8.1f}")
    print(f"{'saved':<13} {saved:8.1f}  ({100 * saved / full:.0f}% of a full trial)")
    print(json.dumps({"rounds": args.rounds, "steps": args.steps, "full_s": round(full, 1),
                      "sample_only_s": round(sample_only, 1), "saved_s": round(saved, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
