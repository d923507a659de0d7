"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, §3 and App. G).

An encoder maps an image x in [-1, 1] to the posterior q(z|x) = N(μ, diag σ²) of a
``latent_channels``-channel latent at 1/f resolution (f = 2^(levels - 1)); a decoder maps z
back to pixels. Trained on reconstruction + β KL(q(z|x) || N(0, I)) (:func:`autoencoder_loss`),
the latents stay close to a unit Gaussian and smooth enough for a diffusion model.

The layout and the state-dict names are diffusers' ``AutoencoderKL`` (the layout of LDM's
and Stable Diffusion's VAEs): per level ``layers_per_block`` ResNet blocks and a stride-2
convolution; a middle of ResNet, single-head self-attention, ResNet; the decoder mirrored with
one block more a level and nearest up-sampling; 1x1 ``quant_conv``/``post_quant_conv``. So a
diffusers checkpoint loads as it is (:func:`load_diffusers_autoencoder`, tested for equal
outputs), with no diffusers code.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from diffusion.errors import UserError
from diffusion.models.layers import Upsample  # nearest x2, then a 3x3 conv: diffusers' Upsample2D

LOGVAR_RANGE = (-30.0, 20.0)  # LDM's clamp of the posterior's log-variance
NORM_EPS = 1e-6


class DiagonalGaussian:
    """q(z|x) = N(mean, diag(exp(logvar))), per example (Kingma & Welling 2014, §3). Held in
    float32 whatever the encoder's autocast dtype, so the KL's sum over the latent keeps its
    precision; logvar clamped to [-30, 20] as LDM's ``DiagonalGaussianDistribution``."""

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor) -> None:
        self.mean = mean.float()
        self.logvar = logvar.float().clamp(*LOGVAR_RANGE)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = μ + σ ε (the reparameterisation, Kingma & Welling 2014, eq. 10), ε drawn with ``generator``."""
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) = ½ Σ (μ² + σ² − 1 − log σ²) over the latent (Kingma & Welling 2014, App. B), shape [N]."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).flatten(1).sum(1)


class ResnetBlock(nn.Module):
    """A pre-activation residual block (He et al. 2016) as LDM's ``ResnetBlock`` without a time
    input: GroupNorm, SiLU, 3x3 conv, twice, plus the input (1x1-projected when the width changes)."""

    def __init__(self, cin: int, cout: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=NORM_EPS)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=NORM_EPS)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nn.Module):
    """LDM's ``AttnBlock``: single-head self-attention (Vaswani et al. 2017) over the H·W
    positions of the GroupNorm'd input, ``softmax(QK^T / sqrt(C)) V`` projected, plus the input."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=NORM_EPS)
        self.to_q, self.to_k, self.to_v = (nn.Linear(channels, channels) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)
        out = F.scaled_dot_product_attention(self.to_q(tokens), self.to_k(tokens), self.to_v(tokens))
        return x + self.to_out[0](out).transpose(1, 2).reshape(b, c, h, w)


class MidBlock(nn.Module):
    """The middle at the lowest resolution: ResNet block, self-attention, ResNet block."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups), ResnetBlock(channels, channels, groups)])
        self.attentions = nn.ModuleList([Attention(channels, groups)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class AsymmetricDownsample(nn.Module):
    """Halve H and W with a stride-2 3x3 conv after zero padding of one row and column at the
    bottom and right: diffusers' ``Downsample2D`` with ``padding=0``, as its ``AutoencoderKL``
    has it. The U-Net's :class:`~diffusion.models.layers.Downsample` pads every side by one."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Level(nn.Module):
    """One resolution: ResNet blocks, then a resampler (none at the last level)."""

    def __init__(self, cin: int, cout: int, blocks: int, groups: int, resample: type[nn.Module] | None) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(cin if i == 0 else cout, cout, groups) for i in range(blocks)])
        name = "downsamplers" if resample is AsymmetricDownsample else "upsamplers"
        if resample is not None:
            setattr(self, name, nn.ModuleList([resample(cout)]))
        self.resample = name if resample is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resnets:
            x = block(x)
        return x if self.resample is None else getattr(self, self.resample)[0](x)


