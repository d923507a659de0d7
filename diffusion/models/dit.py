"""DiT, the diffusion transformer (Peebles & Xie 2023, "Scalable Diffusion Models with
Transformers"), a denoiser eps_theta(x_t, t[, y]) on patches.

§3.2: patchify the input into (H/p)(W/p) tokens of width d, add fixed 2-D sin-cos position
embeddings, run N DiT blocks conditioned on ``c = t_emb + y_emb`` by adaLN-Zero, then a final
adaLN, a linear layer to p*p*C_out a token and unpatchify. adaLN-Zero: every block regresses
from c a shift, a scale and a gate for its attention and for its MLP; the gates (all
modulation layers) and the final layer start at zero, so each block starts as the identity
and a fresh model outputs exactly zero. The named configs (S, B, L, XL with patches 2, 4, 8)
are :data:`~diffusion.models.configs.DIT_CONFIGS`.

Conditioned on a caption, ``c = t_emb + W pooled`` and each block also attends to the caption's
tokens (``text_attention``): "cross", PixArt-alpha's cross-attention sub-layer between
self-attention and the MLP (Chen et al. 2024, §2.3), or "joint", SD3's MMDiT block (Esser et al.
2024, "Scaling Rectified Flow Transformers", §4 and Fig. 2b): the text tokens are a second
stream with its own adaLN-Zero modulation, projections and MLP, and one attention runs over the
image and text tokens together.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from diffusion.models.layers import CrossAttention, PatchTransformer, SelfAttention, attention, layer_norm, mlp

if TYPE_CHECKING:
    from diffusion.models.text import TextEmbedding


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


class CrossAttentionDiTBlock(DiTBlock):
    """PixArt-alpha's block (§2.3, Fig. 4): a DiT block with a cross-attention sub-layer to the
    caption between self-attention and the MLP, ``x += CrossAttention(LN(x), text)``, outside
    the adaLN modulation (its output projection starts at zero instead)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, text_dim: int) -> None:
        super().__init__(dim, num_heads, mlp_ratio)
        self.norm_cross = layer_norm(dim)
        self.cross_attn = CrossAttention(dim, text_dim, num_heads)

    def forward(self, x: torch.Tensor, c: torch.Tensor, text: TextEmbedding) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(c).chunk(6, dim=1)
        x = torch.addcmul(x, gate_msa[:, None], self.attn(modulate(self.norm1(x), shift_msa, scale_msa)))
        x = x + self.cross_attn(self.norm_cross(x), text)
        return torch.addcmul(x, gate_mlp[:, None], self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))


class TextKeys(nn.Module):
    """The text stream of the last MMDiT block (SD3's ``context_pre_only``): adaLN (shift and
    scale) and the fused query-key-value projection only, since nothing reads its output."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1 = layer_norm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))


class JointDiTBlock(nn.Module):
    """SD3's MMDiT block (Esser et al. 2024, §4, Fig. 2b): an image and a text stream, each a DiT
    block's weights (adaLN-Zero modulation from c, qkv, output projection, MLP), joined in one
    attention over the N + L tokens; padding text tokens are never attended. ``last``: the text
    stream only gives keys and values (:class:`TextKeys`) and is dropped after the block.
    ``forward(x, c, text) -> (x, text)``, ``text.tokens`` the text stream."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, last: bool) -> None:
        super().__init__()
        self.image = DiTBlock(dim, num_heads, mlp_ratio)
        self.text = TextKeys(dim) if last else DiTBlock(dim, num_heads, mlp_ratio)
        self.num_heads, self.last = num_heads, last

    def forward(self, x: torch.Tensor, c: torch.Tensor, text: TextEmbedding) -> tuple[torch.Tensor, TextEmbedding]:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.image.modulation(c).chunk(6, dim=1)
        text_mod = self.text.modulation(c).chunk(2 if self.last else 6, dim=1)
        text_qkv = self.text.qkv if self.last else self.text.attn.qkv
        qkv = torch.cat([
            self.image.attn.qkv(modulate(self.image.norm1(x), shift_msa, scale_msa)),
            text_qkv(modulate(self.text.norm1(text.tokens), text_mod[0], text_mod[1])),
        ], dim=1)
        n = x.shape[1]
        mask = F.pad(text.mask, (n, 0), value=True)  # every image token, the caption's real tokens
        h = attention(*qkv.chunk(3, dim=-1), self.num_heads, mask)
        x = torch.addcmul(x, gate_msa[:, None], self.image.attn.proj(h[:, :n]))
        x = torch.addcmul(x, gate_mlp[:, None], self.image.mlp(modulate(self.image.norm2(x), shift_mlp, scale_mlp)))
        if self.last:
            return x, text
        _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = text_mod
        t = torch.addcmul(text.tokens, gate_msa[:, None], self.text.attn.proj(h[:, n:]))
        t = torch.addcmul(t, gate_mlp[:, None], self.text.mlp(modulate(self.text.norm2(t), shift_mlp, scale_mlp)))
        return x, replace(text, tokens=t)


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

    def make_block(self, dim: int, num_heads: int, mlp_ratio: float, grid: int, last: bool) -> nn.Module:
        if self.text_dim is None:
            return DiTBlock(dim, num_heads, mlp_ratio)
        if self.text_attention == "joint":
            return JointDiTBlock(dim, num_heads, mlp_ratio, last)
        return CrossAttentionDiTBlock(dim, num_heads, mlp_ratio, self.text_dim)

    def make_final_layer(self, dim: int, out_features: int) -> FinalLayer:
        return FinalLayer(dim, out_features)

    def zero_initialised(self) -> list[nn.Module]:
        """adaLN-Zero: every modulation (both streams' in joint blocks) and the final linear
        layer, so each block is the identity and a fresh model outputs exactly zero."""
        modulated = [m for m in self.modules() if isinstance(m, (DiTBlock, TextKeys, FinalLayer))]
        modulations = [m.modulation[1] for m in modulated]
        return [*modulations, self.final_layer.linear]
