"""Our ODE solvers against diffusers' schedulers on one exact model: error from the exact ODE map.

Data N(mu, s²) with mu = s = 0.5, DDPM's linear schedule at T = 1000 (ours
``make_betas("linear", 1000)``, diffusers' ``beta_schedule="linear"``: equal to float32
rounding), and the exact eps model of that data. At an integer timestep it is exact for
the table's ᾱ; between timesteps (our log-SNR and Karras steps, diffusers' Heun) it is exact
for the ᾱ of log σ interpolated linearly, the interpolation both libraries use. Every run
takes the same x_T ~ N(0, I), a sample of the process at its last timestep t = 999, and is
scored by the mean absolute error from where the probability-flow ODE takes it from there:
mu + s z_T (:func:`exact_mixture.exact_ode_map`), over 4096 x 4 values, float64. (diffusers'
"leading" spacing starts later, e.g. DDIM's default at t = 900 for 10 steps: it is run as
it comes, x_T taken for a sample at its first timestep, and scored against the same map.)

NFE is the network evaluations per image: steps for the multistep solvers and DDIM, 2n - 1
for Heun (so Heun runs 9, 19, 49, 99). Ours run on every step schedule; the table shows
each at its best schedule (the one with the smallest geometric-mean error over the NFEs)
and the full grid follows. diffusers' schedulers run at their defaults and with each
``timestep_spacing`` (linspace, leading, trailing) and ``use_karras_sigmas``; the table
shows their defaults and their best.

    python benchmarks/bench_solvers.py            # prints the tables (Markdown), ~1 min on 2 CPU cores
"""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from exact_mixture import exact_ode_map  # noqa: E402

from diffusion.process.schedules import make_betas  # noqa: E402
from diffusion.sampling import specs as sampler_specs  # noqa: E402
from diffusion.sampling.denoiser import ModelDenoiser, alpha_bar_at  # noqa: E402
from diffusion.sampling.sample import SAMPLER_FUNCTIONS  # noqa: E402
from diffusion.process.discrete import DiscreteChain
from diffusion.sampling.steps import STEP_SCHEDULES, make_steps  # noqa: E402

MU, S = 0.5, 0.5
NFES = (10, 20, 50, 100)
SHAPE = (4096, 4)
OURS = ("ddim", "dpm++2m", "dpm++3m", "unipc", "unipc3", "heun")
# our solver -> (diffusers scheduler, its options): the counterpart it is compared with
THEIRS = {
    "ddim": ("DDIMScheduler", {"clip_sample": False}),  # its default clips x̂_0 to [-1, 1]; ours here do not
    "dpm++2m": ("DPMSolverMultistepScheduler", {"solver_order": 2, "algorithm_type": "dpmsolver++"}),
    "dpm++3m": ("DPMSolverMultistepScheduler", {"solver_order": 3, "algorithm_type": "dpmsolver++"}),
    "unipc": ("UniPCMultistepScheduler", {"solver_order": 2}),
    "unipc3": ("UniPCMultistepScheduler", {"solver_order": 3}),
    "heun": ("HeunDiscreteScheduler", {}),
}
# DDPM's linear schedule, stated in full: HeunDiscreteScheduler's defaults are Stable Diffusion's 0.00085..0.012
LINEAR = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}
VARIANTS = {
    "default": {},
    "linspace": {"timestep_spacing": "linspace"},
    "leading": {"timestep_spacing": "leading"},
    "trailing": {"timestep_spacing": "trailing"},
    "karras": {"use_karras_sigmas": True},
}


class ExactEps:
    """The exact eps of N(mu, s²) data at ᾱ(t) of ``levels`` (the table at integer t)."""

    def __init__(self, levels: DiscreteChain):
        self.process = levels

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = alpha_bar_at(self.process, t.reshape(-1).expand(len(x)), x)
        x0 = MU + ab.sqrt() * S**2 / (ab * S**2 + 1 - ab) * (x - ab.sqrt() * MU)
        return (x - ab.sqrt() * x0) / (1 - ab).sqrt()


def steps_for(name: str, nfe: int) -> int:
    return (nfe + 1) // 2 if name == "heun" else nfe


def ours(name: str, schedule: str, nfe: int, levels: DiscreteChain, x_T: torch.Tensor) -> tuple[int, float]:
    n = steps_for(name, nfe)
    x = SAMPLER_FUNCTIONS[name](ModelDenoiser(ExactEps(levels), levels), x_T, make_steps(schedule, levels, n))
    return sampler_specs.network_evaluations(name, n), error(x, x_T, levels.alphas_cumprod[-1])


