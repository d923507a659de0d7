"""Training-step throughput and peak memory: our networks against their diffusers twins,
the U-Net against ``UNet2DModel`` and DiT against ``DiTTransformer2DModel``.

One training step is forward + MSE loss + backward + AdamW step on a batch of
random images, timesteps (and, for DiT, class labels). Both networks are built in ONE
process with the same architecture (U-Net: widths, depth, attention placement, AdaGN,
resampling; DiT: depth, width, heads, patches, adaLN-Zero, 1000 classes), so their
parameter counts match (both are printed). After warm-up steps the two models
alternate, one timed step each per round, so load from other jobs on a shared
machine hits both alike; the figure is the median img/s over the rounds.

Peak memory is measured per model in its own fresh subprocess (the same build,
warm-up and a few steps): on CPU the process's peak RSS (Linux ``VmHWM``, reset
through ``/proc/self/clear_refs`` just before the model is built) minus its RSS
then, i.e. weights, gradients, AdamW state, saved activations and the allocator's
slack; on CUDA ``torch.cuda.max_memory_allocated``. (``getrusage``'s ru_maxrss
would be wrong here: Linux carries the parent's high-water mark over fork+exec.)

    python benchmarks/bench_unet.py                       # CPU, unet-small, 32x32, batch 64
    python benchmarks/bench_unet.py --device cuda --bf16 --channels-last
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusion.models.configs import FAMILY_OF
from diffusion.models.factory import create_model

PEERS = ("ours", "diffusers")
# DiT is class-conditional in diffusers (adaLN-Zero on t + y): both get ImageNet's 1000 classes.
DIT_CLASSES = 1000


def unet_twin(config: dict) -> nn.Module:
    """diffusers' ``UNet2DModel`` with the architecture of our UNet's ``config``."""
    from diffusers import UNet2DModel

    widths = tuple(config["base_channels"] * m for m in config["channel_mult"])
    sizes = [config["image_size"] // 2**level for level in range(len(widths))]
    attention = [size in config["attention_resolutions"] for size in sizes]
    updown = "resnet" if config["resblock_updown"] else "conv"
    return UNet2DModel(
        sample_size=config["image_size"],
        in_channels=config["in_channels"],
        out_channels=config["out_channels"],
        block_out_channels=widths,
        layers_per_block=config["num_res_blocks"],
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        attention_head_dim=config["head_channels"] or widths[-1] // config["num_heads"],
        resnet_time_scale_shift="scale_shift" if config["use_scale_shift_norm"] else "default",
        downsample_type=updown,
        upsample_type=updown,
        dropout=config["dropout"],
    )


def dit_twin(config: dict) -> nn.Module:
    """diffusers' ``DiTTransformer2DModel`` with the architecture of our DiT's ``config``."""
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(
        num_attention_heads=config["num_heads"],
        attention_head_dim=config["hidden_size"] // config["num_heads"],
        in_channels=config["in_channels"],
        out_channels=config["out_channels"],
        num_layers=config["depth"],
        sample_size=config["image_size"],
        patch_size=config["patch_size"],
        num_embeds_ada_norm=config["num_classes"],
    )


# family -> (diffusers' twin of our config, whether the networks take class labels)
TWINS: dict[str, tuple[Callable[[dict], nn.Module], bool]] = {"unet": (unet_twin, False), "dit": (dit_twin, True)}


def build(peer: str, args: argparse.Namespace) -> tuple[nn.Module, Callable]:
    """The model and its ``f(x, t, y) -> prediction`` for ``peer`` ("ours" or "diffusers")."""
    twin, labelled = TWINS[FAMILY_OF[args.model]]
    classes = DIT_CLASSES if labelled else None
    ours = create_model(args.model, in_channels=args.channels, image_size=args.image_size, num_classes=classes)
    if peer == "ours":
        model, forward = ours, ours
    else:
        model = twin(ours.config)
        if labelled:
            forward = lambda x, t, y: model(x, t, class_labels=y, return_dict=False)[0]
        else:
            forward = lambda x, t, y: model(x, t, return_dict=False)[0]
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(args.device, memory_format=fmt).train()
    if args.compile:
        forward = torch.compile(forward)
    return model, forward


def make_step(model: nn.Module, forward: Callable, args: argparse.Namespace) -> Callable[[], None]:
    """One training step on a fixed random batch."""
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    gen = torch.Generator().manual_seed(0)
    shape = (args.batch, args.channels, args.image_size, args.image_size)
    x = torch.randn(shape, generator=gen).to(args.device, memory_format=fmt)
    target = torch.randn(shape, generator=gen).to(args.device, memory_format=fmt)
    t = torch.randint(0, 1000, (args.batch,), generator=gen).to(args.device)
    y = torch.randint(0, DIT_CLASSES, (args.batch,), generator=gen).to(args.device) if TWINS[FAMILY_OF[args.model]][1] else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast = torch.autocast(args.device, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = F.mse_loss(forward(x, t, y).float(), target)
        loss.backward()
        optimizer.step()
        if args.device == "cuda":
            torch.cuda.synchronize()

    return step


def peak_memory(peer: str, args: argparse.Namespace) -> int:
    """Run in a fresh process (``--memory-of``): peak bytes of one model's training steps."""
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status_kib("VmRSS")
    model, forward = build(peer, args)
    step = make_step(model, forward, args)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup + 3):
        step()
    if args.device == "cuda":
        return torch.cuda.max_memory_allocated()
    return (_status_kib("VmHWM") - before) * 1024


