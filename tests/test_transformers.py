"""The transformer backbones: DiT (diffusion/models/dit.py), DiffiT and latent DiffiT
(diffusion/models/diffit.py), their shared layers (diffusion/models/layers.py) and the model
families of diffusion/models/configs.py."""

import inspect
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import copy_repo, pipeline_env, run_in
from mlflow import MlflowClient
from tiny_unet import perturb

from diffusion.models.configs import FAMILIES, FAMILY_OF
from diffusion.models.diffit import DiffiTResBlock, window_merge, window_partition
from diffusion.models.layers import (
    PatchEmbedding, RelativePositionBias, SelfAttention, TimeDependentSelfAttention, sincos_2d_position_embedding,
    unpatchify,
)
from diffusion.models.factory import CONSTRUCTORS, MODELS, create_model
from diffusion.packaged import PackagedDiffusion
from diffusion.process.gaussian import GaussianDiffusion
from diffusion.process.schedules import make_betas

pytestmark = pytest.mark.usefixtures("single_thread")

TRANSFORMERS = [name for name in MODELS if FAMILY_OF[name] != "unet"]
# Built for real (the rest on the meta device: shapes and counts without the memory).
SMALL = [name for name in TRANSFORMERS if name.endswith(("-tiny", "-cpu"))]


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build(name: str, *, channels: int, size: int, **kwargs) -> torch.nn.Module:
    if name in SMALL:
        return create_model(name, in_channels=channels, image_size=size, **kwargs)
    with torch.device("meta"):
        return create_model(name, in_channels=channels, image_size=size, **kwargs)


# ---------------------------------------------------------------- shapes, counts, zero init


CASES = [(name, sigma, classes) for name in SMALL for sigma in (False, True) for classes in (None, 10)]
CASES += [(name, True, 10) for name in TRANSFORMERS if name not in SMALL]  # on the meta device: one case each


@pytest.mark.parametrize(("name", "learn_sigma", "num_classes"), CASES)
def test_output_shape_for_every_config(name, learn_sigma, num_classes):
    size = {"-tiny": 8, "-cpu": 28}.get(name[name.rindex("-"):], 32)  # the -cpu configs: the default data's 28 px
    model = build(name, channels=3, size=size, learn_sigma=learn_sigma, num_classes=num_classes)
    device = next(model.parameters()).device
    x, t = torch.randn(2, 3, size, size, device=device), torch.tensor([0, 999], device=device)
    y = None if num_classes is None else torch.tensor([0, 9], device=device)
    out = model(x, t, y)
    assert out.shape == (2, 6 if learn_sigma else 3, size, size)


@pytest.mark.parametrize("name", SMALL)
def test_a_fresh_model_predicts_exactly_zero(name):
    """adaLN-Zero and the zero output layers: every family starts at exactly 0, for any input."""
    model = create_model(name, in_channels=1, image_size=28 if name.endswith("-cpu") else 8, num_classes=10)
    size = model.config["image_size"]
    out = model(torch.randn(3, 1, size, size), torch.tensor([1, 500, 999]), torch.tensor([0, 5, 9]))
    assert torch.equal(out, torch.zeros_like(out))


# DiT's parameter counts (Peebles & Xie 2023; facebookresearch/DiT) for 32 x 32 x 4 latents, 1000
# classes and the learned variance, less its fixed position embedding (here a buffer, not a
# parameter: 1024/p^2 tokens x width).
PAPER_COUNTS = {"dit-s": 33e6, "dit-b": 130e6, "dit-l": 458e6, "dit-xl": 675e6}


@pytest.mark.parametrize("name", [n for n in TRANSFORMERS if FAMILY_OF[n] == "dit" and n.count("-") == 2])
def test_dit_parameter_counts_match_the_paper(name):
    model = build(name, channels=4, size=32, learn_sigma=True, num_classes=1000)
    size = name.rsplit("-", 1)[0]
    assert abs(n_params(model) - PAPER_COUNTS[size]) / PAPER_COUNTS[size] < 0.01


def test_counts_of_the_reference_configs_are_exact():
    """The official DiT-XL/2 has 675,129,632 parameters, of which its position embedding is
    256 x 1152 = 294,912; latent DiffiT (NVlabs/DiffiT ``Diffit``) is 561M by the paper
    (16.88% fewer than DiT-XL/2); image-space DiffiT on CIFAR-10 as recorded in BENCHMARKS.md."""
    dit = build("dit-xl-2", channels=4, size=32, learn_sigma=True, num_classes=1000)
    assert n_params(dit) == 675_129_632 - 256 * 1152
    latent = build("latent-diffit-imagenet256", channels=4, size=32, learn_sigma=True, num_classes=1000)
    assert n_params(latent) == 561_035_232
    assert abs(n_params(latent) - 675_129_632 * (1 - 0.1688)) / 561e6 < 0.001
    assert n_params(build("diffit-cifar10", channels=3, size=32)) == 39_361_363


