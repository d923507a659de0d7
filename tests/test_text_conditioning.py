"""Text conditioning in every network family (diffusion/models/layers.py: cross-attention, the
conditioning and the null condition; unet.py, dit.py, diffit.py): a caption's tokens reach the
image by cross-attention (or SD3's joint attention), its pooled embedding the time embedding."""

import io

import pytest
import torch
from tiny_unet import perturb

from diffusion.models.configs import check_override
from diffusion.models.factory import create_model
from diffusion.models.layers import CrossAttention, null_condition
from diffusion.models.text import CharTransformerEncoder

pytestmark = pytest.mark.usefixtures("single_thread")

SIZE = 8
# (config, overrides): one network of each family, DiT with both kinds of text attention.
CROSS = [
    ("unet-tiny", {}),
    ("dit-tiny", {"text_attention": "cross"}),
    ("diffit-tiny", {}),
    ("latent-diffit-tiny", {}),
]
NETWORKS = [*CROSS, ("dit-tiny", {"text_attention": "joint"})]
IDS = [name + "".join(f"-{v}" for v in overrides.values()) for name, overrides in NETWORKS]
CAPTIONS = ["a thick, right-leaning seven", "a thin two", "a small, upright zero"]


def encoder(seed: int = 0) -> CharTransformerEncoder:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return CharTransformerEncoder(width=16, depth=1, heads=2, max_length=32)


def text_network(name: str, overrides: dict, seed: int = 0) -> torch.nn.Module:
    """The network with a tiny char-level encoder, every weight moved off its initial value."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = create_model(name, in_channels=1, image_size=SIZE, text_encoder=encoder(seed), **overrides)
    return perturb(net, seed).eval()


def inputs(batch: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(batch, 1, SIZE, SIZE, generator=gen), torch.tensor([5, 400, 999][:batch])


def tokens(net: torch.nn.Module, captions: list[str]) -> torch.Tensor:
    return net.text_encoder.tokenize(captions)


@pytest.mark.parametrize(("name", "overrides"), CROSS, ids=IDS[: len(CROSS)])
@torch.no_grad()
def test_zero_keys_and_values_give_the_unconditional_network(name, overrides):
    """With every cross-attention's key/value projection (and its output bias) and the pooled
    projection zero, the network is its unconditional twin holding the same weights (the
    cross-attention layers skipped): the residual adds 0 and c = t. With the weights random, a
    caption moves the output by far more than rounding, and two captions apart."""
    net = text_network(name, overrides)
    twin = create_model(name, in_channels=1, image_size=SIZE, **overrides).eval()
    twin.load_state_dict({key: net.state_dict()[key] for key in twin.state_dict()})  # every key of the twin's is net's
    x, t = inputs()
    y = tokens(net, CAPTIONS)
    conditional, unconditional = net(x, t, y), twin(x, t)
    assert (conditional - unconditional).abs().max() > 1e-3
    other = net(x, t, tokens(net, ["a thin, left-leaning nine"] * 3))
    assert (conditional - other).abs().amax(dim=(1, 2, 3)).min() > 1e-3

    layers = [m for m in net.modules() if isinstance(m, CrossAttention)]
    assert layers and net.pooled_embed is not None
    for layer in layers:
        for p in (layer.kv.weight, layer.kv.bias, layer.proj.bias):
            p.zero_()
    net.pooled_embed.weight.zero_()
    net.pooled_embed.bias.zero_()
    torch.testing.assert_close(net(x, t, y), unconditional, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("name", "overrides"), NETWORKS, ids=IDS)
def test_a_fresh_network_starts_from_its_unconditional_path_and_keeps_its_encoder(name, overrides):
    """The caption enters by zero-initialised layers (cross-attention output projections, the
    pooled projection), and the network's own init leaves the encoder's weights as it made them."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = create_model(name, in_channels=1, image_size=SIZE, text_encoder=encoder(seed=3), **overrides)
    zero = [m.proj for m in net.modules() if isinstance(m, CrossAttention)] + [net.pooled_embed]
    assert all(layer.weight.abs().sum() == 0 and layer.bias.abs().sum() == 0 for layer in zero)
    alone = encoder(seed=3).state_dict()
    assert all(torch.equal(value, alone[key]) for key, value in net.text_encoder.state_dict().items())


