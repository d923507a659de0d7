"""Named network configs as plain data (no torch): ``model.name`` in params.yaml is a key.

:mod:`diffusion.models.table` builds networks from these; :mod:`diffusion.config` reads them
to reject an unknown name or override, or an image size the network cannot
down-sample, before any work starts. ``attention_resolutions=None``: attention at
the lowest resolution only (and in the middle block).
"""

from collections.abc import Callable
from typing import Any

UNET_CONFIGS: dict[str, dict] = {
    # Tests and smoke runs: ~50k parameters, any image size divisible by 2.
    "unet-tiny": dict(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=None),
    # The CPU default for 28-32 px (MNIST-like): 28 -> 14 -> 7, attention at 7, ~1.2M parameters.
    # One block a level: 1.6x the img/s of two for about the same loss per step (BENCHMARKS.md).
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


# UNet constructor arguments params.yaml may override (model.overrides), each with the
# check of its type and range; the rest come from the data and the process.
# tests/test_unet.py checks the names against the signature.
OVERRIDABLE: dict[str, Callable[[Any], Any]] = {
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


def check_override(key: str, value: Any) -> Any:
    """``value`` as the constructor takes it; ValueError (one line) naming the key and what is allowed."""
    if key not in OVERRIDABLE:
        raise ValueError(f"model.overrides: unknown key '{key}'; allowed: {', '.join(OVERRIDABLE)}")
    try:
        return OVERRIDABLE[key](value)
    except ValueError as err:
        raise ValueError(f"model.overrides.{key}: {err} (got {value!r})") from None


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


def resolved_unet(name: str, overrides: dict) -> dict:
    """The named config with ``overrides`` applied (each checked by :func:`check_override`)."""
    return UNET_CONFIGS[name] | {key: check_override(key, value) for key, value in overrides.items()}
