"""Named network configs as plain data (no torch): ``model.name`` in params.yaml is a key.

Networks come in families (:data:`FAMILIES`): the U-Net, DiT, image-space DiffiT and latent
DiffiT. Each family declares its named configs (one line each: the constructor's arguments,
as DiT's ``DiT_models`` table), the constructor arguments params.yaml may override
(``model.overrides``, each with the check of its type and range) and its shape rule on the
image size. :mod:`diffusion.models.factory` builds the networks from these; :mod:`diffusion.config`
reads them to reject an unknown name or override, or an image size the network cannot take,
before any work starts.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# ---------------------------------------------------------------- the U-Net (diffusion/models/unet.py)

# ``attention_resolutions=None``: attention at the lowest resolution only (and in the middle block).
UNET_CONFIGS: dict[str, dict] = {
    # Tests and smoke runs: ~50k parameters, any image size divisible by 2.
    "unet-tiny": dict(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=None),
    # The CPU default for 28-32 px (MNIST-like): 28 -> 14 -> 7, attention at 7, ~1.2M parameters.
    # One block a level: faster than two for about the same loss per step (BENCHMARKS.md).
    "unet-small": dict(
        base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=None, head_channels=32
    ),
    # Ho et al. 2020 (DDPM), App. B, CIFAR-10: 35.7M parameters.
    "ddpm-cifar10": dict(
        base_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2, attention_resolutions=(16,),
        num_heads=1, dropout=0.1, use_scale_shift_norm=False, resblock_updown=False,
    ),
    # The same widths with ADM's improvements (Dhariwal & Nichol 2021, §3): AdaGN, BigGAN
    # up/down-sampling, attention at 16 and 8 with 64 channels a head.
    "adm-cifar10": dict(
        base_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2, attention_resolutions=(16, 8),
        head_channels=64, dropout=0.1, use_scale_shift_norm=True, resblock_updown=True,
    ),
}

# Noise-aware classifiers (diffusion/models/classifier.py): the U-Net's encoder half with
# attention pooling, so the same arguments and shape rules (check_unet) apply.
CLASSIFIER_CONFIGS: dict[str, dict] = {
    # Tests: ~24k parameters, any image size divisible by 2.
    "classifier-tiny": dict(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=None),
    # The default data (28-32 px): 28 -> 14 -> 7, attention and pooling at 7, ~0.56M parameters; BigGAN
    # down-sampling and AdaGN, as guided-diffusion's classifier_defaults.
    "classifier-small": dict(
        base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=None, head_channels=32,
        resblock_updown=True, use_scale_shift_norm=True,
    ),
}

def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError("needs an int >= 1")
    return value


def _levels(value: Any) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or not value:
        raise ValueError("needs a non-empty list of ints >= 1")
    try:
        return tuple(_positive_int(v) for v in value)
    except ValueError:
        raise ValueError("needs a non-empty list of ints >= 1") from None


def _optional(check: Callable[[Any], Any], what: str) -> Callable[[Any], Any]:
    def optional(value: Any) -> Any:
        if value is None:
            return None
        try:
            return check(value)
        except ValueError:
            raise ValueError(f"needs {what} or null") from None

    return optional


def _dropout(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError("needs a number in [0, 1)")
    return float(value)


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("needs true or false")
    return value


def _positive_float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:  # not nan, not inf
        raise ValueError("needs a finite number > 0")
    return float(value)


# Constructor arguments params.yaml may override (model.overrides), each with the check of
# its type and range; the rest come from the data and the process. tests/test_unet.py and
# tests/test_transformers.py check the names against each family's constructor.
UNET_OVERRIDABLE: dict[str, Callable[[Any], Any]] = {
    "base_channels": _positive_int,
    "channel_mult": _levels,
    "num_res_blocks": _positive_int,
    "attention_resolutions": _optional(_levels, "a non-empty list of ints >= 1"),
    "num_heads": _positive_int,
    "head_channels": _optional(_positive_int, "an int >= 1"),
    "dropout": _dropout,
    "resblock_updown": _flag,
    "use_scale_shift_norm": _flag,
    "rescale_skip": _flag,
}


def check_unet(
    image_size: int, *, base_channels: int = 128, channel_mult=(1, 2, 2, 2), attention_resolutions=(16,),
    num_heads: int = 1, head_channels: int | None = None, **_: Any,
) -> tuple[int, ...]:
    """The shape rules of a U-Net on ``image_size``^2 images, without torch; returns the
    resolutions that get attention. ValueError (one line) names the argument to change.
    The defaults are :class:`~diffusion.models.unet.UNet`'s (a test keeps them equal).

    * the image halves ``len(channel_mult) - 1`` times, so it must be divisible by 2^that;
    * attention goes only at feature-map sizes of the network (None: the lowest);
    * the heads split the channels of every attention block evenly (the middle block,
      at the lowest resolution, always has one).
    """
    divisor = 2 ** (len(channel_mult) - 1)
    if image_size % divisor:
        raise ValueError(
            f"data.image_size: {image_size} is not divisible by {divisor}, the down-sampling of "
            f"channel_mult {list(channel_mult)}; allowed multiples of {divisor} (or fewer channel_mult levels)"
        )
    resolutions = [image_size // 2**level for level in range(len(channel_mult))]
    attention = (resolutions[-1],) if attention_resolutions is None else tuple(attention_resolutions)
    unknown = sorted(set(attention) - set(resolutions))
    if unknown:
        raise ValueError(f"attention_resolutions: {unknown} are not feature-map sizes of this network; allowed: {resolutions}")
    for level, size in enumerate(resolutions):
        channels = base_channels * channel_mult[level]
        if (size in attention or size == resolutions[-1]) and channels % (head_channels or num_heads):
            bad = f"head_channels={head_channels}" if head_channels else f"num_heads={num_heads}"
            raise ValueError(f"{bad} does not divide the {channels} channels of an attention block; use a divisor of {channels}")
    return attention


# ---------------------------------------------------------------- DiT (diffusion/models/dit.py)

DIT_CONFIGS: dict[str, dict] = {
    # Tests: ~40k parameters, any even image size.
    "dit-tiny": dict(depth=2, hidden_size=32, patch_size=2, num_heads=2),
    # The default data (28 px): 14 x 14 tokens, ~1.3M parameters, about the U-Net's unet-small.
    "dit-cpu": dict(depth=4, hidden_size=128, patch_size=2, num_heads=4),
    # Peebles & Xie 2023, Table 1: S, B, L, XL, each with patches of 2, 4 and 8.
    "dit-s-2": dict(depth=12, hidden_size=384, patch_size=2, num_heads=6),
    "dit-s-4": dict(depth=12, hidden_size=384, patch_size=4, num_heads=6),
    "dit-s-8": dict(depth=12, hidden_size=384, patch_size=8, num_heads=6),
    "dit-b-2": dict(depth=12, hidden_size=768, patch_size=2, num_heads=12),
    "dit-b-4": dict(depth=12, hidden_size=768, patch_size=4, num_heads=12),
    "dit-b-8": dict(depth=12, hidden_size=768, patch_size=8, num_heads=12),
    "dit-l-2": dict(depth=24, hidden_size=1024, patch_size=2, num_heads=16),
    "dit-l-4": dict(depth=24, hidden_size=1024, patch_size=4, num_heads=16),
    "dit-l-8": dict(depth=24, hidden_size=1024, patch_size=8, num_heads=16),
    "dit-xl-2": dict(depth=28, hidden_size=1152, patch_size=2, num_heads=16),
    "dit-xl-4": dict(depth=28, hidden_size=1152, patch_size=4, num_heads=16),
    "dit-xl-8": dict(depth=28, hidden_size=1152, patch_size=8, num_heads=16),
}

def _one_of(*allowed: str) -> Callable[[Any], str]:
    def one_of(value: Any) -> str:
        if value not in allowed:
            raise ValueError(f"needs one of {', '.join(map(repr, allowed))}")
        return value

    return one_of


# The arguments of a ViT on patches, DiT's and latent DiffiT's alike.
PATCH_TRANSFORMER_OVERRIDABLE: dict[str, Callable[[Any], Any]] = {
    "depth": _positive_int,
    "hidden_size": _positive_int,
    "patch_size": _positive_int,
    "num_heads": _positive_int,
    "mlp_ratio": _positive_float,
}

# How a text-conditional DiT attends to the caption: "cross" (PixArt-alpha's cross-attention
# sub-layer) or "joint" (SD3's MMDiT: image and text tokens in one attention); latent DiffiT: "cross".
TEXT_ATTENTION = ("cross", "joint")
DIT_OVERRIDABLE = PATCH_TRANSFORMER_OVERRIDABLE | {"text_attention": _one_of(*TEXT_ATTENTION)}
LATENT_DIFFIT_OVERRIDABLE = PATCH_TRANSFORMER_OVERRIDABLE | {"text_attention": _one_of("cross")}


def check_patch_transformer(image_size: int, *, hidden_size: int, patch_size: int, num_heads: int, **_: Any) -> None:
    """The shape rules of a ViT on ``image_size``^2 images cut into ``patch_size``^2 patches:
    the patches tile the image, the heads split the width, and the width is divisible by 4
    (the 2-D sin-cos position embedding gives a quarter of it to each of sin and cos of rows
    and columns). ValueError (one line) names the argument to change."""
    if image_size % patch_size:
        raise ValueError(
            f"data.image_size: {image_size} is not divisible by patch_size {patch_size}; "
            f"allowed multiples of {patch_size} (or a patch size that divides {image_size})"
        )
    if hidden_size % num_heads:
        raise ValueError(f"num_heads={num_heads} does not divide hidden_size {hidden_size}; use a divisor of {hidden_size}")
    if hidden_size % 4:
        raise ValueError(f"hidden_size: {hidden_size} is not divisible by 4, as the 2-D sin-cos position embedding needs")


# ---------------------------------------------------------------- DiffiT (diffusion/models/diffit.py)

DIFFIT_CONFIGS: dict[str, dict] = {
    # Tests: any image size divisible by 4, windows of 2 x 2 tokens.
    "diffit-tiny": dict(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, num_heads=2, window_size=2),
    # The default data (28 px): 28 -> 14 -> 7, windows of 7 x 7 (16, 4 and 1 of them), about unet-small's size.
    "diffit-cpu": dict(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, num_heads=2, window_size=7),
    # The paper's CIFAR-10 network (Hatamizadeh et al. 2024, §3.2.1 and Fig. 2: four levels
    # 32 -> 4 of DiffiT ResBlocks with TMSA in local windows). The widths follow DDPM's
    # CIFAR-10 U-Net, as the image-space code is not published; BENCHMARKS.md has the count.
    "diffit-cifar10": dict(base_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2, num_heads=4, window_size=4),
}

DIFFIT_OVERRIDABLE: dict[str, Callable[[Any], Any]] = {
    "base_channels": _positive_int,
    "channel_mult": _levels,
    "num_res_blocks": _positive_int,
    "num_heads": _positive_int,
    "window_size": _positive_int,
    "mlp_ratio": _positive_float,
}


def check_diffit(
    image_size: int, *, base_channels: int, channel_mult: tuple[int, ...], num_heads: int, window_size: int, **_: Any
) -> list[int]:
    """The shape rules of image-space DiffiT on ``image_size``^2 images; returns the attention
    window of each level (``window_size``, or the whole map where that is smaller). The image
    halves ``len(channel_mult) - 1`` times, the heads split every level's width, and each
    level's window tiles its feature map. ValueError (one line) names the argument to change."""
    divisor = 2 ** (len(channel_mult) - 1)
    if image_size % divisor:
        raise ValueError(
            f"data.image_size: {image_size} is not divisible by {divisor}, the down-sampling of "
            f"channel_mult {list(channel_mult)}; allowed multiples of {divisor} (or fewer channel_mult levels)"
        )
    windows = []
    for level, mult in enumerate(channel_mult):
        size, channels = image_size // 2**level, base_channels * mult
        if channels % num_heads:
            raise ValueError(f"num_heads={num_heads} does not divide the {channels} channels of level {level}; use a divisor of {channels}")
        window = min(window_size, size)
        if size % window:
            raise ValueError(
                f"window_size: {window_size} does not tile the {size} x {size} feature map of level {level}; "
                f"use a divisor of {size}"
            )
        windows.append(window)
    return windows


