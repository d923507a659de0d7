"""Named network configs as plain data (no torch): ``model.name`` in params.yaml is a key.

:mod:`diffusion.models` builds networks from these; :mod:`diffusion.config` reads them
to reject an unknown name or override, or an image size the network cannot
down-sample, before any work starts. ``attention_resolutions=None``: attention at
the lowest resolution only (and in the middle block).
"""

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

# UNet constructor arguments params.yaml may override (model.overrides); the rest come
# from the data and the process. tests/test_unet.py checks this against the signature.
OVERRIDABLE = (
    "base_channels", "channel_mult", "num_res_blocks", "attention_resolutions", "num_heads",
    "head_channels", "dropout", "resblock_updown", "use_scale_shift_norm", "rescale_skip",
)


def downsampling_factor(name: str, overrides: dict) -> int:
    """How much the named network (with ``overrides``) shrinks an image: 2^(levels - 1)."""
    channel_mult = overrides.get("channel_mult", UNET_CONFIGS[name]["channel_mult"])
    return 2 ** (len(channel_mult) - 1)
