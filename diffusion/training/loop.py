"""The training loop: minibatch SGD on the diffusion loss, with EMA, checkpoints, resume.

One step (Ho et al. 2020, Algorithm 1; Nichol & Dhariwal 2021 for importance-
sampled timesteps and the hybrid loss):

1. draw a batch x0 from the uint8 images (scaled to [-1, 1]) or the latents
   (:func:`model_input`), flipped left-right
   with probability 1/2 if ``hflip``; for conditional training each condition (a class
   label, or a caption's token ids) is replaced by the null condition (the null class, the
   empty caption) with probability ``train.p_uncond`` (classifier-free guidance training,
   Ho & Salimans 2022, Algorithm 1);
2. draw noise levels t (times of the process) and importance weights w from the named
   distribution (:mod:`diffusion.process.timestep_sampling`), and the noise; the loss is
   ``mean(w * L_t)`` from ``diffusion.training_losses`` (the discrete chain's or a continuous
   process's), its squared error weighted by ``train.loss_weighting``
   (:mod:`diffusion.process.weighting`: simple, min-SNR-γ, EDM's λ(σ), the flow's);
3. AdamW (Loshchilov & Hutter 2019) with linear learning-rate warm-up
   (:func:`warmup_lr`), the gradient norm clipped to ``grad_clip`` (always
   measured), then an EMA update of the weights (:mod:`diffusion.training.ema`) and, on rank 0,
   of the power function EMAs of ``train.ema_lengths``, snapshotted every ``train.ema_snapshot_every``
   steps and at the last (:mod:`diffusion.training.posthoc_ema`: EDM2's post-hoc EMA).

Checkpoints are ``<checkpoint_dir>/ckpt-<step>.pt`` (zero-padded step), written
atomically every ``checkpoint_every`` steps, at the end, and at the step where SIGINT or
SIGTERM stopped the loop (:mod:`diffusion.interrupt`: the step under way ends first); the newest
:data:`KEEP_CHECKPOINTS` are kept; there is no separate ``last.pt``. Resume reads
the newest one that is not damaged (:func:`diffusion.training.checkpoint.load_newest`: CRC and
finite weights checked), with a one-line warning for each newer one it skips.

Resume continues the same trajectory. Every random draw comes from state that is
saved: batch indices, flips, label drops, timesteps and noise all come from one
CPU ``torch.Generator`` (so they do not depend on the device), and dropout uses
torch's global RNG, which :func:`train` seeds inside ``torch.random.fork_rng``
(the caller's RNG state is left untouched) and saves with the checkpoint. On the
CPU, N steps + resume + M steps equals N + M straight steps bit for bit.

Distributed (``train.distributed``, or torchrun; :mod:`diffusion.training.distributed`): the
network is wrapped in DistributedDataParallel, one process per GPU. Every rank steps the same
data generator through the whole global batch of ``train.batch_size`` (indices, flips, label
drops, timesteps, noise) and trains on its own contiguous slice, so the trajectory does not
depend on the number of processes: 2 gloo processes give the loss curve of one process
within float tolerance (tested). Dropout draws from torch's RNG seeded per rank
(:func:`~diffusion.training.distributed.rank_seed`). The logged loss terms are averaged over
the ranks, which also makes the non-finite check agree: a NaN on one rank stops every rank at
the same step. The loss-aware sampler learns from the whole batch's losses (all-gathered), the
EMA follows the unwrapped module, and rank 0 alone logs, validates and writes checkpoints,
which carry every rank's RNG state.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from diffusion import interrupt
from diffusion.training import distributed
from diffusion.training.checkpoint import (
    CheckpointError, checkpoint_path, load_checkpoint, load_newest, prune_checkpoints, save_checkpoint,
)
from diffusion.training.devices import autocast, batch_memory, resolve_device, resolve_precision
from diffusion.training.ema import EMA
from diffusion.models.layers import null_condition
from diffusion.training.posthoc_ema import PosthocEMA
from diffusion.errors import UserError
from diffusion.training.reference_loss import reference_loss
from diffusion.process.continuous import ContinuousDiffusion
from diffusion.process.likelihood import ode_bpd
from diffusion.process.options import loss_weighting_name, process_option
from diffusion.process.timestep_sampling import make_timestep_sampler
from diffusion.process.weighting import loss_weight

if TYPE_CHECKING:
    from diffusion.config import TrainParams
    from diffusion.process.gaussian import GaussianDiffusion

KEEP_CHECKPOINTS = 3
"""How many ``ckpt-<step>.pt`` files are kept; older ones are deleted."""

RESUME_KEYS = (
    "model", "ema", "posthoc_ema", "optimizer", "timestep_sampler", "data_generator", "rng_cpu",
    "step", "loss_curve", "val_curve", "log_window",
)
"""The keys of a training checkpoint that resume reads (and ``rng_cuda`` when it was saved on CUDA)."""

LOGGED_TERMS = ("loss", "mse", "vb")
"""Per-example terms of ``training_losses`` that are logged when present."""

LogFn = Callable[[int, dict[str, float]], None]
EvalFn = Callable[[int, nn.Module], dict[str, float]]
"""``evaluate(step, ema_model)``: metrics of the EMA model at ``step`` (the train stage's sample quality)."""


class NonFiniteLossError(UserError, RuntimeError):
    """The loss or gradient went NaN/inf; the message names the step and last good checkpoint."""

    every_rank = True  # the loss terms are averaged over the ranks first: all raise it at once (rank 0 says it)


@dataclass(frozen=True)
class TrainResult:
    step: int
    """Optimiser steps done in total (including those before a resume)."""
    loss: float
    """Mean loss over the last log window."""
    loss_curve: list[tuple[int, float]]
    """(step, mean loss of the window ending there) at every log point."""
    bpd: float | None
    """Held-out bits/dim of the EMA model, or None when no held-out images were given."""
    val_curve: list[tuple[int, float]]
    """(step, :func:`~diffusion.training.reference_loss.reference_loss` of the EMA model) every ``val_every`` steps."""
    eval_curve: list[tuple[int, dict[str, float], float]]
    """(step, ``evaluate``'s metrics of the EMA model, its wall seconds) every ``eval_every`` steps and at the last."""
    img_per_s: float | None
    """Training throughput of this call (None when no step was left to run)."""
    checkpoint: Path
    """The newest checkpoint file."""
    ema_model: nn.Module
    """The EMA network (eval mode, on the training device): the one to sample from."""
    ema_snapshots: list[dict[str, Any]]
    """The snapshots of the power function EMAs (:attr:`~diffusion.training.posthoc_ema.PosthocEMA.snapshots`), rank 0's."""


# ---------------------------------------------------------------- schedule & data


def warmup_lr(step: int, lr: float, warmup_steps: int) -> float:
    """Learning rate of optimiser step ``step`` (1-based): linear from lr/warmup to lr, then flat."""
    if warmup_steps <= 0:
        return lr
    return lr * min(1.0, step / warmup_steps)


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1] (x / 127.5 - 1, as in Ho et al. 2020)."""
    return images.float() / 127.5 - 1.0


def model_input(data: torch.Tensor) -> torch.Tensor:
    """What the network is trained on: uint8 images scaled to [-1, 1] (:func:`to_model_range`),
    or latents (floating, already scaled to unit variance: :mod:`diffusion.data.latents`) as float32."""
    return to_model_range(data) if data.dtype == torch.uint8 else data.float()


def micro_batches(share: range, size: int | None) -> list[slice]:
    """The slices of a rank's ``share`` of the batch (positions within it) that one forward and
    backward pass computes: ``size`` examples each, or the whole share when ``size`` is None.
    Their gradients accumulate into the step's, as the ranks' do (gradient accumulation)."""
    size = size or len(share)
    return [slice(start, min(start + size, len(share))) for start in range(0, len(share), size)]


def draw_batch(
    images: torch.Tensor,
    labels: torch.Tensor | None,
    batch_size: int,
    generator: torch.Generator,
    *,
    hflip: bool,
    null_condition: int | torch.Tensor | None,
    label_drop: float = 0.0,
    part: slice = slice(None),
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A random batch (indices drawn with replacement) and its conditions.

    All draws use ``generator`` (on the CPU); the images may live on any device.
    ``labels``: one condition per image, class labels [N] or token ids [N, L]; returned only
    when ``null_condition`` (the null class, or the empty caption's tokens [L]) is given,
    each replaced by it with probability ``label_drop``. ``part``: the examples of the batch
    to return (a rank's slice); the draws are those of the whole batch either way.
    """
    device = images.device
    idx = torch.randint(len(images), (batch_size,), generator=generator)
    flip = torch.rand(batch_size, generator=generator) < 0.5 if hflip else None
    drop = torch.rand(batch_size, generator=generator) < label_drop if null_condition is not None else None
    idx = idx[part]
    x = model_input(images[idx.to(device)])
    if flip is not None:
        x = torch.where(flip[part].to(device)[:, None, None, None], x.flip(3), x)
    if drop is None:
        return x, None
    y = labels[idx.to(labels.device)].to(device)
    dropped = drop[part].to(device).view(-1, *[1] * (y.ndim - 1))
    return x, torch.where(dropped, torch.as_tensor(null_condition, device=device), y)


