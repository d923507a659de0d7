"""A small digit classifier: how many generated images are clear digits, of which classes,
and whether each is the digit its prompt named.

FID says how far a set of samples is from the data, not whether each image is a digit.
This CNN (three conv + max-pool layers, then average-pooled to 3x3: ~0.2M parameters),
trained on real digits with ±2-pixel shifts, answers that: an image is a *clear digit*
when the classifier puts at least :data:`CONFIDENT` of its probability on one class, and
the histogram of those classes shows whether a model draws all ten digits in similar
numbers. Real held-out digits set the ceiling (:func:`digit_scores` on them, beside the
classifier's held-out :func:`accuracy`). It reads one-channel square images of the size it
was trained at (MNIST: 28x28) and refuses others in one line.

The file form (:func:`save_digit_classifier`, :func:`load_digit_classifier`) is plain data,
``{"format", "image_size", "state_dict", "meta"}``, written and read as a training
checkpoint (:mod:`diffusion.training.checkpoint`: atomic, weights-only, CRC-checked).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from diffusion.errors import UserError
from diffusion.training.checkpoint import load_checkpoint, save_checkpoint

CONFIDENT = 0.9  # max softmax probability of a clear digit
NUM_DIGITS = 10
FILE_FORMAT = "digit-classifier"
_BATCH = 1024  # images classified at a time (bounds the activations' memory)


class DigitClassifierError(UserError, ValueError):
    """Images of a shape the classifier cannot read, labels that are not digits, or a file
    that is not a digit classifier; one line naming what is needed."""


class DigitClassifier(nn.Module):
    """Logits ``[B, 10]`` of images in [-1, 1], ``[B, 1, image_size, image_size]``."""

    def __init__(self, image_size: int = 28) -> None:
        super().__init__()
        self.image_size = image_size
        self.convs = nn.ModuleList(nn.Conv2d(c_in, c_out, 3, padding=1) for c_in, c_out in ((1, 32), (32, 64), (64, 128)))
        self.hidden = nn.Linear(128 * 3 * 3, 128)
        self.out = nn.Linear(128, NUM_DIGITS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_images(x, self.image_size)
        for conv in self.convs:
            x = F.max_pool2d(F.relu(conv(x)), 2)  # 28 -> 14 -> 7 -> 3
        x = F.adaptive_avg_pool2d(x, 3)  # the identity at 28; other sizes to the same 3x3
        return self.out(F.dropout(F.relu(self.hidden(x.flatten(1))), 0.3, self.training))


def classifier_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1], the classifier's own input scaling: the diffusion
    model's (:func:`diffusion.training.loop.to_model_range`) is not imported, so a change to
    the training loop neither retrains the classifier nor re-scores the samples."""
    return images.float() / 127.5 - 1.0


def check_images(images: torch.Tensor, image_size: int) -> None:
    """:class:`DigitClassifierError` unless ``images`` is ``[N, 1, image_size, image_size]``."""
    if images.ndim != 4 or tuple(images.shape[1:]) != (1, image_size, image_size):
        raise DigitClassifierError(
            f"digit classifier: needs one-channel {image_size}x{image_size} images [N, 1, {image_size}, {image_size}] "
            f"(the size it was trained at); got shape {list(images.shape)}"
        )


def train_digit_classifier(images: torch.Tensor, labels: torch.Tensor, *, steps: int = 1500, seed: int = 0) -> DigitClassifier:
    """A :class:`DigitClassifier` trained on uint8 ``[N, 1, S, S]`` images with labels 0-9
    (AdamW, one-cycle lr 2e-3, batches of 128, each batch rolled by up to two pixels each
    way); the same ``seed`` gives the same weights."""
    if images.ndim != 4 or images.shape[1] != 1 or images.shape[2] != images.shape[3]:
        raise DigitClassifierError(f"digit classifier: needs one-channel square images [N, 1, S, S]; got shape {list(images.shape)}")
    if labels.shape != (len(images),) or len(labels) == 0 or labels.min() < 0 or labels.max() >= NUM_DIGITS:
        raise DigitClassifierError(
            f"digit classifier: needs one label in 0-{NUM_DIGITS - 1} per image; got labels of shape {list(labels.shape)}"
        )
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = DigitClassifier(images.shape[-1])
        optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 2e-3, total_steps=steps)
        x = classifier_input(images)
        for _ in range(steps):
            batch = torch.randint(len(x), (128,), generator=generator)
            shift = torch.randint(-2, 3, (2,), generator=generator).tolist()
            loss = F.cross_entropy(net.train()(torch.roll(x[batch], shift, (2, 3))), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return net.eval()


@torch.no_grad()
def digit_probabilities(net: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The classifier's softmax ``[N, 10]`` (float32, CPU) of uint8 ``images``, in batches on its device."""
    device = next(net.parameters(), torch.empty(0)).device
    net.eval()
    chunks = [F.softmax(net(classifier_input(chunk.to(device))).float(), 1).cpu() for chunk in images.split(_BATCH)]
    return torch.cat(chunks) if chunks else torch.empty(0, NUM_DIGITS)


def accuracy(net: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """The share of ``images`` whose most probable digit is their label."""
    return (digit_probabilities(net, images).argmax(1) == labels.cpu()).double().mean().item()


def digit_scores(net: nn.Module, images: torch.Tensor) -> dict:
    """``clear``: the share of images classified with probability >= :data:`CONFIDENT`;
    ``classes``: how many clear images of each digit; ``balance``: the smallest of those
    counts over the mean (1: all ten equally often, 0: a digit missing)."""
    confidence, digit = digit_probabilities(net, images).max(1)
    clear = confidence >= CONFIDENT
    counts = torch.bincount(digit[clear], minlength=NUM_DIGITS)
    mean = counts.float().mean().item()
    return {
        "clear": clear.double().mean().item(),
        "classes": counts.tolist(),
        "balance": counts.min().item() / mean if mean else 0.0,
    }


def save_digit_classifier(path: str | Path, net: DigitClassifier, meta: dict[str, Any]) -> Path:
    """Write ``net`` and ``meta`` (plain data kept beside the weights: its ``heldout_accuracy``
    and training ``steps``) to ``path`` atomically."""
    state = {"format": FILE_FORMAT, "image_size": net.image_size, "state_dict": net.state_dict(), "meta": dict(meta)}
    return save_checkpoint(path, state)


def load_digit_classifier(path: str | Path) -> tuple[DigitClassifier, dict[str, Any]]:
    """The classifier (CPU, eval mode) and the ``meta`` that :func:`save_digit_classifier`
    wrote to ``path``; one line naming the file if it is missing, damaged or something else."""
    state = load_checkpoint(path)
    if state.get("format") != FILE_FORMAT or not isinstance(state.get("image_size"), int):
        raise DigitClassifierError(f"{path}: not a digit classifier file (written by save_digit_classifier)")
    net = DigitClassifier(state["image_size"])
    try:
        net.load_state_dict(state["state_dict"])
    except (RuntimeError, KeyError, TypeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DigitClassifierError(f"{path}: digit classifier weights do not fit its network ({reason})") from None
    return net.eval(), dict(state.get("meta", {}))
