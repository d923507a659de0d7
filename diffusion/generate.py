"""``diffusion generate``: images from a trained model, as PNGs, a grid and an ``.npz``.

The model is a file of :meth:`~diffusion.packaged.PackagedDiffusion.save`
(``models/model.pt``), a run's model (``runs:/<run id>/model``, or the run id alone) or a
registered model (``models:/diffusion@champion``), read by
:func:`diffusion.registry.load_model` from ``--tracking-uri`` (default
``MLFLOW_TRACKING_URI``, else the repository's ``mlflow/`` store). Every sampling option
left out is the model's own :attr:`~diffusion.packaged.PackagedDiffusion.sampling`, so a
registered model samples with the settings behind its recorded FID unless told
otherwise. The images are drawn as the sample stage draws them
(:func:`diffusion.images.generate_images`): image k from its own generator, seeded from
(``--seed``, k), for ``--labels`` cycled, or by default balanced over the classes; a
text-conditional model for ``--prompt`` (repeatable) or the lines of ``--prompts FILE``, cycled.

Written into ``--out``, each file atomically: ``image-00000.png`` ... (one per image),
``grid.png`` and ``samples.npz`` (uint8 ``images`` [N, C, H, W], ``labels`` (a text model's:
its token ids) and its ``prompts``, the ``sampling`` settings as JSON, the ``seed``), the sample
stage's format. Image files of
an earlier, larger run in the folder are removed.

Bad arguments are one line, before anything is sampled: a value out of range, an unknown
sampler or step schedule, an eta or churn the sampler does not take, a sampler in the
process's own time (euler, sde) on the discrete chain, a missing model file or URI, labels
outside the model's classes, labels or guidance for an unconditional model, prompts for a model
not conditioned on text (or none for one that is), an empty prompts file, more steps than
a discrete chain's timesteps, a guidance interval beyond the process's times, an ``--out``
that is a file or cannot be written. The model samples on its own noise process (the
``process`` it was trained on, :func:`diffusion.process.factory.make_diffusion`).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Any, NoReturn

from diffusion.errors import UserError
from diffusion.process.options import time_max
from diffusion.sampling.specs import CHURN_OPTIONS, FITTED, SAMPLER_SPECS, SCHEDULE_NAMES, eta_refused, options_refused

RUN_ID = re.compile(r"[0-9a-f]{32}")  # an MLflow run id: its model is runs:/<id>/model
IMAGE_NAME = re.compile(r"image-\d{5,}\.png")
MODEL_KIND = {"none": "unconditional", "class": "class-conditional", "text": "text-conditional"}  # by its conditioning


class GenerateError(UserError, ValueError):
    """An argument that cannot be run; the message is one line naming the option."""


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are a :class:`GenerateError`: one line, as every other bad argument is."""

    def error(self, message: str) -> NoReturn:
        raise GenerateError(message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="diffusion generate", description="Sample images from a trained model into PNGs, a grid and an .npz.")
    parser.add_argument("model", help="models/model.pt, a run id, runs:/<run id>/model or models:/<name>@<alias>")
    parser.add_argument("-n", "--num-images", type=int, default=16, help="how many images (default: 16)")
    parser.add_argument("--labels", type=int, nargs="+", help="class labels, cycled over the images (default: balanced)")
    parser.add_argument("--prompt", action="append", help="a text-conditional model's caption; repeat for several, cycled over the images")
    parser.add_argument("--prompts", metavar="FILE", help="a file of prompts, one a line (blank lines skipped), cycled over the images")
    unset = "(default: the model's)"
    parser.add_argument("--sampler", choices=list(SAMPLER_SPECS), help=f"sampler {unset}")
    parser.add_argument("--steps", type=int, help=f"sampler steps {unset}")
    parser.add_argument(
        "--schedule", choices=list(SCHEDULE_NAMES), help=f"where the steps go (fitted: the model's own fit) {unset}"
    )
    parser.add_argument("--eta", type=float, help=f"DDIM's eta, 0 for every other sampler {unset}")
    parser.add_argument("--guidance-scale", type=float, help=f"classifier-free guidance, 1 = off {unset}")
    parser.add_argument("--guidance-interval", type=float, nargs=2, metavar=("LO", "HI"),
                        help=f"guide only for the process's times LO <= t <= HI {unset}")
    churn = ", ".join(name for name, spec in SAMPLER_SPECS.items() if "s_churn" in spec.options)
    parser.add_argument("--s-churn", type=float, help=f"EDM's S_churn ({churn}), 0 = deterministic {unset}")
    parser.add_argument("--s-tmin", type=float, help=f"churn only where S_tmin <= sigma {unset}")
    parser.add_argument("--s-tmax", type=float, help=f"churn only where sigma <= S_tmax {unset}")
    parser.add_argument("--s-noise", type=float, help=f"EDM's S_noise {unset}")
    parser.add_argument("--precision", choices=["fp32", "bf16"], help=f"the network's, under autocast {unset}")
    parser.add_argument("--seed", type=int, default=0, help="image k is drawn from (seed, k) (default: 0)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="(default: auto)")
    parser.add_argument("--batch-size", type=int, default=64, help="images a pass; changes no image (default: 64)")
    parser.add_argument("--out", default="generated", help="output folder (default: generated)")
    parser.add_argument("--tracking-uri", help="MLflow store of runs:/ and models:/ (default: $MLFLOW_TRACKING_URI, else mlflow/)")
    return parser


def option(key: str) -> str:
    """The option that sets sampling key ``key``: ``guidance_scale`` -> ``--guidance-scale``."""
    return "--" + key.replace("_", "-")


# Options that must be at least some value, checked before the model is read.
AT_LEAST = {
    "num_images": 1, "batch_size": 1, "steps": 1, "seed": 0, "eta": 0.0, "guidance_scale": 0.0,
    **{key: 0.0 for key in CHURN_OPTIONS},
}


def check_arguments(args: argparse.Namespace) -> None:
    """The checks that need no model: :class:`GenerateError` naming the first bad option."""
    for key, low in AT_LEAST.items():
        value = getattr(args, key)
        if value is not None and not (math.isfinite(value) and value >= low):
            raise GenerateError(f"{option(key)}: got {value}; allowed: {low} or more")
    if args.labels is not None and min(args.labels) < 0:
        raise GenerateError(f"--labels: got {min(args.labels)}; allowed: class indices >= 0")
    if args.prompts is not None:
        args.prompt = (args.prompt or []) + read_prompts(Path(args.prompts))
    if args.guidance_interval is not None and not 0 <= args.guidance_interval[0] <= args.guidance_interval[1]:
        raise GenerateError(f"--guidance-interval: got {args.guidance_interval}; allowed: LO HI with 0 <= LO <= HI")
    if args.sampler is not None and args.eta is not None and (why := eta_refused(args.sampler, args.eta)):
        raise GenerateError(f"--eta: {why}")


def read_prompts(path: Path) -> list[str]:
    """The non-blank lines of ``path``, stripped; :class:`GenerateError` naming it when it cannot be read or holds none."""
    try:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise GenerateError(f"--prompts: {path}: cannot be read ({getattr(err, 'strerror', None) or err}); allowed: a UTF-8 text file, one prompt a line") from None
    if not prompts:
        raise GenerateError(f"--prompts: {path}: holds no prompt; allowed: a UTF-8 text file, one prompt a line")
    return prompts


def check_out(out: Path) -> None:
    """Create ``out`` and write and remove a nameless file in it, before anything is sampled:
    :class:`GenerateError` when it is a file, or a folder that cannot be made or written."""
    import tempfile

    if out.exists() and not out.is_dir():
        raise GenerateError(f"--out: {out}: is a file, not a folder; name a folder to write the images in")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        raise GenerateError(f"--out: {out}: cannot write there ({err.strerror or err}); allowed: a folder you can write") from None


def load(model: str, tracking_uri: str | None):
    """The :class:`~diffusion.packaged.PackagedDiffusion` that ``model`` names: a file, a run id or a model URI."""
    from diffusion import registry
    from diffusion.packaged import PackagedDiffusion

    if Path(model).is_file():
        return PackagedDiffusion.load(model)
    if RUN_ID.fullmatch(model):
        model = f"runs:/{model}/model"
    if not model.startswith(("models:/", "runs:/")):
        raise GenerateError(f"model: {model}: no such file, and not a run id or a model URI ({registry.URI_FORMS})")
    try:
        return registry.load_model(model, tracking_uri=tracking_uri)
    except registry.RegistryError as err:
        raise GenerateError(f"model: {err}") from None


def settings(packaged, args: argparse.Namespace) -> dict[str, Any]:
    """The model's ``sampling`` with the options given on top; :class:`GenerateError` when they
    do not fit the model (guidance or labels without classes, too many steps)."""
    given = {key: getattr(args, key) for key in packaged.sampling if getattr(args, key, None) is not None}
    sampling = {**packaged.sampling, **given}
    if sampling["schedule"] != FITTED:
        sampling["timesteps"] = None  # a fitted model sampled on a formula: its fit no longer applies
    elif sampling["timesteps"] is None:
        raise GenerateError("--schedule: fitted needs a model that carries a fitted schedule (sample.schedule fitted "
                            "before it was promoted); this one has none: name linspace, trailing, log-snr or karras")
    elif (sampling["sampler"], sampling["steps"]) != (packaged.sampling["sampler"], packaged.sampling["steps"]):
        raise GenerateError(
            f"--schedule: the model's schedule was fitted for {packaged.sampling['sampler']} at "
            f"{packaged.sampling['steps']} steps, not {sampling['sampler']} at {sampling['steps']}: drop "
            "--sampler/--steps, or name another --schedule"
        )
    process = packaged.diffusion.process
    conditioning = packaged.conditioning
    if sampling["guidance_scale"] != 1 and conditioning == "none":
        raise GenerateError(
            f"--guidance-scale: {sampling['guidance_scale']} guides a conditional model, and this one "
            "is unconditional; allowed: 1 (no guidance)"
        )
    if args.labels is not None and conditioning != "class":
        raise GenerateError(f"--labels: this model is {MODEL_KIND[conditioning]}, not class-conditional; leave --labels out")
    if args.prompt is not None and conditioning != "text":
        raise GenerateError(
            f"--prompt: this model is {MODEL_KIND[conditioning]}, not text-conditional; leave --prompt and --prompts out"
        )
    if args.prompt is None and conditioning == "text":
        raise GenerateError('--prompt: this model is text-conditional; give --prompt "a caption" (repeatable) or --prompts FILE')
    if args.eta is not None and (why := eta_refused(sampling["sampler"], args.eta)):
        raise GenerateError(f"--eta: {why}")
    if why := options_refused(sampling["sampler"], {key: sampling[key] for key in CHURN_OPTIONS}, process.name):
        key, _, rest = why.partition(": ")
        raise GenerateError(f"{option(key)}: {rest}" if key in CHURN_OPTIONS else f"--sampler: {why}")
    if sampling["s_tmax"] is not None and sampling["s_tmin"] > sampling["s_tmax"]:
        raise GenerateError(f"--s-tmin: {sampling['s_tmin']} is above --s-tmax {sampling['s_tmax']}")
    timesteps = getattr(process, "num_timesteps", None)  # the discrete chain's T; a continuous process has none
    if timesteps is not None and sampling["steps"] is not None and sampling["steps"] > timesteps:
        raise GenerateError(f"--steps: {sampling['steps']} is more than the model's {timesteps} timesteps; allowed 1..{timesteps}")
    interval, top = sampling["guidance_interval"], time_max(process.name, timesteps or 0)
    if interval is not None and interval[1] > top:
        raise GenerateError(f"--guidance-interval: got {list(interval)}; allowed 0 <= LO <= HI <= {top:g} (the process's times)")
    return sampling


def write(out: Path, images, labels, sampling: dict[str, Any], seed: int, prompts: list[str] | None = None) -> None:
    """One PNG per image, the grid and ``samples.npz``, each atomically; earlier image files beyond this run's removed."""
    import numpy as np
    from PIL import Image

    from diffusion.files import atomic_write
    from diffusion.images import image_grid

    names = set()
    for index in range(len(images)):
        names.add(name := f"image-{index:05d}.png")
        with atomic_write(out / name) as fh:
            Image.fromarray(image_grid(images[index : index + 1], columns=1, padding=0)).save(fh, format="png")
    with atomic_write(out / "grid.png") as fh:
        Image.fromarray(image_grid(images, columns=math.ceil(math.sqrt(len(images))))).save(fh, format="png")
    with atomic_write(out / "samples.npz") as fh:
        text = {"prompts": np.array(prompts, dtype=str)} if prompts is not None else {}
        np.savez(fh, images=images.numpy(), labels=labels.numpy(), sampling=np.array(json.dumps(sampling)), seed=np.array(seed), **text)
    for stale in out.iterdir():
        if IMAGE_NAME.fullmatch(stale.name) and stale.name not in names:
            stale.unlink()


def main(argv: list[str]) -> int:
    """``diffusion generate``: sample ``--num-images`` images from a model into ``--out``."""
    try:
        args = _parser().parse_args(argv)
    except GenerateError as err:
        print(f"diffusion generate: error: {err}", file=sys.stderr)
        return 2
    try:
        check_arguments(args)
        from diffusion.images import cycled_prompts, generate_images, sampling_labels
        from diffusion.training.devices import resolve_device

        device = resolve_device(args.device, key="--device")
        packaged = load(args.model, args.tracking_uri).to(device)
        sampling = settings(packaged, args)
        prompts = cycled_prompts(args.prompt, args.num_images) if args.prompt else None
        if prompts is not None:
            labels = packaged.tokenize(prompts)
        else:
            labels = sampling_labels(args.labels, args.num_images, packaged.model_spec.get("num_classes"), key="--labels")
        check_out(Path(args.out))
        images = generate_images(
            packaged, sampling, labels=labels, batch_size=args.batch_size, seed=args.seed, device=device, name=option
        )
        write(Path(args.out), images, labels, sampling, args.seed, prompts)
    except UserError as err:
        print(f"diffusion generate: error: {err}", file=sys.stderr)
        return 1
    print(f"diffusion generate: {len(images)} images ({json.dumps(sampling)}) in {args.out}/")
    return 0
