"""The ADM U-Net (diffusion/models/unet.py) and the named configs (diffusion/models/factory.py)."""

import inspect
import subprocess
import sys

import pytest
import torch
from tiny_unet import perturb

from diffusion.models.configs import UNET_CONFIGS, UNET_OVERRIDABLE
from diffusion.models.factory import UNet, create_model

pytestmark = pytest.mark.usefixtures("single_thread")


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def inputs(batch: int, channels: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, size, size, generator=gen), torch.randint(0, 1000, (batch,), generator=gen)


# ---------------------------------------------------------------- shapes and conditioning


@pytest.mark.parametrize("image_size", [8, 16, 28])
@pytest.mark.parametrize("learn_sigma", [False, True])
@pytest.mark.parametrize("num_classes", [None, 10])
def test_output_shape(image_size, learn_sigma, num_classes):
    model = create_model("unet-tiny", in_channels=3, image_size=image_size, learn_sigma=learn_sigma, num_classes=num_classes)
    x, t = inputs(2, 3, image_size)
    y = None if num_classes is None else torch.tensor([0, 9])
    out = model(x, t, y)
    assert out.shape == (2, 6 if learn_sigma else 3, image_size, image_size)
    assert out.dtype == torch.float32


@pytest.mark.parametrize(
    "overrides",
    [
        {"resblock_updown": True, "rescale_skip": True},
        {"use_scale_shift_norm": False, "dropout": 0.1},
        {"channel_mult": [1, 2, 2], "num_res_blocks": 2, "attention_resolutions": [8, 4], "head_channels": 4},
    ],
)
def test_variants_shape_and_gradients(overrides):
    model = perturb(create_model("unet-tiny", in_channels=1, image_size=16, **overrides))
    x, t = inputs(2, 1, 16)
    out = model(x, t)
    assert out.shape == (2, 1, 16, 16)
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_null_class_and_labels_change_the_output():
    model = perturb(create_model("unet-tiny", in_channels=1, image_size=8, num_classes=10)).eval()
    x, t = inputs(3, 1, 8)
    null = model(x, t, torch.full((3,), 10))
    assert torch.equal(model(x, t), null)  # y=None is the null class, index num_classes
    a, b = model(x, t, torch.tensor([1, 2, 3])), model(x, t, torch.tensor([4, 5, 6]))
    assert (a - b).abs().amax() > 1e-3
    assert (a - null).abs().amax() > 1e-3


def test_labels_on_an_unconditional_model_are_an_error():
    model = create_model("unet-tiny", in_channels=1, image_size=8)
    x, t = inputs(2, 1, 8)
    with pytest.raises(ValueError, match="^y: class labels given to a model built without num_classes$"):
        model(x, t, torch.tensor([0, 1]))


def test_float_and_long_timesteps_agree():
    model = perturb(create_model("unet-tiny", in_channels=1, image_size=8)).eval()
    x, t = inputs(2, 1, 8)
    torch.testing.assert_close(model(x, t), model(x, t.float()))
    assert (model(x, t) - model(x, t + 100)).abs().amax() > 1e-4


@pytest.mark.parametrize("name,size", [("unet-tiny", 16), ("unet-small", 28)])
def test_channels_last_matches_contiguous(name, size):
    model = perturb(create_model(name, in_channels=3, image_size=size)).eval()
    x, t = inputs(2, 3, size)
    expected = model(x, t)
    model_cl = model.to(memory_format=torch.channels_last)
    out = model_cl(x.contiguous(memory_format=torch.channels_last), t)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


def test_bf16_autocast_forward_and_backward():
    model = perturb(create_model("unet-tiny", in_channels=1, image_size=8, num_classes=3))
    x, t = inputs(2, 1, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x.contiguous(memory_format=torch.channels_last), t, torch.tensor([0, 2]))
    assert out.shape == (2, 1, 8, 8)
    out.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


# ---------------------------------------------------------------- initialisation and sizes


@pytest.mark.parametrize("name,size", [("unet-tiny", 8), ("unet-small", 28)])
def test_fresh_model_predicts_exactly_zero(name, size):
    model = create_model(name, in_channels=1, image_size=size, learn_sigma=True, num_classes=10)
    x, t = inputs(4, 1, size)
    assert torch.equal(model(x, t), torch.zeros(4, 2, size, size))


