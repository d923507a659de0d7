"""FID against NFE on a trained model: a schedule fitted to the model against the fixed ones.

For one ODE solver (``--samplers``, default unipc) and each NFE of ``--nfes``, the same seeded
images (seed 0, :func:`bench_fid_nfe.measure`) are drawn on each fixed schedule (linspace,
trailing, log-snr, karras) and on a schedule fitted to the model at that NFE
(:func:`diffusion.sampling.fitted.fit_timesteps`, as the fit_schedule stage fits it: a
calibration batch of ``--calibration-images`` x_T of seed ``--calibration-seed``, drawn and
guided as the sample stage draws, against dpm++3m on ``--reference-steps`` log-snr steps,
starting from ``--fit-start``), and each FID is measured against the pipeline's reference
(``data/reference.npz``). The sampling settings other than sampler, steps and schedule
(guidance scale, clipping, precision, ...) are the sample stage's, read from ``--params``
(``models/model.pt`` itself carries only the package defaults, guidance 1 and fp32).

NFE here is solver steps (one network evaluation per image per step for these one-step
solvers, :func:`bench_fid_nfe.steps_for`); classifier-free guidance runs the conditional and
the unconditional pass at each of them, which this count does not double.

Rows go to ``benchmarks/results/fitted_fid_<name>.csv`` after every measurement (so a cut-off
run keeps what it finished); a Markdown table is printed at the end.

    python benchmarks/bench_fitted_fid.py --model models/model.pt --reference data/reference.npz
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from bench_fid_nfe import RESULTS, measure, steps_for, write_csv  # noqa: E402

from diffusion.config import load_params  # noqa: E402
from diffusion.evaluation.metrics import load_reference  # noqa: E402
from diffusion.images import sampling_labels  # noqa: E402
from diffusion.packaged import PackagedDiffusion  # noqa: E402
from diffusion.sampling.fitted import fit_timesteps  # noqa: E402
from diffusion.sampling.specs import CHURN_DEFAULTS, FITTED, SAMPLER_SPECS  # noqa: E402
from diffusion.sampling.steps import make_steps  # noqa: E402
from diffusion.stages.fit_schedule import REFERENCE_SAMPLER  # noqa: E402
from diffusion.stages.sample import sampling_settings  # noqa: E402

FIXED = ["linspace", "trailing", "log-snr", "karras"]
HEADER = ["sampler", "nfe", "steps", "schedule", "fid", "sample_seconds", "fit_seconds",
          "start_distance", "fitted_distance", "solves", "timesteps"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--reference", type=Path, required=True)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="the sample section's settings")
    parser.add_argument("--samplers", nargs="*", default=["unipc"])
    parser.add_argument("--nfes", nargs="*", type=int, default=[5, 8, 10, 20, 50])
    parser.add_argument("--fit-nfes", nargs="*", type=int, default=None, help="NFEs that get a fit (default: all)")
    parser.add_argument("--schedules", nargs="*", default=FIXED, help="the fixed schedules")
    parser.add_argument("--schedules-at", nargs="*", default=[], metavar="NFE=S1,S2",
                        help="fewer fixed schedules at an NFE (a budget cut), e.g. 50=log-snr")
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--calibration-images", type=int, default=64)
    parser.add_argument("--calibration-seed", type=int, default=1)
    parser.add_argument("--reference-steps", type=int, default=100)
    parser.add_argument("--fit-start", default="log-snr")
    parser.add_argument("--max-solves", type=int, default=100)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--resume", action="store_true", help="keep the CSV's rows and skip what they measured")
    parser.add_argument("--calibration-cache", type=Path, default=None,
                        help="a file keeping the calibration reference between runs (same model and settings only)")
    parser.add_argument("--name", default="mnist5k", help="suffix of the CSV file in benchmarks/results/")
    args = parser.parse_args()
    unknown = [s for s in args.samplers if s not in SAMPLER_SPECS]
    if unknown:
        parser.error(f"--samplers: unknown {', '.join(unknown)}")
    fit_nfes = set(args.nfes if args.fit_nfes is None else args.fit_nfes)
    schedules_at = {int(k): [s for s in v.split(",") if s] for k, v in (item.split("=", 1) for item in args.schedules_at)}
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.set_grad_enabled(False)
    device = torch.device("cpu")
    packaged = PackagedDiffusion.load(args.model)
    reference = load_reference(args.reference)
    settings = sampling_settings(load_params(args.params), device, timesteps=None)
    for key in ("sampler", "steps", "schedule", "timesteps"):
        settings.pop(key)
    print(f"settings: {settings}", flush=True)
    num_classes = packaged.model_spec.get("num_classes")
    labels = sampling_labels(None, args.calibration_images, num_classes)

    def draw(**overrides) -> torch.Tensor:  # the calibration batch, as fit_schedule draws it
        return packaged.sample(
            args.calibration_images, **{**settings, **overrides}, labels=labels if num_classes else None,
            seed=args.calibration_seed, device=device,
        )

    out = RESULTS / f"fitted_fid_{args.name}.csv"
    rows: list[list] = []
    if args.resume and out.is_file():
        import csv

        with out.open() as fh:
            rows = [[row[h] for h in HEADER] for row in csv.DictReader(fh)]
        for row in rows:
            row[1], row[4], row[5] = int(row[1]), float(row[4]), float(row[5])
            if row[6]:
                row[6], row[7], row[8] = float(row[6]), float(row[7]), float(row[8])
    done = {(row[0], int(row[1]), row[3]) for row in rows}
    calibration_target = None
    if args.calibration_cache is not None and args.calibration_cache.is_file():
        calibration_target = torch.load(args.calibration_cache)
    for sampler in args.samplers:
        for nfe in args.nfes:
            steps = steps_for(sampler, nfe)
            for schedule in schedules_at.get(nfe, args.schedules):
                if (sampler, nfe, schedule) in done:
                    continue
                fid, seconds = measure(packaged, reference, count=args.num_samples, batch=args.batch,
                                       **settings, sampler=sampler, steps=steps, schedule=schedule)
                rows.append([sampler, nfe, steps, schedule, round(fid, 3), round(seconds, 1), "", "", "", "", ""])
                write_csv(out, HEADER, rows)
                print(f"{sampler:8s} nfe {nfe:3d} {schedule:9s}: FID {fid:7.2f} ({seconds:.0f} s)", flush=True)
            if nfe not in fit_nfes or (sampler, nfe, FITTED) in done:
                continue
            if calibration_target is None:
                began = time.perf_counter()
                calibration_target = draw(sampler=REFERENCE_SAMPLER, steps=args.reference_steps, schedule="log-snr",
                                          eta=0.0, **CHURN_DEFAULTS)
                print(f"calibration reference ({REFERENCE_SAMPLER}, {args.reference_steps} log-snr steps, "
                      f"{args.calibration_images} images): {time.perf_counter() - began:.0f} s", flush=True)
                if args.calibration_cache is not None:
                    torch.save(calibration_target, args.calibration_cache)
            start = make_steps(args.fit_start, packaged.diffusion.process, steps)
            began = time.perf_counter()
            result = fit_timesteps(
                lambda s: draw(sampler=sampler, steps=steps, schedule=FITTED, timesteps=s.timesteps.tolist()),
                calibration_target, start, max_solves=args.max_solves,
            )
            fit_seconds = time.perf_counter() - began
            times = result.steps.timesteps.tolist()
            fid, seconds = measure(packaged, reference, count=args.num_samples, batch=args.batch,
                                   **settings, sampler=sampler, steps=steps, schedule=FITTED, timesteps=times)
            rows.append([sampler, nfe, steps, FITTED, round(fid, 3), round(seconds, 1), round(fit_seconds, 1),
                         round(result.start_distance, 4), round(result.distance, 4), result.solves,
                         " ".join(f"{t:.1f}" for t in times)])
            write_csv(out, HEADER, rows)
            print(f"{sampler:8s} nfe {nfe:3d} fitted   : FID {fid:7.2f} ({seconds:.0f} s); fit {fit_seconds:.0f} s, "
                  f"{result.solves} solves, distance {result.start_distance:.4f} -> {result.distance:.4f}; "
                  f"times {[round(t, 1) for t in times]}", flush=True)

    schedules = list(dict.fromkeys(row[3] for row in rows))
    nfes = sorted({row[1] for row in rows})
    for sampler in dict.fromkeys(row[0] for row in rows):
        fids = {(row[1], row[3]): row[4] for row in rows if row[0] == sampler}
        fits = {row[1]: row for row in rows if row[0] == sampler and row[3] == FITTED}
        print(f"\n{sampler}: FID ({args.num_samples} images) against NFE\n")
        print("| NFE | " + " | ".join(schedules) + " | best fixed | fit s | calib. distance start → fitted |")
        print("|---" * (len(schedules) + 4) + "|")
        for nfe in nfes:
            fixed = [fids[(nfe, s)] for s in schedules if s != FITTED and (nfe, s) in fids] or [float("nan")]
            fit = fits.get(nfe)
            if not any((nfe, s) in fids for s in schedules):
                continue
            cells = [f"{fids[(nfe, s)]:.2f}" if (nfe, s) in fids else "–" for s in schedules]
            print(f"| {nfe} | " + " | ".join(cells) + f" | {min(fixed):.2f} | "
                  + (f"{fit[6]:.0f} | {fit[7]:.4f} → {fit[8]:.4f}" if fit else "– | –") + " |")


if __name__ == "__main__":
    main()
