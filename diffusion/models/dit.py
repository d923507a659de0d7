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

from diffusion.models.layers import PatchTransformer, SelfAttention, layer_norm, mlp


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

    def __init__(self, dim: int, out_features: int) -> None:
        super().__init__()
        self.norm = layer_norm(dim)
        self.linear = nn.Linear(dim, out_features)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(PatchTransformer):
    """DiT (see the module doc): :class:`~diffusion.models.layers.PatchTransformer` of
    :class:`DiTBlock` s and the adaLN :class:`FinalLayer`; ``depth`` blocks of width
    ``hidden_size`` with ``num_heads`` heads on ``patch_size``^2 patches, the learned variance
    with ``out_channels`` 2C (§3.2: "we also learn the diagonal covariance")."""

    def make_block(self, dim: int, num_heads: int, mlp_ratio: float, grid: int) -> DiTBlock:
        return DiTBlock(dim, num_heads, mlp_ratio)

    def make_final_layer(self, dim: int, out_features: int) -> FinalLayer:
        return FinalLayer(dim, out_features)

    def zero_initialised(self) -> list[nn.Module]:
        """adaLN-Zero: every modulation and the final linear layer, so each block is the
        identity and a fresh model outputs exactly zero."""
        modulations = [block.modulation[1] for block in self.blocks] + [self.final_layer.modulation[1]]
        return [*modulations, self.final_layer.linear]
