"""Text faithfulness, measured offline: does each image show what its prompt asked for?

CLIP score (Hessel et al. 2021, "CLIPScore") needs pretrained weights. For digits each part
of a prompt can be checked on its own, with the functions that wrote the training captions
(:mod:`diffusion.data.captions`): :func:`~diffusion.data.captions.parse_caption` reads what a
prompt asks, the digit classifier (:mod:`diffusion.evaluation.digit_classifier`) reads the
digit drawn, and :func:`~diffusion.data.captions.measure_attributes` with
:func:`~diffusion.data.captions.attribute_words` read each attribute drawn. Real digits with
their own measured captions therefore agree on every attribute exactly, and on the digit
as often as the classifier is right.

The metrics (:func:`text_faithfulness`), each over the images whose prompt asks for it, and
absent when none does:

- ``text_digit_accuracy``: the share whose most probable digit is the one the prompt names;
  ``text_clear``: the share of all images classified with probability >= ``CONFIDENT``
  (clear digits). Both need a classifier.
- ``text_<attribute>_agreement``: the share whose measured word is the word asked.
- ``text_<attribute>_chance``: the agreement expected if the images ignored their prompts,
  Cohen's (1960) chance agreement ``Σ_w p_asked(w) p_measured(w)`` with both word
  frequencies taken over these images: the mean agreement over all re-pairings of the same
  prompts and images. Following the prompts shows as agreement above it.
- ``text_<attribute>_gap``: the mean measured value (the attribute's units: pixels of
  thickness, shear of slant, share of the side for size) of the images asked for the
  attribute's highest word less that of the images asked for its lowest ("thick" less
  "thin"); present when both are asked. Positive when the prompts are followed.
- ``text_error``: one less the mean of ``text_digit_accuracy`` and every
  ``text_<attribute>_agreement`` present; 0 when every image shows all it was asked for.
  The sweep's objective to minimise.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch

from diffusion.data.captions import CAPTION_VOCABULARY, attribute_words, measure_attributes, parse_caption
from diffusion.errors import UserError
from diffusion.evaluation.digit_classifier import CONFIDENT, DigitClassifier, digit_probabilities


class TextFaithfulnessError(UserError, ValueError):
    """Images and prompts that do not pair up; one line saying what is needed."""


def text_faithfulness(images: torch.Tensor, prompts: Sequence[str], classifier: DigitClassifier | None) -> dict[str, float]:
    """The text-faithfulness metrics (the module doc) of uint8 ``images`` ``[N, 1, H, W]``, image
    ``i`` drawn for ``prompts[i]``; the digit's metrics need ``classifier`` (None: left out)."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 1:
        raise TextFaithfulnessError(
            f"text faithfulness: needs uint8 one-channel images [N, 1, H, W]; got {images.dtype} {list(images.shape)}"
        )
    if len(images) != len(prompts):
        raise TextFaithfulnessError(f"text faithfulness: {len(images)} images but {len(prompts)} prompts; needs one prompt per image")
    asked = [parse_caption(prompt) for prompt in prompts]
    images = images.cpu()
    metrics = {}
    if classifier is not None and len(images):
        metrics |= _digit_metrics(images, [a.digit for a in asked], classifier)
    attributes = [i for i, a in enumerate(asked) if a.words]
    if attributes:
        subset = torch.tensor(attributes)
        values = measure_attributes(images[subset])
        measured = attribute_words(values)
        for name, spec in CAPTION_VOCABULARY["attributes"].items():
            pairs = [(j, asked[i].words[name]) for j, i in enumerate(attributes) if name in asked[i].words]
            if pairs:
                metrics |= _attribute_metrics(name, spec["words"], pairs, values[name], measured[name])
    agreements = [v for k, v in metrics.items() if k == "text_digit_accuracy" or k.endswith("_agreement")]
    if agreements:
        metrics["text_error"] = 1.0 - sum(agreements) / len(agreements)
    return metrics


def _digit_metrics(images: torch.Tensor, digits: list[int | None], classifier: DigitClassifier) -> dict[str, float]:
    """``text_clear`` over all images; ``text_digit_accuracy`` over those whose prompt names a digit."""
    confidence, drawn = digit_probabilities(classifier, images).max(1)
    metrics = {"text_clear": (confidence >= CONFIDENT).double().mean().item()}
    named = [(i, d) for i, d in enumerate(digits) if d is not None]
    if named:
        index, digit = torch.tensor(named).T
        metrics["text_digit_accuracy"] = (drawn[index] == digit).double().mean().item()
    return metrics


def _attribute_metrics(
    name: str, words: list[str], pairs: list[tuple[int, str]], values: torch.Tensor, measured: list[str]
) -> dict[str, float]:
    """Agreement, chance agreement and gap of one attribute over ``pairs``: (row of ``values``
    and ``measured``, word asked); ``words`` low to high."""
    n = len(pairs)
    agreement = sum(measured[j] == word for j, word in pairs) / n
    asked_counts = Counter(word for _, word in pairs)
    measured_counts = Counter(measured[j] for j, _ in pairs)
    chance = sum(asked_counts[w] * measured_counts[w] for w in asked_counts) / n**2
    metrics = {f"text_{name}_agreement": agreement, f"text_{name}_chance": chance}
    low = [j for j, word in pairs if word == words[0]]
    high = [j for j, word in pairs if word == words[-1]]
    if low and high:
        metrics[f"text_{name}_gap"] = (values[high].mean() - values[low].mean()).item()
    return metrics
