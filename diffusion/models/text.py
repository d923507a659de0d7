"""Text encoders: a caption becomes per-token embeddings, their mask and one pooled vector.

``text.encoder`` names one (:func:`build_text_encoder`):

- ``char-transformer`` (:class:`CharTransformerEncoder`): a small transformer over characters,
  learned jointly with the diffusion model; needs nothing but torch.
- a folder holding a Hugging Face text encoder and its tokenizer, saved with ``save_pretrained``
  (:class:`PretrainedTextEncoder`): frozen, as Stable Diffusion's CLIP text encoder
  (Rombach et al. 2022, §3.3) or Imagen's frozen T5 (Saharia et al. 2022, §2.1). Its embeddings
  can be computed once for every caption of a data set (:func:`text_embedding_cache`) and looked
  up instead of recomputed (:meth:`PretrainedTextEncoder.use_cache`).

Networks take the condition as token ids ``[B, L]`` (``tokenize``), padded to the encoder's
``max_length``; every caption, the empty one included, has at least one real token, so attention
over a caption's tokens is never a softmax over nothing. Token embeddings at padded positions
are zero. The null condition of classifier-free guidance is the empty caption (``null_tokens``).
"""

from __future__ import annotations

import string
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from diffusion.errors import UserError
from diffusion.files import atomic_write
from diffusion.models.configs import _positive_float, _positive_int
from diffusion.models.layers import SelfAttention, mlp


class TextEncoderError(UserError, ValueError):
    """A text encoder that cannot be built or loaded, or an embedding cache that does not fit; one line."""


@dataclass(frozen=True)
class TextEmbedding:
    """What a :class:`TextEncoder` gives for a batch of captions."""

    tokens: torch.Tensor
    """[B, L, dim] float: the per-token embeddings (cross-attention keys and values come from
    these); zero where ``mask`` is False."""
    mask: torch.Tensor
    """[B, L] bool: True where a real token is; attention never looks at False positions."""
    pooled: torch.Tensor
    """[B, dim] float: one vector a caption (added to the time embedding)."""


class TextEncoder(nn.Module):
    """The interface both encoders implement: ``tokenize`` captions on the CPU, ``forward`` the
    ids on the module's device, ``spec`` to rebuild the same architecture
    (``build_text_encoder(**encoder.spec())``)."""

    dim: int
    """Width of ``tokens`` and ``pooled``."""
    max_length: int
    """L: every caption is padded (or truncated) to this many tokens."""
    null_tokens: torch.Tensor
    """Buffer [L]: ``tokenize([""])[0]``, the null condition of classifier-free guidance."""

    def tokenize(self, captions: Sequence[str]) -> torch.Tensor:
        """int64 [B, L] on the CPU, a deterministic function of the captions."""
        raise NotImplementedError

    def forward(self, tokens: torch.Tensor) -> TextEmbedding:
        raise NotImplementedError

    def spec(self) -> dict[str, Any]:
        """JSON-able; ``build_text_encoder(**spec)`` rebuilds the same architecture."""
        raise NotImplementedError

    def _register_null_tokens(self) -> None:
        self.register_buffer("null_tokens", self.tokenize([""])[0], persistent=False)


