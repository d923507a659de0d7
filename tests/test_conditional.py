"""Class-conditional training and classifier-free guidance end to end, on a real tiny U-Net.

Training with ``train.p_uncond`` drops labels to the U-Net's null class, so that class's
embedding is trained (and left alone without dropout). The trained model's samples
follow their labels, and the guidance scale does what its convention says
(:mod:`diffusion.sampling.guidance`): 1 is the conditional model alone, 0 the
unconditional (null-label) one, and w mixes the two predictions linearly.
"""

from __future__ import annotations

import pytest
import torch

from conftest import section
from diffusion.packaged import PackagedDiffusion
from diffusion.training.loop import train

pytestmark = pytest.mark.usefixtures("single_thread")

CLASSES = 3
SPEC = {"name": "unet-tiny", "in_channels": 1, "image_size": 8, "learn_sigma": False, "num_classes": CLASSES, "overrides": {}}
PROCESS = {"schedule": "cosine", "timesteps": 20, "prediction": "eps", "variance": "fixed_small", "loss": "mse"}


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    """48 images whose class sets their brightness (class c: about 40 + 80 c), so labels matter."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(48) % CLASSES
    images = (40 + 80 * labels[:, None, None, None] + torch.randint(-20, 21, (48, 1, 8, 8), generator=g)).to(torch.uint8)
    return images, labels


def _train(tmp_path, p_uncond: float) -> tuple[torch.nn.Module, torch.Tensor, PackagedDiffusion]:
    """(trained network, its null-class embedding before training, the EMA model packaged)."""
    torch.manual_seed(0)
    packaged = PackagedDiffusion(SPEC, PROCESS)
    net = packaged.net
    null_before = net.label_embed.weight[CLASSES].detach().clone()
    cfg = section(
        "train", steps=12, batch_size=16, lr=2e-3, warmup_steps=2, log_every=4, checkpoint_every=12,
        device="cpu", precision="fp32", bpd_images=0, p_uncond=p_uncond,
    )
    images, labels = _data()
    result = train(net, packaged.diffusion, images, labels, cfg, checkpoint_dir=tmp_path / f"p{p_uncond}",
                   conditional=True, progress=False)
    return net, null_before, PackagedDiffusion(SPEC, PROCESS, net=result.ema_model)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("conditional"), p_uncond=0.5)


def test_label_dropout_trains_the_null_class(trained, tmp_path):
    net, null_before, _ = trained
    assert not torch.equal(net.label_embed.weight[CLASSES], null_before)  # dropped labels reached it
    undropped, untouched, _ = _train(tmp_path, p_uncond=0.0)
    assert torch.equal(undropped.label_embed.weight[CLASSES], untouched)  # no dropout: never used
    assert not torch.equal(undropped.label_embed.weight[0], net.label_embed.weight[0])


def test_samples_follow_the_label_and_the_guidance_scale(trained):
    _, _, model = trained
    settings = {"sampler": "ddim", "steps": 1, "clip_denoised": False, "seed": 3}

    def draw(label: int, scale: float) -> torch.Tensor:
        return model.sample(4, labels=torch.full((4,), label), guidance_scale=scale, **settings)

    conditional = draw(1, 1.0)
    assert not torch.equal(conditional, draw(0, 1.0))  # the label changes the image
    assert torch.equal(conditional, model.sample(4, labels=torch.full((4,), 1), **settings))  # w = 1: no guidance
    unconditional = draw(1, 0.0)
    assert torch.equal(unconditional, draw(CLASSES, 1.0))  # w = 0: the null-label pass, exactly
    assert not torch.equal(unconditional, conditional)
    # One DDIM step to t = 0 returns the guided x̂_0 = x̂_0,u + w (x̂_0,c - x̂_0,u): linear in w.
    guided = draw(1, 3.0)
    torch.testing.assert_close(guided, unconditional + 3.0 * (conditional - unconditional), atol=1e-5, rtol=1e-5)
    assert (guided - conditional).abs().max() > 1e-3
