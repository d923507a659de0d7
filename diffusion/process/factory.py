"""The process a params.yaml ``diffusion`` section (or a model file's copy of it) names."""

from __future__ import annotations

from typing import Any

from diffusion.process.continuous import ContinuousDiffusion, EDMProcess, FlowProcess, VPProcess
from diffusion.process.gaussian import GaussianDiffusion
from diffusion.process.options import process_option
from diffusion.process.schedules import make_betas


def make_diffusion(section: dict[str, Any]) -> GaussianDiffusion | ContinuousDiffusion:
    """The trainable process of ``section`` (process, schedule, timesteps, zero_terminal_snr,
    prediction, variance, loss, sigma_data): the discrete chain for ``ddpm`` and for a
    section without ``process`` (model files written before processes existed), else a
    :class:`~diffusion.process.continuous.ContinuousDiffusion`. A null schedule or prediction
    is the process's own (:data:`~diffusion.process.options.PROCESS_OPTIONS`)."""
    name = section.get("process") or "ddpm"
    prediction = process_option(name, "prediction", section.get("prediction"), "diffusion.")
    if name == "ddpm":
        schedule = process_option(name, "schedule", section.get("schedule"), "diffusion.")
        betas = make_betas(schedule, section["timesteps"], section.get("zero_terminal_snr", False))
        return GaussianDiffusion(betas, prediction=prediction, variance=section["variance"], loss=section["loss"])
    processes = {
        "vp": lambda: VPProcess(process_option(name, "schedule", section.get("schedule"), "diffusion.")),
        "edm": lambda: EDMProcess(section.get("sigma_data", 0.5)),
        "flow": FlowProcess,
    }
    return ContinuousDiffusion(processes[name](), prediction)
