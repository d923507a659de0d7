"""The ADM U-Net: a denoiser eps_theta(x_t, t[, y]) for image diffusion.

Ho et al. 2020, "Denoising Diffusion Probabilistic Models" (DDPM), App. B: a
PixelCNN++-style U-Net of wide residual blocks with GroupNorm, a sinusoidal
timestep embedding added in every block, and self-attention at 16x16.
Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis" (ADM),
§3 improves it with multi-head attention at several resolutions (64 channels a
head), BigGAN residual blocks for up/down-sampling, adaptive GroupNorm
(``GroupNorm(h) * (1 + scale) + shift``) and class conditioning; §2/App. A of
Nichol & Dhariwal 2021 ("Improved DDPM") add the learned variance (2C outputs).

Layout: ``conv_in``; per resolution level ``num_res_blocks`` residual blocks
(+ attention at the chosen resolutions) and a down-sampling step; a middle of
residual block, attention, residual block; the mirror image going up, where each
block first concatenates the matching encoder activation (the skip); then
GroupNorm, SiLU and a zero-initialised ``conv_out``, so a fresh model predicts 0.

Conditioned on a caption (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent
Diffusion Models", §3.3, Stable Diffusion's ``SpatialTransformer``): every self-attention block
is followed by a cross-attention block to the caption's tokens, and the caption's pooled
embedding is added to the timestep embedding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from diffusion.models.configs import check_unet
from diffusion.models.layers import (
    CrossAttention, Downsample, LabelEmbedding, SelfAttention, TimestepEmbedding, Upsample, check_conditioning,
    condition, group_norm, pooled_embedding, text_layers,
)

if TYPE_CHECKING:
    from diffusion.models.text import TextEmbedding, TextEncoder

# ---------------------------------------------------------------- resampling


def _down(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, 2)


def _up(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2.0, mode="nearest")


def _same(x: torch.Tensor) -> torch.Tensor:
    return x


# The parameter-free resampling inside a BigGAN residual block (ADM §3).
RESAMPLE = {"none": _same, "down": _down, "up": _up}

# The resampling step between levels without BigGAN blocks (DDPM).
RESAMPLE_BLOCKS = {"down": Downsample, "up": Upsample}


# ---------------------------------------------------------------- residual and attention blocks


def _additive(h: torch.Tensor, norm: nn.GroupNorm, e: torch.Tensor) -> torch.Tensor:
    """DDPM: the embedding is added to the features, then normalised."""
    return norm(h + e)


def _scale_shift(h: torch.Tensor, norm: nn.GroupNorm, e: torch.Tensor) -> torch.Tensor:
    """ADM §3 adaptive GroupNorm: ``AdaGN(h, y) = GroupNorm(h) * (1 + y_s) + y_b``."""
    scale, shift = e.chunk(2, dim=1)
    return torch.addcmul(shift, norm(h), 1.0 + scale)


class ResBlock(nn.Module):
    """A wide residual block conditioned on the embedding (DDPM App. B; ADM §3).

    ``h = conv(SiLU(GN(x)))``; the embedding enters by addition before the second
    GroupNorm or, with ``use_scale_shift_norm``, as AdaGN after it; then SiLU,
    dropout and a zero-initialised conv, so the block starts as its skip path.
    ``resample`` "down"/"up" makes it a BigGAN-style resampling block (ADM §3):
    both paths are average-pooled / nearest-upsampled, the main one after its first
    activation. ``rescale_skip`` divides the sum by sqrt(2), keeping its variance
    (Song et al. 2021, "Score-Based Generative Modeling through SDEs", NCSN++).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        *,
        dropout: float = 0.0,
        use_scale_shift_norm: bool = True,
        rescale_skip: bool = False,
        resample: str = "none",
    ) -> None:
        super().__init__()
        self.norm_in = group_norm(in_channels)
        self.conv_in = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_channels, out_channels * (2 if use_scale_shift_norm else 1))
        self.condition = _scale_shift if use_scale_shift_norm else _additive
        self.norm_out = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv_out = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)
        self.resample = RESAMPLE[resample]
        self.skip_scale = 2**-0.5 if rescale_skip else 1.0

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """``emb`` is SiLU(embedding), [B, emb_channels] (the activation every block's
        projection starts with, computed once by :class:`UNet`)."""
        h = self.conv_in(self.resample(F.silu(self.norm_in(x))))
        h = self.condition(h, self.norm_out, self.emb_proj(emb)[:, :, None, None])
        h = self.conv_out(self.dropout(F.silu(h)))
        out = self.skip(self.resample(x)) + h
        return out.mul_(self.skip_scale) if self.skip_scale != 1.0 else out


