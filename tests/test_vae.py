"""The autoencoder of latent diffusion: the posterior and its KL in closed form, diffusers'
AutoencoderKL loaded as it is, and a short training that beats the mean-image baseline."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from diffusion.errors import UserError
from diffusion.models.configs import VAE_CONFIGS, latent_shape
from diffusion.models.vae import DiagonalGaussian, KLAutoencoder, autoencoder_loss, load_diffusers_autoencoder
from diffusion.packaged import load_autoencoder, save_autoencoder
from diffusion.training.autoencoder import mean_image_error, reconstruction_error, train_autoencoder
from diffusion.training.loop import NonFiniteLossError


def test_kl_matches_its_closed_form():
    mean = torch.tensor([[0.5, -1.0, 2.0]])
    logvar = torch.tensor([[0.0, -2.0, 1.0]])
    by_hand = 0.5 * sum(m * m + torch.exp(lv) - 1 - lv for m, lv in zip(mean[0], logvar[0]))
    q = DiagonalGaussian(mean, logvar)
    assert q.kl().item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert q.kl().item() == pytest.approx(kl_divergence(Normal(mean, q.std), Normal(0.0, 1.0)).sum().item(), rel=1e-6)
    assert DiagonalGaussian(torch.zeros(2, 4), torch.zeros(2, 4)).kl().tolist() == [0.0, 0.0]


def test_posterior_samples_have_its_mean_and_std():
    q = DiagonalGaussian(torch.full((20_000, 1), 1.5), torch.full((20_000, 1), 2 * torch.tensor(0.3).log().item()))
    z = q.sample(torch.Generator().manual_seed(0))
    assert z.mean().item() == pytest.approx(1.5, abs=0.01) and z.std().item() == pytest.approx(0.3, abs=0.005)
    assert torch.equal(z, q.sample(torch.Generator().manual_seed(0)))


def test_loss_is_recon_plus_beta_kl_per_pixel_value():
    x, recon = torch.zeros(2, 1, 4, 4), torch.full((2, 1, 4, 4), 0.5)
    q = DiagonalGaussian(torch.ones(2, 2, 2, 2), torch.zeros(2, 2, 2, 2))  # KL = 0.5 * 8 per example
    terms = autoencoder_loss(recon, x, q, kl_weight=0.1)
    assert terms["recon"].item() == pytest.approx(0.25) and terms["kl"].item() == pytest.approx(4.0 / 16)
    assert terms["loss"].item() == pytest.approx(0.25 + 0.1 * 0.25)


@pytest.mark.parametrize("name, factor", [("vae-tiny", 2), ("vae-f4-cpu", 4)])
def test_latents_are_one_f_th_of_the_image(name, factor):
    model = KLAutoencoder(in_channels=3, **VAE_CONFIGS[name])
    with torch.no_grad():
        q = model.encode(torch.zeros(2, 3, 16, 16))
    channels, size = latent_shape(16, **VAE_CONFIGS[name])
    assert q.mean.shape == (2, channels, size, size) == (2, VAE_CONFIGS[name]["latent_channels"], 16 // factor, 16 // factor)
    assert model.downsampling_factor == factor


def test_encode_refuses_sides_the_down_sampling_does_not_divide():
    model = KLAutoencoder(in_channels=1, **VAE_CONFIGS["vae-f4-cpu"])
    with pytest.raises(ValueError, match=r"^encode: images of 16x18 px; allowed: sides divisible by 4"):
        model.encode(torch.zeros(1, 1, 16, 18))


# ---------------------------------------------------------------- diffusers' AutoencoderKL


def diffusers_autoencoder():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(
        in_channels=1, out_channels=1, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        norm_num_groups=32, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    ).eval()


def assert_same_outputs(ours: KLAutoencoder, theirs) -> None:
    x, z = torch.rand(2, 1, 16, 16) * 2 - 1, torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        q, p = ours.encode(x), theirs.encode(x).latent_dist
        assert torch.allclose(q.mean, p.mean, atol=1e-5) and torch.allclose(q.logvar, p.logvar, atol=1e-5)
        assert torch.allclose(ours.decode(z), theirs.decode(z).sample, atol=1e-5)


def test_diffusers_autoencoder_weights_load_with_the_same_outputs():
    theirs = diffusers_autoencoder()
    ours = KLAutoencoder(in_channels=1, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32)
    ours.load_state_dict(theirs.state_dict())  # strict: the same names and shapes
    assert_same_outputs(ours.eval(), theirs)


def test_a_saved_diffusers_folder_loads_without_diffusers_code(tmp_path):
    theirs = diffusers_autoencoder()
    theirs.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    assert_same_outputs(load_diffusers_autoencoder(tmp_path), theirs)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"latent_channels": 8}))
    with pytest.raises(UserError, match=r"safetensors does not fit its config.json"):
        load_diffusers_autoencoder(tmp_path)


def test_old_attention_names_in_a_bin_file_load_the_same(tmp_path):
    """The .bin fallback, read weights-only, with the query/key/value/proj_attn names of files
    that older diffusers wrote: renamed as diffusers renames them, the same outputs."""
    theirs = diffusers_autoencoder()
    theirs.save_pretrained(tmp_path, safe_serialization=False)
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for name, tensor in theirs.state_dict().items():
        for new, deprecated in old.items():
            name = name.replace(f".{new}.", f".{deprecated}.")
        state[name] = tensor
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in state
    torch.save(state, tmp_path / "diffusion_pytorch_model.bin")
    assert not (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    assert_same_outputs(load_diffusers_autoencoder(tmp_path), theirs)


DIFFUSERS_CONFIG = {"_class_name": "AutoencoderKL", "in_channels": 1, "out_channels": 1, "block_out_channels": [32],
                    "down_block_types": ["DownEncoderBlock2D"], "up_block_types": ["UpDecoderBlock2D"]}


@pytest.mark.parametrize("key, value, allowed", [
    ("act_fn", "gelu", "'silu'"),
    ("mid_block_add_attention", False, "True"),
    ("use_quant_conv", False, "True"),
    ("use_post_quant_conv", False, "True"),
    ("up_block_types", ["AttnUpDecoderBlock2D"], "UpDecoderBlock2D for every level"),
    ("down_block_types", ["DownEncoderBlock2D", "DownEncoderBlock2D"], "DownEncoderBlock2D for every level"),
])
def test_an_unsupported_config_value_is_one_line_naming_the_key(tmp_path, key, value, allowed):
    (tmp_path / "config.json").write_text(json.dumps(DIFFUSERS_CONFIG | {key: value}))
    with pytest.raises(UserError) as caught:
        load_diffusers_autoencoder(tmp_path)
    message = str(caught.value)
    assert "\n" not in message and str(tmp_path / "config.json") in message
    assert f"{key} is {value!r}; allowed: {allowed}" in message


class RunsCode:
    def __reduce__(self):
        return (print, ("this ran",))


def test_a_bin_file_that_would_run_code_is_refused_unrun(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(DIFFUSERS_CONFIG))
    torch.save({"encoder.conv_in.weight": RunsCode()}, tmp_path / "diffusion_pytorch_model.bin")
    with pytest.raises(UserError, match=r"diffusion_pytorch_model.bin cannot be read safely \(UnpicklingError\)$"):
        load_diffusers_autoencoder(tmp_path)
    assert "this ran" not in capsys.readouterr().out


def test_a_folder_without_weights_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", "block_out_channels": [32],
                                                       "down_block_types": ["DownEncoderBlock2D"],
                                                       "up_block_types": ["UpDecoderBlock2D"]}))
    with pytest.raises(UserError, match=r"holds no weights; allowed: diffusion_pytorch_model.safetensors or"):
        load_diffusers_autoencoder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "VQModel"}))
    with pytest.raises(UserError, match=r"_class_name is 'VQModel'; allowed: 'AutoencoderKL'"):
        load_diffusers_autoencoder(tmp_path)


# ---------------------------------------------------------------- training


def blob_images(count: int, seed: int) -> torch.Tensor:
    """uint8 [count, 1, 16, 16]: a bright axis-aligned rectangle of random place and size on black."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.zeros(count, 1, 16, 16, dtype=torch.uint8)
    for k in range(count):
        top, left = torch.randint(0, 10, (2,), generator=gen).tolist()
        height, width = torch.randint(3, 7, (2,), generator=gen).tolist()
        images[k, 0, top: top + height, left: left + width] = 255
    return images