LATENT_DIFFIT_CONFIGS: dict[str, dict] = {
    # Tests: ~50k parameters, any even image size.
    "latent-diffit-tiny": dict(depth=2, hidden_size=32, patch_size=2, num_heads=2),
    # The default data (28 px, or a latent of it): 14 x 14 tokens, ~1.1M parameters.
    "latent-diffit-cpu": dict(depth=4, hidden_size=128, patch_size=2, num_heads=4),
    # The paper's ImageNet-256 model on 32 x 32 x 4 SD-VAE latents (NVlabs/DiffiT ``Diffit``): 561M parameters.
    "latent-diffit-imagenet256": dict(depth=28, hidden_size=1152, patch_size=2, num_heads=16),
}


# ---------------------------------------------------------------- the autoencoder of latent diffusion (diffusion/models/vae.py)

# KLAutoencoder arguments (diffusers' AutoencoderKL layout): the image is down-sampled
# 2^(len(block_out_channels) - 1) times, to latent_channels channels.
VAE_CONFIGS: dict[str, dict] = {
    # Tests: f = 2, 2 latent channels, ~40k parameters.
    "vae-tiny": dict(latent_channels=2, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8),
    # The default data (28 px): f = 4, 7 x 7 x 4 latents.
    "vae-f4-cpu": dict(latent_channels=4, block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=32),
    # Rombach et al. 2022, Table 8 (KL-f4, z = 3) and Stable Diffusion's KL-f8 (z = 4).
    "kl-f4": dict(latent_channels=3, block_out_channels=(128, 256, 512), layers_per_block=2, norm_num_groups=32),
    "kl-f8": dict(latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32),
}