class AttentionBlock(SelfAttention):
    """Multi-head self-attention over the H*W positions (DDPM App. B; ADM §3): GroupNorm,
    :class:`~diffusion.models.layers.SelfAttention` on the [B, H*W, C] tokens (a view when the
    input is channels_last) with a zero-initialised output projection, residual. With
    ``text_dim``, a :class:`CrossAttentionBlock` to the caption follows (``cross``)."""

    def __init__(self, channels: int, num_heads: int, text_dim: int | None = None) -> None:
        super().__init__(channels, num_heads)
        self.norm = group_norm(channels)
        self.cross = None if text_dim is None else CrossAttentionBlock(channels, text_dim, num_heads)

    def forward(self, x: torch.Tensor, text: TextEmbedding | None = None) -> torch.Tensor:
        h = super().forward(self.norm(x).flatten(2).transpose(1, 2))  # [B, HW, C]
        x = x + h.transpose(1, 2).unflatten(2, x.shape[2:])
        return x if self.cross is None else self.cross(x, text)


class CrossAttentionBlock(CrossAttention):
    """Cross-attention from the H*W positions to the caption (LDM §3.3): GroupNorm,
    :class:`~diffusion.models.layers.CrossAttention` of the [B, H*W, C] tokens to the caption's
    tokens (its output projection zero-initialised), residual."""

    def __init__(self, channels: int, text_dim: int, num_heads: int) -> None:
        super().__init__(channels, text_dim, num_heads)
        self.norm = group_norm(channels)

    def forward(self, x: torch.Tensor, text: TextEmbedding) -> torch.Tensor:
        h = super().forward(self.norm(x).flatten(2).transpose(1, 2), text)  # [B, HW, C]
        return x + h.transpose(1, 2).unflatten(2, x.shape[2:])


class EmbedSequential(nn.ModuleList):
    """Blocks applied in order; residual blocks also get the embedding, attention blocks the caption's."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, text: TextEmbedding | None = None) -> torch.Tensor:
        for block in self:
            if isinstance(block, ResBlock):
                x = block(x, emb)
            elif isinstance(block, AttentionBlock):
                x = block(x, text)
            else:
                x = block(x)
        return x


# ---------------------------------------------------------------- the encoder half


@dataclass(frozen=True)
class Blocks:
    """How one network builds its residual, attention and resampling blocks, alike in the
    U-Net and in its encoder half alone (the classifier, :mod:`diffusion.models.classifier`)."""

    emb_channels: int
    dropout: float
    use_scale_shift_norm: bool
    rescale_skip: bool
    resblock_updown: bool
    num_heads: int
    head_channels: int | None
    text_dim: int | None = None  # the caption's width: each attention block then cross-attends to it

    def heads(self, channels: int) -> int:
        """``channels // head_channels`` (ADM: 64 channels a head), else ``num_heads``."""
        return channels // self.head_channels if self.head_channels else self.num_heads

    def res(self, cin: int, cout: int, resample: str = "none") -> ResBlock:
        return ResBlock(
            cin, cout, self.emb_channels, dropout=self.dropout, use_scale_shift_norm=self.use_scale_shift_norm,
            rescale_skip=self.rescale_skip, resample=resample,
        )

    def attention(self, channels: int) -> AttentionBlock:
        return AttentionBlock(channels, self.heads(channels), self.text_dim)

    def resample(self, channels: int, direction: str) -> nn.Module:
        """A BigGAN residual block (``resblock_updown``, ADM §3) or DDPM's convolution."""
        if self.resblock_updown:
            return self.res(channels, channels, direction)
        return RESAMPLE_BLOCKS[direction](channels)


def encoder(
    blocks: Blocks, *, in_channels: int, base_channels: int, channel_mult: tuple[int, ...], num_res_blocks: int,
    resolutions: list[int], attention_resolutions: tuple[int, ...],
) -> tuple[nn.Conv2d, nn.ModuleList, EmbedSequential, list[int]]:
    """The U-Net's first half: ``conv_in``, the down path (each entry yields one skip
    activation), the middle (residual block, attention, residual block), and the channels
    of each skip activation, the last being the middle's."""
    conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
    down = nn.ModuleList()
    skip_channels, ch = [base_channels], base_channels
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            stage = EmbedSequential([blocks.res(ch, mult * base_channels)])
            ch = mult * base_channels
            if resolutions[level] in attention_resolutions:
                stage.append(blocks.attention(ch))
            down.append(stage)
            skip_channels.append(ch)
        if level < len(channel_mult) - 1:
            down.append(EmbedSequential([blocks.resample(ch, "down")]))
            skip_channels.append(ch)
    middle = EmbedSequential([blocks.res(ch, ch), blocks.attention(ch), blocks.res(ch, ch)])
    return conv_in, down, middle, skip_channels