def test_parameter_counts():
    counts = {
        "unet-tiny": n_params(create_model("unet-tiny", in_channels=1, image_size=28)),
        "unet-small": n_params(create_model("unet-small", in_channels=1, image_size=28)),
        "ddpm-cifar10": n_params(create_model("ddpm-cifar10", in_channels=3, image_size=32)),
        "adm-cifar10": n_params(create_model("adm-cifar10", in_channels=3, image_size=32)),
    }
    print(f"parameters: {counts}; DDPM paper CIFAR-10: 35.7M")
    assert counts["unet-tiny"] == 48_401
    assert counts["unet-small"] == 1_191_233
    assert abs(counts["ddpm-cifar10"] / 35.7e6 - 1) < 0.02
    assert counts["adm-cifar10"] == 44_173_827


# ---------------------------------------------------------------- learning


def test_tiny_model_overfits_one_batch():
    """eps-prediction on one fixed batch, fixed noise and timesteps: the loss falls 10x."""
    torch.manual_seed(0)
    model = create_model("unet-tiny", in_channels=1, image_size=16)
    gen = torch.Generator().manual_seed(1)
    x0 = torch.rand(8, 1, 16, 16, generator=gen) * 2 - 1
    noise = torch.randn(8, 1, 16, 16, generator=gen)
    t = torch.full((8,), 300)
    alpha_bar = 0.5
    x_t = alpha_bar**0.5 * x0 + (1 - alpha_bar) ** 0.5 * noise
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(100):
        loss = (model(x_t, t) - noise).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    print(f"overfit loss: first {losses[0]:.4f}, last {losses[-1]:.5f} ({losses[0] / losses[-1]:.0f}x)")
    assert losses[-1] < losses[0] / 10


# ---------------------------------------------------------------- errors and imports


def test_bad_image_size_is_a_one_line_error():
    with pytest.raises(ValueError) as info:
        create_model("unet-small", in_channels=1, image_size=30)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("data.image_size: 30 is not divisible by 4, the down-sampling of channel_mult [1, 2, 2]")


def test_attention_at_a_missing_resolution_is_an_error():
    with pytest.raises(ValueError, match=r"attention_resolutions: \[7\] .* allowed: \[32, 16, 8\]"):
        create_model("unet-small", in_channels=1, image_size=32, attention_resolutions=[7])


def test_unknown_name_and_override_are_errors():
    with pytest.raises(ValueError, match="unknown 'unet-huge'; allowed: unet-tiny, unet-small, ddpm-cifar10"):
        create_model("unet-huge", in_channels=1, image_size=28)
    with pytest.raises(ValueError, match=r"unknown key 'depth' for unet-small \(a unet\); allowed: base_channels, channel_mult"):
        create_model("unet-small", in_channels=1, image_size=28, depth=3)


def test_overridable_keys_are_the_constructor_arguments():
    """diffusion/models/configs.py lists them without importing torch; they must match UNet."""
    given = {"in_channels", "out_channels", "image_size", "num_classes", "text_encoder"}  # from the data and the process
    assert set(UNET_OVERRIDABLE) == set(inspect.signature(UNet).parameters) - given


def test_every_config_builds_and_overrides_apply():
    for name in UNET_CONFIGS:
        assert isinstance(create_model(name, in_channels=3, image_size=32), UNet)
    model = create_model("unet-small", in_channels=1, image_size=28, num_res_blocks=2, channel_mult=[1, 2])
    assert model.config["num_res_blocks"] == 2 and model.config["channel_mult"] == (1, 2)
    assert model.config["attention_resolutions"] == (14,)


def test_import_loads_only_torch():
    code = (
        "import sys, torch; before = {m.split('.')[0] for m in sys.modules}; import diffusion.models.factory; "
        "print(sorted({m.split('.')[0] for m in sys.modules} - before))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['diffusion']"


def test_shape_rules_share_the_unet_defaults():
    """check_unet (torch-free, what params are validated with) assumes UNet's own defaults."""
    from diffusion.models.configs import check_unet

    signature = inspect.signature(UNet).parameters
    for name, parameter in inspect.signature(check_unet).parameters.items():
        if parameter.default is not inspect.Parameter.empty:
            assert parameter.default == signature[name].default, name
