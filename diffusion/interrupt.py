"""Stopping on SIGINT or SIGTERM: every stage the same way, whatever its parent ignores.

A process inherits an ignored signal across ``exec`` (``nohup``, a job started with ``&``
by a script, some batch schedulers and CI runners ignore SIGINT), and Python then installs
no KeyboardInterrupt handler; SIGTERM kills a Python process outright, with no ``finally``
run. So the ``diffusion`` command installs its own handler for both (:func:`handled`),
whatever it inherited:

- outside a :func:`deferred` block the first signal raises :class:`Stopped` (a
  ``KeyboardInterrupt``) at once: the stage's MLflow run ends KILLED
  (:func:`diffusion.tracking.stage_run`) and the command exits with ``128 + signal``
  and one line;
- inside one (the training loop) it only records the request: the loop finishes its
  step, writes a checkpoint at that step and raises :class:`Stopped` itself;
- once a stop is under way, later signals are recorded and nothing more, so the
  checkpoint and the run's end are never cut short (SIGKILL still is).

A stage run by ``dvc repro`` also stops when DVC dies (:func:`stop_with_dvc`): DVC
ignores SIGINT while its stage runs, but SIGTERM kills it outright, and the stage would go
on as an orphan.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

SIGNALS = (signal.SIGINT, signal.SIGTERM)
PR_SET_PDEATHSIG = 1  # linux/prctl.h


class Stopped(KeyboardInterrupt):
    """The process was asked to stop by ``signum``; ``detail`` says where it stopped."""

    def __init__(self, signum: int, detail: str = "") -> None:
        super().__init__(signum, detail)
        self.signum = signum
        self.detail = detail

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + self.signum

    def __str__(self) -> str:
        return f"stopped by {signal.Signals(self.signum).name}" + (f" {self.detail}" if self.detail else "")


_requested: int | None = None  # the first stop signal received
_deferring = 0  # depth of deferred() blocks


def _handle(signum: int, frame: object) -> None:
    global _requested
    if _requested is not None:
        return  # a stop is under way: let it finish
    _requested = signum
    if not _deferring:
        raise Stopped(signum)


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """SIGINT and SIGTERM handled as the module doc says while the block runs, whatever this
    process inherited; the previous handlers after it. Only the main thread can: elsewhere the
    block changes nothing."""
    global _requested
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, _handle) for signum in SIGNALS}
    _requested = None
    try:
        yield
    finally:
        for signum, handler in previous.items():
            if handler is not None:
                signal.signal(signum, handler)
        _requested = None


def requested() -> int | None:
    """The stop signal received so far, or None."""
    return _requested


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A block that stops only where it checks :func:`requested`; a stop asked for and not
    acted on is raised when the block ends."""
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
    if _requested is not None and not _deferring:
        raise Stopped(_requested)


def die_with_parent(signum: int = signal.SIGKILL) -> None:
    """Have the kernel send ``signum`` to this process when its parent (the thread that
    started it) dies: Linux ``PR_SET_PDEATHSIG``, nothing elsewhere."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, int(signum))


SHELLS = {"sh", "dash", "bash", "zsh", "ksh", "mksh", "fish"}


def _parent_of(pid: int) -> int | None:
    """The parent pid of ``pid`` (``/proc``), or None when it is gone."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def stop_with_dvc(parent: int) -> None:
    """SIGTERM to this stage when the DVC that runs it dies, or now if it has. DVC runs a stage's
    command with ``$SHELL -c`` (``/bin/sh`` when unset): bash execs the command, so DVC is
    ``parent``, the parent this process started with, and the kernel's parent-death signal does
    it (:func:`die_with_parent`); dash, Debian's ``/bin/sh``, stays between them and outlives DVC,
    so a thread checks each second that the shell's parent is still DVC."""
    die_with_parent(signal.SIGTERM)
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)
        return
    try:
        name = Path(f"/proc/{parent}/comm").read_text().strip()
    except OSError:
        return
    dvc = _parent_of(parent)
    if name not in SHELLS or dvc is None:
        return

    def watch() -> None:
        while _parent_of(parent) == dvc:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="stop-with-dvc", daemon=True).start()
