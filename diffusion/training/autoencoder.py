"""Training the autoencoder of latent diffusion, and its held-out reconstruction error.

One step: a batch of the uint8 images (scaled to [-1, 1]), indices drawn with replacement; the
posterior sampled, z ~ q(z|x), and decoded; Adam with LDM's autoencoder betas (0.5, 0.9) and a
constant learning rate on :func:`~diffusion.models.vae.autoencoder_loss` (reconstruction MSE +
``kl_weight`` KL, per pixel value), stopped with :class:`~diffusion.training.loop.NonFiniteLossError`
before a NaN or inf loss reaches the weights. Batch indices and the posterior's noise come from one CPU
generator seeded from ``seed``, saved in every checkpoint, so a killed run resumes on the
same trajectory (bit for bit on the CPU). Checkpoints are ``ckpt-<step>.pt`` as the
diffusion model's (:mod:`diffusion.training.checkpoint`), also at the step where SIGINT or
SIGTERM stopped it (:mod:`diffusion.interrupt`); the newest three are kept.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from diffusion import interrupt
from diffusion.models.vae import KLAutoencoder, autoencoder_loss
from diffusion.training.checkpoint import CheckpointError, checkpoint_path, load_newest, prune_checkpoints, save_checkpoint
from diffusion.training.devices import autocast, batch_memory, resolve_device, resolve_precision
from diffusion.training.loop import KEEP_CHECKPOINTS, LogFn, NonFiniteLossError, _seeds, to_model_range

ADAM_BETAS = (0.5, 0.9)  # LDM's autoencoder optimiser (Rombach et al. 2022, its autoencoder configs)
TERMS = ("loss", "recon", "kl")  # of autoencoder_loss, logged as vae_<term>


@dataclass(frozen=True)
class AutoencoderResult:
    step: int
    curve: list[tuple[int, float, float, float]]
    """(step, loss, recon, kl) window means at every log point."""
    img_per_s: float | None
    """Training throughput of this call (None when no step was left to run)."""
    model: KLAutoencoder


def train_autoencoder(
    model: KLAutoencoder, images: torch.Tensor, cfg: Any, *, checkpoint_dir: str | Path, log: LogFn | None = None,
    progress: bool = True,
) -> AutoencoderResult:
    """Train ``model`` on uint8 ``images`` to ``cfg.steps`` steps (the module doc), resuming from
    ``checkpoint_dir``; ``cfg`` is the vae section (steps, batch_size, lr, kl_weight, seed,
    device, precision, log_every, checkpoint_every). ``log(step, {vae_loss, vae_recon, vae_kl})``
    gets the window means every ``log_every`` steps."""
    factor = model.downsampling_factor
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-2] % factor or images.shape[-1] % factor:
        raise ValueError(
            f"train_autoencoder: images must be uint8 [N, C, H, W] with H and W divisible by {factor}; "
            f"got {images.dtype} {tuple(images.shape)}"
        )
    device = resolve_device(cfg.device, key="vae.device")
    dtype = resolve_precision(cfg.precision, device)
    model = model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=ADAM_BETAS)
    generator = torch.Generator().manual_seed(_seeds(cfg.seed)[0])
    data = images.to(device)
    step, curve, window, last_good = 0, [], [], None
    newest = load_newest(checkpoint_dir)
    if newest is not None:
        last_good, state, damaged = newest
        for err in damaged:
            print(f"train_vae: warning: {err}; resuming from the older {last_good}", file=sys.stderr, flush=True)
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            generator.set_state(state["generator"])
            step, curve, window = state["step"], state["curve"], state["window"]
        except (KeyError, RuntimeError, ValueError) as err:
            raise CheckpointError(f"{last_good}: not a checkpoint of this autoencoder ({str(err).splitlines()[0]})") from None
        print(f"train_vae: resuming from {last_good} at step {step}", flush=True)

    def write_checkpoint() -> Path:
        state = {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "generator": generator.get_state(),
            "step": step, "curve": curve, "window": window,
        }
        path = save_checkpoint(checkpoint_path(checkpoint_dir, step), state)
        prune_checkpoints(checkpoint_dir, KEEP_CHECKPOINTS, path)
        return path

    timed_s, timed_steps = 0.0, 0
    bar = tqdm(total=cfg.steps, initial=step, desc="train_vae", unit="step", disable=not progress)
    # SIGINT or SIGTERM: the step under way ends, then a checkpoint at it (diffusion.interrupt).
    with interrupt.deferred(), bar:
        while step < cfg.steps:
            step += 1
            start = time.perf_counter()
            index = torch.randint(len(data), (cfg.batch_size,), generator=generator)
            x = to_model_range(data[index.to(device)])
            with batch_memory("vae.batch_size", cfg.batch_size, device):
                with autocast(device, dtype):
                    recon, posterior = model(x, generator)
                terms = autoencoder_loss(recon, x, posterior, cfg.kl_weight)
                optimizer.zero_grad(set_to_none=True)
                terms["loss"].backward()
            values = torch.stack([terms[k].detach() for k in TERMS]).tolist()
            if not all(map(math.isfinite, values)):
                raise NonFiniteLossError(
                    f"vae step {step}: non-finite loss terms {dict(zip(TERMS, values))}; training stopped without "
                    f"saving; last good checkpoint: {last_good if last_good is not None else 'none written yet'}"
                )
            optimizer.step()
            window.append(values)
            timed_s, timed_steps = timed_s + time.perf_counter() - start, timed_steps + 1
            bar.update()
            if step % cfg.log_every == 0:
                means = [sum(column) / len(window) for column in zip(*window)]
                curve.append((step, *means))
                window = []
                bar.set_postfix(loss=f"{means[0]:.4f}", refresh=False)
                if log is not None:
                    log(step, {f"vae_{k}": mean for k, mean in zip(TERMS, means)})
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                last_good = write_checkpoint()
            if interrupt.requested():
                if last_good != checkpoint_path(checkpoint_dir, step):
                    last_good = write_checkpoint()
                raise interrupt.Stopped(interrupt.requested(), f"at step {step}; checkpoint written; run it again to resume")
    return AutoencoderResult(
        step=step, curve=curve, img_per_s=cfg.batch_size * timed_steps / timed_s if timed_steps else None,
        model=model.eval(),
    )


@torch.no_grad()
def reconstruction_error(model: KLAutoencoder, images: torch.Tensor, *, batch_size: int) -> float:
    """Mean squared error per pixel value, in [-1, 1] units, of D(mean of q(z|x)) on uint8 ``images``."""
    device = next(model.parameters()).device
    total = 0.0
    for chunk in images.split(batch_size):
        x = to_model_range(chunk.to(device))
        total += (model.decode(model.encode(x).mode()) - x).pow(2).sum().item()
    return total / images.numel()


def mean_image_error(train_images: torch.Tensor, heldout_images: torch.Tensor) -> float:
    """The baseline: the MSE per pixel value of predicting each held-out image by the per-pixel
    mean of the training images."""
    mean = to_model_range(train_images).mean(0)
    return (to_model_range(heldout_images) - mean).pow(2).mean().item()
