"""Devices and precision: where a stage runs and in which dtype, from its params."""

from __future__ import annotations

import torch

from diffusion.errors import UserError


class DeviceError(UserError, RuntimeError):
    """A device this machine does not have; the message is one line naming the key."""


def resolve_device(name: str, *, key: str = "device") -> torch.device:
    """``"auto"`` -> the current CUDA device if there is one, else the CPU; ``key`` names
    the param in the error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"{key}: 'cuda' was asked for but CUDA is not available on this machine; allowed here: 'auto', 'cpu'")
        return torch.device("cuda", torch.cuda.current_device())
    if name == "cpu":
        return torch.device("cpu")
    raise ValueError(f"device: got {name!r}; allowed 'auto', 'cpu', 'cuda'")


_PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype: ``"auto"`` is bf16 on a CUDA device that supports it, else fp32."""
    if name == "auto":
        bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16_ok else torch.float32
    if name not in _PRECISIONS:
        raise ValueError(f"precision: got {name!r}; allowed 'auto', {', '.join(map(repr, _PRECISIONS))}")
    return _PRECISIONS[name]


def autocast(device: torch.device, dtype: torch.dtype) -> torch.autocast:
    """Mixed precision for ``dtype`` on ``device``; a no-op for fp32."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
