"""encode: the latents of the train and held-out sets, and the scale factor, when ``model.space`` is latent.

Each image is encoded by ``models/vae.pt`` to its posterior q(z|x) and kept as its mean, or
with ``vae.posterior: sample`` as one draw (image k's from its own generator seeded from
(``vae.seed``, k), so the batch size changes nothing). The scale factor is 1 / std of the
training latents (:func:`~diffusion.data.latents.latent_scale_factor`, as LDM).

Outputs: ``data/latents.npz`` (:mod:`diffusion.data.latents`) and ``metrics/latents.json``
(shape, mean, std, scale factor). No MLflow run: train logs the factor with its params.
With ``model.space: pixel`` it writes the marker :data:`~diffusion.stages.paths.PIXEL_SPACE`
and an empty metrics file, importing no torch.
"""

from __future__ import annotations

from diffusion.config import Params
from diffusion.files import atomic_write, write_json
from diffusion.stages.paths import AUTOENCODER, HELDOUT_SET, LATENTS, LATENTS_METRICS, PIXEL_SPACE, TRAIN_SET


def run(params: Params) -> None:
    if params.model.space == "pixel":
        with atomic_write(LATENTS) as fh:
            fh.write(PIXEL_SPACE)
        with atomic_write(LATENTS_METRICS) as fh:
            fh.write(b"{}\n")
        return
    _encode(params)


def encode_images(autoencoder, images, *, posterior: str, seed: int, batch_size: int, device):
    """float32 latents [N, C_z, h, w] of uint8 ``images``: posterior means, or one draw each
    (image k's noise from its own generator seeded (seed, k): :class:`diffusion.sampling.noise.StackedRandomGenerator`)."""
    import torch

    from diffusion.sampling.noise import StackedRandomGenerator
    from diffusion.training.loop import to_model_range

    batches = []
    with torch.no_grad():
        for first in range(0, len(images), batch_size):
            chunk = images[first: first + batch_size]
            q = autoencoder.encode(to_model_range(chunk.to(device)))
            z = q.mode()
            if posterior == "sample":
                eps = StackedRandomGenerator(seed, range(first, first + len(chunk))).randn(z.shape, device=device, dtype=z.dtype)
                z = q.mean + q.std * eps
            batches.append(z.float().cpu())
    return torch.cat(batches)


def _encode(params: Params) -> None:
    from diffusion import tracking
    from diffusion.data.dataset import load_dataset
    from diffusion.data.latents import Latents, latent_scale_factor, save_latents
    from diffusion.packaged import load_autoencoder
    from diffusion.training.devices import resolve_device

    vae = params.vae
    device = resolve_device(vae.device, key="vae.device")
    autoencoder, info = load_autoencoder(AUTOENCODER, map_location=device)
    dataset, heldout = load_dataset(TRAIN_SET), load_dataset(HELDOUT_SET)
    encoded = {
        split: encode_images(autoencoder, data.images, posterior=vae.posterior, seed=vae.seed + offset,
                             batch_size=vae.encode_batch_size, device=device)
        for offset, (split, data) in enumerate((("train", dataset), ("heldout", heldout)))
    }
    scale = latent_scale_factor(encoded["train"])
    meta = {"posterior": vae.posterior, "autoencoder_md5": tracking.file_md5(AUTOENCODER), "source": info.get("source")}
    save_latents(LATENTS, Latents(
        train=encoded["train"], heldout=encoded["heldout"], train_labels=dataset.labels, heldout_labels=heldout.labels,
        scale_factor=scale, meta=meta,
    ))
    train = encoded["train"]
    summary = {
        "train": len(train), "heldout": len(encoded["heldout"]), "shape": list(train.shape[1:]),
        "mean": train.mean().item(), "std": train.std().item(), "scale_factor": scale,
    }
    write_json(LATENTS_METRICS, summary)
    print(f"encode: {summary['train']} + {summary['heldout']} latents {tuple(train.shape[1:])}, std {summary['std']:.4g}, "
          f"scale factor {scale:.4g}", flush=True)
