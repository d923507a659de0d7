"""The noise processes (ddpm, vp, edm, flow) on params.yaml's recipe, at equal training steps and seconds.

Every contender is params.yaml's recipe (network, class conditioning, steps, batch, lr,
EMA, guidance) with only ``diffusion.process`` and that process's own options changed
(:data:`PROCESSES`): ddpm as today (cosine, v), vp (linear, its own prediction), edm (its
own: log-normal P_mean -1.2 P_std 1.2, edm weighting, Table 1 preconditioning) and flow
(velocity, logit-normal). All train in ONE process, their steps interleaved round-robin
(one step of each in turn, each stepped by the pipeline's own
:class:`diffusion.training.loop.Trainer`), so a machine that slows down slows all alike;
each one's measured training seconds are reported next to its FID (the network and the
batch are the same, so equal steps are equal seconds within a few %).

Each trained EMA network then draws ``--samples`` images (seeded, the sample stage's
:func:`diffusion.images.generate_images` with params.yaml's sample section: precision auto,
guidance w = 2) with each sampler of :data:`SAMPLERS` the process allows, all at <= 50
network evaluations (:func:`diffusion.sampling.specs.network_evaluations`), scored as
bench_default.py scores (FID/KID against ``--reference`` training images drawn at random,
and on digits the clear-digit share of :mod:`diffusion.evaluation.digit_classifier`). Each row is written to
the results as soon as it is scored.

    python benchmarks/bench_processes.py                          # MNIST-5k: ~35 minutes on 2 cores
    python benchmarks/bench_processes.py --steps 30 --samples 50  # a quick look
    python benchmarks/bench_processes.py --data cifar10 --minutes 3 --processes ddpm edm flow

``--data cifar10`` trains on CIFAR-10 (the first ``--cifar-shards`` JPEG shards of
../shared/data/cifar10-jpeg, 10,000 class-balanced training images each, unpacked once
under ``--cifar-cache`` as an image folder: data.source imagefolder, 32 px,
3 channels) for ``--minutes`` training minutes EACH (the interleaved round-robin stops
when the slowest contender has spent them; every contender gets the same number of steps),
and scores FID/KID only (no digits). Results: ``benchmarks/results/processes_<data>.json``
and ``processes_grid_<process>.png`` (``processes_cifar10_grid_<process>.png`` for CIFAR).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

from bench_default import pipeline_samples, pipeline_trainer, reference_and_judge, scores
from bench_networks import machine

from diffusion.config import merge_params, parse_params
from diffusion.data.dataset import split
from diffusion.data.sources import load_source
from diffusion.evaluation.metrics import fid_from_features, inception_features, kid_from_features
from diffusion.images import image_grid
from diffusion.sampling.specs import network_evaluations

RESULTS = Path(__file__).parent / "results"
CIFAR_SHARDS = ROOT.parent / "shared" / "data" / "cifar10-jpeg"

PROCESSES: dict[str, dict] = {
    # today's default, as params.yaml says it
    "ddpm": {"diffusion.process": "ddpm", "diffusion.schedule": "cosine", "diffusion.prediction": "v",
             "train.timestep_sampler": "uniform"},
    # each continuous process with its own options (null: the process's own, PROCESS_OPTIONS' first)
    "vp": {"diffusion.process": "vp", "diffusion.schedule": "linear", "diffusion.prediction": None,
           "train.timestep_sampler": None, "train.loss_weighting": None},
    "edm": {"diffusion.process": "edm", "diffusion.schedule": None, "diffusion.prediction": None,
            "train.timestep_sampler": None, "train.loss_weighting": None},
    "flow": {"diffusion.process": "flow", "diffusion.schedule": None, "diffusion.prediction": None,
             "train.timestep_sampler": None, "train.loss_weighting": None},
}

SAMPLERS: dict[str, dict] = {
    # name: sample params; every one 50 network evaluations with guidance w = 2
    "ddpm-25-linspace": {"sampler": "ddpm", "steps": 25, "schedule": "linspace"},  # today's
    "ddpm-25-karras": {"sampler": "ddpm", "steps": 25, "schedule": "karras"},
    "dpm++2m-25-karras": {"sampler": "dpm++2m", "steps": 25, "schedule": "karras"},
    "heun-13-karras": {"sampler": "heun", "steps": 13, "schedule": "karras"},
    "euler-25-karras": {"sampler": "euler", "steps": 25, "schedule": "karras"},
    "sde-25-karras": {"sampler": "sde", "steps": 25, "schedule": "karras"},
    "euler-25-linspace": {"sampler": "euler", "steps": 25, "schedule": "linspace"},
    "heun-13-karras-churn": {"sampler": "heun", "steps": 13, "schedule": "karras", "s_churn": 10.0,
                             "s_tmin": 0.05, "s_tmax": 50.0, "s_noise": 1.003},
    "dpm++2m-25-log-snr": {"sampler": "dpm++2m", "steps": 25, "schedule": "log-snr"},
}
DEFAULT_SAMPLERS = ["ddpm-25-linspace", "dpm++2m-25-karras", "heun-13-karras", "euler-25-karras", "sde-25-karras"]


def cifar_root(cache: Path, shards: int) -> Path:
    """The first ``shards`` training shards of CIFAR-10's JPEG copy (10,000 class-balanced
    images each) unpacked under ``cache/<shards>`` (once): ``<cache>/<shards>/train``."""
    folder = cache / str(shards)
    if not (folder / "train").is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        for shard in sorted(CIFAR_SHARDS.glob("train-*.tar"))[:shards]:
            subprocess.run(["tar", "-xf", str(shard), "-C", str(folder)], check=True)
    return folder / "train"


def load_params(path: Path, changes: dict) -> tuple[dict, object]:
    raw = merge_params(yaml.safe_load(path.read_text()), changes)
    return raw, parse_params(raw, str(path))


def train_round_robin(trainers: dict, steps: int, seconds: float | None) -> tuple[dict, int]:
    """One step of each trainer in turn, for ``steps`` rounds or until the slowest has spent
    ``seconds``; returns each one's training seconds, its median step seconds (robust to a
    neighbour's burst of load during a few steps) and the rounds run."""
    spent = dict.fromkeys(trainers, 0.0)
    per_step = {name: [] for name in trainers}
    done = 0
    for step in range(1, steps + 1):
        for name, trainer in trainers.items():
            start = time.perf_counter()
            trainer.step(step, None)
            per_step[name].append(time.perf_counter() - start)
            spent[name] += per_step[name][-1]
        done = step
        if step % 50 == 0:
            print(f"step {step}: " + ", ".join(f"{n} {s:.0f} s" for n, s in spent.items()), flush=True)
        if seconds is not None and max(spent.values()) >= seconds:
            break
    median = {name: sorted(times)[len(times) // 2] for name, times in per_step.items()}
    return spent, median, done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=YAML", help="params changes for every contender")
    parser.add_argument("--data", choices=["default", "cifar10"], default="default")
    parser.add_argument("--cifar-cache", type=Path, default=Path("/tmp/cifar10-jpeg"))
    parser.add_argument("--cifar-shards", type=int, default=1, help="training shards of 10,000 images (1..5)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: train.steps)")
    parser.add_argument("--minutes", type=float, default=None, help="stop training when a contender has spent these")
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--reference", type=int, default=1000, help="images drawn at random from the training split")
    parser.add_argument("--seed", type=int, default=0, help="the reference draw")
    parser.add_argument("--classifier-steps", type=int, default=1500, help="the digit classifier's training")
    parser.add_argument("--processes", nargs="*", default=list(PROCESSES), choices=list(PROCESSES))
    parser.add_argument("--samplers", nargs="*", default=DEFAULT_SAMPLERS, choices=list(SAMPLERS))
    parser.add_argument("--only", nargs="*", default=[], metavar="PROCESS:SAMPLER",
                        help="extra (process, sampler) rows beyond --samplers, e.g. edm:heun-13-karras-churn")
    parser.add_argument("--no-real", action="store_true", help="skip scoring the real held-out images (the floor)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--grids", type=Path, default=RESULTS, help="where the grids go")
    args = parser.parse_args()

    changes = {k: yaml.safe_load(v) for k, v in (change.split("=", 1) for change in args.set)}
    if args.data == "cifar10":
        changes = {"data.source": "imagefolder", "data.root": str(cifar_root(args.cifar_cache, args.cifar_shards)),
                   "data.image_size": 32, "data.captions": None, **changes}
    if args.steps is not None:
        changes["train.steps"] = args.steps
    if args.minutes is not None and args.steps is None:
        changes["train.steps"] = 100_000  # the minutes stop it; the lr warm-up and EMA do not depend on steps
    changes["sample.num_samples"] = args.samples
    raw, base = load_params(args.params, changes)
    load_start = time.perf_counter()
    splits = split(load_source(base.data), base.data)
    train_set = splits.train
    print(f"{machine()}; data {args.data}: {tuple(train_set.images.shape)} training images, "
          f"loaded in {time.perf_counter() - load_start:.0f} s", flush=True)

    params, specs, trainers = {}, {}, {}
    for name in args.processes:
        _, params[name] = load_params(args.params, {**changes, **PROCESSES[name]})
        specs[name], trainers[name] = pipeline_trainer(params[name], train_set)
    steps = base.train.steps
    torch.manual_seed(trainers[args.processes[0]].torch_seed)  # the trainers draw from their own generators
    train_s, step_median_s, rounds = train_round_robin(trainers, steps, None if args.minutes is None else args.minutes * 60)
    print("training seconds: " + json.dumps(train_s) + f" ({rounds} steps each); median step s: "
          + json.dumps(step_median_s), flush=True)

    digits = args.data == "default"
    start = time.perf_counter()
    if digits:
        reference, classifier, classifier_accuracy = reference_and_judge(splits, args.reference, args.seed, args.classifier_steps)
    else:
        draw = torch.randperm(len(train_set.images), generator=torch.Generator().manual_seed(args.seed))
        reference, classifier, classifier_accuracy = inception_features(train_set.images[draw[: args.reference]], device="cpu"), None, None
    print(f"reference (and judge) in {time.perf_counter() - start:.0f} s", flush=True)

    out = args.out or RESULTS / ("processes_default.json" if digits else f"processes_{args.data}.json")
    grid_name = "processes_grid_{}.png" if digits else f"processes_{args.data}_grid_{{}}.png"
    result = {
        "machine": machine(),
        "data": args.data,
        "training_images": len(train_set.images),
        "samples": args.samples,
        "reference": args.reference,
        "classifier_heldout_accuracy": classifier_accuracy,
        "train_steps": rounds,
        "train_s": train_s,
        "step_median_s": step_median_s,
        "recipes": {n: params[n].model_dump(include={"diffusion", "train"}) for n in args.processes},
        "rows": [],
    }
    if args.no_real:
        pass
    elif not digits:
        real = scores_plain(splits.heldout.images[: args.samples], reference)
    else:
        real = scores(splits.heldout.images[: args.samples], reference, classifier)
    if not args.no_real:
        result["real_heldout"] = real
        print("real held-out", json.dumps(real), flush=True)

    rows = [(p, s) for p in args.processes for s in args.samplers]
    rows += [tuple(item.split(":", 1)) for item in args.only]
    from PIL import Image

    for process, sampler in rows:
        sample = SAMPLERS[sampler]
        try:
            _, row_params = load_params(
                args.params, {**changes, **PROCESSES[process], **{f"sample.{k}": v for k, v in sample.items()}}
            )
        except ValueError as err:
            print(f"{process} / {sampler}: refused by the config ({err})", flush=True)
            continue
        nfe = network_evaluations(sample["sampler"], sample["steps"], row_params.sample.guidance_scale)
        start = time.perf_counter()
        images, sampling = pipeline_samples(row_params, specs[process], trainers[process], args.samples)
        sample_s = time.perf_counter() - start
        score = scores(images, reference, classifier) if digits else scores_plain(images, reference)
        row = {"process": process, "sampler": sampler, "nfe": nfe, "sample_s": sample_s, "sampling": sampling, **score}
        result["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "sampling"}), flush=True)
        if process not in result.get("grids", {}):  # the process's first row of this run
            args.grids.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image_grid(images[:100], base.sample.grid_rows)).save(args.grids / grid_name.format(process))
            result.setdefault("grids", {})[process] = sampler
        best = {}
        for r in result["rows"]:
            if r["process"] not in best or r["fid"] < best[r["process"]]["fid"]:
                best[r["process"]] = r
        result["best"] = {p: {"sampler": r["sampler"], "fid": r["fid"]} for p, r in best.items()}
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["best"]), flush=True)
    print_table(result)


def scores_plain(images: torch.Tensor, reference: torch.Tensor) -> dict:
    features = inception_features(images, device="cpu")
    return {"fid": fid_from_features(features, reference), "kid": kid_from_features(features, reference)}


def print_table(result: dict) -> None:
    digits = result["data"] == "default"
    best = {p: b["sampler"] for p, b in result.get("best", {}).items()}
    head = "| process | train s | sampler | NFE | FID | KID |" + (" clear digits |" if digits else "")
    print(head)
    print("| --- " * (head.count("|") - 1) + "|")
    for r in result["rows"]:
        mark = "**" if best.get(r["process"]) == r["sampler"] else ""
        line = (f"| {r['process']} | {result['train_s'][r['process']]:.1f} | {r['sampler']} | {r['nfe']} | "
                f"{mark}{r['fid']:.1f}{mark} | {r['kid']:.3f} |")
        if digits:
            line += f" {100 * r['clear']:.1f}% |" if "clear" in r else " |"
        print(line)


if __name__ == "__main__":
    main()
