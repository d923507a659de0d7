"""The trained model as one object: the network, the configs that rebuild it, sampling.

``models/model.pt`` (the train stage's output) and the MLflow model's ``model.pt``
are both :meth:`PackagedDiffusion.save`'s file: tensors and plain data that
``torch.load(weights_only=True)`` reads, never code. ``forward(noise)`` maps x_T to
images with the model's ``sampling`` settings; :meth:`PackagedDiffusion.sample`
takes any sampler, step count and seed.

``sampling`` is :data:`DEFAULT_SAMPLER` in ``models/model.pt``: train does not know
the sample params. The registered model carries the sample params behind its FID
(:func:`diffusion.registry.promote` sets them).

A latent diffusion model (``model.space: latent``) carries its autoencoder and the latent
scale factor: the network denoises latents of :attr:`~PackagedDiffusion.image_shape`, and
sampling ends with the decoder, ``x = D(z / scale_factor)`` (Rombach et al. 2022, §3), so
every caller gets images of :attr:`~PackagedDiffusion.output_shape`. ``models/vae.pt`` is
the autoencoder alone (:func:`save_autoencoder`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffusion.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from diffusion.process.factory import make_diffusion
from diffusion.models.factory import create_model
from diffusion.models.layers import null_condition
from diffusion.models.text import build_text_encoder
from diffusion.models.vae import KLAutoencoder
from diffusion.sampling.guidance import Classifier, guidance
from diffusion.sampling.sample import sample as run_sampler
from diffusion.sampling.specs import CHURN_DEFAULTS, CHURN_OPTIONS, FITTED, SAMPLER_SPECS, options_refused

# The sample() arguments that ``sampling`` holds, and their defaults.
DEFAULT_SAMPLER = {
    "sampler": "ddim",
    "steps": 50,
    "schedule": "linspace",
    "timesteps": None,  # schedule "fitted": the fitted times (diffusion.sampling.fitted)
    "eta": 0.0,
    "clip_denoised": True,
    "threshold": None,
    "guidance_scale": 1.0,
    "guidance_interval": None,
    "precision": "fp32",  # the network's: fp32 | bf16 (autocast)
    **CHURN_DEFAULTS,  # heun's S_churn, S_tmin, S_tmax, S_noise
}


def balanced_labels(count: int, num_classes: int) -> torch.Tensor:
    """0, 1, ..., num_classes - 1 cycled over ``count`` images: the labels a class-conditional
    model draws for when none are given (as the sample stage draws the FID's images)."""
    return torch.arange(count) % num_classes


def _check_settings(given: dict[str, Any], where: str) -> None:
    unknown = sorted(set(given) - set(DEFAULT_SAMPLER))
    if unknown:
        raise ValueError(f"{where}: unknown {', '.join(unknown)}; allowed {', '.join(DEFAULT_SAMPLER)}")


class PackagedDiffusion(nn.Module):
    """A denoiser plus everything needed to sample from it.

    ``model_spec``: ``create_model`` arguments (name, in_channels, image_size,
    learn_sigma, num_classes, overrides) and, for a text-conditional model, ``text_encoder``:
    the encoder's :meth:`~diffusion.models.text.TextEncoder.spec`. ``process``: the diffusion section of
    params.yaml (process, schedule, timesteps, zero_terminal_snr, prediction, variance, loss,
    sigma_data; :func:`~diffusion.process.factory.make_diffusion`: a file without
    ``process``, written before there were others, holds the discrete chain ``ddpm``).
    ``sampling``: what ``forward`` samples with, the keys of :data:`DEFAULT_SAMPLER`
    (sampler, steps, schedule, timesteps, eta, clip_denoised, threshold, guidance_scale,
    guidance_interval, precision; ``timesteps``: a fitted schedule's times, which a
    registered model carries); those not given keep their default. ``autoencoder``:
    for a latent model, ``{"config": KLAutoencoder arguments, "scale_factor": float}``
    (and ``decoder``, its network; by default a fresh one to load weights into).
    """

    def __init__(
        self,
        model_spec: dict[str, Any],
        process: dict[str, Any],
        net: nn.Module | None = None,
        sampling: dict[str, Any] | None = None,
        autoencoder: dict[str, Any] | None = None,
        decoder: KLAutoencoder | None = None,
    ):
        super().__init__()
        _check_settings(sampling or {}, "sampling")
        self.model_spec = dict(model_spec)
        self.process = dict(process)
        # Latents are not bounded: a latent model's default is to sample unclipped.
        unclipped = {"clip_denoised": False} if autoencoder is not None else {}
        self.sampling = {**DEFAULT_SAMPLER, **unclipped, **(sampling or {})}
        spec = dict(model_spec)
        text = spec.pop("text_encoder", None)
        self.net = net if net is not None else create_model(
            spec.pop("name"), **spec.pop("overrides", {}), **spec,
            **({"text_encoder": build_text_encoder(**text)} if text else {}),
        )
        if text and net is None:  # the whole encoder, its defaults included, is what rebuilds it
            self.model_spec["text_encoder"] = self.net.text_encoder.spec()
        self.diffusion = make_diffusion(self.process)
        self.autoencoder, self.latent_scale = None, None
        if autoencoder is not None:
            self.autoencoder = decoder if decoder is not None else KLAutoencoder(**autoencoder["config"])
            self.autoencoder.requires_grad_(False).eval()
            self.latent_scale = float(autoencoder["scale_factor"])

    @property
    def autoencoder_spec(self) -> dict[str, Any] | None:
        """``{"config", "scale_factor"}`` of a latent model (what rebuilds its decoder), else None."""
        if self.autoencoder is None:
            return None
        return {"config": self.autoencoder.config, "scale_factor": self.latent_scale}

    @property
    def conditioning(self) -> str:
        """``none``, ``class`` (labels [N] condition it) or ``text`` (token ids [N, L] of captions)."""
        if self.model_spec.get("text_encoder"):
            return "text"
        return "class" if self.model_spec.get("num_classes") else "none"

    @property
    def null_condition(self) -> int | torch.Tensor | None:
        """The condition of classifier-free guidance's unconditional pass
        (:func:`~diffusion.models.layers.null_condition`), None for an unconditional model."""
        return None if self.conditioning == "none" else null_condition(self.net)

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """The condition of a text-conditional model for ``prompts``: token ids [N, L]."""
        if self.conditioning != "text":
            raise ValueError(f"prompts: this model is conditioned on {self.conditioning}, not text; leave the prompts out")
        return self.net.text_encoder.tokenize(prompts)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """The shape of what the network denoises: an image, or a latent."""
        return (self.model_spec["in_channels"], self.model_spec["image_size"], self.model_spec["image_size"])

    @property
    def output_shape(self) -> tuple[int, int, int]:
        """The shape of a sample: an image (decoded, for a latent model)."""
        if self.autoencoder is None:
            return self.image_shape
        factor = self.autoencoder.downsampling_factor
        channels, size = self.autoencoder.config["in_channels"], self.model_spec["image_size"] * factor
        return (channels, size, size)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] of scaled latents: ``D(z / scale_factor)``, clamped."""
        return self.autoencoder.decode(latents / self.latent_scale).clamp(-1, 1)

    def forward(self, noise: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """x_T -> x_0 in [-1, 1] with :attr:`sampling`; a class-conditional model draws image k
        for ``labels[k]``, by default :func:`balanced_labels` (as the sample stage draws the
        FID's images unless ``sample.labels`` says otherwise); a text-conditional one for the token
        ids ``labels`` [N, L] of its prompts (:meth:`tokenize`), which it needs."""
        if self.conditioning == "text" and labels is None:
            raise ValueError("labels: a text-conditional model draws for prompts: give their token ids, model.tokenize(prompts)")
        num_classes = self.model_spec.get("num_classes")
        if num_classes and labels is None:
            labels = balanced_labels(noise.shape[0], num_classes)
        return self.sample(noise.shape[0], noise=noise, labels=labels, device=noise.device)

    @torch.no_grad()
    def sample(
        self,
        num_samples: int,
        *,
        labels: torch.Tensor | None = None,
        classifier: Classifier | None = None,
        classifier_scale: float = 0.0,
        seed: int | None = None,
        first_index: int = 0,
        noise: torch.Tensor | None = None,
        device: str | torch.device = "cpu",
        progress: bool = False,
        **settings: Any,
    ) -> torch.Tensor:
        """Samples in [-1, 1], shape [num_samples, C, H, W]: with ``seed``, images
        ``first_index, ..., first_index + num_samples - 1`` of that seed, each from its own
        generator, so a run split into batches gives the same images (see
        :func:`diffusion.sampling.sample.sample`).

        ``settings``: keys of :data:`DEFAULT_SAMPLER` (sampler, steps, schedule, eta,
        clip_denoised, threshold, guidance_scale, guidance_interval, precision); each one not
        given is the model's own, :attr:`sampling`, what ``forward`` samples with.
        ``labels``: the condition of each image, class labels [N] or a text model's token ids [N, L]
        (:meth:`tokenize`). ``guidance_scale`` != 1 guides a conditional model towards ``labels``
        (classifier-free), ``classifier`` at ``classifier_scale`` adds classifier guidance
        (:mod:`diffusion.sampling.guidance`). A latent model samples latents, unclipped, and
        returns them decoded."""
        _check_settings(settings, "sample")
        settings = {**self.sampling, **settings}
        if why := options_refused(settings["sampler"], {k: settings[k] for k in CHURN_OPTIONS}, self.diffusion.process.name):
            raise ValueError(why)
        clip_denoised, threshold = settings["clip_denoised"], settings["threshold"]
        if self.autoencoder is not None and (clip_denoised or threshold is not None):
            raise ValueError(
                "clip_denoised and threshold clip pixels in [-1, 1]; a latent model samples latents: "
                "use clip_denoised=False and threshold=None"
            )
        wrap = guidance(
            scale=settings["guidance_scale"],
            null_condition=self.null_condition,
            interval=settings["guidance_interval"],
            classifier=classifier,
            classifier_scale=classifier_scale,
        )
        was_training = self.net.training
        self.net.eval()
        try:
            samples = run_sampler(
                self.diffusion,
                self.net,
                (num_samples, *self.image_shape),
                sampler=settings["sampler"],
                steps=settings["steps"],
                schedule=settings["schedule"],
                timesteps=settings["timesteps"] if settings["schedule"] == FITTED else None,
                eta=settings["eta"],
                labels=labels,
                guidance=wrap,
                clip_denoised=clip_denoised,
                threshold=threshold,
                seed=seed,
                first_index=first_index,
                device=device,
                noise=noise,
                progress=progress,
                precision=settings["precision"],
                **{key: settings[key] for key in SAMPLER_SPECS[settings["sampler"]].options},
            )
        finally:
            self.net.train(was_training)
        return samples if self.autoencoder is None else self.decode(samples)

    def save(self, path: str | Path) -> Path:
        """Write the weights, both configs and the sampling settings atomically (no pickled code)."""
        state = {
            "model_spec": self.model_spec,
            "process": self.process,
            "sampling": self.sampling,
            "state_dict": self.net.state_dict(),
        }
        if self.autoencoder is not None:
            state["autoencoder"] = self.autoencoder_spec
            state["autoencoder_state_dict"] = self.autoencoder.state_dict()
        return save_checkpoint(path, state)

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu") -> PackagedDiffusion:
        """Read a file of :meth:`save` (weights only, no code); a file written before
        ``sampling`` existed gets :data:`DEFAULT_SAMPLER`."""
        state = load_checkpoint(path)
        try:
            packaged = cls(
                state["model_spec"], state["process"], sampling=state.get("sampling"), autoencoder=state.get("autoencoder"),
            )
            packaged.net.load_state_dict(state["state_dict"])
            if packaged.autoencoder is not None:
                packaged.autoencoder.load_state_dict(state["autoencoder_state_dict"])
        except KeyError as err:
            raise CheckpointError(
                f"{path}: not a model file (no key {err}): give the models/model.pt that train writes, "
                "not a training checkpoint"
            ) from None
        return packaged.to(map_location).eval()


def save_autoencoder(path: str | Path, autoencoder: KLAutoencoder, **info: Any) -> Path:
    """``models/vae.pt``: the autoencoder's arguments and weights (no code), plus ``info``
    (plain data: where it came from, its held-out error)."""
    return save_checkpoint(path, {"config": autoencoder.config, "state_dict": autoencoder.state_dict(), "info": info})


def load_autoencoder(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[KLAutoencoder, dict[str, Any]]:
    """The frozen autoencoder of :func:`save_autoencoder` and its ``info``; one line for another file."""
    state = load_checkpoint(path)
    if not {"config", "state_dict", "info"} <= state.keys():
        raise CheckpointError(f"{path}: not an autoencoder file (train_vae writes one): run `dvc repro train_vae`")
    autoencoder = KLAutoencoder(**state["config"])
    autoencoder.load_state_dict(state["state_dict"])
    return autoencoder.requires_grad_(False).eval().to(map_location), state["info"]