def latent_shape(image_size: int, *, latent_channels: int, block_out_channels, **_: Any) -> tuple[int, int]:
    """(channels, size) of the latents of ``image_size``^2 images; ValueError (one line) when
    the autoencoder's down-sampling does not divide the image size."""
    factor = 2 ** (len(block_out_channels) - 1)
    if image_size % factor:
        raise ValueError(
            f"data.image_size: {image_size} is not divisible by {factor}, the autoencoder's down-sampling; "
            f"allowed multiples of {factor}"
        )
    return latent_channels, image_size // factor


DIFFUSERS_AUTOENCODER = {
    # config.json key: the value our KLAutoencoder takes (absent keys get diffusers' default)
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "mid_block_add_attention": True,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
}


def diffusers_autoencoder_config(folder: str) -> dict[str, Any]:
    """:class:`~diffusion.models.vae.KLAutoencoder` arguments (in_channels included) of a
    diffusers ``AutoencoderKL`` folder (``save_pretrained``), read from its config.json
    alone; ValueError (one line) naming the file and the key it cannot take."""
    import json
    from pathlib import Path

    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ValueError(f"vae.pretrained: {path} not found; give a diffusers AutoencoderKL folder (config.json and weights)")
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"vae.pretrained: {path} is not JSON ({err.__class__.__name__})") from None
    for key, value in DIFFUSERS_AUTOENCODER.items():
        if config.get(key, value) != value:
            raise ValueError(f"vae.pretrained: {path}: {key} is {config[key]!r}; allowed: {value!r}")
    blocks = {"down_block_types": "DownEncoderBlock2D", "up_block_types": "UpDecoderBlock2D"}
    channels = config.get("block_out_channels")
    if not isinstance(channels, list) or not channels:
        raise ValueError(f"vae.pretrained: {path}: block_out_channels is {channels!r}; allowed: a list of ints")
    for key, block in blocks.items():
        if config.get(key) != [block] * len(channels):
            raise ValueError(f"vae.pretrained: {path}: {key} is {config.get(key)!r}; allowed: {block} for every level")
    if config.get("out_channels", 3) != config.get("in_channels", 3):
        raise ValueError(f"vae.pretrained: {path}: out_channels differs from in_channels; allowed: equal")
    return {
        "in_channels": config.get("in_channels", 3),
        "latent_channels": config.get("latent_channels", 4),
        "block_out_channels": tuple(channels),
        "layers_per_block": config.get("layers_per_block", 1),
        "norm_num_groups": config.get("norm_num_groups", 32),
    }


