"""Denoising networks by name: ``model.name`` in params.yaml is a key of :data:`MODELS`.

A name belongs to a family (:data:`~diffusion.models.configs.FAMILIES`), whose constructor
:data:`CONSTRUCTORS` holds; the name's config (one line in ``configs.py``) is that
constructor's arguments, updated with the caller's (``model.overrides``, checked by the
family's rules). :func:`create_model` is the one entry point the training and packaging code use.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from torch import nn

from diffusion.models.configs import FAMILIES, FAMILY_OF, check_override, family
from diffusion.models.diffit import DiffiT, LatentDiffiT
from diffusion.models.dit import DiT
from diffusion.models.unet import UNet

if TYPE_CHECKING:
    from diffusion.models.text import TextEncoder

__all__ = ["CONSTRUCTORS", "MODELS", "create_model"]

CONSTRUCTORS: dict[str, type[nn.Module]] = {"unet": UNet, "dit": DiT, "diffit": DiffiT, "latent-diffit": LatentDiffiT}

MODELS: dict[str, Callable[..., nn.Module]] = {
    name: partial(CONSTRUCTORS[FAMILY_OF[name]], **config) for f in FAMILIES.values() for name, config in f.configs.items()
}


def create_model(
    name: str,
    *,
    in_channels: int,
    image_size: int,
    learn_sigma: bool = False,
    num_classes: int | None = None,
    text_encoder: TextEncoder | None = None,
    **overrides: Any,
) -> nn.Module:
    """The network ``MODELS[name]`` for ``in_channels`` x ``image_size``^2 images.

    ``learn_sigma``: 2 * in_channels outputs, eps and the variance interpolation v
    (Nichol & Dhariwal 2021, eq. 15). ``num_classes``: class-conditional with a null class;
    ``text_encoder``: conditioned on captions instead, the encoder part of the network.
    """
    family(name)  # an unknown name: one line listing the names
    overrides = {key: check_override(name, key, value) for key, value in overrides.items()}
    out_channels = 2 * in_channels if learn_sigma else in_channels
    return MODELS[name](
        in_channels=in_channels, out_channels=out_channels, image_size=image_size, num_classes=num_classes,
        text_encoder=text_encoder, **overrides,
    )
