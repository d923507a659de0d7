"""Post-hoc EMA (EDM2) on the default: the FID of EMA lengths chosen after one training.

Trains params.yaml's default, as is, once in a temporary folder as the train stage trains it
(:func:`diffusion.training.loop.train`; without the held-out metrics and the in-training curve,
which leave the trajectory alone), keeping the snapshots of the power function EMAs of
``train.ema_lengths`` every ``train.ema_snapshot_every`` steps, and writes ``models/model.pt``
and ``models/ema_snapshots.pt`` there as the stage does. Then, with the sample stage's own code
(:func:`diffusion.stages.sample.load_model` and ``generate``: ``sample.num_samples`` images of
the default sampler), it draws the images of the EMA of ``train.ema_decay`` (``sample.ema_length``
null, today's model) and of each of ``--lengths``, and measures their FID against the Inception
features of the prepare stage's reference images (the pipeline's FID at this N). Every length
draws the same seeds, so the FIDs differ by the weights alone.

Results go to ``benchmarks/results/posthoc_ema.json`` after every measurement; a Markdown table
is printed at the end.

    OMP_NUM_THREADS=2 python benchmarks/bench_posthoc_ema.py
    python benchmarks/bench_posthoc_ema.py --set train.steps=20 sample.num_samples=20 --lengths 0.1   # a quick look
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

from diffusion.config import merge_params, parse_params  # noqa: E402
from diffusion.data.dataset import split  # noqa: E402
from diffusion.data.sources import load_source  # noqa: E402
from diffusion.evaluation.metrics import fid_from_features, inception_features  # noqa: E402
from diffusion.packaged import PackagedDiffusion  # noqa: E402
from diffusion.stages.paths import EMA_SNAPSHOTS, MODEL  # noqa: E402
from diffusion.stages.sample import generate, load_model  # noqa: E402
from diffusion.stages.train import model_spec  # noqa: E402
from diffusion.training.checkpoint import save_checkpoint  # noqa: E402
from diffusion.training.loop import seeded_init, train  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=YAML", help="params changes, e.g. train.steps=100")
    parser.add_argument("--lengths", nargs="*", type=float, default=[0.02, 0.05, 0.08, 0.12, 0.16, 0.20, 0.25])
    args = parser.parse_args()
    changes = dict(change.split("=", 1) for change in args.set)
    raw = merge_params(yaml.safe_load(args.params.read_text()), {k: yaml.safe_load(v) for k, v in changes.items()})
    params = parse_params(raw, str(args.params))
    device = torch.device("cpu")
    out = RESULTS / ("posthoc_ema.json" if not args.set else "posthoc_ema_quick.json")
    result: dict = {"machine": machine(), "recipe": params.model_dump(include={"model", "diffusion", "train"}), "fid": {}}

    os.chdir(tempfile.mkdtemp(prefix="bench_posthoc_ema-"))  # models/ of the stages' paths
    splits = split(load_source(params.data), params.data)
    reference = inception_features(splits.reference.images)  # as the prepare stage
    _, channels, size, _ = splits.train.images.shape
    spec = model_spec(params, channels, size, len(splits.train.class_names))
    with seeded_init(params.train.seed):
        packaged = PackagedDiffusion(spec, params.diffusion.model_dump())
    began = time.perf_counter()
    trained = train(
        packaged.net, packaged.diffusion, splits.train.images, splits.train.labels, params.train,
        checkpoint_dir="checkpoints", conditional=params.model.conditioning != "none", progress=False,
    )
    result["train_s"] = time.perf_counter() - began
    PackagedDiffusion(spec, params.diffusion.model_dump(), net=trained.ema_model).save(MODEL)
    save_checkpoint(EMA_SNAPSHOTS, {"snapshots": trained.ema_snapshots})
    result["snapshots"] = len(trained.ema_snapshots)
    result["snapshots_bytes"] = EMA_SNAPSHOTS.stat().st_size
    result["model_bytes"] = MODEL.stat().st_size
    print(f"{machine()}; trained {params.train.steps} steps in {result['train_s']:.0f} s; {len(trained.ema_snapshots)} "
          f"snapshots, {result['snapshots_bytes'] / 2**20:.1f} MiB (model.pt {result['model_bytes'] / 2**20:.1f} MiB)", flush=True)

    for length in [None, *args.lengths]:
        chosen = parse_params(merge_params(raw, {"sample": {"ema_length": length}}), str(args.params))
        began = time.perf_counter()
        images, _ = generate(load_model(chosen, device), chosen, device)
        fid = fid_from_features(inception_features(images), reference)
        name = f"ema_decay {params.train.ema_decay}" if length is None else f"sigma_rel {length}"
        result["fid"][name] = fid
        print(f"{name}: FID {fid:.2f} ({time.perf_counter() - began:.0f} s)", flush=True)
        RESULTS.mkdir(exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")

    baseline = result["fid"][f"ema_decay {params.train.ema_decay}"]
    best = min((k for k in result["fid"] if k.startswith("sigma_rel")), key=result["fid"].get)
    print(f"\nFID of {params.sample.num_samples} samples ({params.sample.sampler}, {params.sample.steps} steps)\n")
    print("| EMA | FID |\n|---|---|")
    for name, fid in result["fid"].items():
        print(f"| {name} | {fid:.2f} |")
    print(f"\nbest: {best}, FID {result['fid'][best]:.2f} against {baseline:.2f} ({result['fid'][best] - baseline:+.2f})")


if __name__ == "__main__":
    main()
