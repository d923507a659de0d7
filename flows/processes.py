"""The processes a flow starts: how they start, how they stop, and that they end with the flow.

- **Start** (:func:`spawn`): each command in a process group of its own, through a small
  ``exec`` step that sets SIGINT and SIGTERM back to their default first. A flow started in
  the background (``nohup``, ``setsid … &`` from a script, a Prefect worker started so, a batch
  scheduler) ignores SIGINT, an ignored signal is inherited across ``exec``, and Python then
  installs no KeyboardInterrupt handler: the command would not stop on SIGINT. (A
  ``preexec_fn`` could reset it, but it is unsafe beside the worker's threads.) The step also
  asks the kernel for SIGTERM when the flow's thread that started it dies
  (:func:`diffusion.interrupt.die_with_parent`), so a flow killed outright leaves no command
  running: DVC dies, and the stage it ran stops with it (``diffusion`` does so under DVC).
- **Stop** (:func:`stop`): SIGINT to the command's group (DVC ignores it while a stage runs,
  the stage writes a checkpoint, marks its run and exits, DVC then cleans up its temporary
  copy), SIGTERM after ``grace``, SIGKILL :data:`TERM_GRACE_S` later.
- **With the flow** (:func:`stop_all`, :func:`run_main`): when the flow stops, every command
  it still runs, in any task's thread, is stopped so, and none starts afterwards (their
  callers get :class:`Interrupted`). As a script (``python -m flows.pipeline``), SIGINT and
  SIGTERM end the flow by an exception, whatever it inherited, so that Prefect's ephemeral
  API server (a ``uvicorn`` subprocess, stopped at interpreter exit) ends too.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

TERM_GRACE_S = 5.0
"""Seconds between SIGTERM and SIGKILL when a command did not stop on SIGINT."""
INTERRUPTED_GRACE_S = 15.0
"""Seconds a command gets after SIGINT when the flow itself is stopping: with
:data:`TERM_GRACE_S`, inside the 30 s that Prefect's runner gives a cancelled flow run."""

# Run by the command's own process before it becomes the command (argv: the flow's pid, the command).
EXEC = """\
import os, signal, sys
for signum in (signal.SIGINT, signal.SIGTERM):
    signal.signal(signum, signal.SIG_DFL)
try:
    from diffusion.interrupt import die_with_parent
    die_with_parent(signal.SIGTERM)
except ImportError:
    pass
if os.getppid() != int(sys.argv[1]):
    sys.exit(143)  # the flow is gone already
try:
    os.execvp(sys.argv[2], sys.argv[2:])
except OSError as err:
    print(f"{sys.argv[2]}: {err.strerror}", file=sys.stderr)
    sys.exit(127)
"""


class Interrupted(RuntimeError):
    """The flow is stopping: its command was stopped, or not started."""


_lock = threading.Lock()
_live: set[subprocess.Popen] = set()
_stopped_by_flow: set[int] = set()  # pids
_stopping = threading.Event()


def spawn(cmd: Sequence[str], **popen: Any) -> subprocess.Popen:
    """Start ``cmd`` (``Popen``'s keyword arguments in ``popen``) as the module doc says."""
    with _lock:
        if _stopping.is_set():
            raise Interrupted(f"`{' '.join(cmd)}` not started: the flow is stopping")
        proc = subprocess.Popen([sys.executable, "-c", EXEC, str(os.getpid()), *cmd], process_group=0, **popen)
        _live.add(proc)
    return proc


def release(proc: subprocess.Popen) -> bool:
    """Forget ``proc`` (it has ended); True when :func:`stop_all` stopped it."""
    with _lock:
        _live.discard(proc)
        return proc.pid in _stopped_by_flow


def _signal(proc: subprocess.Popen, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signum)


def _group_ended(proc: subprocess.Popen) -> bool:
    """``proc`` has ended (and is reaped) and so has every process left in its group."""
    if proc.poll() is None:
        return False
    try:
        os.killpg(proc.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _wait(procs: list[subprocess.Popen], seconds: float) -> list[subprocess.Popen]:
    """Wait up to ``seconds`` for the groups of ``procs`` to end; those still running."""
    deadline = time.monotonic() + seconds
    while True:
        left = [proc for proc in procs if not _group_ended(proc)]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.05)


def stop(procs: Iterable[subprocess.Popen], grace: float = 30.0) -> None:
    """SIGINT to the groups of ``procs``, SIGTERM to those left after ``grace`` seconds, SIGKILL
    :data:`TERM_GRACE_S` later (also to their descendants that left the group); each reaped."""
    import psutil

    procs = list(procs)
    descendants = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            descendants += psutil.Process(proc.pid).children(recursive=True)
    left = procs
    for signum, wait in ((signal.SIGINT, grace), (signal.SIGTERM, TERM_GRACE_S), (signal.SIGKILL, 0.0)):
        for proc in left:
            _signal(proc, signum)
        left = _wait(left, wait)
        if not left:
            break
    for proc in procs:
        proc.wait()
    for child in descendants:
        with contextlib.suppress(psutil.Error):
            if child.is_running():
                child.kill()


def stop_all(grace: float = INTERRUPTED_GRACE_S) -> None:
    """Stop every command this process still runs (:func:`stop`), and start no more."""
    with _lock:
        _stopping.set()
        procs = [proc for proc in _live if proc.poll() is None]
        _stopped_by_flow.update(proc.pid for proc in procs)
    stop(procs, grace)


def interrupted(err: BaseException) -> bool:
    """``err`` stops the flow from outside: SIGINT or SIGTERM, Prefect's cancellation, or
    :class:`Interrupted` in a task whose command was stopped so."""
    from prefect.exceptions import TerminationSignal

    return isinstance(err, (KeyboardInterrupt, TerminationSignal, Interrupted))


def run_main(flow: Callable[[], Any]) -> None:
    """Run ``flow`` as a script (``python -m flows.<name>``): SIGINT and SIGTERM, whatever the
    process inherited, stop it by an exception (:mod:`diffusion.interrupt`; during the flow
    run Prefect turns SIGTERM into its ``TerminationSignal``, then passes it on), its commands
    with it, and the process exits with ``128 + signal`` after one line, at which Prefect's
    ephemeral server stops."""
    from diffusion import interrupt

    with interrupt.handled():  # later signals wait for the stop under way
        try:
            flow()
            return
        except BaseException as err:
            if not interrupted(err):
                raise
            signum = getattr(err, "signum", None) or getattr(err, "signal", None) or signal.SIGINT
        stop_all()
        name = signal.Signals(signum).name
        print(f"{getattr(flow, 'name', 'flow')}: stopped by {name}; its commands were stopped", file=sys.stderr, flush=True)
    sys.exit(128 + signum)