def _captions(captions: Sequence[str]) -> list[str]:
    if isinstance(captions, str):  # a lone caption would be tokenized a character a caption
        raise TypeError("captions: give a list of strings, not one string")
    return list(captions)


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, L, dim], [B, L] -> [B, dim]: the mean of each caption's real tokens (Sentence-BERT's
    mean pooling, Reimers & Gurevych 2019, §3)."""
    weights = mask.to(tokens.dtype)[..., None]
    return (tokens * weights).sum(1) / weights.sum(1)


# ---------------------------------------------------------------- the char-level transformer

# Lower-cased printable ASCII; any other character is UNK. Id 0 pads, id 1 starts every caption.
CHARACTERS = " " + string.ascii_lowercase + string.digits + string.punctuation
PAD, BOS, UNK = 0, 1, 2
CHARACTER_IDS = {character: 3 + i for i, character in enumerate(CHARACTERS)}
VOCABULARY_SIZE = 3 + len(CHARACTERS)


class CharTransformerBlock(nn.Module):
    """A pre-LN transformer encoder layer (Xiong et al. 2020, Fig. 1b):
    ``x + Attn(LN(x))`` then ``x + MLP(LN(x))``, attention blind to padded keys."""

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = mlp(width, mlp_ratio)

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        """x [B, L, width]; ``key_bias`` [B, 1, 1, L]: 0 at real tokens, -inf at padding."""
        x = x + self.attn.attend(self.attn.qkv(self.norm1(x)), key_bias)
        return x + self.mlp(self.norm2(x))


class CharTransformerEncoder(TextEncoder):
    """Characters -> a small transformer encoder (Vaswani et al. 2017, §3.1; pre-LN), learned
    with the diffusion model from scratch.

    A caption is lower-cased, prefixed with BOS and cut to ``max_length - 1`` characters (a longer
    caption is truncated); learned token and position embeddings, ``depth`` pre-LN blocks, a final
    LayerNorm. ``pooled`` is the mean of the real tokens' outputs rather than BOS's output: every
    character feeds it directly, and a two-layer encoder need not learn to gather the caption into
    one position first.
    """

    def __init__(self, width: int = 128, depth: int = 2, heads: int = 4, max_length: int = 48, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.dim, self.max_length, self.depth, self.heads, self.mlp_ratio = width, max_length, depth, heads, mlp_ratio
        self.embedding = nn.Embedding(VOCABULARY_SIZE, width)
        self.position = nn.Parameter(torch.empty(max_length, width))
        self.blocks = nn.ModuleList(CharTransformerBlock(width, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        nn.init.normal_(self.embedding.weight, std=0.02)  # GPT-2 / CLIP's text tower
        nn.init.normal_(self.position, std=0.01)
        self._register_null_tokens()

    def tokenize(self, captions: Sequence[str]) -> torch.Tensor:
        captions = _captions(captions)
        tokens = torch.full((len(captions), self.max_length), PAD, dtype=torch.int64)
        for row, caption in zip(tokens, captions):
            ids = [BOS] + [CHARACTER_IDS.get(c, UNK) for c in caption.lower()[: self.max_length - 1]]
            row[: len(ids)] = torch.tensor(ids)
        return tokens

    def forward(self, tokens: torch.Tensor) -> TextEmbedding:
        """tokens [B, L'] with L' <= max_length (what :meth:`tokenize` gives, or a prefix of it)."""
        mask = tokens != PAD
        x = self.embedding(tokens) + self.position[: tokens.shape[1]]
        key_bias = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill(~mask, float("-inf"))[:, None, None]
        for block in self.blocks:
            x = block(x, key_bias)
        x = self.norm(x) * mask[..., None]
        return TextEmbedding(x, mask, masked_mean(x, mask))

    def spec(self) -> dict[str, Any]:
        return {
            "name": "char-transformer", "width": self.dim, "depth": self.depth, "heads": self.heads,
            "max_length": self.max_length, "mlp_ratio": self.mlp_ratio,
        }


# ---------------------------------------------------------------- a frozen Hugging Face encoder

# The config class (by name) -> the model class that is its text encoder alone; any other config: AutoModel.
ENCODER_MODELS = {
    "CLIPTextConfig": "CLIPTextModel",
    "T5Config": "T5EncoderModel",
    "MT5Config": "MT5EncoderModel",
    "UMT5Config": "UMT5EncoderModel",
}
# Padded positions in the ids this encoder's tokenize gives: the mask travels with the ids
# (a tokenizer's own pad id may equal a real token's, as CLIP's end-of-text).
PRETRAINED_PAD = -1


class PretrainedTextEncoder(TextEncoder):
    """A Hugging Face tokenizer and text model from ``folder`` (``save_pretrained``; nothing is
    downloaded), frozen: no parameter requires grad, the model stays in eval mode when its parent
    trains, and forward records no graph.

    ``tokens`` is the model's ``last_hidden_state``, ``mask`` the tokenizer's attention mask,
    ``pooled`` the model's ``pooler_output`` where it has one (CLIP: the end-of-text token's state)
    and the mean of the real tokens otherwise (T5). ``max_length`` is the smallest of the
    tokenizer's ``model_max_length``, the model's position table and the ``max_length`` given;
    longer captions are truncated by the tokenizer.
    """

    def __init__(self, folder: str, max_length: int = 77) -> None:
        super().__init__()
        self.folder = str(folder)
        self.tokenizer, self.model = _load_pretrained(self.folder)
        self.model.requires_grad_(False)
        self.model.eval()
        config = self.model.config
        self.dim = config.hidden_size
        self.max_length = min(max_length, self.tokenizer.model_max_length, getattr(config, "max_position_embeddings", max_length))
        self._register_null_tokens()
        if not self.null_tokens.ne(PRETRAINED_PAD).any():
            raise TextEncoderError(
                f"text.encoder: {self.folder}: its tokenizer gives the empty caption no token; "
                "allowed: a tokenizer that adds a start or end token"
            )
        self._lookup: EmbeddingLookup | None = None

    def train(self, mode: bool = True) -> PretrainedTextEncoder:
        super().train(mode)
        self.model.eval()
        return self

    def tokenize(self, captions: Sequence[str]) -> torch.Tensor:
        batch = self.tokenizer(
            _captions(captions), padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return batch["input_ids"].to(torch.int64).masked_fill(batch["attention_mask"] == 0, PRETRAINED_PAD)

    def encode(self, tokens: torch.Tensor) -> TextEmbedding:
        """The model's embedding of ``tokens``, the cache unused."""
        mask = tokens != PRETRAINED_PAD
        with torch.no_grad():
            out = self.model(input_ids=tokens.masked_fill(~mask, self.tokenizer.pad_token_id), attention_mask=mask.long())
        hidden = out.last_hidden_state * mask[..., None]
        pooled = getattr(out, "pooler_output", None)
        return TextEmbedding(hidden, mask, masked_mean(hidden, mask) if pooled is None else pooled)

    def forward(self, tokens: torch.Tensor) -> TextEmbedding:
        """The embedding of ``tokens``: rows found in the cache (:meth:`use_cache`) are looked up,
        the model runs on the others alone."""
        if self._lookup is None:
            return self.encode(tokens)
        index = torch.tensor([self._lookup.rows.get(row.tobytes(), -1) for row in tokens.cpu().numpy()])
        hit = index >= 0
        found = {key: self._lookup.cache[key][index[hit]].to(tokens.device) for key in ("tokens", "mask", "pooled")}
        if bool(hit.all()):
            return TextEmbedding(**found)
        hit = hit.to(tokens.device)
        missed = self.encode(tokens[~hit])
        parts = {}
        for key, value in found.items():
            new = getattr(missed, key)
            parts[key] = new.new_empty((len(tokens), *new.shape[1:]))
            parts[key][hit] = value.to(new.dtype)
            parts[key][~hit] = new
        return TextEmbedding(**parts)

    def use_cache(self, cache: dict[str, torch.Tensor] | None) -> None:
        """Look embeddings up in ``cache`` (:func:`text_embedding_cache` of this encoder; None: stop);
        :class:`TextEncoderError` (one line) if its shapes are not this encoder's. Copies of the
        encoder (``copy.deepcopy``: the EMA networks) share it."""
        if cache is not None:
            ids, tokens = cache["ids"], cache["tokens"]
            if ids.shape[1] != self.max_length or tokens.shape[2] != self.dim:
                raise TextEncoderError(
                    f"text embedding cache: {ids.shape[1]} tokens of width {tokens.shape[2]}; "
                    f"the encoder {self.folder} gives {self.max_length} of width {self.dim}: rebuild the cache"
                )
        self._lookup = None if cache is None else EmbeddingLookup(cache)

    def spec(self) -> dict[str, Any]:
        return {"name": self.folder, "max_length": self.max_length}