@pytest.mark.parametrize("family", ["dit", "diffit", "latent-diffit"])
def test_overridable_keys_are_the_constructor_arguments(family):
    given = {"in_channels", "out_channels", "image_size", "num_classes", "text_encoder"}  # from the data and the process
    assert set(FAMILIES[family].overridable) == set(inspect.signature(CONSTRUCTORS[family]).parameters) - given
    for name, config in FAMILIES[family].configs.items():
        assert set(config) <= set(FAMILIES[family].overridable), name


def test_overrides_reach_the_network():
    model = create_model("dit-tiny", in_channels=1, image_size=8, depth=3, patch_size=4, mlp_ratio=2)
    assert len(model.blocks) == 3 and model.patch_embed.kernel_size == (4, 4)
    assert model.blocks[0].mlp[0].out_features == 2 * 32
    with pytest.raises(ValueError, match="unknown key 'window_size' for dit-tiny"):
        create_model("dit-tiny", in_channels=1, image_size=8, window_size=4)


@pytest.mark.parametrize("name", SMALL)
def test_labels_and_time_change_the_output_and_y_none_is_the_null_class(name):
    model = perturb(create_model(name, in_channels=1, image_size=8 if name.endswith("-tiny") else 28, num_classes=10)).eval()
    size = model.config["image_size"]
    x, t = torch.randn(3, 1, size, size, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 400, 900])
    assert torch.equal(model(x, t), model(x, t, torch.full((3,), 10)))
    assert (model(x, t, torch.tensor([1, 2, 3])) - model(x, t)).abs().amax() > 1e-3
    assert (model(x, t) - model(x, t + 50)).abs().amax() > 1e-3
    with pytest.raises(ValueError, match="^y: class labels given to a model built without num_classes$"):
        create_model(name, in_channels=1, image_size=size)(x, t, torch.tensor([0, 1, 2]))


# ---------------------------------------------------------------- TMSA and its parts


def tmsa(dim: int = 16, heads: int = 4, time_dim: int = 8, window: int | None = 3, seed: int = 0):
    torch.manual_seed(seed)
    return perturb(TimeDependentSelfAttention(dim, heads, time_dim, window), seed)


def test_tmsa_with_zero_time_weights_is_multi_head_self_attention():
    """W_qt = W_kt = W_vt = 0 (and their bias) and no position bias: TMSA is MHSA on the same
    weights, ours and torch's own nn.MultiheadAttention."""
    attention = tmsa(window=None)
    with torch.no_grad():
        attention.qkv_time.weight.zero_()
        attention.qkv_time.bias.zero_()
    tokens, time = torch.randn(2, 9, 16), torch.randn(2, 8)
    plain = SelfAttention(16, 4)
    plain.load_state_dict({k: v for k, v in attention.state_dict().items() if not k.startswith("qkv_time")})
    torch.testing.assert_close(attention(tokens, time), plain(tokens))
    reference = torch.nn.MultiheadAttention(16, 4, batch_first=True)
    reference.load_state_dict({
        "in_proj_weight": attention.qkv.weight, "in_proj_bias": attention.qkv.bias,
        "out_proj.weight": attention.proj.weight, "out_proj.bias": attention.proj.bias,
    })
    torch.testing.assert_close(attention(tokens, time), reference(tokens, tokens, tokens, need_weights=False)[0])


def test_tmsa_changes_with_the_time_token_and_matches_its_equations():
    """softmax(QK^T / sqrt(d) + B) V with q = x W_qs + x_t W_qt (likewise k, v), by hand."""
    attention = tmsa()
    tokens, t1, t2 = torch.randn(2, 9, 16), torch.randn(2, 8), torch.randn(2, 8)
    assert (attention(tokens, t1) - attention(tokens, t2)).abs().amax() > 1e-3
    w_s, b_s = attention.qkv.weight, attention.qkv.bias
    w_t, b_t = attention.qkv_time.weight, attention.qkv_time.bias
    qkv = tokens @ w_s.T + b_s + (t1 @ w_t.T + b_t)[:, None]
    q, k, v = (part.unflatten(-1, (4, 4)).transpose(1, 2) for part in qkv.chunk(3, dim=-1))  # [B, heads, N, d]
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(4) + attention.position_bias(), dim=-1)
    expected = (weights @ v).transpose(1, 2).flatten(2) @ attention.proj.weight.T + attention.proj.bias
    torch.testing.assert_close(attention(tokens, t1), expected)


