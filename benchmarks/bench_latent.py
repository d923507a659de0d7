"""Pixel-space U-Net against latent U-Net, DiT, SiT and latent DiffiT, after the same training minutes.

The embedded default (MNIST-5k, 28 px, params.yaml's recipe). First the autoencoder of
params.yaml's ``vae`` section trains as the train_vae stage trains it (``vae.steps``; its
minutes are reported apart: one autoencoder serves every latent model and every sweep
trial), and the training split is encoded as the encode stage encodes it (7 x 7 x 4
latents, scaled to unit std). Then every network trains in ONE process with the pipeline's
:class:`~diffusion.training.loop.Trainer`, the steps interleaved so that each gets the same
``--minutes`` of training (as :mod:`bench_backbones`), samples ``--samples`` images with
params.yaml's sample section (a latent model decodes them; the timing includes the
decoder), and is scored as :mod:`bench_default` scores: FID and KID against ``--reference``
training digits, and the share of clear digits.

``latent-sit`` is ``latent-dit`` on the flow process (SiT: velocity, logit-normal t, Euler
steps), every other param the same. Results: ``benchmarks/results/latent.json`` and
``latent_grid_<name>.png`` (``--out`` names others).

    python benchmarks/bench_latent.py                       # ~15 minutes on 2 cores
    python benchmarks/bench_latent.py --runs latent-dit latent-sit --out latent_sit   # DiT on ddpm against SiT
    python benchmarks/bench_latent.py --minutes 0.1 --vae-steps 20 --samples 50 --classifier-steps 50   # a quick look
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

from bench_backbones import run_figures, train_interleaved
from bench_default import RESULTS, pipeline_samples, pipeline_trainer, reference_and_judge
from bench_networks import machine

from diffusion.config import merge_params, parse_params
from diffusion.data.dataset import split
from diffusion.data.latents import latent_scale_factor
from diffusion.data.sources import load_source
from diffusion.models.configs import VAE_CONFIGS
from diffusion.models.vae import KLAutoencoder
from diffusion.stages.encode import encode_images
from diffusion.training.autoencoder import mean_image_error, reconstruction_error, train_autoencoder
from diffusion.training.loop import seeded_init

# (space, model.name, model.overrides, other params): about unet-small's 1.2M parameters each;
# on 7 x 7 latents the transformers take patches of 1 (49 tokens) and the U-Net keeps one level.
FLOW = {  # SiT (Ma et al. 2024): DiT on the linear interpolant, velocity, its Euler sampler
    "diffusion.process": "flow", "diffusion.schedule": None, "diffusion.prediction": None,
    "train.timestep_sampler": None, "sample.sampler": "euler", "sample.schedule": "linspace",
}
RUNS = {
    "pixel-unet": ("pixel", "unet-small", {}, {}),
    "latent-unet": ("latent", "unet-small", {"channel_mult": [1], "base_channels": 64, "num_res_blocks": 2}, {}),
    "latent-dit": ("latent", "dit-cpu", {"patch_size": 1}, {}),
    "latent-diffit": ("latent", "latent-diffit-cpu", {"patch_size": 1}, {}),
    "latent-sit": ("latent", "dit-cpu", {"patch_size": 1}, FLOW),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--runs", nargs="*", default=list(RUNS))
    parser.add_argument("--minutes", type=float, default=2.5, help="training minutes of each network")
    parser.add_argument("--vae-steps", type=int, default=None, help="default: params.yaml's vae.steps")
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--reference", type=int, default=1000, help="digits drawn at random from the training split")
    parser.add_argument("--classifier-steps", type=int, default=1500, help="the digit classifier's training")
    parser.add_argument("--out", default="latent", help="results/<out>.json and results/<out>_grid_<run>.png")
    args = parser.parse_args()

    base = yaml.safe_load(args.params.read_text())
    if args.vae_steps is not None:
        base = merge_params(base, {"vae.steps": args.vae_steps})
    params = parse_params(base, str(args.params))
    splits = split(load_source(params.data), params.data)
    train_set = splits.train
    print(machine(), flush=True)

    vae = params.vae
    with seeded_init(vae.seed):
        autoencoder = KLAutoencoder(in_channels=train_set.images.shape[1], **VAE_CONFIGS[vae.name])
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        trained = train_autoencoder(autoencoder, train_set.images, vae, checkpoint_dir=tmp)
    vae_s = time.perf_counter() - start
    autoencoder = trained.model.cpu().eval()
    start = time.perf_counter()
    latents = encode_images(autoencoder, train_set.images, posterior=vae.posterior, seed=vae.seed,
                            batch_size=vae.encode_batch_size, device="cpu")
    encode_s = time.perf_counter() - start
    scale = latent_scale_factor(latents)
    vae_result = {
        "name": vae.name, "parameters": sum(p.numel() for p in autoencoder.parameters()), "steps": trained.step,
        "train_s": vae_s, "encode_s": encode_s, "latent_shape": list(latents.shape[1:]), "scale_factor": scale,
        "heldout_mse": reconstruction_error(autoencoder, splits.heldout.images, batch_size=vae.batch_size),
        "mean_image_mse": mean_image_error(train_set.images, splits.heldout.images),
    }
    print("vae", json.dumps(vae_result), flush=True)
    spec_of_autoencoder = {"config": autoencoder.config, "scale_factor": scale}

    runs = {}
    for name in args.runs:
        space, model, overrides, changes = RUNS[name]
        run_params = parse_params(
            merge_params(base, {"model.space": space, "model.name": model, "model.overrides": overrides, **changes}),
            name,
        )
        images = None if space == "pixel" else latents * scale
        spec, trainer = pipeline_trainer(run_params, train_set, images)
        runs[name] = {"params": run_params, "spec": spec, "trainer": trainer, "seconds": [], "steps": 0, "space": space}
        print(f"{name}: {sum(p.numel() for p in trainer.model.parameters()):,} parameters", flush=True)

    torch.manual_seed(params.train.seed)
    train_interleaved(runs, 60 * args.minutes)

    reference, classifier, classifier_accuracy = reference_and_judge(splits, args.reference, 0, args.classifier_steps)
    result = {
        "machine": machine(), "minutes": args.minutes, "samples": args.samples, "reference": args.reference,
        "classifier_heldout_accuracy": classifier_accuracy, "vae": vae_result,
        "recipe": params.model_dump(include={"diffusion", "train", "sample", "vae"}),
    }
    for name, run in runs.items():
        latent = run["space"] == "latent"
        start = time.perf_counter()
        images, sampling = pipeline_samples(
            run["params"], run["spec"], run["trainer"], args.samples,
            autoencoder=spec_of_autoencoder if latent else None, decoder=autoencoder if latent else None,
        )
        sample_s = time.perf_counter() - start
        figures = run_figures(name, run, images, sampling, sample_s, (reference, classifier), args.out)
        result[name] = {"model": RUNS[name][1], "overrides": RUNS[name][2], "process": run["params"].diffusion.process, **figures}
    (RESULTS / f"{args.out}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