def vae_cfg(**changes) -> SimpleNamespace:
    cfg = dict(steps=300, batch_size=32, lr=2e-3, kl_weight=1e-4, seed=0, device="cpu", precision="fp32",
               log_every=50, checkpoint_every=100)
    return SimpleNamespace(**(cfg | changes))


def tiny_vae() -> KLAutoencoder:
    torch.manual_seed(0)
    return KLAutoencoder(in_channels=1, **VAE_CONFIGS["vae-tiny"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_autoencoder(tiny_vae(), blob_images(512, 0), vae_cfg(), checkpoint_dir=tmp_path_factory.mktemp("vae"),
                                 progress=False)
    finally:
        torch.set_num_threads(threads)


def test_short_training_reconstructs_far_better_than_the_mean_image(trained):
    """300 steps of vae-tiny: held-out MSE below a twentieth of the mean-image baseline's
    (measured: 0.0027 against 0.268, 1%), and the loss curve falls."""
    heldout = blob_images(128, 1)
    error = reconstruction_error(trained.model, heldout, batch_size=64)
    baseline = mean_image_error(blob_images(512, 0), heldout)
    assert error < 0.05 * baseline
    assert trained.curve[-1][1] < 0.5 * trained.curve[0][1]
    assert [point[0] for point in trained.curve] == [50, 100, 150, 200, 250, 300]


def test_encode_decode_round_trip_through_the_file(trained, tmp_path):
    """vae.pt saves and loads the same network: decode(encode(x).mode()) is equal, and each
    held-out image comes back with an MSE below 0.02 (measured: at most 0.006; the range is 2 wide)."""
    save_autoencoder(tmp_path / "vae.pt", trained.model, source="trained")
    loaded, info = load_autoencoder(tmp_path / "vae.pt")
    x = blob_images(16, 2).float() / 127.5 - 1
    with torch.no_grad():
        ours, theirs = trained.model.decode(trained.model.encode(x).mode()), loaded.decode(loaded.encode(x).mode())
    assert torch.equal(ours, theirs) and info == {"source": "trained"}
    per_image = (ours - x).pow(2).flatten(1).mean(1)
    assert per_image.max().item() < 0.02


def test_resume_continues_the_same_trajectory(tmp_path, single_thread):
    """30 steps, killed at 20 and resumed, equal 30 straight steps bit for bit."""
    images = blob_images(64, 3)
    straight = train_autoencoder(tiny_vae(), images, vae_cfg(steps=30, checkpoint_every=10, log_every=10),
                                 checkpoint_dir=tmp_path / "a", progress=False)
    train_autoencoder(tiny_vae(), images, vae_cfg(steps=20, checkpoint_every=10, log_every=10),
                      checkpoint_dir=tmp_path / "b", progress=False)
    resumed = train_autoencoder(tiny_vae(), images, vae_cfg(steps=30, checkpoint_every=10, log_every=10),
                                checkpoint_dir=tmp_path / "b", progress=False)
    assert resumed.curve == straight.curve
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)


def test_a_non_finite_loss_stops_before_the_weights_and_saves_nothing(tmp_path, single_thread):
    model = tiny_vae()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NonFiniteLossError, match=r"^vae step 1: non-finite loss terms .*last good checkpoint: none written yet$"):
        train_autoencoder(model, blob_images(8, 4), vae_cfg(steps=3, kl_weight=float("nan")), checkpoint_dir=tmp_path,
                          progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert list(tmp_path.iterdir()) == []


def test_training_refuses_images_it_cannot_encode(tmp_path):
    with pytest.raises(ValueError, match=r"uint8 \[N, C, H, W\] with H and W divisible by 2; got torch.float32"):
        train_autoencoder(tiny_vae(), blob_images(8, 4).float(), vae_cfg(), checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"divisible by 2; got torch.uint8 \(8, 1, 15, 15\)"):
        train_autoencoder(tiny_vae(), blob_images(8, 4)[..., :15, :15], vae_cfg(), checkpoint_dir=tmp_path, progress=False)
