"""DiffiT, diffusion vision transformers (Hatamizadeh et al. 2024, "DiffiT: Diffusion Vision
Transformers for Image Generation", arXiv 2312.02139), image-space and latent.

Both are built of the DiffiT transformer block (eqs. 7-8), whose attention is TMSA,
time-dependent multi-head self-attention (:class:`~diffusion.models.layers.TimeDependentSelfAttention`,
eqs. 3-6): queries, keys and values are linear in the spatial tokens and in the time token
x_t, so the attention itself changes along the denoising trajectory. The time token is the
timestep embedding plus, for a class-conditional network, the label embedding (the label is
folded into it, as the paper's latent model does). Conditioned on a caption, the pooled
embedding is added to the time token likewise, and every DiffiT block gains a cross-attention
sub-layer to the caption's tokens after its TMSA (Stable Diffusion's, Rombach et al. 2022, §3.3),
the time token staying TMSA's.

* :class:`DiffiT`, image space (§3.2.1, Fig. 2): a U-shaped encoder-decoder of DiffiT
  ResBlocks (eqs. 9-10: a 3x3 convolution after GroupNorm and Swish, then a DiffiT block),
  TMSA in local windows with a relative position bias, convolutional down- and up-sampling
  and skip connections that the decoder concatenates.
* :class:`LatentDiffiT` (§3.2.2, Fig. 4): a ViT of DiffiT blocks on patchified latents,
  without down- or up-sampling, with fixed 2-D sin-cos position embeddings; its attention
  spans the whole token grid with a relative position bias over it (NVlabs/DiffiT), and the
  last layer is LayerNorm, SiLU and a linear map to the patches.

Named configs: :data:`~diffusion.models.configs.DIFFIT_CONFIGS` and
:data:`~diffusion.models.configs.LATENT_DIFFIT_CONFIGS`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from diffusion.models.configs import check_diffit
from diffusion.models.layers import (
    CrossAttention, Downsample, LabelEmbedding, PatchTransformer, TimeDependentSelfAttention, TimestepEmbedding,
    Upsample, check_conditioning, condition, group_norm, initialize_transformer, layer_norm, mlp, pooled_embedding,
)

if TYPE_CHECKING:
    from diffusion.models.text import TextEmbedding, TextEncoder


class DiffiTBlock(nn.Module):
    """The DiffiT transformer block (eqs. 7-8): ``x̂_s = TMSA(LN(x_s), x_t) + x_s`` and
    ``x_s = MLP(LN(x̂_s)) + x̂_s``; with ``text_dim``, ``x̂_s += CrossAttention(LN(x̂_s), text)``
    between the two. ``tokens`` may be the windows of several images, B of them in order
    (the caption's batch): each image's tokens attend to its caption."""

    def __init__(
        self, dim: int, num_heads: int, time_dim: int, window: int | None, mlp_ratio: float, text_dim: int | None = None
    ) -> None:
        super().__init__()
        self.norm1 = layer_norm(dim)
        self.attn = TimeDependentSelfAttention(dim, num_heads, time_dim, window)
        self.norm_cross = layer_norm(dim)  # no weights: nothing in the state dict without text
        self.cross_attn = None if text_dim is None else CrossAttention(dim, text_dim, num_heads)
        self.norm2 = layer_norm(dim)
        self.mlp = mlp(dim, mlp_ratio)

    def forward(self, tokens: torch.Tensor, time: torch.Tensor, text: TextEmbedding | None = None) -> torch.Tensor:
        tokens = tokens + self.attn(self.norm1(tokens), time)
        if text is not None:
            h = self.norm_cross(tokens)
            per_image = h.reshape(text.tokens.shape[0], -1, h.shape[-1])  # [B, windows * w^2, C]
            tokens = tokens + self.cross_attn(per_image, text).reshape(h.shape)
        return tokens + self.mlp(self.norm2(tokens))


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """[B, C, H, W] -> [B * (H/w)(W/w), w*w, C]: the tokens of each w x w window (Swin §3.2)."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // window, window, w // window, window)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(-1, window * window, c)


def window_merge(tokens: torch.Tensor, window: int, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`window_partition`: [B * (H/w)(W/w), w*w, C] -> [B, C, H, W]."""
    c = tokens.shape[-1]
    x = tokens.reshape(-1, height // window, width // window, window, window, c)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(-1, c, height, width)


class DiffiTResBlock(nn.Module):
    """The DiffiT ResBlock (eqs. 9-10): ``x̂_s = Conv3x3(Swish(GN(x_s)))`` and
    ``x_s = DiffiT-Block(x̂_s, x_t) + x_s``, the block's TMSA in ``window`` x ``window``
    windows, each attending within itself with the time token; a 1x1 convolution maps the
    residual where the width changes (the decoder's concatenated skips)."""

    def __init__(
        self, in_channels: int, out_channels: int, time_dim: int, num_heads: int, window: int, mlp_ratio: float,
        text_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.norm = group_norm(in_channels)
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.block = DiffiTBlock(out_channels, num_heads, time_dim, window, mlp_ratio, text_dim)
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)
        self.window = window

    def forward(self, x: torch.Tensor, time: torch.Tensor, text: TextEmbedding | None = None) -> torch.Tensor:
        h = self.conv(F.silu(self.norm(x)))
        height, width = h.shape[2:]
        windows = (height // self.window) * (width // self.window)
        tokens = self.block(window_partition(h, self.window), time.repeat_interleave(windows, dim=0), text)
        return window_merge(tokens, self.window, height, width) + self.skip(x)


class DiffiT(nn.Module):
    """Image-space DiffiT (see the module doc). ``forward(x, t, y=None)`` -> [B, out_channels, H, W].

    ``channel_mult``: width of each resolution level in units of ``base_channels``, with
    ``num_res_blocks`` DiffiT ResBlocks a level going down and one more going up;
    ``window_size``: TMSA's window (the whole map at levels smaller than it); the time token
    has ``4 * base_channels`` channels; ``num_classes`` adds the label (null class for
    ``y=None``) to it; ``text_encoder`` the caption's pooled embedding (the empty caption for
    ``y=None``), every block cross-attending to its tokens. A 3x3 convolution embeds the
    image ("tokenizer") and GroupNorm, Swish and a zero-initialised 3x3 convolution decode it
    ("head"), so a fresh model outputs zero.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        image_size: int,
        base_channels: int,
        channel_mult: Sequence[int],
        num_res_blocks: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float = 4.0,
        num_classes: int | None = None,
        text_encoder: TextEncoder | None = None,
    ) -> None:
        super().__init__()
        channel_mult = tuple(channel_mult)
        windows = check_diffit(
            image_size, base_channels=base_channels, channel_mult=channel_mult, num_heads=num_heads,
            window_size=window_size,
        )
        check_conditioning(num_classes, text_encoder)
        self.config = dict(
            in_channels=in_channels, out_channels=out_channels, image_size=image_size, base_channels=base_channels,
            channel_mult=channel_mult, num_res_blocks=num_res_blocks, num_heads=num_heads, window_size=window_size,
            mlp_ratio=mlp_ratio, num_classes=num_classes,
        )
        self.num_classes = num_classes  # the null class's index, which the trainer drops labels to
        time_dim = 4 * base_channels
        self.time_embed = TimestepEmbedding(base_channels, time_dim)
        self.label_embed = LabelEmbedding(num_classes, time_dim) if num_classes is not None else None
        self.pooled_embed = pooled_embedding(text_encoder, time_dim)
        text_dim = None if text_encoder is None else text_encoder.dim

        def res(cin: int, cout: int, level: int) -> DiffiTResBlock:
            return DiffiTResBlock(cin, cout, time_dim, num_heads, windows[level], mlp_ratio, text_dim)

        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        self.down = nn.ModuleList()
        skip_channels, ch = [base_channels], base_channels
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.down.append(res(ch, mult * base_channels, level))
                ch = mult * base_channels
                skip_channels.append(ch)
            if level < len(channel_mult) - 1:
                self.down.append(Downsample(ch))
                skip_channels.append(ch)
        # Going up, every residual block first concatenates one skip activation.
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(res(ch + skip_channels.pop(), mult * base_channels, level))
                ch = mult * base_channels
            if level > 0:
                self.up.append(Upsample(ch))
        self.norm_out = group_norm(ch)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)
        initialize_transformer(self, zero=[self.conv_out])
        self.text_encoder = text_encoder  # after the init: the encoder keeps its own

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, C, H, W], t [B] timesteps, y [B] class labels or [B, L] token ids (None: the
        null condition) -> [B, out_channels, H, W]."""
        time, text = condition(self, self.time_embed(t), y)
        h = self.conv_in(x)
        skips = [h]
        for layer in self.down:
            h = layer(h, time, text) if isinstance(layer, DiffiTResBlock) else layer(h)
            skips.append(h)
        for layer in self.up:
            h = layer(torch.cat([h, skips.pop()], dim=1), time, text) if isinstance(layer, DiffiTResBlock) else layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class LatentFinalLayer(nn.Module):
    """Latent DiffiT's last layer (NVlabs/DiffiT): LayerNorm, SiLU, a linear map of each token
    to its patch; the time token has no part in it."""

    def __init__(self, dim: int, out_features: int) -> None:
        super().__init__()
        self.norm = layer_norm(dim)
        self.linear = nn.Linear(dim, out_features)

    def forward(self, tokens: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        return self.linear(F.silu(self.norm(tokens)))


class LatentDiffiT(PatchTransformer):
    """Latent DiffiT (see the module doc): :class:`~diffusion.models.layers.PatchTransformer` of
    ``depth`` :class:`DiffiTBlock` s of width ``hidden_size`` on ``patch_size``^2 patches of the
    input (latents, or pixels), TMSA over the whole grid with a relative position bias; with a
    text encoder, cross-attention to the caption in every block (``text_attention`` "cross" only)."""

    def make_block(self, dim: int, num_heads: int, mlp_ratio: float, grid: int, last: bool) -> DiffiTBlock:
        if self.text_dim is not None and self.text_attention != "cross":
            raise ValueError(f"text_attention: {self.text_attention!r} is not a latent DiffiT's; allowed: 'cross'")
        return DiffiTBlock(dim, num_heads, dim, grid, mlp_ratio, self.text_dim)

    def make_final_layer(self, dim: int, out_features: int) -> LatentFinalLayer:
        return LatentFinalLayer(dim, out_features)

    def zero_initialised(self) -> list[nn.Module]:
        """The output layer, so a fresh model outputs exactly zero."""
        return [self.final_layer.linear]
