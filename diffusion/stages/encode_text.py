"""encode_text: a frozen text encoder's embeddings of every training caption, computed once, when ``text.cache`` is true.

With ``model.conditioning: text``, a pretrained ``text.encoder`` (a folder: frozen, so its
output for a caption never changes) and ``text.cache: true``, each distinct caption of
``data/train.npz`` and the empty caption (the null condition) are encoded once
(:func:`~diffusion.models.text.text_embedding_cache`) into ``data/text_embeddings.npz``; the
train stage then looks them up instead of running the encoder every step
(:meth:`~diffusion.models.text.PretrainedTextEncoder.use_cache`), as latent diffusion encodes
the images once (the encode stage). Otherwise it writes the marker
:data:`~diffusion.stages.paths.NO_TEXT_CACHE` and imports no torch: the char-transformer
learns, so its embeddings change every step and cannot be cached.
"""

from __future__ import annotations

from diffusion.config import Params
from diffusion.files import atomic_write
from diffusion.stages.paths import NO_TEXT_CACHE, TEXT_EMBEDDINGS, TRAIN_SET

BATCH_SIZE = 256  # captions a forward of the encoder


def cached(params: Params) -> bool:
    """Whether this config's text embeddings are computed by this stage (and looked up by train)."""
    text = params.text
    return params.model.conditioning == "text" and text.cache and text.encoder != "char-transformer"


def run(params: Params) -> None:
    if not cached(params):
        with atomic_write(TEXT_EMBEDDINGS) as fh:
            fh.write(NO_TEXT_CACHE)
        return
    from diffusion.data.dataset import load_dataset
    from diffusion.models.text import build_text_encoder, save_text_embedding_cache, text_embedding_cache

    encoder = build_text_encoder(params.text.encoder, **params.text.overrides)
    cache = text_embedding_cache(encoder, load_dataset(TRAIN_SET).captions, BATCH_SIZE)
    save_text_embedding_cache(TEXT_EMBEDDINGS, cache)
    print(f"encode_text: {len(cache['ids'])} distinct captions encoded by {params.text.encoder}", flush=True)
