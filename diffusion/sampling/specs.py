"""The samplers params.yaml may name, without torch: name -> implementation and cost.

:mod:`diffusion.config` validates ``sample.sampler`` against this table (no torch
import), :mod:`diffusion.sampling.sample` resolves each name to its function, and the sweep's
``sampling_cost`` objective is :func:`network_evaluations`: what a sampler costs per
image, whatever its step count means (a second-order solver evaluates the network
twice a step, guidance may double it again).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class SamplerSpec:
    function: str
    """The sampler's function as ``module.name`` in the :mod:`diffusion.sampling` package."""
    nfe: Callable[[int], int]
    """Network evaluations per image for ``steps`` sampler steps."""
    max_eta: float = 0.0
    """The largest ``sample.eta`` it takes (it takes 0..max_eta): DDIM's stochasticity, 0..1
    (eq. 16: η = 1 is DDPM's variance). 0: eta means nothing to it; ancestral DDPM draws
    with the denoiser's own variance, and the others solve the probability-flow ODE."""

    options: tuple[str, ...] = ()
    """The ``sample`` params beyond the common ones that it takes (EDM's churn)."""
    continuous_only: bool = False
    """It steps in the process's own time, which the discrete chain (process ddpm) does not have."""
    stochastic: bool = False
    """It draws fresh noise every step (at any setting), so its answer is no ODE solution."""

    @property
    def takes_eta(self) -> bool:
        """Whether ``sample.eta`` means anything to it."""
        return self.max_eta > 0


CHURN_OPTIONS = ("s_churn", "s_tmin", "s_tmax", "s_noise")
"""EDM's stochastic sampler's S_churn, S_tmin, S_tmax, S_noise (Karras et al. 2022, Algorithm 2)."""
CHURN_DEFAULTS = {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": None, "s_noise": 1.0}
"""Their values that change nothing (S_churn = 0: Algorithm 1; S_tmax None: ∞)."""

SAMPLER_SPECS: dict[str, SamplerSpec] = {
    "ddpm": SamplerSpec("ancestral.ddpm_sample", nfe=lambda steps: steps, stochastic=True),  # one evaluation a step
    "ddim": SamplerSpec("ancestral.ddim_sample", nfe=lambda steps: steps, max_eta=1.0),
    "dpm++2m": SamplerSpec("dpm_solver.dpmpp_2m_sample", nfe=lambda steps: steps),  # multistep: one a step
    "dpm++3m": SamplerSpec("dpm_solver.dpmpp_3m_sample", nfe=lambda steps: steps),
    "unipc": SamplerSpec("unipc.unipc_sample", nfe=lambda steps: steps),  # the corrector reuses the next evaluation
    "unipc3": SamplerSpec("unipc.unipc3_sample", nfe=lambda steps: steps),
    "ipndm": SamplerSpec("ipndm.ipndm_sample", nfe=lambda steps: steps),  # multistep: one a step
    # two a step, one on the last (to σ = 0); EDM's churn (Algorithm 2)
    "heun": SamplerSpec("heun.heun_sample", nfe=lambda steps: 2 * steps - 1, options=CHURN_OPTIONS),
    "euler": SamplerSpec("euler.euler_sample", nfe=lambda steps: steps, continuous_only=True),
    "sde": SamplerSpec("euler.sde_sample", nfe=lambda steps: steps, continuous_only=True, stochastic=True),
}


STEP_SCHEDULE_NAMES = ("linspace", "trailing", "log-snr", "karras")
"""The step schedules by formula (:data:`diffusion.sampling.steps.STEP_SCHEDULES`, in this order)."""
FITTED = "fitted"
"""The schedule fitted to the model, one solver and one step count (:mod:`diffusion.sampling.fitted`,
the fit_schedule stage): its times travel with the sampling settings (``timesteps``)."""
SCHEDULE_NAMES = (*STEP_SCHEDULE_NAMES, FITTED)
"""The step schedules params.yaml and ``diffusion generate`` may name."""


def fitted_refused(sampler: str, eta: float, options: dict[str, object]) -> str | None:
    """Why a schedule cannot be fitted to ``sampler`` at ``eta`` with ``options`` (None: it can):
    the fit matches the solver's answer to the probability-flow ODE's, which a sampler that
    draws noise on the way (ancestral ddpm, the sde, ddim at eta > 0, heun with churn) does
    not give."""
    deterministic = [name for name, spec in SAMPLER_SPECS.items() if not spec.stochastic]
    if SAMPLER_SPECS[sampler].stochastic or eta != 0 or options.get("s_churn", 0.0) != 0:
        noise = f"eta {eta}" if eta != 0 else "s_churn" if options.get("s_churn", 0.0) != 0 else "fresh noise every step"
        return (f"a fitted schedule is fitted to an ODE solver's answer, and {sampler} with {noise} draws noise; "
                f"allowed: {', '.join(deterministic)} (eta 0, s_churn 0)")
    return None


def eta_refused(sampler: str, eta: float) -> str | None:
    """Why ``eta`` does not fit ``sampler`` (None: it does): a sampler that does not take eta
    draws the same images at any eta, so it takes none but 0; one that does takes
    0..:attr:`SamplerSpec.max_eta`. The validation of params.yaml and of ``diffusion generate``
    both ask here; the FID protocol records eta 0 for a sampler that takes none
    (:func:`diffusion.evaluation.protocol.describe`)."""
    spec = SAMPLER_SPECS[sampler]
    if spec.takes_eta and not 0 <= eta <= spec.max_eta:
        return f"{eta} is outside {sampler.upper()}'s range; allowed 0..{spec.max_eta:g}"
    if eta == 0 or spec.takes_eta:
        return None
    takers = ", ".join(name for name, spec in SAMPLER_SPECS.items() if spec.takes_eta)
    return f"{eta} means nothing to {sampler}; use 0, or a sampler that takes eta: {takers}"


def options_refused(sampler: str, options: dict[str, object], process: str) -> str | None:
    """Why ``options`` (sample params of :data:`CHURN_OPTIONS`) or ``process`` do not fit
    ``sampler`` (None: they do): an option a sampler does not take must keep its default, and
    a sampler in the process's own time needs a continuous process."""
    spec = SAMPLER_SPECS[sampler]
    if spec.continuous_only and process == "ddpm":
        return f"{sampler} steps in the process's own time; process 'ddpm' is a discrete chain: use vp, edm or flow"
    for key, value in options.items():
        if key not in spec.options and value != CHURN_DEFAULTS[key]:
            takers = ", ".join(name for name, s in SAMPLER_SPECS.items() if key in s.options)
            return f"{key}: {value} means nothing to {sampler}; use {CHURN_DEFAULTS[key]}, or a sampler that takes it: {takers}"
    return None


def network_evaluations(sampler: str, steps: int, guidance_scale: float = 1.0) -> int:
    """Network evaluations per image of ``sampler`` at ``steps`` steps (the NFE of the papers);
    classifier-free guidance at a scale other than 0 and 1 runs the conditional and the
    unconditional pass at each evaluation, so it counts twice (with a guidance interval,
    an upper bound)."""
    if sampler not in SAMPLER_SPECS:
        raise ValueError(f"sampler: got {sampler!r}; allowed: {', '.join(SAMPLER_SPECS)}")
    return SAMPLER_SPECS[sampler].nfe(steps) * (1 if guidance_scale in (0.0, 1.0) else 2)