class Coder(nn.Module):
    """conv_in, the levels and the middle (in the encoder's or the decoder's order), then
    GroupNorm, SiLU and conv_out."""

    def __init__(self, cin: int, cout: int, widths: list[int], blocks: int, groups: int, *, decoder: bool) -> None:
        super().__init__()
        self.decoder = decoder
        self.conv_in = nn.Conv2d(cin, widths[0], 3, padding=1)
        self.mid_block = MidBlock(widths[-1] if not decoder else widths[0], groups)
        levels = []
        for i, width in enumerate(widths):
            last = i == len(widths) - 1
            previous = widths[max(i - 1, 0)]
            resample = None if last else (Upsample if decoder else AsymmetricDownsample)
            levels.append(Level(previous, width, blocks, groups, resample))
        setattr(self, "up_blocks" if decoder else "down_blocks", nn.ModuleList(levels))
        self.conv_norm_out = nn.GroupNorm(groups, widths[-1], eps=NORM_EPS)
        self.conv_out = nn.Conv2d(widths[-1], cout, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        if self.decoder:
            x = self.mid_block(x)
        for level in self.up_blocks if self.decoder else self.down_blocks:
            x = level(x)
        if not self.decoder:
            x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class KLAutoencoder(nn.Module):
    """Encoder to q(z|x) and decoder back (the module doc); ``.config`` rebuilds it."""

    def __init__(
        self, in_channels: int, latent_channels: int, block_out_channels: tuple[int, ...], layers_per_block: int,
        norm_num_groups: int,
    ) -> None:
        super().__init__()
        self.config = {
            "in_channels": in_channels, "latent_channels": latent_channels,
            "block_out_channels": list(block_out_channels), "layers_per_block": layers_per_block,
            "norm_num_groups": norm_num_groups,
        }
        widths = list(block_out_channels)
        self.encoder = Coder(in_channels, 2 * latent_channels, widths, layers_per_block, norm_num_groups, decoder=False)
        self.decoder = Coder(latent_channels, in_channels, widths[::-1], layers_per_block + 1, norm_num_groups, decoder=True)
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1)

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.config["block_out_channels"]) - 1)

    @property
    def latent_channels(self) -> int:
        return self.config["latent_channels"]

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """q(z|x) of images x [N, C, H, W] in [-1, 1]; H and W multiples of :attr:`downsampling_factor`."""
        factor = self.downsampling_factor
        if x.shape[-2] % factor or x.shape[-1] % factor:
            raise ValueError(
                f"encode: images of {x.shape[-2]}x{x.shape[-1]} px; allowed: sides divisible by {factor}, "
                "the autoencoder's down-sampling"
            )
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return DiagonalGaussian(mean, logvar)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images (unclamped, as LDM's) of latents z [N, latent_channels, H/f, W/f]."""
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussian]:
        """(decode(z), q(z|x)) for z ~ q(z|x) drawn with ``generator``: what training needs."""
        posterior = self.encode(x)
        return self.decode(posterior.sample(generator)), posterior


def autoencoder_loss(recon: torch.Tensor, x: torch.Tensor, posterior: DiagonalGaussian, kl_weight: float) -> dict[str, torch.Tensor]:
    """The β-VAE objective (Higgins et al. 2017) in LDM's KL-regularised form, per pixel value:
    ``recon`` = the batch mean of ||x − x̂||² / D, ``kl`` = that of KL(q(z|x) || N(0, I)) / D
    (D = C·H·W), ``loss = recon + kl_weight · kl``."""
    values = x[0].numel()
    terms = {"recon": (recon.float() - x).pow(2).flatten(1).mean(1).mean(), "kl": posterior.kl().float().mean() / values}
    return {"loss": terms["recon"] + kl_weight * terms["kl"], **terms}


WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
DEPRECATED_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
"""The attention layers' names in files written by older diffusers versions (many still on the
Hub), renamed as diffusers' own ``_convert_deprecated_attention_blocks`` does on load."""


def _current_attention_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``...attentions.0.query.weight`` -> ``...attentions.0.to_q.weight`` (and key, value, proj_attn)."""
    renamed = {}
    for name, tensor in state.items():
        path, _, leaf = name.rpartition(".")  # leaf: weight or bias
        parent, _, layer = path.rpartition(".")
        if ".attentions." in name and layer in DEPRECATED_ATTENTION_NAMES:
            name = f"{parent}.{DEPRECATED_ATTENTION_NAMES[layer]}.{leaf}"
        renamed[name] = tensor
    return renamed


def load_diffusers_autoencoder(folder: str | Path) -> KLAutoencoder:
    """A diffusers ``AutoencoderKL`` folder (``save_pretrained``): the arguments from config.json
    (:func:`~diffusion.models.configs.diffusers_autoencoder_config`), the weights from safetensors
    or else the .bin read weights-only; no code runs. One-line :class:`UserError` otherwise."""
    from diffusion.models.configs import diffusers_autoencoder_config

    folder = Path(folder)
    try:
        config = diffusers_autoencoder_config(str(folder))
    except ValueError as err:
        raise UserError(str(err)) from None
    found = [folder / name for name in WEIGHT_FILES if (folder / name).is_file()]
    if not found:
        raise UserError(f"vae.pretrained: {folder} holds no weights; allowed: {' or '.join(WEIGHT_FILES)}")
    weights = found[0]
    try:
        if weights.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(weights))
        else:
            state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as err:  # a damaged file, or a pickle that would run code
        raise UserError(f"vae.pretrained: {weights} cannot be read safely ({err.__class__.__name__})") from None
    model = KLAutoencoder(**config)
    try:
        model.load_state_dict(_current_attention_names(state))
    except RuntimeError as err:  # "Error(s) in loading state_dict for ...:" then a line a kind of misfit
        lines = str(err).strip().splitlines()
        first = lines[1].strip() if len(lines) > 1 else lines[0]
        raise UserError(f"vae.pretrained: {weights} does not fit its config.json ({first[:300]})") from None
    return model.eval()
