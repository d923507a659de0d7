"""Layers every denoising network shares: the timestep and label embeddings, the conditioning
on a class or a caption, multi-head self-attention (plain, and DiffiT's time-dependent form with
a relative position bias) and cross-attention to text tokens, the transformer MLP, patches and
their fixed 2-D position embedding, and resampling.

:mod:`~diffusion.models.unet`, :mod:`~diffusion.models.dit` and :mod:`~diffusion.models.diffit`
build from these; no network has its own copy.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from diffusion.models.configs import TEXT_ATTENTION, check_patch_transformer

if TYPE_CHECKING:
    from diffusion.models.text import TextEmbedding, TextEncoder

# The patch transformers' timestep embedding: 256 sinusoid frequencies into the MLP (DiT §3.2;
# NVlabs/DiffiT likewise).
TIME_FREQUENCIES = 256

# ---------------------------------------------------------------- timestep and label embeddings


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding of (integer or real) timesteps, [B] -> [B, dim] float32.

    The Transformer's positional encoding (Vaswani et al. 2017, §3.5) as DDPM and DiT use
    it for t: ``[cos(t * w_i), sin(t * w_i)]`` with ``w_i = max_period^(-i / half)``.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) / half * torch.arange(half, device=t.device, dtype=torch.float32))
    args = t.float()[:, None] * freqs[None]
    return F.pad(torch.cat([torch.cos(args), torch.sin(args)], dim=-1), (0, dim % 2))


class TimestepEmbedding(nn.Sequential):
    """t -> MLP(sinusoid(t)): Linear, SiLU, Linear (DDPM App. B; DiT §3.2 with 256 frequencies)."""

    def __init__(self, frequencies: int, dim: int) -> None:
        super().__init__(nn.Linear(frequencies, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.frequencies = frequencies

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return super().forward(timestep_embedding(t, self.frequencies))


class LabelEmbedding(nn.Embedding):
    """One row a class plus the null class, index ``num_classes``, of classifier-free guidance
    (Ho & Salimans 2022); the trainer drops labels to it (``train.p_uncond``)."""

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__(num_classes + 1, dim)
        self.num_classes = num_classes

    def forward(self, y: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        """[B, dim] for labels ``y`` [B]; ``None``: the null class for all ``batch_size``."""
        if y is None:
            y = torch.full((batch_size,), self.num_classes, device=self.weight.device)
        return super().forward(y)


def check_conditioning(num_classes: int | None, text_encoder: TextEncoder | None) -> None:
    """A network is conditioned on class labels or on captions, not both (ValueError, one line)."""
    if num_classes is not None and text_encoder is not None:
        raise ValueError("num_classes and text_encoder: a network takes class labels or captions, not both; give one")


def pooled_embedding(text_encoder: TextEncoder | None, dim: int) -> nn.Linear | None:
    """The projection of a caption's pooled embedding into the time embedding (Imagen §2.2,
    Saharia et al. 2022; SD3's ``c = t + pooled``), zero-initialised by each family's init, so
    a fresh network's conditioning vector is the time embedding's; None without text."""
    return None if text_encoder is None else nn.Linear(text_encoder.dim, dim)


def condition(
    network: nn.Module, time: torch.Tensor, y: torch.Tensor | None
) -> tuple[torch.Tensor, TextEmbedding | None]:
    """The conditioning vector and the caption's embedding, for every family alike.

    A class-conditional network (``network.label_embed``): ``c = t + y_emb`` (DiT §3.2; the
    U-Net's embedding; DiffiT's time token), no text. A text-conditional one
    (``network.text_encoder``, with ``network.pooled_embed``): ``y`` token ids [B, L] (None: the
    empty caption, the null condition) encoded once, ``c = t + W pooled``, and the embedding
    that cross- or joint attention reads. Otherwise ``c = t``."""
    if network.text_encoder is not None:
        if y is None:
            y = network.text_encoder.null_tokens.expand(time.shape[0], -1)
        text = network.text_encoder(y)
        return time + network.pooled_embed(text.pooled), text
    if network.label_embed is not None:
        return time + network.label_embed(y, time.shape[0]), None
    if y is not None:
        raise ValueError("y: class labels given to a model built without num_classes")
    return time, None


def null_condition(network: nn.Module) -> int | torch.Tensor:
    """The null condition of classifier-free guidance (Ho & Salimans 2022), what the trainer drops
    conditions to and guidance's unconditional pass is given: the null class ``num_classes`` of a
    class-conditional network, the empty caption's token ids [L] of a text-conditional one (each
    broadcast over a batch by its caller)."""
    text_encoder = getattr(network, "text_encoder", None)
    if text_encoder is not None:
        return text_encoder.null_tokens
    if getattr(network, "num_classes", None) is not None:
        return network.num_classes
    raise ValueError("null_condition: the model is unconditional (built without num_classes or text_encoder)")


# ---------------------------------------------------------------- attention


class SelfAttention(nn.Module):
    """Multi-head self-attention on tokens [B, N, C] (Vaswani et al. 2017, §3.2.2):
    one fused projection to queries, keys and values, ``softmax(QK^T / sqrt(d) + B) V`` per
    head (B an optional additive bias), an output projection."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads={num_heads} does not divide the width {dim}; use a divisor of {dim}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def attend(self, qkv: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """[B, N, 3C] fused queries, keys and values -> [B, N, C] projected attention output;
        ``bias`` [1, heads, N, N] is added to the attention logits."""
        q, k, v = qkv.unflatten(-1, (3, self.num_heads, -1)).permute(2, 0, 3, 1, 4)  # each [B, heads, N, C/heads]
        bias = None if bias is None else bias.to(q.dtype)
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(h.transpose(1, 2).flatten(2))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.attend(self.qkv(tokens))


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, mask: torch.Tensor | None
) -> torch.Tensor:
    """Multi-head ``softmax(QK^T / sqrt(d)) V`` (Vaswani et al. 2017, §3.2.2) of queries
    [B, N, C] over keys and values [B, M, C], -> [B, N, C]; ``mask`` [B, M] bool: the keys that
    may be attended (False: padding, never attended)."""
    q, k, v = (a.unflatten(-1, (num_heads, -1)).transpose(1, 2) for a in (q, k, v))  # [B, heads, *, C/heads]
    mask = None if mask is None else mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2)


class CrossAttention(nn.Module):
    """Multi-head cross-attention from image tokens to a caption (Rombach et al. 2022, "High-
    Resolution Image Synthesis with Latent Diffusion Models", §3.3; PixArt-alpha, Chen et al.
    2024, §2.3): queries from the tokens [B, N, C], keys and values from the text tokens
    [B, L, D] by their own projection, attention over the caption's real tokens only
    (``TextEmbedding.mask``), an output projection. Each family zero-initialises ``proj``, so a
    fresh layer adds nothing and a fresh network is its unconditional self."""

    def __init__(self, dim: int, text_dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads={num_heads} does not divide the width {dim}; use a divisor of {dim}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(text_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, tokens: torch.Tensor, text: TextEmbedding) -> torch.Tensor:
        """tokens [B, N, C] and the caption's embedding (B of them) -> [B, N, C]."""
        k, v = self.kv(text.tokens).chunk(2, dim=-1)
        return self.proj(attention(self.q(tokens), k, v, self.num_heads, text.mask))


