"""Text-conditional against class-conditional on the default data, at equal training minutes.

Both models are params.yaml's default (``unet-small``, the ddpm chain, 500 samples of the
default sampler, guidance scale 2), trained in-process as the train stage trains them
(:func:`diffusion.training.loop.train`, without the held-out metrics and the in-training curve,
which leave the trajectory alone): the class model for ``train.steps`` steps, the text model
(``model.conditioning: text``, the char-transformer learned with it, the measured captions of
the prepare stage) for as many steps as fit in the same minutes, measured on a short
calibration run of each. Each then draws ``sample.num_samples`` images with the sample stage's
own code (:func:`diffusion.stages.sample.generate`): the text model for the evaluation prompts
of ``sample.prompts`` cycled, the class model for the digit each of those prompts names (its
labels carry nothing else), so both are asked for the same digits and the attributes are a
question the class model cannot be told. Scored as evaluate scores: FID against the prepare
stage's reference, and :func:`diffusion.evaluation.text_faithfulness.text_faithfulness` with the
digit classifier the train_digit_classifier stage trains (clear digits, the named digit's
accuracy, each attribute's agreement with the prompt, its chance level and the thick-thin gap).

Also measured: the text encoder's share of a training step (its forward and backward on a
batch of captions, alone), and with ``--dit`` the DiT's two ways to read a caption, cross-attention
blocks against joint attention (SD3's MMDiT), at equal steps (``--dit-steps``; ``dit-cpu`` with
2-pixel patches).

Results go to ``benchmarks/results/text.json`` after every measurement; a Markdown table is
printed at the end.

    OMP_NUM_THREADS=2 python benchmarks/bench_text.py [--dit]
    python benchmarks/bench_text.py --set train.steps=20 sample.num_samples=30 evaluate.digit_classifier_steps=20   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

from bench_networks import machine  # noqa: E402

from diffusion.config import Params, merge_params, parse_params  # noqa: E402
from diffusion.data.captions import parse_caption  # noqa: E402
from diffusion.data.dataset import split  # noqa: E402
from diffusion.data.sources import load_source  # noqa: E402
from diffusion.evaluation.digit_classifier import accuracy, train_digit_classifier  # noqa: E402
from diffusion.evaluation.metrics import fid_from_features, inception_features  # noqa: E402
from diffusion.evaluation.text_faithfulness import text_faithfulness  # noqa: E402
from diffusion.images import cycled_prompts  # noqa: E402
from diffusion.packaged import PackagedDiffusion  # noqa: E402
from diffusion.stages.sample import generate  # noqa: E402
from diffusion.stages.train import model_spec  # noqa: E402
from diffusion.training.loop import seeded_init, train  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
CALIBRATION_STEPS = 30
QUIET = {"val_images": 0, "bpd_images": 0, "eval_images": 0}  # held-out metrics and the curve: no effect on the weights


def build(params: Params, splits) -> tuple[PackagedDiffusion, torch.Tensor]:
    """The network of ``params`` (as the train stage builds it) and its training conditions."""
    _, channels, size, _ = splits.train.images.shape
    spec = model_spec(params, channels, size, len(splits.train.class_names))
    with seeded_init(params.train.seed):
        packaged = PackagedDiffusion(spec, params.diffusion.model_dump())
    if packaged.conditioning == "text":
        return packaged, packaged.tokenize(splits.train.captions)
    return packaged, splits.train.labels


def fit(params: Params, splits, steps: int, folder: str) -> tuple[PackagedDiffusion, float]:
    """``params``' model trained for ``steps`` steps (the EMA network, packaged) and the seconds it took."""
    packaged, conditions = build(params, splits)
    cfg = params.train.model_copy(update={"steps": steps, **QUIET})
    began = time.perf_counter()
    result = train(packaged.net, packaged.diffusion, splits.train.images, conditions, cfg, checkpoint_dir=folder,
                   conditional=True, progress=False)
    seconds = time.perf_counter() - began
    return PackagedDiffusion(packaged.model_spec, packaged.process, net=result.ema_model), seconds


def encoder_seconds(packaged: PackagedDiffusion, conditions: torch.Tensor, batch_size: int, reps: int = 20) -> float:
    """Seconds of the text encoder's forward and backward on one training batch of captions."""
    encoder = packaged.net.text_encoder.train()
    batch = conditions[:batch_size]
    began = time.perf_counter()
    for _ in range(reps):
        out = encoder(batch)
        (out.tokens.sum() + out.pooled.sum()).backward()
    return (time.perf_counter() - began) / reps