def test_a_zero_relative_position_bias_is_no_bias():
    attention, unbiased = tmsa(window=3), tmsa(window=None)
    unbiased.load_state_dict({k: v for k, v in attention.state_dict().items() if not k.startswith("position_bias")})
    tokens, time = torch.randn(2, 9, 16), torch.randn(2, 8)
    assert (attention(tokens, time) - unbiased(tokens, time)).abs().amax() > 1e-4  # perturbed: a real bias
    with torch.no_grad():
        attention.position_bias.table.zero_()
    torch.testing.assert_close(attention(tokens, time), unbiased(tokens, time))


def test_relative_position_bias_depends_on_the_offset_only():
    """B[h, i, j] = table[offset(i, j), h]: the (2w-1)^2 offsets of a w x w window, each used,
    and equal for every pair of positions with the same offset (Swin §3.2)."""
    window = 3
    bias = RelativePositionBias(window, num_heads=2)
    with torch.no_grad():
        bias.table.copy_(torch.arange(25 * 2, dtype=torch.float32).reshape(25, 2))
    b = bias()[0]
    assert bias().shape == (1, 2, 9, 9) and bias.index.unique().numel() == (2 * window - 1) ** 2
    positions = [(r, c) for r in range(window) for c in range(window)]
    for i, (ri, ci) in enumerate(positions):
        for j, (rj, cj) in enumerate(positions):
            row = (ri - rj + window - 1) * (2 * window - 1) + (ci - cj + window - 1)
            assert b[:, i, j].tolist() == bias.table[row].tolist()


def test_windows_partition_and_merge_back():
    x = torch.randn(2, 5, 8, 8)
    windows = window_partition(x, 4)
    assert windows.shape == (2 * 4, 16, 5)
    torch.testing.assert_close(windows[1], x[0, :, 0:4, 4:8].flatten(1).T)  # window (0, 1) of image 0, row-major
    assert torch.equal(window_merge(windows, 4, 8, 8), x)


def test_a_window_the_size_of_the_map_is_global_attention():
    """The DiffiT ResBlock with one window covering the feature map attends over all of it:
    it equals the same block's transformer on the flattened map."""
    torch.manual_seed(0)
    block = perturb(DiffiTResBlock(8, 8, time_dim=6, num_heads=2, window=4, mlp_ratio=2.0))
    x, time = torch.randn(2, 8, 4, 4), torch.randn(2, 6)
    h = block.conv(F.silu(block.norm(x)))
    tokens = block.block(h.flatten(2).transpose(1, 2), time)
    torch.testing.assert_close(block(x, time), tokens.transpose(1, 2).reshape(2, 8, 4, 4) + x)


def test_patches_embed_and_unpatchify_back():
    """A patch embedding that copies each p x p x C patch into its token, then unpatchify: the
    input (its position embedding taken away)."""
    p, c = 2, 3
    embed = PatchEmbedding(c, p * p * c, p, image_size=8)
    with torch.no_grad():  # token channel (i, j, ch), DiT's unpatchify order, takes pixel (i, j) of channel ch
        embed.weight.zero_()
        embed.bias.zero_()
        for i in range(p):
            for j in range(p):
                for ch in range(c):
                    embed.weight[(i * p + j) * c + ch, ch, i, j] = 1.0
    x = torch.randn(2, c, 8, 8)
    tokens = embed(x) - embed.position_embedding
    assert tokens.shape == (2, 16, p * p * c)
    torch.testing.assert_close(embed.position_embedding[0], sincos_2d_position_embedding(p * p * c, 4))
    torch.testing.assert_close(unpatchify(tokens, p, c), x)


def test_sincos_position_embedding_is_mae_s():
    """Channel block 0..d/4: sin(col * w_i), d/4..d/2: cos(col * w_i), then the same of the row,
    w_i = 10000^(-i / (d/4)) (MAE's get_2d_sincos_pos_embed, which DiT uses)."""
    dim, grid = 16, 3
    emb = sincos_2d_position_embedding(dim, grid)
    assert emb.shape == (9, 16)
    token = 1 * grid + 2  # row 1, column 2
    w = 10_000 ** (-torch.arange(4, dtype=torch.float64) / 4)
    expected = torch.cat([torch.sin(2 * w), torch.cos(2 * w), torch.sin(1 * w), torch.cos(1 * w)]).float()
    torch.testing.assert_close(emb[token], expected)
    assert torch.equal(emb[0], torch.tensor([0.0] * 4 + [1.0] * 4 + [0.0] * 4 + [1.0] * 4))


