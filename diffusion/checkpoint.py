"""Training checkpoints on disk: atomic writes, checked reads, the newest file.

A checkpoint is one ``torch.save`` file of plain containers and tensors (what
``torch.load(..., weights_only=True)`` accepts). Writes go to a temporary file in
the same directory, are flushed and fsync'ed, then renamed over the target with
``os.replace`` (atomic on POSIX and Windows), so a process killed mid-write
leaves either the old file or the new one at ``path``, never a truncated one.

Training writes ``ckpt-<step>.pt`` files (see :func:`checkpoint_path`) and keeps
the newest few; :func:`latest_checkpoint` finds the one with the highest step.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from diffusion.errors import UserError
from diffusion.files import atomic_write

_CKPT_NAME = re.compile(r"ckpt-(\d+)\.pt")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be read; the message is one line naming the file."""


def checkpoint_path(directory: str | Path, step: int) -> Path:
    """``<directory>/ckpt-<step>.pt``, zero-padded so names sort by step."""
    return Path(directory) / f"ckpt-{step:08d}.pt"


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically (:func:`~diffusion.files.atomic_write`)."""
    with atomic_write(path) as fh:
        torch.save(state, fh)
    return Path(path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint onto the CPU; :class:`CheckpointError` if missing or damaged."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for damaged files
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CheckpointError(
            f"{path}: truncated or corrupt checkpoint ({type(err).__name__}: {reason})"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a checkpoint (holds a {type(state).__name__}, not a dict)")
    return state


def list_checkpoints(directory: str | Path) -> list[Path]:
    """The ``ckpt-<step>.pt`` files in ``directory``, oldest step first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _CKPT_NAME.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The ``ckpt-<step>.pt`` file with the highest step in ``directory``, or None."""
    found = list_checkpoints(directory)
    return found[-1] if found else None


def prune_checkpoints(directory: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` (>= 1) ``ckpt-<step>.pt`` files in ``directory``."""
    if keep < 1:
        raise ValueError(f"prune_checkpoints: keep must be >= 1; got {keep}")
    for old in list_checkpoints(directory)[:-keep]:
        old.unlink(missing_ok=True)