def _seeds(seed: int) -> tuple[int, int, int]:
    """Three independent seeds from ``seed``: the data generator's, torch's global RNG
    (dropout) and the network's initialisation."""
    data_seed, torch_seed, init_seed = np.random.SeedSequence(seed).generate_state(3)
    return int(data_seed), int(torch_seed), int(init_seed)


@contextlib.contextmanager
def seeded_init(seed: int) -> Iterator[None]:
    """Build the network inside this block: its initial weights then come from ``seed``
    (``train.seed``) alone, so seed replicates start from different weights and one
    seed always from the same. The caller's RNG stream is left untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_seeds(seed)[2])
        yield


def _check_data(images: torch.Tensor, labels: torch.Tensor | None, conditional: bool) -> None:
    if not (images.dtype == torch.uint8 or images.is_floating_point()) or images.ndim != 4:
        raise ValueError(
            f"train: images must be a uint8 (images) or float (latents) tensor [N, C, H, W]; got {images.dtype} "
            f"{tuple(images.shape)}"
        )
    if conditional and (labels is None or len(labels) != len(images)):
        got = None if labels is None else tuple(labels.shape)
        raise ValueError(f"train: conditional training needs one condition per image ({len(images)}); got {got}")


def _null_condition(model: nn.Module, labels: torch.Tensor) -> int | torch.Tensor:
    """The model's null condition (:func:`~diffusion.models.layers.null_condition`: the empty
    caption's token ids of a text-conditional model, the null-class index of a class-conditional
    one), after checking the conditions against the model."""
    text_encoder = getattr(model, "text_encoder", None)
    num_classes = getattr(model, "num_classes", None)
    if text_encoder is not None:
        if labels.shape[1:] != (text_encoder.max_length,) or labels.dtype != torch.int64:
            raise ValueError(
                f"train: a text-conditional model needs token ids int64 [N, {text_encoder.max_length}]; "
                f"got {labels.dtype} {tuple(labels.shape)}"
            )
    elif num_classes is None:
        raise ValueError("train: conditional training needs a model built with num_classes or a text encoder")
    elif len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < num_classes:
        raise ValueError(
            f"train: labels must lie in 0..{num_classes - 1} (the model's classes); "
            f"got {int(labels.min())}..{int(labels.max())}"
        )
    null = null_condition(model)
    return null.cpu() if isinstance(null, torch.Tensor) else null


# ---------------------------------------------------------------- the loop


class Trainer:
    """The objects one training run updates, one step at a time, and their saved state:
    :func:`train` steps it with checkpoints and logging around, benchmarks/bench_default.py
    steps it alone, interleaved with a peer's steps."""

    def __init__(
        self,
        model: nn.Module,
        diffusion: GaussianDiffusion | ContinuousDiffusion,
        images: torch.Tensor,
        labels: torch.Tensor | None,
        cfg: TrainParams,
        *,
        conditional: bool,
        world: distributed.World = distributed.World(),
    ) -> None:
        self.world = world
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_precision(cfg.precision, self.device)
        self.memory_format = torch.channels_last if cfg.channels_last else torch.preserve_format
        self.model = model.to(device=self.device, memory_format=self.memory_format).train()
        # What the loss calls: the model itself, or its DDP wrapper (whose backward all-reduces the gradients).
        self.network = self.model
        if world.size > 1:
            ids = [torch.cuda.current_device()] if self.device.type == "cuda" else None  # LOCAL_RANK's GPU
            self.network = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        mine = distributed.shard(cfg.batch_size, world)  # this rank's examples of every batch
        self.part = slice(mine.start, mine.stop)
        # ...computed micro_batch_size at a time, their gradients accumulated (micro_batches).
        self.micro_parts = micro_batches(mine, cfg.micro_batch_size)
        self.diffusion = diffusion
        self.cfg = cfg
        self.ema = EMA(model, cfg.ema_decay, warmup=cfg.ema_warmup)
        self.posthoc = PosthocEMA(model, cfg.ema_lengths, cfg.ema_snapshot_every) if world.main else None
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        process = diffusion.process
        self.sampler = make_timestep_sampler(
            process_option(process.name, "timestep_sampler", cfg.timestep_sampler, "train."), diffusion,
            cfg.timestep_mean, cfg.timestep_std,
        )
        self.loss_weighting = loss_weighting_name(process.name, cfg.loss_weighting, cfg.min_snr_gamma, "train.")
        self.null_condition = _null_condition(model, labels) if conditional else None
        self.images = images.to(self.device)
        self.labels = labels.to(self.device) if conditional else None
        data_seed, torch_seed, _ = _seeds(cfg.seed)
        self.torch_seed = distributed.rank_seed(torch_seed, world.rank)
        self.generator = torch.Generator().manual_seed(data_seed)

    def step(self, step: int, last_good: Path | None) -> dict[str, float]:
        """Optimiser step number ``step`` (steps 1-3 of the module doc); returns the
        batch means of the loss terms and the gradient norm.

        Raises :class:`NonFiniteLossError` before touching the weights if one of
        them is not finite (the check is the step's one host-device sync), on every rank at once.
        """
        cfg, device, fmt, part = self.cfg, self.device, self.memory_format, self.part
        x0, y = draw_batch(
            self.images, self.labels, cfg.batch_size, self.generator, hflip=cfg.hflip, null_condition=self.null_condition,
            label_drop=cfg.p_uncond, part=part,
        )
        x0 = x0.contiguous(memory_format=fmt)
        t_all, weights = self.sampler.sample(cfg.batch_size, torch.device("cpu"), generator=self.generator)
        noise = torch.randn((cfg.batch_size, *x0.shape[1:]), generator=self.generator)[part].to(device, memory_format=fmt)
        t, weights = t_all[part].to(device), weights[part].to(device)

        self.optimizer.zero_grad(set_to_none=True)
        mse_weight = loss_weight(
            self.loss_weighting, self.diffusion.process, self.diffusion.prediction, t, gamma=cfg.min_snr_gamma
        )
        kwargs = {} if y is None else {"y": y}
        sums: dict[str, torch.Tensor] = {}
        per_example = []
        for i, micro in enumerate(self.micro_parts):
            # DDP all-reduces the gradients at the last micro-batch's backward only.
            last = i == len(self.micro_parts) - 1
            with contextlib.nullcontext() if last or self.network is self.model else self.network.no_sync():
                with autocast(device, self.dtype):
                    losses = self.diffusion.training_losses(
                        self.network, x0[micro], t[micro], model_kwargs={k: v[micro] for k, v in kwargs.items()},
                        noise=noise[micro], mse_weight=None if mse_weight is None else mse_weight[micro],
                    )
                terms = {k: (losses[k].float() * weights[micro]).mean() for k in LOGGED_TERMS if k in losses}
                # Each micro-batch's mean over 1/count: the gradients sum to the mean over the rank's share
                # (a power-of-two scale is exact, so 2 micro-batches equal 2 processes bit for bit).
                (terms["loss"] / len(self.micro_parts)).backward()
            sums = {k: sums.get(k, 0) + v.detach() for k, v in terms.items()}
            per_example.append(losses["loss"].detach().float())
        terms = {k: v / len(self.micro_parts) for k, v in sums.items()}
        max_norm = cfg.grad_clip if cfg.grad_clip is not None else math.inf
        terms["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        means = distributed.mean(torch.stack(list(terms.values())).float())
        stats = dict(zip(terms, means.tolist(), strict=True))
        bad = [k for k, v in stats.items() if not math.isfinite(v)]
        if bad:
            where = last_good if last_good is not None else "none written yet"
            raise NonFiniteLossError(
                f"step {step}: non-finite {bad[0]} ({stats[bad[0]]}); training stopped without "
                f"saving; last good checkpoint: {where}"
            )
        for group in self.optimizer.param_groups:
            group["lr"] = warmup_lr(step, cfg.lr, cfg.warmup_steps)
        self.optimizer.step()
        self.sampler.update(t_all, distributed.concat(torch.cat(per_example)))
        self.ema.update(self.model)
        if self.posthoc is not None:
            self.posthoc.update(self.model, last=step == cfg.steps)
        return stats

    def _rng_state(self) -> dict[str, torch.Tensor]:
        state = {"rng_cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def state_dict(self) -> dict[str, Any]:
        """Model, EMA, optimiser, sampler and every RNG state: what resume needs. Called on
        every rank at once: with several, ``rng_ranks`` holds each rank's RNG state."""
        ranks = distributed.gather(self._rng_state())
        state = {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "posthoc_ema": self.posthoc.state_dict() if self.posthoc is not None else None,  # rank 0's, which writes
            "optimizer": self.optimizer.state_dict(),
            "timestep_sampler": self.sampler.state_dict(),
            "data_generator": self.generator.get_state(),
            **ranks[0],
        }
        if len(ranks) > 1:
            state["rng_ranks"] = ranks
        return state

    def load_state_dict(self, state: dict[str, Any], path: Path) -> None:
        """Load :meth:`state_dict` back; :class:`CheckpointError` (one line) if a key of
        :data:`RESUME_KEYS` is missing or it does not fit."""
        missing = [key for key in RESUME_KEYS if key not in state]
        if missing:
            keys = ", ".join(map(repr, missing))
            raise CheckpointError(f"{path}: not a training checkpoint of this version (no key {keys})")
        try:
            self.model.load_state_dict(state["model"])
            self.ema.load_state_dict(state["ema"])
            if self.posthoc is not None:
                self.posthoc.load_state_dict(state["posthoc_ema"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.sampler.load_state_dict(state["timestep_sampler"])
            self.generator.set_state(state["data_generator"])
            rank = self.world.rank
            ranks = state.get("rng_ranks", [state])
            if rank < len(ranks):
                torch.set_rng_state(ranks[rank]["rng_cpu"])
                if "rng_cuda" in ranks[rank] and self.device.type == "cuda":
                    torch.cuda.set_rng_state(ranks[rank]["rng_cuda"], self.device)
            elif rank == len(ranks):  # one line for the ranks the checkpoint did not have
                print(
                    f"train: warning: {path} holds the RNG states of {len(ranks)} processes, not {self.world.size}: "
                    f"ranks {len(ranks)}.. draw dropout afresh from their seeds (the data and noise are unchanged)",
                    file=sys.stderr, flush=True,
                )
        except KeyError as err:
            raise CheckpointError(f"{path}: not a training checkpoint (no key {err})") from None
        except (RuntimeError, ValueError) as err:
            first = str(err).strip().splitlines()[0]
            raise CheckpointError(f"{path}: does not fit this model/config ({first})") from None


def train(
    model: nn.Module,
    diffusion: GaussianDiffusion | ContinuousDiffusion,
    images: torch.Tensor,
    labels: torch.Tensor | None,
    cfg: TrainParams,
    *,
    checkpoint_dir: str | Path,
    heldout_images: torch.Tensor | None = None,
    log: LogFn | None = None,
    evaluate: EvalFn | None = None,
    conditional: bool = False,
    progress: bool = True,
    world: distributed.World = distributed.World(),
) -> TrainResult:
    """Train ``model`` to ``cfg.steps`` steps in total, resuming from ``checkpoint_dir``.

    ``model`` is moved to the device and trained in place. ``log(step, metrics)``
    is called at every multiple of ``cfg.log_every`` with the window means of
    loss, mse (and vb) and grad_norm, plus lr and img_per_s; log points do not
    depend on where runs were stopped and resumed, so neither does the loss
    curve. The final loss is that of the last full window (of the steps so far
    when there are fewer than ``log_every``). ``evaluate(step, ema_model)`` (:data:`EvalFn`), if
    given, is called at every multiple of ``cfg.eval_every`` and at the last step, and its metrics
    are logged with ``train_eval_seconds``, the wall seconds spent in it so far; it runs inside
    ``torch.random.fork_rng``, so whatever it draws leaves the trajectory alone.
    If ``heldout_images`` (uint8, or latents) are given, the EMA model's :func:`~diffusion.training.reference_loss.reference_loss` on the
    first ``cfg.val_images`` of them is logged as ``val_loss`` at every multiple of
    ``cfg.val_every`` (it draws no random number of the run, so the trajectory is the
    same with or without it), and for uint8 images their bits/dim on the first
    ``cfg.bpd_images`` is returned (:func:`heldout_bpd`: the discrete chain's variational bound,
    a continuous process's probability-flow ODE likelihood). Latents have no bits/dim (the bound's
    last term is the likelihood of discrete pixel values): for them ``val_loss`` is the
    held-out figure, and ``bpd`` is None.

    ``world``: this process's rank among those of a distributed job (whose process group is
    up); every rank calls ``train``, and only rank 0 logs, validates and writes checkpoints.
    The result's curves and ``bpd`` are rank 0's.
    """
    _check_data(images, labels, conditional)
    checkpoint_dir = Path(checkpoint_dir)
    run = Trainer(model, diffusion, images, labels, cfg, conditional=conditional, world=world)
    main = world.main
    log = log if main else None
    rng_devices = [run.device.index] if run.device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(run.torch_seed)
        step, loss_curve, val_curve, eval_curve, window = 0, [], [], [], []
        val_images = None  # scaled once, scored every val_every steps
        if heldout_images is not None and cfg.val_images:
            val_images = model_input(heldout_images[: cfg.val_images])
        last_ckpt, state = _resume_point(checkpoint_dir, main)
        if state is not None:
            run.load_state_dict(state, last_ckpt)
            step, loss_curve, window = state["step"], state["loss_curve"], state["log_window"]
            val_curve = state["val_curve"]
            eval_curve = state.get("eval_curve", [])  # a checkpoint of a run without evaluate has none
            if main:
                print(f"train: resuming from {last_ckpt} at step {step}", flush=True)

        def write_checkpoint() -> Path:
            state = run.state_dict() | {
                "step": step, "loss_curve": loss_curve, "val_curve": val_curve, "eval_curve": eval_curve, "log_window": window,
            }
            path = checkpoint_path(checkpoint_dir, step)
            if main:
                save_checkpoint(path, state)
                prune_checkpoints(checkpoint_dir, KEEP_CHECKPOINTS, path)
            return path

        timed_s, timed_steps, window_s, window_steps = 0.0, 0, 0.0, 0
        bar = tqdm(total=cfg.steps, initial=step, desc="train", unit="step", disable=not (progress and main))
        # SIGINT or SIGTERM: the step under way ends, then a checkpoint at it (diffusion.interrupt).
        with interrupt.deferred(), bar:
            while step < cfg.steps:
                step += 1
                start = time.perf_counter()
                with batch_memory("train.batch_size", cfg.batch_size, run.device):
                    window.append(run.step(step, last_ckpt))
                elapsed = time.perf_counter() - start
                timed_s, timed_steps = timed_s + elapsed, timed_steps + 1
                window_s, window_steps = window_s + elapsed, window_steps + 1
                bar.update()

                if step % cfg.log_every == 0:
                    metrics = {k: sum(s[k] for s in window) / len(window) for k in window[0]}
                    metrics["lr"] = warmup_lr(step, cfg.lr, cfg.warmup_steps)
                    metrics["img_per_s"] = cfg.batch_size * window_steps / window_s  # of the whole job
                    loss_curve.append((step, metrics["loss"]))
                    # shown at the bar's next refresh: a forced one would ignore TQDM_MININTERVAL
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
                    if log is not None:
                        log(step, metrics)
                    window, window_s, window_steps = [], 0.0, 0

                if main and val_images is not None and step % cfg.val_every == 0:
                    val_curve.append((step, reference_loss(run.ema.model, diffusion, val_images, seed=cfg.seed)))
                    if log is not None:
                        log(step, {"val_loss": val_curve[-1][1]})

                if main and evaluate is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
                    eval_start = time.perf_counter()
                    with torch.random.fork_rng(devices=rng_devices):
                        quality = evaluate(step, run.ema.model)
                    eval_curve.append((step, quality, time.perf_counter() - eval_start))
                    if log is not None:
                        log(step, quality | {"train_eval_seconds": sum(seconds for *_, seconds in eval_curve)})

                if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                    last_ckpt = write_checkpoint()
                stop = distributed.highest(interrupt.requested() or 0)  # every rank stops at the same step
                if stop:
                    if last_ckpt != checkpoint_path(checkpoint_dir, step):
                        last_ckpt = write_checkpoint()
                    raise interrupt.Stopped(stop, f"at step {step}; checkpoint written; run it again to resume")

        bpd = None
        if main and heldout_images is not None and heldout_images.dtype == torch.uint8 and cfg.bpd_images > 0:
            bpd = heldout_bpd(
                run.ema.model, diffusion, heldout_images[: cfg.bpd_images],
                batch_size=cfg.batch_size, seed=cfg.seed, memory_format=run.memory_format,
            )

    return TrainResult(
        step=step,
        loss=loss_curve[-1][1] if loss_curve else sum(s["loss"] for s in window) / len(window),
        loss_curve=loss_curve,
        val_curve=val_curve,
        eval_curve=eval_curve,
        bpd=bpd,
        img_per_s=cfg.batch_size * timed_steps / timed_s if timed_steps else None,
        checkpoint=last_ckpt,
        ema_model=run.ema.model,
        ema_snapshots=run.posthoc.snapshots if run.posthoc is not None else [],
    )


def _resume_point(checkpoint_dir: Path, main: bool) -> tuple[Path | None, dict[str, Any] | None]:
    """The newest readable checkpoint and its state, or (None, None) to start afresh. Rank 0
    chooses (one warning line for each newer damaged one it skips) and every rank loads that
    file; a folder with no readable checkpoint fails every rank with rank 0's one line."""
    chosen: dict[str, Any] = {}

    def choose() -> Path | None:
        if not main:
            return None
        newest = load_newest(checkpoint_dir)
        if newest is None:
            return None
        path, chosen["state"], damaged = newest
        for err in damaged:
            print(f"train: warning: {err}; resuming from the older {path}", file=sys.stderr, flush=True)
        return path

    path = distributed.agreed(choose)[0]
    if path is None:
        return None, None
    return path, chosen["state"] if main else load_checkpoint(path)


# ---------------------------------------------------------------- held-out likelihood


@torch.no_grad()
def heldout_bpd(
    model: nn.Module,
    diffusion: GaussianDiffusion | ContinuousDiffusion,
    images: torch.Tensor,
    *,
    batch_size: int,
    seed: int = 0,
    memory_format: torch.memory_format = torch.preserve_format,
    ode_tolerance: float = 1e-5,
) -> float:
    """Mean bits/dim of uint8 ``images`` under ``model``, in fp32, every random draw from ``seed``:

    * the discrete chain: the variational bound (Ho et al. 2020, Eq. 5) by
      ``diffusion.calc_bpd_loop``, its noise drawn from ``seed``;
    * a continuous process (:class:`~diffusion.process.continuous.ContinuousDiffusion`): the
      probability-flow ODE's bits/dim of the dequantized images (Song et al. 2021, appendix
      D.2) by :func:`~diffusion.process.likelihood.ode_bpd`, with Hutchinson's divergence
      estimate (a Rademacher probe per batch) and the dequantization noise drawn from ``seed``,
      the ODE solved to rtol = atol = ``ode_tolerance`` (score-SDE's 1e-5).

    The model is called without labels, so a class-conditional model is evaluated
    with its null class, i.e. unconditionally.
    """
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(seed)
    was_training = model.training
    model.eval()
    total = 0.0
    for chunk in images.split(batch_size):
        if isinstance(diffusion, ContinuousDiffusion):
            bpd, _ = ode_bpd(model, diffusion, chunk.to(device), generator=generator, rtol=ode_tolerance, atol=ode_tolerance)
            total += bpd.sum().item()
            continue
        x0 = to_model_range(chunk.to(device)).contiguous(memory_format=memory_format)
        total += diffusion.calc_bpd_loop(model, x0, generator=generator)["total_bpd"].sum().item()
    model.train(was_training)
    return total / len(images)
