"""train_digit_classifier: the classifier that tells whether samples are clear digits, and the ones their prompts name.

With a digit source (``data.source`` one that measured captions read: mnist5k, mnist) it trains a
:class:`~diffusion.evaluation.digit_classifier.DigitClassifier` on ``data/train.npz`` for
``evaluate.digit_classifier_steps`` steps and writes ``models/digit_classifier.pt`` with its
accuracy on ``data/heldout.npz``; the evaluate stage scores the samples with it
(:mod:`diffusion.evaluation.text_faithfulness`). With any other source the stage writes the
marker :data:`~diffusion.stages.paths.NO_DIGIT_CLASSIFIER` and imports neither torch nor
MLflow. It depends on the data alone, not on the diffusion model, so a sweep trains it once.
"""

from __future__ import annotations

from diffusion.config import CAPTION_SOURCES, Params
from diffusion.files import atomic_write
from diffusion.stages.paths import DIGIT_CLASSIFIER, HELDOUT_SET, NO_DIGIT_CLASSIFIER, TRAIN_SET

def run(params: Params) -> None:
    if params.data.source not in CAPTION_SOURCES["measured"]:  # the sources whose labels are the digits 0-9
        with atomic_write(DIGIT_CLASSIFIER) as fh:
            fh.write(NO_DIGIT_CLASSIFIER)
        return
    # Imported here, not above: the marker must not pay for torch.
    from diffusion.data.dataset import load_dataset
    from diffusion.evaluation.digit_classifier import accuracy, save_digit_classifier, train_digit_classifier

    train, heldout = load_dataset(TRAIN_SET), load_dataset(HELDOUT_SET)
    steps = params.evaluate.digit_classifier_steps
    net = train_digit_classifier(train.images, train.labels, steps=steps, seed=params.data.seed)
    held_out = accuracy(net, heldout.images, heldout.labels) if len(heldout.images) else None
    save_digit_classifier(DIGIT_CLASSIFIER, net, {"heldout_accuracy": held_out, "steps": steps})
    shown = "no held-out images" if held_out is None else f"held-out accuracy {held_out:.4f}"
    print(f"train_digit_classifier: {steps} steps on {len(train.images)} digits, {shown}", flush=True)
