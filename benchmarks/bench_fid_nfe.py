"""FID against network evaluations per sampler, and against the guidance scale, for a trained model.

For a model the pipeline trained (``models/model.pt``), each sampler draws the same seeded
images at several NFE (network evaluations per image: the step count that costs at most
that many, :func:`diffusion.sampling.specs.network_evaluations`), and each FID is measured
against the pipeline's own reference (``data/reference.npz``) with its Inception features.
For a class-conditional model, ``--guidance`` scans the classifier-free scale w (1: none)
with one sampler at one NFE. Results go to CSV files that ``dvc plots show`` renders
(dvc.yaml's top-level ``plots``) and, with ``--tracking-uri``, to one MLflow run whose
metric ``fid_<sampler>`` has NFE as its step (``fid_guided`` has step 100·w), so the UI
draws the curves.

    python benchmarks/bench_fid_nfe.py --model models/model.pt --reference data/reference.npz
    python benchmarks/bench_fid_nfe.py --model cond/models/model.pt --reference data/reference.npz \\
        --samplers --guidance 1 1.5 2 3 4 6
"""

from __future__ import annotations

import argparse
import csv
import os
import time
from pathlib import Path

import torch

from diffusion.evaluation.metrics import fid_from_features, inception_features, load_reference
from diffusion.images import generate_images, sampling_labels
from diffusion.packaged import PackagedDiffusion
from diffusion.sampling.specs import SAMPLER_SPECS, network_evaluations

RESULTS = Path(__file__).parent / "results"


def steps_for(sampler: str, nfe: int) -> int:
    """The most steps whose cost is at most ``nfe`` evaluations per image."""
    return max(s for s in range(1, nfe + 1) if network_evaluations(sampler, s) <= nfe)


def measure(packaged: PackagedDiffusion, reference, *, count: int, batch: int, **sampling) -> tuple[float, float]:
    """(FID, seconds of sampling) of ``count`` images seeded 0, 1, ... with ``sampling``."""
    labels = sampling_labels(None, count, packaged.model_spec.get("num_classes"))
    start = time.perf_counter()
    images = generate_images(
        packaged, {**packaged.sampling, **sampling}, labels=labels, batch_size=batch, seed=0,
        device=torch.device("cpu"), name=lambda key: f"--{key}",
    )
    seconds = time.perf_counter() - start
    features = inception_features(images, device="cpu", batch_size=100)
    return fid_from_features(features, reference["features"]), seconds


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        csv.writer(fh).writerows([header, *rows])


def by_nfe(rows: list[list]) -> tuple[list[str], list[list]]:
    """The long rows (sampler, schedule, steps, nfe, fid, seconds), one per run, as one row per
    NFE budget with a FID column per sampler: the table dvc.yaml's plot draws, a line a sampler.
    A sampler whose cost is below the budget (Heun's 2n - 1) sits in the budget's row."""
    samplers = list(dict.fromkeys(row[0] for row in rows))
    budgets = sorted({budget for *_, budget in rows})
    table = {(row[0], row[-1]): row[4] for row in rows}
    return ["nfe", *samplers], [[b, *(table.get((s, b), "") for s in samplers)] for b in budgets]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--reference", type=Path, required=True)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--samplers", nargs="*", default=["ddpm", "ddim", "dpm++2m", "heun"])
    parser.add_argument("--schedules", nargs="*", default=[], help="sampler=schedule, e.g. dpm++2m=log-snr")
    parser.add_argument("--nfe", nargs="*", type=int, default=[5, 10, 20, 50, 100])
    parser.add_argument("--guidance", nargs="*", type=float, default=[])
    parser.add_argument("--guidance-sampler", default="ddim")
    parser.add_argument("--guidance-nfe", type=int, default=20)
    parser.add_argument("--name", default="default", help="suffix of the CSV files in benchmarks/results/")
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"))
    args = parser.parse_args()
    unknown = [s for s in args.samplers + [args.guidance_sampler] if s not in SAMPLER_SPECS]
    if unknown:
        parser.error(f"--samplers: unknown {', '.join(unknown)}; allowed: {', '.join(SAMPLER_SPECS)}")
    schedules = dict(item.split("=", 1) for item in args.schedules)

    torch.set_grad_enabled(False)
    packaged = PackagedDiffusion.load(args.model)
    reference = load_reference(args.reference)
    nfe_rows, guidance_rows = [], []
    for sampler in args.samplers:
        for nfe in args.nfe:
            steps = steps_for(sampler, nfe)
            schedule = schedules.get(sampler, "linspace")
            fid, seconds = measure(
                packaged, reference, count=args.samples, batch=args.batch, sampler=sampler, steps=steps, schedule=schedule
            )
            cost = network_evaluations(sampler, steps)
            nfe_rows.append([sampler, schedule, steps, cost, round(fid, 3), round(seconds, 1), nfe])
            print(f"{sampler:8s} {schedule:9s} steps {steps:3d} nfe {cost:3d}: FID {fid:7.2f} ({seconds:.0f} s)", flush=True)
    for w in args.guidance:
        steps = steps_for(args.guidance_sampler, args.guidance_nfe)
        fid, seconds = measure(
            packaged, reference, count=args.samples, batch=args.batch, sampler=args.guidance_sampler, steps=steps,
            guidance_scale=w,
        )
        guidance_rows.append([w, args.guidance_sampler, steps, round(fid, 3), round(seconds, 1)])
        print(f"guidance {w:4.2f} ({args.guidance_sampler} {steps} steps): FID {fid:7.2f} ({seconds:.0f} s)", flush=True)

    if nfe_rows:
        header = ["sampler", "schedule", "steps", "nfe", "fid", "seconds", "budget"]
        write_csv(RESULTS / f"fid_vs_nfe_{args.name}_runs.csv", header, nfe_rows)
        write_csv(RESULTS / f"fid_vs_nfe_{args.name}.csv", *by_nfe(nfe_rows))
    if guidance_rows:
        write_csv(RESULTS / f"fid_vs_guidance_{args.name}.csv", ["guidance_scale", "sampler", "steps", "fid", "seconds"], guidance_rows)
    if args.tracking_uri:
        import mlflow

        mlflow.set_tracking_uri(args.tracking_uri)
        mlflow.set_experiment("benchmarks")
        with mlflow.start_run(run_name=f"fid-vs-nfe-{args.name}"):
            mlflow.log_params({"model": str(args.model), "samples": args.samples})
            for sampler, _, _, cost, fid, _, _ in nfe_rows:
                mlflow.log_metric(f"fid_{sampler}", fid, step=cost)
            for w, _, _, fid, _ in guidance_rows:
                mlflow.log_metric("fid_guided", fid, step=round(100 * w))


if __name__ == "__main__":
    main()