class EmbeddingLookup:
    """A text embedding cache (:func:`text_embedding_cache`) and its rows by their token ids' bytes;
    read-only, so a deep copy is the same object (the EMA networks do not copy the cache)."""

    def __init__(self, cache: dict[str, torch.Tensor]) -> None:
        self.cache = cache
        self.rows = {row.tobytes(): i for i, row in enumerate(cache["ids"].numpy())}

    def __deepcopy__(self, memo: dict) -> EmbeddingLookup:
        return self


def _load_pretrained(folder: str) -> tuple[Any, nn.Module]:
    """(tokenizer, model) from a ``save_pretrained`` folder, float32 on the CPU, nothing downloaded;
    :class:`TextEncoderError` (one line naming the folder) when it cannot be loaded."""
    if not (Path(folder) / "config.json").is_file():
        allowed = ", ".join(LEARNED_ENCODERS)
        raise TextEncoderError(
            f"text.encoder: {folder} is not a folder with a config.json; "
            f"allowed: {allowed} or a folder saved with save_pretrained"
        )
    try:
        import transformers
    except ImportError:
        raise TextEncoderError(f"text.encoder: {folder} needs transformers: pip install -e '.[text]'") from None
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
        model_class = getattr(transformers, ENCODER_MODELS.get(type(config).__name__, "AutoModel"))
        model = model_class.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as err:  # transformers raises OSError, ValueError, KeyError... for a folder it cannot read
        first = (str(err).strip().splitlines() or [""])[0][:300]
        raise TextEncoderError(f"text.encoder: {folder} cannot be loaded ({err.__class__.__name__}: {first})") from None
    if tokenizer.pad_token_id is None:
        raise TextEncoderError(f"text.encoder: {folder}: its tokenizer has no pad token; allowed: a tokenizer with one")
    return tokenizer, model


