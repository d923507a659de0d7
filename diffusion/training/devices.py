"""Devices and precision: where a stage runs and in which dtype, from its params; and a
batch that does not fit in the device's memory, as one line naming the param that sized it."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch

from diffusion.errors import UserError


class DeviceError(UserError, RuntimeError):
    """A device this machine does not have; the message is one line naming the key."""


class BatchMemoryError(UserError, MemoryError):
    """A batch too large for the device's memory; the message is one line naming the param that sized it."""


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


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes in bf16 natively: a CUDA device that supports it, or a CPU
    with AVX-512 BF16 or AMX (elsewhere bf16 is converted in software, typically slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype: ``"auto"`` is bf16 where :func:`native_bf16`, else fp32."""
    if name == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    if name not in _PRECISIONS:
        raise ValueError(f"precision: got {name!r}; allowed 'auto', {', '.join(map(repr, _PRECISIONS))}")
    return _PRECISIONS[name]


def precision_name(dtype: torch.dtype) -> str:
    """``"fp32"`` or ``"bf16"``: the name params.yaml gives ``dtype``."""
    return next(name for name, value in _PRECISIONS.items() if value == dtype)


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision for ``dtype`` on ``device``; a no-op for fp32 (on any device, the meta
    device included, where ``torch.autocast`` itself refuses to be built)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


_CPU_OUT_OF_MEMORY = ("can't allocate memory", "DefaultCPUAllocator")
"""What the CPU allocator's RuntimeError says (CUDA raises ``torch.OutOfMemoryError``)."""


@contextlib.contextmanager
def batch_memory(key: str, value: int, device: torch.device) -> Iterator[None]:
    """Running out of ``device`` memory inside the block is a :class:`BatchMemoryError`
    naming the param ``key`` (say ``train.batch_size``), its ``value`` and the allocation
    that failed; any other error passes through."""
    try:
        yield
    except RuntimeError as err:  # torch.OutOfMemoryError is one
        message = str(err)
        if not isinstance(err, torch.OutOfMemoryError) and not any(s in message for s in _CPU_OUT_OF_MEMORY):
            raise
        tried = re.search(r"tried to allocate ([\d.]+ ?[A-Za-z]+)", message, re.IGNORECASE)
        what = f"tried to allocate {tried.group(1)}" if tried else message.strip().splitlines()[0]
        raise BatchMemoryError(
            f"{key}: {value} does not fit in {device.type} memory ({what}); allowed: a smaller {key}"
        ) from None
