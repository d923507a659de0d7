"""DiT, the diffusion transformer (Peebles & Xie 2023, "Scalable Diffusion Models with
Transformers"), a denoiser eps_theta(x_t, t[, y]) on patches.

§3.2: patchify the input into (H/p)(W/p) tokens of width d, add fixed 2-D sin-cos position
embeddings, run N DiT blocks conditioned on ``c = t_emb + y_emb`` by adaLN-Zero, then a final
adaLN, a linear layer to p*p*C_out a token and unpatchify. adaLN-Zero: every block regresses
from c a shift, a scale and a gate for its attention and for its MLP; the gates (all
modulation layers) and the final layer start at zero, so each block starts as the identity
and a fresh model outputs exactly zero. The named configs (S, B, L, XL with patches 2, 4, 8)
are :data:`~diffusion.models.configs.DIT_CONFIGS`.
"""

from __future__ import annotations

import torch
from torch import nn

from diffusion.models.configs import check_patch_transformer
from diffusion.models.layers import (
    LabelEmbedding, PatchEmbedding, SelfAttention, TimestepEmbedding, condition, initialize_transformer, layer_norm,
    mlp, unpatchify,
)

# DiT's timestep embedding: 256 sinusoid frequencies into the MLP (§3.2, "Timestep embedding").
TIME_FREQUENCIES = 256


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN (§3.2): ``x * (1 + scale) + shift``, one shift and scale a sample, over its tokens."""
    return torch.addcmul(shift[:, None], x, 1 + scale[:, None])


class DiTBlock(nn.Module):
    """A DiT block with adaLN-Zero (§3.2, Fig. 3):
    ``x += gate_msa * Attention(modulate(LN(x), shift_msa, scale_msa))`` and
    ``x += gate_mlp * MLP(modulate(LN(x), shift_mlp, scale_mlp))``, the six regressed from c."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = layer_norm(dim)
        self.attn = SelfAttention(dim, num_heads)
        self.norm2 = layer_norm(dim)
        self.mlp = mlp(dim, mlp_ratio)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(c).chunk(6, dim=1)
        x = torch.addcmul(x, gate_msa[:, None], self.attn(modulate(self.norm1(x), shift_msa, scale_msa)))
        return torch.addcmul(x, gate_mlp[:, None], self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))


class FinalLayer(nn.Module):
    """adaLN, then a linear map of each token to its p x p x C_out patch (§3.2, "Transformer decoder")."""

    def __init__(self, dim: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm = layer_norm(dim)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """DiT (see the module doc). ``forward(x, t, y=None)`` -> [B, out_channels, H, W].

    ``depth`` blocks of width ``hidden_size`` with ``num_heads`` heads on ``patch_size``^2
    patches; ``num_classes``: class-conditional, with the null class of classifier-free
    guidance (index ``num_classes``) used when ``y`` is None; ``out_channels`` 2C for the
    learned variance (§3.2: "we also learn the diagonal covariance").
    """

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        image_size: int,
        depth: int,
        hidden_size: int,
        patch_size: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        check_patch_transformer(image_size, hidden_size=hidden_size, patch_size=patch_size, num_heads=num_heads)
        self.config = dict(
            in_channels=in_channels, out_channels=out_channels, image_size=image_size, depth=depth,
            hidden_size=hidden_size, patch_size=patch_size, num_heads=num_heads, mlp_ratio=mlp_ratio,
            num_classes=num_classes,
        )
        self.patch_size, self.out_channels = patch_size, out_channels
        self.num_classes = num_classes  # the null class's index, which the trainer drops labels to
        self.patch_embed = PatchEmbedding(in_channels, hidden_size, patch_size, image_size)  # fixed positions (§3.2)
        self.time_embed = TimestepEmbedding(TIME_FREQUENCIES, hidden_size)
        self.label_embed = LabelEmbedding(num_classes, hidden_size) if num_classes is not None else None
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, out_channels)
        # adaLN-Zero: every modulation and the final linear layer zero, so each block is the
        # identity and a fresh model outputs exactly zero.
        modulations = [block.modulation[1] for block in self.blocks] + [self.final_layer.modulation[1]]
        initialize_transformer(self, zero=[*modulations, self.final_layer.linear])

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, C, H, W], t [B] timesteps, y [B] class labels (None: the null class) -> [B, out_channels, H, W]."""
        tokens = self.patch_embed(x)
        c = condition(self.time_embed(t), self.label_embed, y)
        for block in self.blocks:
            tokens = block(tokens, c)
        return unpatchify(self.final_layer(tokens, c), self.patch_size, self.out_channels)
