"""A tiny text-conditional U-Net learns its captions, and guided samples follow the prompt.

The toy set: a "one" (a vertical bar) and a "zero" (a ring), each drawn thin and thick, four
images captioned "a thin one", "a thick zero", ... A U-Net with cross-attention at 8 x 8 and a
char-transformer learned with it is trained on them with caption dropout (``train.p_uncond``),
then sampled with classifier-free guidance against the empty caption. What the prompt asks is
measured on the samples with the functions that caption the real data
(:func:`diffusion.data.captions.measure_attributes`): "thick" prompts draw strokes thicker than
"thin" prompts by more than half the drawn difference, and each sample is the named digit (a
ring leaves its centre empty, a bar inks it). The two words differ in a few characters only, so
the network must read the caption, not its length.
"""

from __future__ import annotations

import pytest
import torch

from conftest import section
from diffusion.data.captions import REFERENCE_SIDE, measure_attributes
from diffusion.packaged import PackagedDiffusion
from diffusion.training.loop import train

pytestmark = pytest.mark.usefixtures("single_thread")

SIZE = 16
SPEC = {
    "name": "unet-tiny", "in_channels": 1, "image_size": SIZE, "learn_sigma": False, "num_classes": None,
    "overrides": {"base_channels": 16, "attention_resolutions": [8], "head_channels": 16},
    "text_encoder": {"name": "char-transformer", "width": 32, "depth": 1, "heads": 2, "max_length": 16},
}
PROCESS = {"schedule": "cosine", "timesteps": 100, "prediction": "v", "variance": "fixed_small", "loss": "mse"}
THIN, THICK = 2.0, 4.0  # drawn stroke widths, pixels of the 16-pixel images
PROMPTS = ["a thin one", "a thick one", "a thin zero", "a thick zero"]


def _grid() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.meshgrid(torch.arange(SIZE) + 0.5 - SIZE / 2, torch.arange(SIZE) + 0.5 - SIZE / 2, indexing="ij")


def _one(width: float) -> torch.Tensor:
    y, x = _grid()
    return (x.abs() < width / 2) & (y.abs() < 5.5)


def _zero(width: float) -> torch.Tensor:
    y, x = _grid()
    return ((x / 6) ** 2 + (y / 7) ** 2 <= 1) & ((x / (6 - width)) ** 2 + (y / (7 - width)) ** 2 > 1)


def _toy_set() -> torch.Tensor:
    drawn = [_one(THIN), _one(THICK), _zero(THIN), _zero(THICK)]  # in PROMPTS' order
    return (torch.stack(drawn)[:, None].to(torch.uint8) * 255)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> PackagedDiffusion:
    torch.manual_seed(0)
    packaged = PackagedDiffusion(SPEC, PROCESS)
    images = _toy_set().repeat(8, 1, 1, 1)
    captions = packaged.tokenize(PROMPTS * 8)
    cfg = section(
        "train", steps=250, batch_size=16, lr=3e-3, warmup_steps=20, log_every=50, checkpoint_every=250, device="cpu",
        precision="fp32", bpd_images=0, val_images=0, eval_images=0, ema_lengths=[], p_uncond=0.2, ema_decay=0.99,
    )
    result = train(packaged.net, packaged.diffusion, images, captions, cfg, checkpoint_dir=tmp_path_factory.mktemp("text"),
                   conditional=True, progress=False)
    return PackagedDiffusion(SPEC, PROCESS, net=result.ema_model).eval()


def test_guided_samples_follow_the_asked_thickness_and_digit(model):
    per_prompt = 8
    prompts = [prompt for prompt in PROMPTS for _ in range(per_prompt)]
    samples = model.sample(len(prompts), labels=model.tokenize(prompts), sampler="ddim", steps=20, guidance_scale=3.0,
                           seed=0)
    images = ((samples.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    thickness = measure_attributes(images)["thickness"].reshape(len(PROMPTS), per_prompt) * SIZE / REFERENCE_SIDE
    thin = torch.cat([thickness[0], thickness[2]]).mean()
    thick = torch.cat([thickness[1], thickness[3]]).mean()
    assert thick - thin > (THICK - THIN) / 2, (thin, thick)
    centre = images[:, 0, SIZE // 2 - 1 : SIZE // 2 + 1, SIZE // 2 - 1 : SIZE // 2 + 1].float().mean(dim=(1, 2)) > 127
    drew_a_one = centre.reshape(len(PROMPTS), per_prompt)
    assert drew_a_one[:2].float().mean() >= 0.9 and (~drew_a_one[2:]).float().mean() >= 0.9


def test_the_empty_caption_is_the_unconditional_pass(model):
    """Guidance scale 0 is the unconditional model: the same images as the empty caption at scale 1."""
    tokens = model.tokenize(["a thick zero"] * 2)
    unconditional = model.sample(2, labels=tokens, sampler="ddim", steps=3, guidance_scale=0.0, seed=1)
    empty = model.sample(2, labels=model.tokenize(["", ""]), sampler="ddim", steps=3, guidance_scale=1.0, seed=1)
    assert torch.equal(unconditional, empty)
    assert not torch.equal(unconditional, model.sample(2, labels=tokens, sampler="ddim", steps=3, guidance_scale=1.0, seed=1))


PROCESS_SAMPLERS = [
    ({"process": "ddpm", "schedule": "cosine", "timesteps": 100, "prediction": "v"}, "ddpm", "linspace"),
    ({"process": "vp", "schedule": "linear", "prediction": "eps"}, "dpm++2m", "log-snr"),
    ({"process": "edm", "prediction": "x0"}, "heun", "karras"),
    ({"process": "flow", "prediction": "velocity"}, "euler", "linspace"),
]


@pytest.mark.parametrize(("process", "sampler", "schedule"), PROCESS_SAMPLERS, ids=[p[0]["process"] for p in PROCESS_SAMPLERS])
def test_the_empty_caption_is_the_null_condition_on_every_process_and_sampler(process, sampler, schedule):
    """An untrained text model (its layers moved off zero) on each process: guidance scale 0 draws
    the empty caption's images, 1 the prompt's, and 2 neither of them."""
    from tiny_unet import perturb

    torch.manual_seed(0)
    spec = {**SPEC, "overrides": {**SPEC["overrides"], "base_channels": 8}}
    model = PackagedDiffusion(spec, {"variance": "fixed_small", "loss": "mse", "schedule": None, **process})
    perturb(model.net)
    tokens = model.tokenize(["a thick zero"] * 2)
    draw = dict(sampler=sampler, steps=3, schedule=schedule, clip_denoised=False, seed=2)
    unconditional = model.sample(2, labels=tokens, guidance_scale=0.0, **draw)
    assert torch.equal(unconditional, model.sample(2, labels=model.tokenize(["", ""]), guidance_scale=1.0, **draw))
    conditional = model.sample(2, labels=tokens, guidance_scale=1.0, **draw)
    guided = model.sample(2, labels=tokens, guidance_scale=2.0, **draw)
    assert (conditional - unconditional).abs().max() > 1e-3
    assert (guided - conditional).abs().max() > 1e-3 and (guided - unconditional).abs().max() > 1e-3