# ---------------------------------------------------------------- the families


@dataclass(frozen=True)
class Family:
    """One kind of network: its named configs, the constructor arguments params.yaml may
    override with the check of each, and its shape rule ``check_shape(image_size, **config)``
    (ValueError, one line, naming what to change)."""

    configs: dict[str, dict]
    overridable: dict[str, Callable[[Any], Any]]
    check_shape: Callable[..., Any]


FAMILIES: dict[str, Family] = {
    "unet": Family(UNET_CONFIGS, UNET_OVERRIDABLE, check_unet),
    "dit": Family(DIT_CONFIGS, DIT_OVERRIDABLE, check_patch_transformer),
    "diffit": Family(DIFFIT_CONFIGS, DIFFIT_OVERRIDABLE, check_diffit),
    "latent-diffit": Family(LATENT_DIFFIT_CONFIGS, LATENT_DIFFIT_OVERRIDABLE, check_patch_transformer),
}

# model.name -> its family's name.
FAMILY_OF: dict[str, str] = {name: family for family, f in FAMILIES.items() for name in f.configs}


def family(name: str) -> Family:
    """The family of config ``name``; ValueError (one line) listing the names for an unknown one."""
    if name not in FAMILY_OF:
        raise ValueError(f"model.name: unknown '{name}'; allowed: {', '.join(FAMILY_OF)}")
    return FAMILIES[FAMILY_OF[name]]


def check_override(name: str, key: str, value: Any) -> Any:
    """``value`` as the constructor of ``name`` takes it; ValueError (one line) naming the key
    and what is allowed."""
    allowed = family(name).overridable
    if key not in allowed:
        raise ValueError(
            f"model.overrides: unknown key '{key}' for {name} (a {FAMILY_OF[name]}); allowed: {', '.join(allowed)}"
        )
    try:
        return allowed[key](value)
    except ValueError as err:
        raise ValueError(f"model.overrides.{key}: {err} (got {value!r})") from None


def resolved(name: str, overrides: dict) -> dict:
    """The config ``name`` with ``overrides`` applied (each checked by :func:`check_override`)."""
    return family(name).configs[name] | {key: check_override(name, key, value) for key, value in overrides.items()}


def check_model(name: str, image_size: int, overrides: dict) -> None:
    """The named network exists, its overrides are constructor arguments of the right type and
    range, and its shape fits ``image_size``^2 images (ValueError, one line)."""
    family(name).check_shape(image_size, **resolved(name, overrides))
