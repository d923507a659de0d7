"""Text faithfulness: real digits with their own measured captions agree exactly, shuffled
prompts agree at chance, thick and thin strokes show the gap asked; the digit classifier's
file form and shape errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from diffusion.data.captions import CAPTION_VOCABULARY, attribute_words, measure_attributes, measured_captions
from diffusion.data.dataset import split
from diffusion.data.sources import load_source
from diffusion.evaluation.digit_classifier import (
    DigitClassifier,
    DigitClassifierError,
    accuracy,
    classifier_input,
    digit_scores,
    load_digit_classifier,
    save_digit_classifier,
    train_digit_classifier,
)
from diffusion.evaluation.text_faithfulness import TextFaithfulnessError, text_faithfulness
from diffusion.training.checkpoint import CheckpointError, save_checkpoint
from conftest import section

ATTRIBUTES = list(CAPTION_VOCABULARY["attributes"])


@pytest.fixture(scope="module")
def mnist():
    """MNIST-5k split as params.yaml splits it, and a digit classifier trained 12 steps on its training part (about 45% right)."""
    params = section("data")
    splits = split(load_source(params), params)
    return splits, train_digit_classifier(splits.train.images, splits.train.labels, steps=12)


def test_own_measured_captions_agree_exactly(mnist) -> None:
    splits, net = mnist
    heldout = splits.heldout
    prompts = measured_captions(heldout.images, heldout.labels, heldout.class_names)
    metrics = text_faithfulness(heldout.images, prompts, net)
    held_accuracy = accuracy(net, heldout.images, heldout.labels)
    assert 0.2 < held_accuracy < 1.0  # a classifier that errs, so equality below says something
    assert metrics["text_digit_accuracy"] == pytest.approx(held_accuracy, abs=1e-12)
    assert metrics["text_clear"] == pytest.approx(digit_scores(net, heldout.images)["clear"], abs=1e-12)
    for name in ATTRIBUTES:
        assert metrics[f"text_{name}_agreement"] == 1.0
    assert metrics["text_error"] == pytest.approx((1 - held_accuracy) / (1 + len(ATTRIBUTES)), abs=1e-12)
    assert text_faithfulness(heldout.images, prompts, net) == metrics  # deterministic


def test_shuffled_prompts_agree_at_chance(mnist) -> None:
    splits, _ = mnist
    heldout = splits.heldout
    n = len(heldout.images)
    prompts = measured_captions(heldout.images, heldout.labels, heldout.class_names)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
    metrics = text_faithfulness(heldout.images, [prompts[i] for i in order], None)
    words = attribute_words(measure_attributes(heldout.images))
    for name in ATTRIBUTES:
        # the asked words are the measured ones re-paired: chance is the sum of squared word frequencies
        frequencies = [words[name].count(w) / n for w in CAPTION_VOCABULARY["attributes"][name]["words"]]
        chance = sum(f * f for f in frequencies)
        assert metrics[f"text_{name}_chance"] == pytest.approx(chance, abs=1e-12)
        band = 4 * math.sqrt(chance * (1 - chance) / n)
        assert abs(metrics[f"text_{name}_agreement"] - chance) <= band + 1e-12
    assert "text_digit_accuracy" not in metrics and "text_clear" not in metrics  # no classifier


def _bar(width: int, shear: float = 0.0) -> torch.Tensor:
    """A 20-row vertical ink bar ``width`` pixels wide on a 28x28 image, each row up moved
    ``shear`` pixels right (its thickness is ``width``, its slant ``shear``)."""
    image = torch.zeros(1, 28, 28, dtype=torch.uint8)
    for row in range(4, 24):
        left = round(14 - width / 2 + shear * (14 - row))
        image[0, row, left : left + width] = 255
    return image


def test_thick_and_thin_prompts_show_their_gap() -> None:
    thick, thin = _bar(4), _bar(2)
    images = torch.stack([thick, thick, thin, thin, thin, thin])
    prompts = ["a thick one"] * 3 + ["a thin one"] * 3
    metrics = text_faithfulness(images, prompts, None)
    # thick prompts drew widths 4, 4, 2 and thin ones 2, 2, 2; reversed, the other way round
    assert metrics["text_thickness_gap"] == pytest.approx(10 / 3 - 2, abs=0.05)
    assert text_faithfulness(images, prompts[::-1], None)["text_thickness_gap"] == pytest.approx(2 - 10 / 3, abs=0.05)
    assert set(metrics) == {"text_thickness_agreement", "text_thickness_chance", "text_thickness_gap", "text_error"}

    leaning = torch.stack([_bar(3, 0.3), _bar(3, 0.3), _bar(3, -0.3), _bar(3, -0.3)])
    slant = text_faithfulness(leaning, ["a right-leaning 7"] * 2 + ["a left-leaning 7"] * 2, None)
    assert slant["text_slant_gap"] == pytest.approx(0.6, abs=0.05)
    assert "text_slant_gap" not in text_faithfulness(leaning, ["an upright 7"] * 4, None)  # only the middle word


class BrightnessDigit(nn.Module):
    """A classifier whose answers the test sets: an image filled with ``20 d`` is digit ``d``,
    with logit ``margin`` over the nine others (softmax e^m / (e^m + 9))."""

    def __init__(self, margin: float) -> None:
        super().__init__()
        self.margin = margin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        digit = ((x.mean((1, 2, 3)) + 1) * 127.5 / 20).round().long()
        return nn.functional.one_hot(digit, 10).float() * self.margin


def test_digit_accuracy_and_clear_share_of_a_known_classifier() -> None:
    images = torch.stack([torch.full((1, 28, 28), 20 * d, dtype=torch.uint8) for d in (7, 7, 3, 1, 0)])
    prompts = ["a seven", "7", "a two", "one", "a blur"]  # right, right, wrong, right, names none
    clear = text_faithfulness(images, prompts, BrightnessDigit(margin=5.0))  # e^5 / (e^5 + 9) = 0.94
    assert clear == pytest.approx({"text_clear": 1.0, "text_digit_accuracy": 3 / 4, "text_error": 1 / 4}, abs=1e-12)
    blurred = text_faithfulness(images, prompts, BrightnessDigit(margin=2.0))  # e^2 / (e^2 + 9) = 0.45
    assert blurred == pytest.approx({"text_clear": 0.0, "text_digit_accuracy": 3 / 4, "text_error": 1 / 4}, abs=1e-12)


def test_metrics_absent_when_not_asked_and_mismatches_refused() -> None:
    images = torch.stack([_bar(3), _bar(3)])
    assert text_faithfulness(images, ["a blur", ""], BrightnessDigit(2.0)) == {"text_clear": 0.0}
    assert text_faithfulness(images, ["a blur", ""], None) == {}
    assert text_faithfulness(images[:0], [], None) == {}
    with pytest.raises(TextFaithfulnessError, match="2 images but 3 prompts"):
        text_faithfulness(images, ["a one"] * 3, None)
    with pytest.raises(TextFaithfulnessError, match=r"uint8 one-channel images \[N, 1, H, W\]; got torch.uint8 \[2, 3, 28, 28\]"):
        text_faithfulness(images.expand(2, 3, 28, 28), ["a one"] * 2, None)


def test_classifier_file_round_trip_and_errors(tmp_path) -> None:
    torch.manual_seed(0)
    net = DigitClassifier(32).eval()
    images = torch.randint(0, 256, (4, 1, 32, 32), dtype=torch.uint8)
    path = save_digit_classifier(tmp_path / "digits.pt", net, {"heldout_accuracy": 0.5, "steps": 3})
    loaded, meta = load_digit_classifier(path)
    assert meta == {"heldout_accuracy": 0.5, "steps": 3} and loaded.image_size == 32
    x = classifier_input(images)
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))
    with pytest.raises(DigitClassifierError, match=r"needs one-channel 32x32 images \[N, 1, 32, 32\].*got shape \[4, 1, 28, 28\]"):
        loaded(x[:, :, :28, :28])
    with pytest.raises(CheckpointError, match="nowhere.pt: no such checkpoint file"):
        load_digit_classifier(tmp_path / "nowhere.pt")
    save_checkpoint(tmp_path / "other.pt", {"weights": torch.zeros(2)})
    with pytest.raises(DigitClassifierError, match="other.pt: not a digit classifier file"):
        load_digit_classifier(tmp_path / "other.pt")
    with pytest.raises(DigitClassifierError, match=r"one label in 0-9 per image"):
        train_digit_classifier(images, torch.tensor([0, 1, 2, 10]), steps=1)
    with pytest.raises(DigitClassifierError, match=r"one-channel square images \[N, 1, S, S\]; got shape \[4, 3, 32, 32\]"):
        train_digit_classifier(images.expand(4, 3, 32, 32), torch.zeros(4, dtype=torch.long), steps=1)