def initialize_weights(network: nn.Module, last: nn.Module) -> None:
    """DDPM's init (App. B, TF ``variance_scaling(1, "fan_avg", "uniform")``): Xavier-uniform
    weights, zero biases. The last layer of every residual branch (residual block
    ``conv_out``, attention ``proj``, cross-attention ``proj`` and the pooled caption's
    projection) and ``last``, the network's output layer, are zero, so each block starts as the
    identity and a fresh network outputs exactly zero."""
    for module in network.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
    zero_init = [last, *text_layers(network)]
    for module in network.modules():
        if isinstance(module, ResBlock):
            zero_init.append(module.conv_out)
        if isinstance(module, AttentionBlock):
            zero_init.append(module.proj)
    for layer in zero_init:
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)


# ---------------------------------------------------------------- the U-Net


class UNet(nn.Module):
    """The ADM U-Net (see the module doc). ``forward(x, t, y=None)`` -> [B, out_channels, H, W].

    ``channel_mult``: width of each resolution level in units of ``base_channels``;
    ``attention_resolutions``: feature-map sizes (e.g. ``(16, 8)``) that get attention,
    ``None`` for the lowest one only (the middle block always has it);
    ``head_channels``: channels per head (ADM: 64), else ``num_heads`` heads;
    ``num_classes``: class-conditional, with an extra row, index ``num_classes``, for
    the null class of classifier-free guidance (Ho & Salimans 2022), used when ``y`` is None;
    ``text_encoder``: conditioned on captions (token ids ``y`` [B, L]; None: the empty caption).
    """

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        image_size: int,
        base_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] | None = (16,),
        num_heads: int = 1,
        head_channels: int | None = None,
        dropout: float = 0.0,
        num_classes: int | None = None,
        resblock_updown: bool = False,
        use_scale_shift_norm: bool = True,
        rescale_skip: bool = False,
        text_encoder: TextEncoder | None = None,
    ) -> None:
        super().__init__()
        channel_mult = tuple(channel_mult)
        resolutions = [image_size // 2**level for level in range(len(channel_mult))]
        attention_resolutions = check_unet(
            image_size, base_channels=base_channels, channel_mult=channel_mult,
            attention_resolutions=attention_resolutions, num_heads=num_heads, head_channels=head_channels,
        )
        check_conditioning(num_classes, text_encoder)
        # The resolved constructor arguments: what rebuilds this network (or a peer's twin).
        self.config = dict(
            in_channels=in_channels, out_channels=out_channels, image_size=image_size, base_channels=base_channels,
            channel_mult=channel_mult, num_res_blocks=num_res_blocks, attention_resolutions=attention_resolutions,
            num_heads=num_heads, head_channels=head_channels, dropout=dropout, num_classes=num_classes,
            resblock_updown=resblock_updown, use_scale_shift_norm=use_scale_shift_norm, rescale_skip=rescale_skip,
        )
        self.num_classes = num_classes  # the null class's index, which the trainer drops labels to
        emb_channels = 4 * base_channels
        blocks = Blocks(
            emb_channels, dropout=dropout, use_scale_shift_norm=use_scale_shift_norm, rescale_skip=rescale_skip,
            resblock_updown=resblock_updown, num_heads=num_heads, head_channels=head_channels,
            text_dim=None if text_encoder is None else text_encoder.dim,
        )

        self.time_embed = TimestepEmbedding(base_channels, emb_channels)
        self.label_embed = LabelEmbedding(num_classes, emb_channels) if num_classes is not None else None
        self.pooled_embed = pooled_embedding(text_encoder, emb_channels)

        self.conv_in, self.down, self.middle, skip_channels = encoder(
            blocks, in_channels=in_channels, base_channels=base_channels, channel_mult=channel_mult,
            num_res_blocks=num_res_blocks, resolutions=resolutions, attention_resolutions=attention_resolutions,
        )
        ch = skip_channels[-1]

        # Decoder: every entry of self.up first concatenates one skip activation.
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                stage = EmbedSequential([blocks.res(ch + skip_channels.pop(), mult * base_channels)])
                ch = mult * base_channels
                if resolutions[level] in attention_resolutions:
                    stage.append(blocks.attention(ch))
                if level > 0 and i == num_res_blocks:
                    stage.append(blocks.resample(ch, "up"))
                self.up.append(stage)

        self.norm_out = group_norm(ch)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)
        initialize_weights(self, last=self.conv_out)
        self.text_encoder = text_encoder  # after the init: the encoder keeps its own

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, C, H, W], t [B] timesteps, y [B] class labels or [B, L] token ids (None: the
        null condition) -> [B, out_channels, H, W]."""
        emb, text = condition(self, self.time_embed(t), y)
        emb = F.silu(emb)

        h = self.conv_in(x)
        skips = [h]
        for stage in self.down:
            h = stage(h, emb, text)
            skips.append(h)
        h = self.middle(h, emb, text)
        for stage in self.up:
            h = stage(torch.cat([h, skips.pop()], dim=1), emb, text)
        return self.conv_out(F.silu(self.norm_out(h)))
