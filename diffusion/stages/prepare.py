"""prepare: a data source becomes a versioned dataset and its FID reference statistics.

Outputs: ``data/train.npz`` and ``data/heldout.npz`` (uint8 images, labels, class
names, the captions of ``data.captions``), ``data/reference.npz`` (Inception statistics
of ``data.reference_images`` training images, computed once here so evaluate never
recomputes them) and ``data/manifest.json`` (source, counts, captions, the sha256 of each
file).
"""

from __future__ import annotations

from diffusion.config import Params
from diffusion.data.dataset import save_dataset, split, write_manifest
from diffusion.evaluation.metrics import cache_dir, inception_features, save_reference
from diffusion.data.sources import load_source
from diffusion.stages.paths import HELDOUT_SET, MANIFEST, REFERENCE, TRAIN_SET


def run(params: Params) -> None:
    cache_dir()  # the Inception weights' cache, before any work: a HOME that is not writable is one line
    splits = split(load_source(params.data), params.data)
    TRAIN_SET.parent.mkdir(parents=True, exist_ok=True)
    save_dataset(TRAIN_SET, splits.train)
    save_dataset(HELDOUT_SET, splits.heldout)
    captions = f"; {len(splits.train.captions)} {params.data.captions} training captions" if splits.train.captions else ""
    print(f"prepare: {len(splits.train.images)} train, {len(splits.heldout.images)} held-out images{captions}; "
          f"Inception features of {len(splits.reference.images)} reference images")
    save_reference(REFERENCE, inception_features(splits.reference.images))
    write_manifest(MANIFEST, params.data, splits, {"train": TRAIN_SET, "heldout": HELDOUT_SET, "reference": REFERENCE})
