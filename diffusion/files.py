"""Atomic file writes (a killed writer leaves the old file or the new one, never a torn
one; a full disk is one line naming the file), the removal of the temp files that killed
writers leave, exclusive locks on files (released by the kernel when their holder dies),
and the hash of a file's bytes."""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import io
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO, TextIO

from diffusion.errors import UserError

_TEMP_NAME = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")
"""The name of :func:`atomic_write`'s temp file: ``mkstemp``'s 8 random characters between
the prefix ``.<name>.`` and the suffix ``.tmp``."""


class DiskFullError(UserError, OSError):
    """A write that found no space left on its filesystem (or quota); one line naming the file."""


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[BinaryIO]:
    """Write ``path`` through a temp file in its folder: fsync, ``os.replace``, fsync the folder.

    The file gets the mode a plain ``open(path, "w")`` would leave: an existing file's
    permission bits, else ``0o666`` less the umask (``mkstemp`` alone makes it 0600).
    A writer killed with SIGKILL leaves its temp file behind (:func:`remove_stale_temps`).
    On a full disk the temp file is deleted, ``path`` is left as it was, and the error is
    a :class:`DiskFullError` naming it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fchmod(fh.fileno(), _new_file_mode(path))
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        full = _disk_full(err)
        if full is None:
            raise
        free = shutil.disk_usage(path.parent).free
        raise DiskFullError(
            f"{path}: not written: {os.strerror(full.errno)} ({free} bytes free in {path.parent}); "
            "the file there is as it was: free some space and run it again"
        ) from None
    _fsync_directory(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """:func:`atomic_write` of ``text`` as UTF-8: metrics, run files, markers."""
    with atomic_write(path) as fh:
        fh.write(text.encode())


def write_json(path: str | Path, data: object) -> None:
    """``data`` as indented JSON and a newline, written atomically (the metrics DVC reads)."""
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def _new_file_mode(path: Path) -> int:
    """The permission bits for ``path``: those of the file there, else ``0o666 & ~umask``."""
    with contextlib.suppress(FileNotFoundError):
        return stat.S_IMODE(os.stat(path).st_mode)
    return 0o666 & ~_umask()


def _umask() -> int:
    """The process's umask, read from ``/proc/self/status`` (Linux) without changing it; elsewhere
    by setting and restoring it (``os.umask`` has no read-only form)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _disk_full(err: BaseException) -> OSError | None:
    """The ENOSPC or EDQUOT error that ``err`` is or was raised while handling (``torch.save``
    turns its writer's OSError into a RuntimeError), else None."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def remove_stale_temps(directory: str | Path) -> list[Path]:
    """Delete the temp files of :func:`atomic_write` in ``directory`` that killed writers
    left (``.<name>.<8 random characters>.tmp``); returns them. Call it only while no
    writer can be at work in ``directory``: under the lock of a folder whose writers hold it."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    stale = sorted(p for p in directory.iterdir() if _TEMP_NAME.fullmatch(p.name) and p.is_file())
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (POSIX; directories cannot be opened on Windows)."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """The hex digest of a file's bytes by hashlib's ``algorithm``: sha256 for the data
    manifest, the FID reference and logged weights; md5 is the hash DVC records."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, algorithm).hexdigest()


def write_csv(path: str | Path, header: Sequence[str], rows: Iterable[Sequence]) -> None:
    """A CSV table (header, then rows), written atomically: DVC plots read these."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    with atomic_write(path) as fh:
        fh.write(text.getvalue().encode())


@contextlib.contextmanager
def exclusive_lock(path: str | Path, *, on_wait: Callable[[str], None] | None = None) -> Iterator[TextIO]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the ``with`` block.

    Another holder makes this wait; ``on_wait(holder)`` is called once first, with
    what the holder wrote into the file (its pid). The kernel drops the lock when the
    holder's process ends, however it ends, so a killed holder never blocks anyone.
    """
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                fh.seek(0)
                on_wait(fh.read().strip() or "unknown")
            fcntl.flock(fh, fcntl.LOCK_EX)
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}\n")
        fh.flush()
        try:
            yield fh
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