def _status_kib(field: str) -> int:
    """A ``kB`` field of /proc/self/status (Linux)."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1])


def memory_in_subprocess(peer: str, argv: list[str]) -> int:
    out = subprocess.run(
        [sys.executable, __file__, *argv, "--memory-of", peer], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
        cpu = names[0] if names else cpu
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}, {torch.get_num_threads()} threads{gpu}, torch {torch.__version__}, Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--model", default="unet-small", help="a U-Net or DiT name in diffusion.models.factory.MODELS")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per model first")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile both forwards")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's, one per core)")
    parser.add_argument("--memory-of", choices=PEERS, help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.memory_of:
        print(json.dumps({"peak_bytes": peak_memory(args.memory_of, args)}))
        return

    torch.manual_seed(0)
    models = {peer: build(peer, args) for peer in PEERS}
    params = {peer: sum(p.numel() for p in model.parameters()) for peer, (model, _) in models.items()}
    peer_class = type(models["diffusers"][0]).__name__
    steps = {peer: make_step(model, forward, args) for peer, (model, forward) in models.items()}
    for _ in range(args.warmup):
        for step in steps.values():
            step()
    seconds: dict[str, list[float]] = {peer: [] for peer in PEERS}
    for _ in range(args.steps):
        for peer, step in steps.items():
            start = time.perf_counter()
            step()
            seconds[peer].append(time.perf_counter() - start)
    del models, steps
    memory = {peer: memory_in_subprocess(peer, argv) for peer in PEERS}

    flags = [f for f, on in (("bf16", args.bf16), ("channels_last", args.channels_last), ("compile", args.compile)) if on]
    print(f"machine: {machine()}")
    print(
        f"setup: {args.model} vs diffusers {peer_class}, {args.device}, batch {args.batch}, "
        f"{args.channels}x{args.image_size}x{args.image_size}, {args.warmup} warm-up + {args.steps} timed steps "
        f"each, alternating; {', '.join(flags) or 'fp32'}"
    )
    memory_kind = "max_memory_allocated" if args.device == "cuda" else "peak RSS growth"
    print(f"{'model':<10} {'params':>12} {'img/s (median)':>15} {'min..max':>15} {memory_kind:>22}")
    rates = {}
    for peer in PEERS:
        per_step = [args.batch / s for s in seconds[peer]]
        rates[peer] = statistics.median(per_step)
        print(
            f"{peer:<10} {params[peer]:>12,} {rates[peer]:>15.1f} {min(per_step):>7.1f}..{max(per_step):<7.1f} "
            f"{memory[peer] / 2**20:>18.1f} MiB"
        )
    print(
        f"ours/diffusers: throughput {rates['ours'] / rates['diffusers']:.2f}x, "
        f"memory {memory['ours'] / memory['diffusers']:.2f}x, params {params['ours'] / params['diffusers']:.3f}x"
    )


if __name__ == "__main__":
    main()