@pytest.mark.parametrize(("name", "overrides"), NETWORKS, ids=IDS)
@torch.no_grad()
def test_the_empty_caption_is_the_null_condition(name, overrides):
    net = text_network(name, overrides)
    x, t = inputs()
    empty = net.text_encoder.tokenize([""]).expand(3, -1)
    assert torch.equal(net(x, t, None), net(x, t, empty))
    y = tokens(net, CAPTIONS)
    assert torch.equal(null_condition(net).expand_as(y), empty)
    assert (net(x, t, y) - net(x, t, None)).abs().max() > 1e-3


def test_null_condition_of_class_and_unconditional_models():
    y = torch.tensor([0, 7, 3])
    classes = create_model("unet-tiny", in_channels=1, image_size=SIZE, num_classes=10)
    assert null_condition(classes) == 10
    with pytest.raises(ValueError, match="unconditional"):
        null_condition(create_model("unet-tiny", in_channels=1, image_size=SIZE))


@pytest.mark.parametrize(("name", "overrides"), NETWORKS, ids=IDS)
@torch.no_grad()
def test_padding_and_batch_order_do_not_change_the_output(name, overrides):
    """Attention never looks at padding: a caption's tokens cut to its real ones (no padding)
    give the output of the padded row. Each image attends to its own caption only: permuting
    the batch permutes the output. (Captions of different lengths, so the padding differs by row.)"""
    net = text_network(name, overrides)
    x, t = inputs()
    y = tokens(net, CAPTIONS)
    out = net(x, t, y)
    for row in range(3):
        real = int((y[row] != 0).sum())
        alone = net(x[row : row + 1], t[row : row + 1], y[row : row + 1, :real])
        torch.testing.assert_close(alone, out[row : row + 1], rtol=1e-5, atol=1e-6)
    order = torch.tensor([2, 0, 1])
    torch.testing.assert_close(net(x[order], t[order], y[order]), out[order], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("name", "overrides"), NETWORKS, ids=IDS)
def test_gradients_reach_every_weight_and_the_encoder(name, overrides):
    """One backward pass reaches the text encoder and leaves no weight without a gradient (the
    last joint block's text stream has no output to train, so it holds only what gives keys)."""
    net = text_network(name, overrides).train()
    x, t = inputs()
    net(x, t, tokens(net, CAPTIONS)).square().sum().backward()
    without = [key for key, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert without == []
    assert any(key.startswith("text_encoder.") for key, _ in net.named_parameters())


@pytest.mark.parametrize(("name", "overrides"), NETWORKS, ids=IDS)
@torch.no_grad()
def test_a_saved_network_reloads_whole(name, overrides):
    """The encoder's weights are the network's: its state dict rebuilds the same function."""
    net = text_network(name, overrides)
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    buffer.seek(0)
    fresh = create_model(name, in_channels=1, image_size=SIZE, text_encoder=encoder(seed=5), **overrides).eval()
    fresh.load_state_dict(torch.load(buffer))
    x, t = inputs()
    y = tokens(net, CAPTIONS)
    assert torch.equal(fresh(x, t, y), net(x, t, y))


def test_text_and_classes_are_exclusive_and_text_attention_is_checked():
    with pytest.raises(ValueError, match="num_classes and text_encoder"):
        create_model("dit-tiny", in_channels=1, image_size=SIZE, num_classes=10, text_encoder=encoder())
    assert check_override("dit-tiny", "text_attention", "joint") == "joint"
    with pytest.raises(ValueError, match="text_attention"):
        check_override("latent-diffit-tiny", "text_attention", "joint")
    with pytest.raises(ValueError, match="text_attention"):
        check_override("dit-tiny", "text_attention", "concat")
