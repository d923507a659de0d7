"""A small digit classifier: how many generated images are clear digits, and of which classes.

FID says how far a set of samples is from the data, not whether each image is a digit.
This CNN (three conv + max-pool layers, ~0.2M parameters), trained on real MNIST digits
with ±2-pixel shifts, answers that: an image is a *clear digit* when the classifier puts
at least :data:`CONFIDENT` of its probability on one class, and the histogram of those
classes shows whether a model draws all ten digits in similar numbers. Real held-out
digits set the ceiling (:func:`digit_scores` on them); the classifier's held-out accuracy
is printed with it. It needs 28x28 one-channel images: the default data.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffusion.training.loop import to_model_range

CONFIDENT = 0.9  # max softmax probability of a clear digit


class DigitClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(c_in, c_out, 3, padding=1) for c_in, c_out in ((1, 32), (32, 64), (64, 128)))
        self.hidden = nn.Linear(128 * 3 * 3, 128)
        self.out = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = F.max_pool2d(F.relu(conv(x)), 2)  # 28 -> 14 -> 7 -> 3
        return self.out(F.dropout(F.relu(self.hidden(x.flatten(1))), 0.3, self.training))


def train_classifier(images: torch.Tensor, labels: torch.Tensor, *, steps: int = 1500, seed: int = 0) -> DigitClassifier:
    """A :class:`DigitClassifier` trained on uint8 ``[N, 1, 28, 28]`` images (AdamW, one-cycle lr
    2e-3, batches of 128, each batch rolled by up to two pixels each way); about a minute on 2 cores."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = DigitClassifier()
        optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 2e-3, total_steps=steps)
        x = to_model_range(images)
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
def accuracy(net: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    return (net(to_model_range(images)).argmax(1) == labels).float().mean().item()


@torch.no_grad()
def digit_scores(net: DigitClassifier, images: torch.Tensor) -> dict:
    """``clear``: the share of images classified with probability >= :data:`CONFIDENT`;
    ``classes``: how many clear images of each digit; ``balance``: the smallest of those
    counts over the mean (1: all ten equally often, 0: a digit missing)."""
    confidence, digit = F.softmax(net(to_model_range(images)), 1).max(1)
    clear = confidence >= CONFIDENT
    counts = torch.bincount(digit[clear], minlength=10)
    mean = counts.float().mean().item()
    return {
        "clear": clear.float().mean().item(),
        "classes": counts.tolist(),
        "balance": counts.min().item() / mean if mean else 0.0,
    }