def theirs(name: str, variant: str, nfe: int, levels: DiscreteChain, x_T: torch.Tensor) -> tuple[int, float] | None:
    import diffusers

    cls, options = THEIRS[name]
    if variant == "karras" and name == "ddim":
        return None  # DDIMScheduler has no Karras sigmas
    scheduler = getattr(diffusers, cls)(**LINEAR, **options, **VARIANTS[variant])
    assert np.allclose(scheduler.alphas_cumprod.double().numpy(), levels.alphas_cumprod, rtol=1e-5), cls
    net, calls = ExactEps(levels), 0
    scheduler.set_timesteps(steps_for(name, nfe))
    if name == "heun":  # EDM scaling: x̃ = x/α, the model sees x̃/√(σ² + 1)
        x = x_T * math.sqrt(float(scheduler.sigmas[0]) ** 2 + 1)
    else:
        x = x_T.clone()
    for t in scheduler.timesteps:
        eps = net(scheduler.scale_model_input(x, t), t.double())
        calls += 1
        x = scheduler.step(eps, t, x).prev_sample
    return calls, error(x, x_T, levels.alphas_cumprod[-1])


def error(x: torch.Tensor, x_T: torch.Tensor, alpha_bar_T: float) -> float:
    return (x - exact_ode_map(x_T, alpha_bar_T, MU, S)).abs().mean().item()


def geometric_mean(values) -> float:
    return float(np.exp(np.mean(np.log(values))))


def main() -> int:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    betas = make_betas("linear", 1000)
    import diffusers

    theirs_betas = diffusers.DDPMScheduler(**LINEAR).betas.double().numpy()
    assert np.allclose(betas, theirs_betas, rtol=1e-6, atol=0), "make_betas('linear', 1000) is not diffusers' linear"
    levels = DiscreteChain(np.cumprod(1 - betas))
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    grid = {(name, schedule): [ours(name, schedule, nfe, levels, x_T) for nfe in NFES]
            for name in OURS for schedule in STEP_SCHEDULES}
    their_grid = {(name, variant): [theirs(name, variant, nfe, levels, x_T) for nfe in NFES]
                  for name in OURS for variant in VARIANTS}
    best = {name: min(STEP_SCHEDULES, key=lambda s: geometric_mean([e for _, e in grid[name, s]])) for name in OURS}
    their_best = {
        name: min((v for v in VARIANTS if their_grid[name, v][0] is not None),
                  key=lambda v: geometric_mean([e for _, e in their_grid[name, v]]))
        for name in OURS
    }

    def cells(rows):
        return " | ".join(f"{e:.2e}" if nfe == target else f"{e:.2e} ({nfe})" for (nfe, e), target in zip(rows, NFES))

    print(f"| solver | {' | '.join(f'NFE {n}' for n in NFES)} |")
    print(f"| --- | {' | '.join('---' for _ in NFES)} |")
    for name in OURS:
        cls, options = THEIRS[name]
        label = f"{cls}({', '.join(f'{k}={v}' for k, v in options.items())})"
        print(f"| ours `{name}`, {best[name]} | {cells(grid[name, best[name]])} |")
        if their_best[name] == "default":
            print(f"| diffusers {label}, default (its best) | {cells(their_grid[name, 'default'])} |")
        else:
            print(f"| diffusers {label}, default | {cells(their_grid[name, 'default'])} |")
            print(f"| diffusers {label}, best: {their_best[name]} | {cells(their_grid[name, their_best[name]])} |")
    print()
    print(f"| ours, every schedule | {' | '.join(f'NFE {n}' for n in NFES)} |")
    print(f"| --- | {' | '.join('---' for _ in NFES)} |")
    for (name, schedule), rows in grid.items():
        print(f"| `{name}`, {schedule} | {cells(rows)} |")
    print()
    print(f"| diffusers, every variant | {' | '.join(f'NFE {n}' for n in NFES)} |")
    print(f"| --- | {' | '.join('---' for _ in NFES)} |")
    for (name, variant), rows in their_grid.items():
        if rows[0] is not None:
            print(f"| {THEIRS[name][0]} ({name}), {variant} | {cells(rows)} |")
    print()
    ours_10 = min(grid[name, best[name]][0][1] for name in OURS)
    theirs_10 = min(their_grid[name, v][0][1] for name in OURS for v in VARIANTS if their_grid[name, v][0] is not None)
    print(f"best at NFE 10: ours {ours_10:.2e}, diffusers' {theirs_10:.2e} (ratio {ours_10 / theirs_10:.2f})")
    for name in OURS:
        for variant in dict.fromkeys(("default", their_best[name])):
            worse = [nfe for (_, e), (_, f), nfe in zip(grid[name, best[name]], their_grid[name, variant], NFES) if e > f]
            verdict = "at least as accurate at every NFE" if not worse else f"less accurate at NFE {', '.join(map(str, worse))}"
            print(f"{name} against {THEIRS[name][0]} ({variant}): {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