def score(packaged: PackagedDiffusion, params: Params, prompts: list[str], reference, classifier) -> dict:
    """FID and the text-faithfulness metrics of the sample stage's images of ``packaged``, each scored
    against ``prompts`` (what a text model was asked; the digit a class model was asked for)."""
    began = time.perf_counter()
    images, _ = generate(packaged, params, torch.device("cpu"))
    result = {"sample_s": time.perf_counter() - began}
    result["fid"] = fid_from_features(inception_features(images), reference)
    result |= text_faithfulness(images, prompts, classifier)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=YAML", help="params changes, e.g. train.steps=100")
    parser.add_argument("--dit", action="store_true", help="also DiT's cross-attention against joint attention")
    parser.add_argument("--dit-steps", type=int, default=200, help="the DiTs' training steps (default: 200)")
    args = parser.parse_args()
    changes = {key: yaml.safe_load(value) for key, value in (change.split("=", 1) for change in args.set)}
    raw = merge_params(yaml.safe_load(args.params.read_text()), changes)
    class_params = parse_params(merge_params(raw, {"model": {"conditioning": "class"}}), str(args.params))
    text_params = parse_params(merge_params(raw, {"model": {"conditioning": "text"}}), str(args.params))
    out = RESULTS / ("text.json" if not args.set else "text_quick.json")
    result: dict = {"machine": machine(), "recipe": class_params.model_dump(include={"model", "diffusion", "train", "sample"})}

    def save() -> None:
        RESULTS.mkdir(exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")

    os.chdir(tempfile.mkdtemp(prefix="bench_text-"))
    splits = split(load_source(class_params.data), class_params.data)
    reference = inception_features(splits.reference.images)  # as the prepare stage
    began = time.perf_counter()
    classifier = train_digit_classifier(splits.train.images, splits.train.labels,
                                        steps=class_params.evaluate.digit_classifier_steps, seed=class_params.data.seed)
    result["digit_classifier"] = {"seconds": time.perf_counter() - began,
                                  "heldout_accuracy": accuracy(classifier, splits.heldout.images, splits.heldout.labels)}
    print(f"{machine()}; digit classifier {result['digit_classifier']}", flush=True)

    per_step = {}
    for name, params in (("class", class_params), ("text", text_params)):
        _, seconds = fit(params, splits, CALIBRATION_STEPS, f"calibration-{name}")
        per_step[name] = seconds / CALIBRATION_STEPS
    text_model, conditions = build(text_params, splits)
    result["per_step_s"] = per_step
    result["encoder_step_s"] = encoder_seconds(text_model, conditions, text_params.train.batch_size)
    result["encoder_params"] = sum(p.numel() for p in text_model.net.text_encoder.parameters())
    result["network_params"] = {name: sum(p.numel() for p in build(p, splits)[0].net.parameters())
                                for name, p in (("class", class_params), ("text", text_params))}
    steps = {"class": class_params.train.steps,
             "text": round(class_params.train.steps * per_step["class"] / per_step["text"])}
    result["steps"] = steps
    print(f"per step: {per_step}; text encoder alone {result['encoder_step_s']:.4f} s; steps at equal minutes {steps}", flush=True)
    save()

    prompts = cycled_prompts(text_params.sample.prompts, text_params.sample.num_samples)
    digits = [parse_caption(prompt).digit for prompt in text_params.sample.prompts]
    class_sampling = parse_params(merge_params(raw, {"model": {"conditioning": "class"}, "sample": {"labels": digits}}),
                                  str(args.params))
    runs = {"class": (class_params, class_sampling), "text": (text_params, text_params)}
    for name, (params, sampling) in runs.items():
        model, seconds = fit(params, splits, steps[name], f"train-{name}")
        result[name] = {"train_s": seconds, "steps": steps[name], **score(model, sampling, prompts, reference, classifier)}
        print(f"{name}: {json.dumps(result[name])}", flush=True)
        save()

    if args.dit:
        for attention in ("cross", "joint"):
            dit = parse_params(merge_params(raw, {"model": {"conditioning": "text", "name": "dit-cpu",
                                                            "overrides": {"patch_size": 2, "text_attention": attention}}}),
                               str(args.params))
            model, seconds = fit(dit, splits, args.dit_steps, f"train-dit-{attention}")
            params_count = sum(p.numel() for p in model.net.parameters()) - result["encoder_params"]
            result[f"dit_{attention}"] = {"train_s": seconds, "steps": args.dit_steps, "params": params_count,
                                          **score(model, dit, prompts, reference, classifier)}
            print(f"dit {attention}: {json.dumps(result[f'dit_{attention}'])}", flush=True)
            save()

    keys = ["train_s", "steps", "fid", "text_clear", "text_digit_accuracy", *(f"text_{a}_{m}" for a in ("thickness", "slant", "size")
                                                                            for m in ("agreement", "chance", "gap"))]
    names = [name for name in ("class", "text", "dit_cross", "dit_joint") if name in result]
    print("\n| | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
    for key in keys:
        print(f"| {key} | " + " | ".join(f"{result[n].get(key, float('nan')):.3f}" for n in names) + " |")


if __name__ == "__main__":
    main()
