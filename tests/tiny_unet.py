"""A small untrained U-Net whose output depends on its input, the same in every run:
``perturb`` moves every weight off its initial value, so the zero-initialised output
layers no longer make a fresh network predict exactly 0."""

import torch

from diffusion.models.factory import create_model


@torch.no_grad()
def perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Move every weight off its initial value (the zero-initialised layers included)."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def tiny_unet(*, in_channels: int = 1, image_size: int = 8, seed: int = 0, **kwargs) -> torch.nn.Module:
    """``unet-tiny`` initialised from ``seed`` (torch's global RNG left as it was), perturbed, in eval mode."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = create_model("unet-tiny", in_channels=in_channels, image_size=image_size, **kwargs)
    return perturb(net, seed).eval()