class RelativePositionBias(nn.Module):
    """Swin's relative position bias (Liu et al. 2021, §3.2): a learned table of one value a
    head for each of the (2w-1)^2 offsets between two positions of a w x w window, gathered
    into the bias B of ``softmax(QK^T / sqrt(d) + B) V``."""

    def __init__(self, window: int, num_heads: int) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.table, std=0.02)
        rows, cols = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
        rows, cols = rows.flatten(), cols.flatten()
        offset = (rows[:, None] - rows[None] + window - 1) * (2 * window - 1) + (cols[:, None] - cols[None] + window - 1)
        self.register_buffer("index", offset, persistent=False)

    def forward(self) -> torch.Tensor:
        """[1, heads, w^2, w^2]: four dimensions, so that CPU attention takes its flash kernel
        (a [heads, N, N] mask falls back to the much slower math path, BENCHMARKS.md)."""
        return self.table[self.index].permute(2, 0, 1)[None]


class TimeDependentSelfAttention(SelfAttention):
    """TMSA, DiffiT's attention (Hatamizadeh et al. 2024, eqs. 3-6): queries, keys and values
    are linear in the spatial token x_s and the time token x_t,
    ``q_s = x_s W_qs + x_t W_qt`` (likewise k_s, v_s), so the attention changes with t;
    ``Attention = softmax(QK^T / sqrt(d) + B) V`` with B a relative position bias over the
    window (``window=None``: no bias). ``qkv`` holds W_qs, W_ks, W_vs and ``qkv_time`` W_qt,
    W_kt, W_vt: with ``qkv_time`` zero it is :class:`SelfAttention`.
    """

    def __init__(self, dim: int, num_heads: int, time_dim: int, window: int | None) -> None:
        super().__init__(dim, num_heads)
        self.qkv_time = nn.Linear(time_dim, 3 * dim)
        self.position_bias = RelativePositionBias(window, num_heads) if window else None

    def forward(self, tokens: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        """tokens [B, N, C] (N = window^2 with a bias), time token [B, time_dim] -> [B, N, C]."""
        qkv = self.qkv(tokens) + self.qkv_time(time)[:, None]
        return self.attend(qkv, None if self.position_bias is None else self.position_bias())


def layer_norm(dim: int) -> nn.LayerNorm:
    """A transformer block's LayerNorm without its own affine map (eps 1e-6, as DiT and DiffiT):
    adaLN supplies it in DiT, the following projections in DiffiT."""
    return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


def mlp(dim: int, ratio: float) -> nn.Sequential:
    """The transformer's position-wise MLP: Linear, GELU (tanh approximation, as DiT), Linear."""
    hidden = int(dim * ratio)
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


# ---------------------------------------------------------------- patches


class PatchEmbedding(nn.Conv2d):
    """Patchify (ViT, Dosovitskiy et al. 2021; DiT §3.2): non-overlapping p x p patches of an
    ``image_size``^2 input, each linearly embedded, plus the fixed 2-D sin-cos position
    embedding of its place: [B, C, H, W] -> [B, (H/p)(W/p), dim], row-major. The positions are
    rebuilt from the sizes, so not in the state dict, and added in the tokens' dtype (bf16
    under autocast, as diffusers' ``PatchEmbed``: the residual stream stays bf16)."""

    def __init__(self, in_channels: int, dim: int, patch_size: int, image_size: int) -> None:
        super().__init__(in_channels, dim, patch_size, stride=patch_size)
        grid = sincos_2d_position_embedding(dim, image_size // patch_size)
        self.register_buffer("position_embedding", grid[None], persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = super().forward(x).flatten(2).transpose(1, 2)
        return tokens + self.position_embedding.to(tokens.dtype)


def unpatchify(tokens: torch.Tensor, patch_size: int, channels: int) -> torch.Tensor:
    """[B, (H/p)(W/p), p*p*C] row-major patch predictions -> [B, C, H, W] (square images)."""
    batch, count, _ = tokens.shape
    side = math.isqrt(count)
    x = tokens.reshape(batch, side, side, patch_size, patch_size, channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(batch, channels, side * patch_size, side * patch_size)


def sincos_2d_position_embedding(dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding (MAE, He et al. 2022; DiT §3.2), [grid^2, dim]:
    half the channels encode the column, half the row, each as ``[sin(pos w_i), cos(pos w_i)]``
    with ``w_i = 10000^(-i / (dim/4))``."""
    if dim % 4:
        raise ValueError(f"the width {dim} must be divisible by 4 for a 2-D sin-cos position embedding")
    omega = 1.0 / 10_000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.flatten().double()[:, None] * omega[None]
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()


class PatchTransformer(nn.Module):
    """The frame DiT and latent DiffiT share: a ViT denoiser on patches. ``forward(x, t, y=None)``
    -> [B, out_channels, H, W]: patchify with fixed positions, the conditioning
    ``c = t_emb + y_emb`` (DiT §3.2; DiffiT's time token) or ``c = t_emb + W pooled``,
    ``depth`` blocks ``block(tokens, c)`` (``block(tokens, c, text)`` with a caption),
    ``final_layer(tokens, c)`` to p*p*C_out a token, unpatchify.

    A subclass says what its blocks and final layer are (:meth:`make_block`,
    :meth:`make_final_layer`) and which layers start at zero (:meth:`zero_initialised`).
    ``num_classes``: class-conditional, with the null class of classifier-free guidance
    (index ``num_classes``) used when ``y`` is None; ``out_channels`` 2C for the learned variance.
    ``text_encoder``: conditioned on captions (token ids ``y`` [B, L]; None: the empty caption),
    each block attending to the caption by ``text_attention``: "cross" (a cross-attention
    sub-layer, PixArt-alpha) or "joint" (a second, text stream in one attention, SD3's MMDiT;
    its tokens are the caption's projected to ``hidden_size`` by ``text_embed``).
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
        text_encoder: TextEncoder | None = None,
        text_attention: str = "cross",
    ) -> None:
        super().__init__()
        check_patch_transformer(image_size, hidden_size=hidden_size, patch_size=patch_size, num_heads=num_heads)
        check_conditioning(num_classes, text_encoder)
        if text_attention not in TEXT_ATTENTION:
            raise ValueError(f"text_attention: unknown {text_attention!r}; allowed: {', '.join(TEXT_ATTENTION)}")
        # The resolved constructor arguments: what rebuilds this network (or a peer's twin), the text encoder aside.
        self.config = dict(
            in_channels=in_channels, out_channels=out_channels, image_size=image_size, depth=depth,
            hidden_size=hidden_size, patch_size=patch_size, num_heads=num_heads, mlp_ratio=mlp_ratio,
            num_classes=num_classes, text_attention=text_attention,
        )
        self.patch_size, self.out_channels = patch_size, out_channels
        self.num_classes = num_classes  # the null class's index, which the trainer drops labels to
        self.text_dim = None if text_encoder is None else text_encoder.dim
        self.text_attention = text_attention
        self.patch_embed = PatchEmbedding(in_channels, hidden_size, patch_size, image_size)
        self.time_embed = TimestepEmbedding(TIME_FREQUENCIES, hidden_size)
        self.label_embed = LabelEmbedding(num_classes, hidden_size) if num_classes is not None else None
        self.pooled_embed = pooled_embedding(text_encoder, hidden_size)
        joint = text_encoder is not None and text_attention == "joint"
        self.text_embed = nn.Linear(text_encoder.dim, hidden_size) if joint else None
        grid = image_size // patch_size
        self.blocks = nn.ModuleList(
            [self.make_block(hidden_size, num_heads, mlp_ratio, grid, last=i == depth - 1) for i in range(depth)]
        )
        self.final_layer = self.make_final_layer(hidden_size, patch_size * patch_size * out_channels)
        initialize_transformer(self, zero=self.zero_initialised())
        self.text_encoder = text_encoder  # after the init: the encoder keeps its own

    def make_block(self, dim: int, num_heads: int, mlp_ratio: float, grid: int, last: bool) -> nn.Module:
        """One block; with ``self.text_dim`` set, one that attends to a caption by ``self.text_attention``."""
        raise NotImplementedError

    def make_final_layer(self, dim: int, out_features: int) -> nn.Module:
        raise NotImplementedError

    def zero_initialised(self) -> list[nn.Module]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, C, H, W], t [B] timesteps, y [B] class labels or [B, L] token ids (None: the
        null condition) -> [B, out_channels, H, W]."""
        tokens = self.patch_embed(x)
        c, text = condition(self, self.time_embed(t), y)
        if text is None:
            for block in self.blocks:
                tokens = block(tokens, c)
        elif self.text_embed is None:
            for block in self.blocks:
                tokens = block(tokens, c, text)
        else:  # joint attention: the text stream runs alongside and is dropped after the last block
            text = replace(text, tokens=self.text_embed(text.tokens))
            for block in self.blocks:
                tokens, text = block(tokens, c, text)
        return unpatchify(self.final_layer(tokens, c), self.patch_size, self.out_channels)


# ---------------------------------------------------------------- convolutional pieces


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups (Wu & He 2018; DDPM, ADM), or gcd(32, channels) for widths
    32 does not divide, so tiny and odd widths still work (1 channel a group at worst)."""
    return nn.GroupNorm(math.gcd(32, channels), channels)


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 convolution (DDPM's ``resamp_with_conv``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour then a 3x3 convolution (DDPM)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


# ---------------------------------------------------------------- initialisation


def initialize_transformer(network: nn.Module, zero: list[nn.Module]) -> None:
    """DiT's init (its ``initialize_weights``), which DiffiT's code shares: Xavier-uniform
    linear layers with zero biases, each patch embedding Xavier-uniform as the linear map it
    is, N(0, 0.02) for label tables and timestep MLPs; then the layers in ``zero`` (output
    layers, adaLN-Zero modulation) zero, weights and biases."""
    for module in network.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
    for module in network.modules():
        if isinstance(module, PatchEmbedding):
            nn.init.xavier_uniform_(module.weight.view(module.weight.shape[0], -1))
            nn.init.zeros_(module.bias)
        elif isinstance(module, LabelEmbedding):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, TimestepEmbedding):
            nn.init.normal_(module[0].weight, std=0.02)
            nn.init.normal_(module[2].weight, std=0.02)
    for layer in zero + text_layers(network):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)


def text_layers(network: nn.Module) -> list[nn.Module]:
    """The layers through which a caption enters that start at zero: every cross-attention's
    output projection and the pooled embedding's projection (the adaLN-Zero idea, DiT §3.2),
    so a fresh text-conditional network is its unconditional self."""
    layers = [module.proj for module in network.modules() if isinstance(module, CrossAttention)]
    return layers + ([network.pooled_embed] if getattr(network, "pooled_embed", None) is not None else [])