# ---------------------------------------------------------------- by name

# Learned encoders by name -> (constructor, its overridable arguments with the check of each).
LEARNED_ENCODERS: dict[str, tuple[type[TextEncoder], dict[str, Callable[[Any], Any]]]] = {
    "char-transformer": (
        CharTransformerEncoder,
        {
            "width": _positive_int, "depth": _positive_int, "heads": _positive_int, "max_length": _positive_int,
            "mlp_ratio": _positive_float,
        },
    ),
}
PRETRAINED_OVERRIDABLE: dict[str, Callable[[Any], Any]] = {"max_length": _positive_int}


def build_text_encoder(name: str, **overrides: Any) -> TextEncoder:
    """``char-transformer`` (:class:`CharTransformerEncoder`), or else ``name`` is a folder holding
    a Hugging Face text encoder (:class:`PretrainedTextEncoder`); ``overrides`` are constructor
    arguments. :class:`TextEncoderError` (one line naming the key or folder) before any work."""
    constructor, allowed = LEARNED_ENCODERS.get(name, (PretrainedTextEncoder, PRETRAINED_OVERRIDABLE))
    checked = {}
    for key, value in overrides.items():
        if key not in allowed:
            raise TextEncoderError(f"text.overrides: unknown key '{key}' for {name}; allowed: {', '.join(allowed)}")
        try:
            checked[key] = allowed[key](value)
        except ValueError as err:
            raise TextEncoderError(f"text.overrides.{key}: {err} (got {value!r})") from None
    if constructor is PretrainedTextEncoder:
        return PretrainedTextEncoder(name, **checked)
    try:
        return constructor(**checked)
    except ValueError as err:  # arguments that do not fit together, e.g. heads that do not divide the width
        raise TextEncoderError(f"text.overrides: {err}") from None


# ---------------------------------------------------------------- the embedding cache of a frozen encoder

CACHE_ARRAYS = ("ids", "tokens", "mask", "pooled")


def text_embedding_cache(encoder: TextEncoder, captions: Sequence[str], batch_size: int) -> dict[str, torch.Tensor]:
    """The embedding of every distinct token row of ``captions`` and of the empty caption (the null
    condition), ``batch_size`` rows a forward: ``ids`` [U, L] int64, ``tokens`` [U, L, dim],
    ``mask`` [U, L] bool, ``pooled`` [U, dim], all on the CPU."""
    ids = torch.unique(encoder.tokenize([*_captions(captions), ""]), dim=0)
    device = encoder.null_tokens.device
    parts = []
    with torch.no_grad():
        for start in range(0, len(ids), batch_size):
            out = encoder(ids[start : start + batch_size].to(device))
            parts.append((out.tokens.cpu(), out.mask.cpu(), out.pooled.cpu()))
    tokens, mask, pooled = (torch.cat(column) for column in zip(*parts))
    return {"ids": ids, "tokens": tokens, "mask": mask, "pooled": pooled}


def save_text_embedding_cache(path: str | Path, cache: dict[str, torch.Tensor]) -> Path:
    """Write ``cache`` as one ``.npz``, atomically."""
    with atomic_write(path) as fh:
        np.savez(fh, **{key: cache[key].numpy() for key in CACHE_ARRAYS})
    return Path(path)


def load_text_embedding_cache(path: str | Path) -> dict[str, torch.Tensor]:
    """The cache of :func:`save_text_embedding_cache`; :class:`TextEncoderError` (one line naming
    the file) for anything else."""
    path = Path(path)
    rerun = "run `dvc repro encode_text`"
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: torch.from_numpy(data[key]) for key in CACHE_ARRAYS if key in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise TextEncoderError(f"{path}: not a text embedding cache ({err.__class__.__name__}): {rerun}") from None
    missing = [key for key in CACHE_ARRAYS if key not in arrays]
    if missing:
        raise TextEncoderError(f"{path}: not a text embedding cache (no {', '.join(missing)}): {rerun}")
    ids = arrays["ids"]
    rows, length = ids.shape if ids.ndim == 2 else (-1, -1)
    leading = {"tokens": (rows, length), "mask": (rows, length), "pooled": (rows,)}
    if rows < 0 or any(tuple(arrays[key].shape[: len(shape)]) != shape for key, shape in leading.items()):
        raise TextEncoderError(f"{path}: not a text embedding cache (its arrays disagree in shape): {rerun}")
    return arrays
