"""train_vae: the autoencoder of latent diffusion, trained, or a user's loaded, when ``model.space`` is latent.

Trained: a :class:`~diffusion.models.vae.KLAutoencoder` of ``vae.name`` on the training images
(:func:`~diffusion.training.autoencoder.train_autoencoder`: recon MSE + ``vae.kl_weight`` KL),
resuming after a kill from ``checkpoints/vae-<key>/``, the key a hash of the dataset and the
params that change the trajectory. Loaded: ``vae.pretrained``, a diffusers ``AutoencoderKL``
folder, read as JSON and safetensors (no code runs; diffusers is not needed).

Outputs: ``models/vae.pt`` (:func:`~diffusion.packaged.save_autoencoder`),
``models/vae_run.json``, ``metrics/vae.json`` (held-out reconstruction MSE against the
mean-image baseline), ``plots/vae_loss.csv`` and ``plots/vae_reconstructions.png`` (held-out
images above their reconstructions). Its MLflow run (``vae-<name>``) gets the vae and data
params, the curves, the metrics, the grid and the model, registered as a version of
``autoencoder``. The outputs are written before anything is logged.

With ``model.space: pixel`` the stage does no work and imports neither torch nor MLflow: it
writes the marker :data:`~diffusion.stages.paths.PIXEL_SPACE` to ``models/vae.pt`` and empty
forms of the rest, which never change, so nothing after it re-runs for a vae param.
"""

from __future__ import annotations

from diffusion.config import Params
from diffusion.files import atomic_write, write_csv, write_json
from diffusion.stages.paths import (
    AUTOENCODER, AUTOENCODER_CURVE, AUTOENCODER_METRICS, AUTOENCODER_RUN, HELDOUT_SET, PIXEL_SPACE, RECONSTRUCTIONS,
    TRAIN_SET, checkpoint_key, checkpoints_dir,
)

CURVE_HEADER = ("step", "loss", "recon", "kl")
REGISTERED_NAME = "autoencoder"
# vae params that do not change the trained weights: a checkpoint stays valid when they change.
RESUMABLE_CHANGES = {"steps", "log_every", "checkpoint_every", "device", "grid_images", "posterior", "encode_batch_size"}


def run(params: Params) -> None:
    if params.model.space == "pixel":
        _write_markers()
        return
    _train_or_load(params)


def _write_markers() -> None:
    with atomic_write(AUTOENCODER) as fh:
        fh.write(PIXEL_SPACE)
    with atomic_write(AUTOENCODER_RUN) as fh:
        fh.write(b"{}\n")
    with atomic_write(AUTOENCODER_METRICS) as fh:
        fh.write(b"{}\n")
    write_csv(AUTOENCODER_CURVE, CURVE_HEADER, [])
    from PIL import Image

    with atomic_write(RECONSTRUCTIONS) as fh:  # a 1 x 1 white PNG: DVC needs every output
        Image.new("L", (1, 1), 255).save(fh, format="png")


def _train_or_load(params: Params) -> None:
    # Imported here: the pixel-space stage must not pay for torch and MLflow.
    import torch
    from PIL import Image

    from diffusion import registry, tracking
    from diffusion.data.dataset import load_dataset
    from diffusion.data.sizes import check_autoencoder_channels
    from diffusion.files import exclusive_lock
    from diffusion.images import image_grid, to_uint8
    from diffusion.models.vae import KLAutoencoder, load_diffusers_autoencoder
    from diffusion.models.configs import VAE_CONFIGS
    from diffusion.packaged import save_autoencoder
    from diffusion.training.autoencoder import mean_image_error, reconstruction_error, train_autoencoder
    from diffusion.training.loop import seeded_init, to_model_range

    tracking.check_store(experiment=params.tracking.experiment)  # in seconds, before any work: one line
    vae = params.vae
    dataset, heldout = load_dataset(TRAIN_SET), load_dataset(HELDOUT_SET)
    channels = dataset.images.shape[1]
    if vae.pretrained is not None:
        model, curve, img_per_s = load_diffusers_autoencoder(vae.pretrained), [], None
        check_autoencoder_channels(vae.pretrained, model.config["in_channels"], channels, str(TRAIN_SET))  # validate's too
        name, source = "pretrained", f"diffusers:{vae.pretrained}"
    else:
        with seeded_init(vae.seed):
            model = KLAutoencoder(in_channels=channels, **VAE_CONFIGS[vae.name])
        key = checkpoint_key(tracking.file_md5(TRAIN_SET), vae=params.vae.model_dump(exclude=RESUMABLE_CHANGES))
        ckpt_dir = checkpoints_dir() / f"vae-{key}"
        with exclusive_lock(ckpt_dir / ".lock"):
            result = train_autoencoder(model, dataset.images, vae, checkpoint_dir=ckpt_dir)
        model, curve, img_per_s = result.model, result.curve, result.img_per_s
        name, source = vae.name, "trained"

    model = model.cpu().eval()
    mse = reconstruction_error(model, heldout.images, batch_size=vae.batch_size)
    baseline = mean_image_error(dataset.images, heldout.images)
    metrics = {"heldout_mse": mse, "mean_image_mse": baseline, "mse_vs_mean_image": mse / baseline}
    if img_per_s is not None:
        metrics["img_per_s"] = img_per_s
    print(f"train_vae: held-out reconstruction MSE {mse:.5f}, {mse / baseline:.3f} of the mean image's {baseline:.5f}",
          flush=True)

    save_autoencoder(AUTOENCODER, model, source=source, heldout_mse=mse)
    write_json(AUTOENCODER_METRICS, metrics)
    write_csv(AUTOENCODER_CURVE, CURVE_HEADER, curve)
    shown = heldout.images[: vae.grid_images]
    with torch.no_grad():
        recon = to_uint8(model.decode(model.encode(to_model_range(shown)).mode()))
    with atomic_write(RECONSTRUCTIONS) as fh:
        Image.fromarray(image_grid(torch.cat([shown, recon]), columns=len(shown))).save(fh, format="png")

    with tracking.stage_run("train_vae", params.tracking.experiment, run_name=f"vae-{name}") as active:
        tracking.log_params(params.model_dump(include={"data", "vae"}))
        tracking.log_dataset(
            TRAIN_SET, name=params.data.source, source=dataset.source_uri, images=dataset.images, labels=dataset.labels,
        )
        for step, loss, recon_term, kl in curve:
            tracking.log_metrics({"vae_loss": loss, "vae_recon": recon_term, "vae_kl": kl}, step=step)
        tracking.log_metrics(metrics)
        tracking.log_artifact(RECONSTRUCTIONS)
        tracking.write_run_id(AUTOENCODER_RUN, active.info.run_id)
        if params.tracking.log_model:
            size = params.data.image_size
            factor = model.downsampling_factor
            model_id = tracking.log_autoencoder(
                AUTOENCODER, model.config, (channels, size, size), (model.latent_channels, size // factor, size // factor),
            )
            registry.register_version(
                REGISTERED_NAME, model_id, tags={"heldout_mse": f"{mse:.6g}", "source": source},
                description="Autoencoders of latent diffusion (train_vae).",
            )
