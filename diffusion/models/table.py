"""Denoising networks by name: ``model.name`` in params.yaml is a key of :data:`MODELS`.

Each entry builds a :class:`~diffusion.models.unet.UNet` from its own defaults
updated with the caller's keyword arguments, so any constructor argument can be
overridden from params.yaml (``model.overrides``). :func:`create_model` is the one
entry point the training and packaging code use.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from diffusion.models.configs import OVERRIDABLE, UNET_CONFIGS, check_override
from diffusion.models.unet import UNet

__all__ = ["MODELS", "OVERRIDABLE", "UNet", "create_model"]


def _unet(**defaults: Any) -> Callable[..., UNet]:
    """A named config: ``UNet(**(defaults | kwargs))``."""

    def build(**kwargs: Any) -> UNet:
        return UNet(**(defaults | kwargs))

    return build


# ---------------------------------------------------------------- named configs

MODELS: dict[str, Callable[..., nn.Module]] = {name: _unet(**config) for name, config in UNET_CONFIGS.items()}


def create_model(
    name: str,
    *,
    in_channels: int,
    image_size: int,
    learn_sigma: bool = False,
    num_classes: int | None = None,
    **overrides: Any,
) -> nn.Module:
    """The network ``MODELS[name]`` for ``in_channels`` x ``image_size``^2 images.

    ``learn_sigma``: 2 * in_channels outputs, eps and the variance interpolation v
    (Nichol & Dhariwal 2021, eq. 15). ``num_classes``: class-conditional with a null class.
    """
    if name not in MODELS:
        raise ValueError(f"model name: unknown '{name}'; allowed: {', '.join(MODELS)}")
    overrides = {key: check_override(key, value) for key, value in overrides.items()}
    out_channels = 2 * in_channels if learn_sigma else in_channels
    return MODELS[name](
        in_channels=in_channels, out_channels=out_channels, image_size=image_size, num_classes=num_classes, **overrides
    )
