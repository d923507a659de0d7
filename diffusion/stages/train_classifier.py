"""train_classifier: the noise-aware classifier of classifier guidance, when ``guidance.classifier`` is true.

Outputs: ``models/classifier.pt``, the classifier as plain data
(:func:`~diffusion.models.classifier.classifier_state`) with the process it was trained on
(:func:`~diffusion.process.options.process_identity`; the sample stage checks it against the
diffusion model's), and
``plots/classifier_accuracy.csv``, its held-out accuracy in ``guidance.classifier_eval_bins``
ranges of t (:func:`~diffusion.training.classifier.accuracy_by_t`). Its MLflow run
(``classifier-<name>``, not nested: the classifier does not depend on the diffusion model)
gets the guidance and diffusion params, the dataset, the loss curve (``classifier_loss``),
the accuracy curve (``accuracy_vs_t``, step = each range's first t on the discrete chain, the
range's index on a continuous process, whose times are not integers), its mean
(``classifier_accuracy``) and the csv. The outputs are written before anything is logged.

With ``guidance.classifier`` false the stage does no work: it writes the marker
:data:`~diffusion.stages.paths.CLASSIFIER_DISABLED` to ``models/classifier.pt`` and a
header-only ``plots/classifier_accuracy.csv`` (DVC needs every output of a stage), and
imports neither torch nor MLflow, so it costs no more than the ``diffusion`` command's start.
The marker never changes, so while guidance.classifier is false a change to the classifier's
params re-runs this stage in a moment and nothing after it.

With ``model.space: latent`` the classifier is trained on the scaled latents of
``data/latents.npz``, the space the diffusion model samples in, so its gradient guides there.
"""

from __future__ import annotations

from diffusion.config import Params
from diffusion.data.sizes import check_classifier_classes
from diffusion.files import atomic_write, write_csv
from diffusion.process.options import process_identity
from diffusion.stages.paths import CLASSIFIER, CLASSIFIER_ACCURACY, CLASSIFIER_DISABLED, HELDOUT_SET, LATENTS, TRAIN_SET

ACCURACY_HEADER = ("t_lo", "t_hi", "accuracy")


def run(params: Params) -> None:
    if not params.guidance.classifier:
        with atomic_write(CLASSIFIER) as fh:
            fh.write(CLASSIFIER_DISABLED)
        write_csv(CLASSIFIER_ACCURACY, ACCURACY_HEADER, [])
        return
    _train(params)


def _train(params: Params) -> None:
    # Imported here, not above: the disabled stage must not pay for torch and MLflow.
    from diffusion import tracking
    from diffusion.data.dataset import load_dataset
    from diffusion.data.latents import load_latents
    from diffusion.models.classifier import classifier_state, create_classifier
    from diffusion.process.factory import make_diffusion
    from diffusion.training.checkpoint import save_checkpoint
    from diffusion.training.classifier import accuracy_by_t, train_classifier
    from diffusion.training.devices import resolve_device
    from diffusion.training.loop import seeded_init

    tracking.check_store(experiment=params.tracking.experiment)  # in seconds, before any work: one line
    guide, d = params.guidance, params.diffusion
    device = resolve_device(guide.classifier_device, key="guidance.classifier_device")
    dataset, heldout = load_dataset(TRAIN_SET), load_dataset(HELDOUT_SET)
    check_classifier_classes(len(dataset.class_names), str(TRAIN_SET))  # validate's rule on the source's classes
    images, labels = dataset.images, dataset.labels
    heldout_images, heldout_labels = heldout.images, heldout.labels
    if params.model.space == "latent":
        latents = load_latents(LATENTS)
        images, labels = latents.scaled("train"), latents.train_labels
        heldout_images, heldout_labels = latents.scaled("heldout"), latents.heldout_labels
    _, channels, size, _ = images.shape
    diffusion = make_diffusion(d.model_dump())
    with seeded_init(guide.classifier_seed):
        net = create_classifier(
            guide.classifier_model, in_channels=channels, image_size=size, num_classes=len(dataset.class_names)
        )

    name = f"classifier-{guide.classifier_model}"
    with tracking.stage_run("train_classifier", params.tracking.experiment, run_name=name):
        tracking.log_params(params.model_dump(include={"guidance", "diffusion"}))
        tracking.log_dataset(
            TRAIN_SET, name=params.data.source, source=dataset.source_uri, images=dataset.images, labels=dataset.labels,
        )
        losses = train_classifier(net, diffusion, images, labels, guide, device=device)
        count = min(guide.classifier_eval_images, len(heldout_images))
        accuracy = accuracy_by_t(
            net, diffusion, heldout_images[:count], heldout_labels[:count], bins=guide.classifier_eval_bins,
            batch_size=guide.classifier_batch_size, seed=guide.classifier_seed,
        )
        save_checkpoint(CLASSIFIER, classifier_state(net.cpu(), process=process_identity(d.model_dump())))
        write_csv(CLASSIFIER_ACCURACY, ACCURACY_HEADER, accuracy)
        mean_accuracy = sum(row[2] for row in accuracy) / len(accuracy)
        print(f"train_classifier: loss {losses[-1][1]:.4g}, held-out accuracy {accuracy[0][2]:.3f} at t <= "
              f"{accuracy[0][1]:g}, {mean_accuracy:.3f} over all t", flush=True)

        for step, loss in losses:
            tracking.log_metrics({"classifier_loss": loss}, step=step)
        for index, (t_lo, _, value) in enumerate(accuracy):
            tracking.log_metrics({"accuracy_vs_t": value}, step=t_lo if isinstance(t_lo, int) else index)
        tracking.log_metrics({"classifier_accuracy": mean_accuracy})
        tracking.log_artifact(CLASSIFIER_ACCURACY)
