"""EMA of weights: closed form, warm-up decay, buffers, state round trip."""

import pytest
import torch
from torch import nn

from diffusion.training.ema import EMA


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def test_copy_is_frozen_and_separate():
    net = _net()
    ema = EMA(net, 0.9)
    assert not ema.model.training
    assert all(not p.requires_grad for p in ema.model.parameters())
    assert all(p.requires_grad for p in net.parameters())
    assert ema.model[0].weight.data_ptr() != net[0].weight.data_ptr()


@pytest.mark.parametrize(("decay", "n"), [(0.9, 1), (0.9, 10), (0.99, 37)])
def test_closed_form_step_response(decay, n):
    """Parameter jumps 0 -> 1: after n updates the EMA is 1 - decay**n."""
    net = nn.Linear(2, 2)
    nn.init.zeros_(net.weight)
    nn.init.zeros_(net.bias)
    ema = EMA(net, decay)
    with torch.no_grad():
        net.weight.fill_(1.0)
        net.bias.fill_(1.0)
    for _ in range(n):
        ema.update(net)
    expected = torch.full_like(net.weight, 1 - decay**n)
    torch.testing.assert_close(ema.model.weight, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(ema.model.bias, expected[0], atol=1e-6, rtol=0)


def test_warmup_decay():
    ema = EMA(nn.Linear(1, 1), 0.999, warmup=True)
    got = []
    for _ in range(4):
        got.append(ema.current_decay())
        ema.update(ema.model)
    assert got == pytest.approx([1 / 10, 2 / 11, 3 / 12, 4 / 13])
    ema.num_updates = 10_000  # (1 + n) / (10 + n) > 0.999 from n = 8992 on
    assert ema.current_decay() == 0.999
    assert EMA(nn.Linear(1, 1), 0.999).current_decay() == 0.999


def test_warmup_closed_form():
    """With warm-up the EMA of a 0 -> 1 step is 1 - prod_k decay_k."""
    net = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(net.weight)
    ema = EMA(net, 0.5, warmup=True)
    with torch.no_grad():
        net.weight.fill_(1.0)
    prod = 1.0
    for k in range(6):
        prod *= min(0.5, (1 + k) / (10 + k))
        ema.update(net)
    assert ema.model.weight.item() == pytest.approx(1 - prod, abs=1e-6)


def test_buffers_copied_and_state_round_trip():
    net = _net()
    net.train()
    net(torch.randn(8, 3))  # moves BatchNorm running stats
    ema = EMA(_net(), 0.9)
    ema.update(net)
    assert torch.equal(ema.model[1].running_mean, net[1].running_mean)
    assert ema.model[1].num_batches_tracked.item() == 1

    other = EMA(_net(), 0.9)
    other.load_state_dict(ema.state_dict())
    assert other.num_updates == 1
    for a, b in zip(other.model.state_dict().values(), ema.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_bad_decay():
    with pytest.raises(ValueError, match="decay must be in"):
        EMA(nn.Linear(1, 1), 1.0)
