"""Training checkpoints on disk: atomic writes, verified reads, the newest good file.

A checkpoint is one ``torch.save`` file of plain containers and tensors (what
``torch.load(..., weights_only=True)`` accepts). Every read is weights-only: a file
whose pickle names any other object (``os.system``, a class to rebuild) is refused
with one line naming the object, and nothing of it runs. Writes go to a temporary file in
the same directory, are flushed and fsync'ed, then renamed over the target with
``os.replace`` (atomic on POSIX and Windows), so a process killed mid-write
leaves either the old file or the new one at ``path``, never a truncated one.

A ``torch.save`` file is a zip archive, and each entry carries a CRC-32 that torch's
reader does not check: 64 bytes overwritten inside a tensor load as garbage (NaN
weights, black samples). :func:`load_checkpoint` therefore checks every entry's CRC
with :mod:`zipfile` before loading, and that every floating tensor is finite;
:func:`save_checkpoint` refuses to write NaN or inf.

Training writes ``ckpt-<step>.pt`` files (see :func:`checkpoint_path`) and keeps
the newest few; :func:`load_newest` reads the newest one that is not damaged.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from diffusion.errors import UserError
from diffusion.files import atomic_write

_CKPT_NAME = re.compile(r"ckpt-(\d+)\.pt")
_PICKLED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")  # how torch's weights-only unpickler names what it refused


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be read, or must not be written; the message is one line naming the file."""


def checkpoint_path(directory: str | Path, step: int) -> Path:
    """``<directory>/ckpt-<step>.pt``, zero-padded so names sort by step."""
    return Path(directory) / f"ckpt-{step:08d}.pt"


def _floating_tensors(obj: Any, where: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """(key path such as ``model/conv_in.weight``, tensor) of every floating tensor in nested dicts and lists."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point():
            yield where, obj
    elif isinstance(obj, dict | list | tuple):
        items = obj.items() if isinstance(obj, dict) else enumerate(obj)
        for key, value in items:
            yield from _floating_tensors(value, f"{where}/{key}" if where else str(key))


def _non_finite(state: dict[str, Any]) -> str | None:
    """``"<count> NaN or inf values in <key path>"`` for the first tensor of ``state`` that holds any, else None."""
    for where, tensor in _floating_tensors(state):
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            return f"{int((~finite).sum())} NaN or inf values in {where}"
    return None


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically (:func:`~diffusion.files.atomic_write`);
    :class:`CheckpointError`, and nothing written, if a floating tensor holds NaN or inf."""
    bad = _non_finite(state)
    if bad is not None:
        raise CheckpointError(f"{path}: not written: {bad}")
    with atomic_write(path) as fh:
        torch.save(state, fh)
    return Path(path)


def _verified_load(path: Path) -> Any:
    """``torch.load`` onto the CPU, after :mod:`zipfile` checked every entry's CRC-32."""
    with zipfile.ZipFile(path) as archive:
        damaged = archive.testzip()
    if damaged is not None:
        raise ValueError(f"entry {damaged} fails its CRC-32 check")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint onto the CPU, weights only; :class:`CheckpointError` if missing,
    truncated, corrupt (a CRC mismatch), holding NaN or inf, or pickling code (refused unrun)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        state = _verified_load(path)
    except Exception as err:  # zipfile and torch raise many types for damaged files
        found = _PICKLED_GLOBAL.search(str(err)) if isinstance(err, pickle.UnpicklingError) else None
        if found:
            raise CheckpointError(
                f"{path}: refused: not a weights-only file (its pickle calls {found.group(1)}, "
                "which would run code; nothing of it ran)"
            ) from None
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CheckpointError(
            f"{path}: truncated or corrupt checkpoint ({type(err).__name__}: {reason})"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a checkpoint (holds a {type(state).__name__}, not a dict)")
    bad = _non_finite(state)
    if bad is not None:
        raise CheckpointError(f"{path}: damaged checkpoint ({bad})")
    return state


def list_checkpoints(directory: str | Path) -> list[Path]:
    """The ``ckpt-<step>.pt`` files in ``directory``, oldest step first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _CKPT_NAME.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def load_newest(directory: str | Path) -> tuple[Path, dict[str, Any], list[CheckpointError]] | None:
    """The newest ``ckpt-<step>.pt`` of ``directory`` that :func:`load_checkpoint` reads,
    its state, and the errors of the newer ones it skipped as damaged (newest first).

    None when ``directory`` holds no checkpoint; :class:`CheckpointError` (one line
    naming the folder) when it holds some and none of them reads.
    """
    damaged: list[CheckpointError] = []
    for path in reversed(list_checkpoints(directory)):
        try:
            return path, load_checkpoint(path), damaged
        except CheckpointError as err:
            damaged.append(err)
    if damaged:
        raise CheckpointError(
            f"{directory}: none of its {len(damaged)} checkpoints is readable (newest: {damaged[0]}); "
            "delete them to train from scratch"
        )
    return None


def prune_checkpoints(directory: str | Path, keep: int, current: str | Path) -> None:
    """Keep the newest ``keep`` (>= 1) ``ckpt-<step>.pt`` files of ``directory`` up to
    ``current`` (the one just written); delete the older ones and every one past it.

    Files past ``current`` are those that :func:`load_newest` skipped as damaged
    before the run resumed from an older step; counted as the newest, they would
    push the good checkpoints out.
    """
    if keep < 1:
        raise ValueError(f"prune_checkpoints: keep must be >= 1; got {keep}")
    found = list_checkpoints(directory)
    names = [p.name for p in found]
    if Path(current).name not in names:
        raise ValueError(f"prune_checkpoints: {current} is not a checkpoint of {directory}")
    last = names.index(Path(current).name)
    for old in found[: max(last + 1 - keep, 0)] + found[last + 1 :]:
        old.unlink(missing_ok=True)
