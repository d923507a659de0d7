"""The noise-aware classifier p_φ(y | x_t, t) of classifier guidance (Dhariwal & Nichol 2021, §4.1).

ADM trains a classifier on noised images x_t at every t and guides sampling with its
gradient ∇ log p_φ(y | x_t) (:mod:`diffusion.sampling.guidance`). Its network is the U-Net's
down-sampling trunk with an attention pool at the 8x8 layer: here the encoder half of
:class:`~diffusion.models.unet.UNet` (its ``conv_in``, down path and middle, built by the
same :func:`~diffusion.models.unet.encoder`, conditioned on t by the same timestep
embedding), then GroupNorm, SiLU and :class:`AttentionPool2d` at the lowest resolution to
one logit a class. It sees no class label.

Named configs are :data:`~diffusion.models.configs.CLASSIFIER_CONFIGS` (torch-free, so
params.yaml is checked without torch); :func:`create_classifier` builds one. The file form
is plain data, ``{"config", "state_dict"}`` (:func:`classifier_state`,
:func:`classifier_from_state`), for ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from diffusion.models.configs import CLASSIFIER_CONFIGS, check_unet
from diffusion.models.layers import TimestepEmbedding, group_norm
from diffusion.models.unet import Blocks, encoder, initialize_weights

# ---------------------------------------------------------------- attention pooling


class AttentionPool2d(nn.Module):
    """CLIP's attention pooling (Radford et al. 2021), ADM's classifier head: the mean
    of the H*W tokens is prepended as one more token, a learned positional embedding is
    added, and that first token's multi-head attention over all H*W + 1 tokens, projected to
    ``out_dim``, is the output [B, out_dim]."""

    def __init__(self, size: int, channels: int, num_heads: int, out_dim: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.positional_embedding = nn.Parameter(torch.randn(size * size + 1, channels) / channels**0.5)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.flatten(2).transpose(1, 2)  # [B, HW, C]
        tokens = torch.cat([tokens.mean(1, keepdim=True), tokens], dim=1) + self.positional_embedding
        q, k, v = self.qkv(tokens).unflatten(-1, (3, self.num_heads, -1)).permute(2, 0, 3, 1, 4)
        pooled = F.scaled_dot_product_attention(q[:, :, :1], k, v)  # the first token's query only
        return self.proj(pooled.transpose(1, 2).flatten(2))[:, 0]


# ---------------------------------------------------------------- the classifier


class NoiseAwareClassifier(nn.Module):
    """p_φ(y | x_t, t) (see the module doc): ``forward(x_t, t)`` -> logits [B, num_classes].

    The U-Net's arguments and defaults, its shape rules (:func:`~diffusion.models.configs.check_unet`)
    and its init (:func:`~diffusion.models.unet.initialize_weights`), the pooling's output
    projection zero: a fresh classifier says p = 1/K for every class, so it does not guide.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        image_size: int,
        num_classes: int,
        base_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] | None = (16,),
        num_heads: int = 1,
        head_channels: int | None = None,
        dropout: float = 0.0,
        resblock_updown: bool = False,
        use_scale_shift_norm: bool = True,
        rescale_skip: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes: got {num_classes!r}; allowed: an int >= 2 (a classifier needs two classes)")
        channel_mult = tuple(channel_mult)
        resolutions = [image_size // 2**level for level in range(len(channel_mult))]
        attention_resolutions = check_unet(
            image_size, base_channels=base_channels, channel_mult=channel_mult,
            attention_resolutions=attention_resolutions, num_heads=num_heads, head_channels=head_channels,
        )
        # The resolved constructor arguments: what rebuilds this network (classifier_from_state).
        self.config = dict(
            in_channels=in_channels, image_size=image_size, num_classes=num_classes, base_channels=base_channels,
            channel_mult=channel_mult, num_res_blocks=num_res_blocks, attention_resolutions=attention_resolutions,
            num_heads=num_heads, head_channels=head_channels, dropout=dropout, resblock_updown=resblock_updown,
            use_scale_shift_norm=use_scale_shift_norm, rescale_skip=rescale_skip,
        )
        self.num_classes = num_classes
        emb_channels = 4 * base_channels
        blocks = Blocks(
            emb_channels, dropout=dropout, use_scale_shift_norm=use_scale_shift_norm, rescale_skip=rescale_skip,
            resblock_updown=resblock_updown, num_heads=num_heads, head_channels=head_channels,
        )
        self.time_embed = TimestepEmbedding(base_channels, emb_channels)
        self.conv_in, self.down, self.middle, skip_channels = encoder(
            blocks, in_channels=in_channels, base_channels=base_channels, channel_mult=channel_mult,
            num_res_blocks=num_res_blocks, resolutions=resolutions, attention_resolutions=attention_resolutions,
        )
        channels = skip_channels[-1]
        self.norm_out = group_norm(channels)
        self.pool = AttentionPool2d(resolutions[-1], channels, blocks.heads(channels), num_classes)
        initialize_weights(self, last=self.pool.proj)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t [B, C, H, W] and its model timesteps t [B] (integer or real) -> logits [B, num_classes]."""
        emb = F.silu(self.time_embed(t))
        h = self.conv_in(x)
        for stage in self.down:
            h = stage(h, emb)
        h = self.middle(h, emb)
        return self.pool(F.silu(self.norm_out(h)))


def create_classifier(name: str, *, in_channels: int, image_size: int, num_classes: int) -> NoiseAwareClassifier:
    """The classifier of config ``name`` (:data:`~diffusion.models.configs.CLASSIFIER_CONFIGS`)."""
    if name not in CLASSIFIER_CONFIGS:
        raise ValueError(f"classifier name: unknown '{name}'; allowed: {', '.join(CLASSIFIER_CONFIGS)}")
    return NoiseAwareClassifier(
        in_channels=in_channels, image_size=image_size, num_classes=num_classes, **CLASSIFIER_CONFIGS[name]
    )


# ---------------------------------------------------------------- the file form


def classifier_state(net: NoiseAwareClassifier, **extra: Any) -> dict[str, Any]:
    """Plain data that rebuilds ``net``: its config and weights (and ``extra``, e.g. the process it was trained on)."""
    return {"config": dict(net.config), "state_dict": net.state_dict(), **extra}


def classifier_from_state(state: dict[str, Any]) -> NoiseAwareClassifier:
    """The classifier of :func:`classifier_state`'s ``state``, in eval mode."""
    net = NoiseAwareClassifier(**state["config"])
    net.load_state_dict(state["state_dict"])
    return net.eval()
