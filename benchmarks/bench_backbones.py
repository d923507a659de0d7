"""U-Net, DiT, DiffiT and latent DiffiT at matched parameter counts, after the same training minutes.

Every network trains in ONE process with params.yaml's recipe (the embedded default:
MNIST-5k, v-prediction, class-conditional, bf16 where native), stepped by the pipeline's own
:class:`diffusion.training.loop.Trainer`, their steps interleaved so that each step goes to
the network with the fewest training seconds so far: all get the same ``--minutes`` of
training, and a machine that slows down mid-run slows them alike. Then each samples
``--samples`` images with params.yaml's sample section (as the sample stage does), timed,
and is scored as :mod:`bench_default` scores: FID and KID against ``--reference`` digits
drawn at random from the training split, and the share of clear digits. Also printed:
parameters, training img/s (median over the run's steps), sampling img/s.

Results: ``benchmarks/results/backbones.json`` and ``backbones_grid_<name>.png``.

    python benchmarks/bench_backbones.py                     # 4 networks x 3 minutes: ~20 minutes on 2 cores
    python benchmarks/bench_backbones.py --minutes 0.2 --samples 50 --classifier-steps 100   # a quick look
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

from bench_default import RESULTS, pipeline_samples, pipeline_trainer, reference_and_judge, scores
from bench_networks import machine

from diffusion.config import merge_params, parse_params
from diffusion.data.dataset import split
from diffusion.data.sources import load_source
from diffusion.images import image_grid

# About unet-small's 1.19M parameters each (diffusion/models/configs.py).
MODELS = ("unet-small", "dit-cpu", "diffit-cpu", "latent-diffit-cpu")


def train_interleaved(runs: dict[str, dict], seconds: float) -> None:
    """Step each run's ``trainer`` until every run has trained ``seconds``, each step going to the
    run with the fewest seconds so far; each run's ``steps`` and per-step ``seconds`` grow."""
    while True:
        name, run = min(runs.items(), key=lambda item: sum(item[1]["seconds"]))
        if sum(run["seconds"]) >= seconds:
            return
        run["steps"] += 1
        start = time.perf_counter()
        run["trainer"].step(run["steps"], None)
        run["seconds"].append(time.perf_counter() - start)
        if run["steps"] % 100 == 0:
            print(f"{name}: step {run['steps']}, {sum(run['seconds']):.0f} s", flush=True)


def run_figures(name: str, run: dict, images, sampling: dict, sample_s: float, judges, out: str) -> dict:
    """A trained and sampled run's figures (parameters, steps, img/s, FID, KID, clear digits),
    printed; its grid written to ``results/<out>_grid_<name>.png``."""
    from PIL import Image

    figures = {
        "parameters": sum(p.numel() for p in run["trainer"].model.parameters()),
        "train_steps": run["steps"],
        "train_s": sum(run["seconds"]),
        "train_img_per_s": run["params"].train.batch_size / statistics.median(run["seconds"]),
        "sample_s": sample_s,
        "sample_img_per_s": len(images) / sample_s,
        "sampling": sampling,
        **scores(images, *judges),
    }
    print(name, json.dumps({k: v for k, v in figures.items() if k != "sampling"}), flush=True)
    RESULTS.mkdir(exist_ok=True)
    Image.fromarray(image_grid(images[:100], run["params"].sample.grid_rows)).save(RESULTS / f"{out}_grid_{name}.png")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--minutes", type=float, default=3.0, help="training minutes of each network")
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--reference", type=int, default=1000, help="digits drawn at random from the training split")
    parser.add_argument("--classifier-steps", type=int, default=1500, help="the digit classifier's training")
    parser.add_argument("--out", default="backbones", help="results/<out>.json and results/<out>_grid_<model>.png")
    args = parser.parse_args()

    base = yaml.safe_load(args.params.read_text())
    params = parse_params(base, str(args.params))
    splits = split(load_source(params.data), params.data)
    train_set = splits.train
    runs = {}
    for name in args.models:
        run_params = parse_params(merge_params(base, {"model.name": name, "model.overrides": {}}), name)
        spec, trainer = pipeline_trainer(run_params, train_set)
        runs[name] = {"params": run_params, "spec": spec, "trainer": trainer, "seconds": [], "steps": 0}
        print(f"{name}: {sum(p.numel() for p in trainer.model.parameters()):,} parameters", flush=True)
    print(machine(), flush=True)

    torch.manual_seed(params.train.seed)
    train_interleaved(runs, 60 * args.minutes)

    reference, classifier, classifier_accuracy = reference_and_judge(splits, args.reference, 0, args.classifier_steps)
    result = {
        "machine": machine(),
        "minutes": args.minutes,
        "samples": args.samples,
        "reference": args.reference,
        "classifier_heldout_accuracy": classifier_accuracy,
        "recipe": params.model_dump(include={"diffusion", "train", "sample"}),
    }
    for name, run in runs.items():
        start = time.perf_counter()
        images, sampling = pipeline_samples(run["params"], run["spec"], run["trainer"], args.samples)
        sample_s = time.perf_counter() - start
        result[name] = run_figures(name, run, images, sampling, sample_s, (reference, classifier), args.out)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
