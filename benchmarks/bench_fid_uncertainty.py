"""Is the FID's bootstrap interval honest on a real model? Independent seed sets against it.

EDM (Karras et al. 2022) reports the minimum FID over three seed sets; the evaluate stage
reports one FID with a bootstrap interval (:func:`diffusion.evaluation.metrics.fid_bootstrap`).
This draws ``--seed-sets`` sets of ``--num-samples`` images of one trained model, each with its
own ``sample.seed`` (image k of set s seeded from (s, k), as the sample stage seeds), with the
sample stage's settings from ``--params``, and measures each against the pipeline's reference:

- the spread of FID over the seed sets (the generated side's sampling error, measured), their
  mean and their minimum (EDM's statistic);
- per set, the bootstrap's standard error with the reference held fixed (the same error, as the
  bootstrap estimates it from one set) and with both sides resampled (what the evaluate stage
  reports and promotion uses), the interval, whether the other sets' FIDs fall in it, and
  FID_inf (Chong & Forsyth 2020);
- the seconds the bootstrap and FID_inf take.

    python benchmarks/bench_fid_uncertainty.py --model models/model.pt --reference data/reference.npz
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

from bench_fid_nfe import RESULTS, write_csv  # noqa: E402

from diffusion.config import load_params  # noqa: E402
from diffusion.evaluation import metrics  # noqa: E402
from diffusion.images import generate_images, sampling_labels  # noqa: E402
from diffusion.packaged import PackagedDiffusion  # noqa: E402
from diffusion.stages.sample import sampling_settings  # noqa: E402

HEADER = ["seed", "fid", "se_generated", "se_both", "low", "high", "fid_infinity", "bootstrap_seconds", "infinity_seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--reference", type=Path, required=True)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="the sample section's settings")
    parser.add_argument("--seed-sets", type=int, default=5)
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--replicates", type=int, default=200)
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--name", default="mnist5k", help="suffix of the CSV file in benchmarks/results/")
    args = parser.parse_args()

    device = torch.device("cpu")
    packaged = PackagedDiffusion.load(args.model)
    settings = sampling_settings(load_params(args.params), device, timesteps=None)
    reference = metrics.load_reference(args.reference)
    fixed = metrics.moments(reference["features"])
    labels = sampling_labels(None, args.num_samples, packaged.model_spec.get("num_classes"))
    rows = []
    for seed in range(args.seed_sets):
        images = generate_images(
            packaged, settings, labels=labels, batch_size=args.batch, seed=seed, device=device, name=lambda key: f"--{key}",
        )
        features = metrics.inception_features(images, device="cpu", batch_size=100)
        fid = metrics.frechet_distance(metrics.moments(features), fixed)
        start = time.perf_counter()
        both = metrics.fid_bootstrap(features, reference["features"], replicates=args.replicates)
        bootstrap_seconds = time.perf_counter() - start
        generated = metrics.fid_bootstrap(features, fixed, replicates=args.replicates)
        low, high = metrics.bootstrap_interval(fid, both, args.confidence)
        start = time.perf_counter()
        n = len(features)
        infinity, _ = metrics.fid_infinity(features, fixed, sizes=np.linspace(n // 10, n, 15).astype(int))
        rows.append([seed, fid, generated.std(), both.std(), low, high, infinity, bootstrap_seconds, time.perf_counter() - start])
        print(" ".join(f"{name} {value:.4g}" for name, value in zip(HEADER, rows[-1])), flush=True)
        write_csv(RESULTS / f"fid_uncertainty_{args.name}.csv", HEADER, rows)

    fids = np.array([row[1] for row in rows])
    inside = [np.mean([(row[4] <= other <= row[5]) for other in np.delete(fids, i)]) for i, row in enumerate(rows)]
    print(f"\n| seed sets | FID mean | FID sd over sets | FID min (EDM) | bootstrap se, generated side | bootstrap se, both sides "
          f"| other sets inside a set's {args.confidence:.0%} interval | FID_inf mean (sd) | bootstrap s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print(f"| {len(rows)} x {args.num_samples} | {fids.mean():.2f} | {fids.std(ddof=1):.2f} | {fids.min():.2f} "
          f"| {np.mean([r[2] for r in rows]):.2f} | {np.mean([r[3] for r in rows]):.2f} | {np.mean(inside):.0%} "
          f"| {np.mean([r[6] for r in rows]):.2f} ({np.std([r[6] for r in rows], ddof=1):.2f}) "
          f"| {np.mean([r[7] for r in rows]):.1f} |")


if __name__ == "__main__":
    main()