# ---------------------------------------------------------------- each family learns


@pytest.mark.parametrize("name", ["dit-tiny", "diffit-tiny", "latent-diffit-tiny"])
def test_each_family_overfits_one_batch(name):
    """One fixed batch (x_0, t, noise), the diffusion loss L_simple: down at least 10x."""
    torch.manual_seed(0)
    model = create_model(name, in_channels=1, image_size=8, num_classes=4)
    diffusion = GaussianDiffusion(make_betas("linear", 100))
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(8, 1, 8, 8, generator=gen) * 2 - 1
    t, noise, y = torch.randint(0, 100, (8,), generator=gen), torch.randn(8, 1, 8, 8, generator=gen), torch.arange(8) % 4
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)

    def loss() -> torch.Tensor:
        return diffusion.training_losses(model, x0, t, noise=noise, model_kwargs={"y": y})["loss"].mean()

    first = loss().item()
    for _ in range(300):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert loss().item() < first / 10


# ---------------------------------------------------------------- through the pipeline and the registry


@pytest.mark.integration
def test_diffit_trains_through_dvc_exp_run(tmp_path, prepared_repo):
    """``dvc exp run -S model.name=diffit-tiny`` on the tiny pipeline: image-space DiffiT trained,
    sampled, evaluated and tracked. DiT runs the pipeline on latents in tests/test_latent.py, and
    latent DiffiT is registered and loaded from ``models:/`` in tests/test_registry.py."""
    repo = copy_repo(prepared_repo, tmp_path / "repo")
    client = MlflowClient(pipeline_env(repo)["MLFLOW_TRACKING_URI"])
    out = run_in(repo, "dvc", "exp", "run", "-S", "model.name=diffit-tiny")
    assert "Running stage 'train'" in out.stdout
    packaged = PackagedDiffusion.load(repo / "models/model.pt")
    assert type(packaged.net).__name__ == "DiffiT" and packaged.model_spec["name"] == "diffit-tiny"
    assert math.isfinite(json.loads((repo / "metrics/evaluate.json").read_text())["fid"])
    model_run = client.get_run(json.loads((repo / "models/run.json").read_text())["run_id"])
    assert model_run.data.params["model.name"] == "diffit-tiny" and model_run.info.status == "FINISHED"


@pytest.mark.parametrize("process", ["ddpm", "vp", "edm", "flow"])
@pytest.mark.parametrize("name", ["unet-tiny", "dit-tiny", "diffit-tiny", "latent-diffit-tiny"])
def test_every_network_family_trains_and_samples_on_every_process(name, process):
    """Each family's network, given each process's time input (the chain's timesteps, 999 t, EDM's
    ¼ ln σ) and image input (EDM's c_in x), gets a finite loss with a gradient in every parameter
    and draws finite samples: the process is the network's business only through these."""
    from diffusion.process.factory import make_diffusion
    from diffusion.sampling.sample import sample

    torch.manual_seed(0)
    net = perturb(create_model(name, in_channels=2, image_size=8, num_classes=3))
    section = {"process": process, "schedule": "cosine" if process == "ddpm" else None, "timesteps": 50,
               "prediction": "v" if process == "ddpm" else None, "variance": "fixed_small", "loss": "mse"}
    diffusion = make_diffusion(section)
    x0, y = torch.rand(4, 2, 8, 8) * 2 - 1, torch.tensor([0, 1, 2, 3])  # 3: the null class
    p = diffusion.process
    t = torch.tensor([0, 10, 30, 49]) if process == "ddpm" else torch.linspace(p.t_min, p.t_max, 4, dtype=torch.float64)
    loss = diffusion.training_losses(net, x0, t, model_kwargs={"y": y})["loss"].mean()
    loss.backward()
    assert math.isfinite(loss.item())
    assert all(param.grad is not None and param.grad.abs().sum() > 0 for param in net.parameters())
    with torch.no_grad():
        x = sample(diffusion, net.eval(), (2, 2, 8, 8), sampler="dpm++2m", steps=3, labels=torch.tensor([0, 1]),
                   clip_denoised=False, seed=0)
    assert torch.isfinite(x).all()
