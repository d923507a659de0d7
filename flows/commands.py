"""Running the pipeline's commands from a flow: their environment, ``-S`` overrides and log.

A flow never imports a stage. It runs ``dvc`` (whose stages are ``diffusion <stage>``)
as a subprocess in the repository, streams the output line by line into the Prefect
run's log, and can stop the whole process tree (a pruned trial); each command starts,
stops and ends with the flow as :mod:`flows.processes` says.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffusion.tracking import tracking_uri
from flows import processes

# The virtual environment's bin: `dvc` and the `diffusion` console script live here.
BIN = Path(sys.executable).parent
QUIET = {"MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1", "DO_NOT_TRACK": "1"}
# tqdm reads TQDM_* from the environment: a progress line every 30 s in the flow's log, not every step.
PROGRESS_EVERY_S = "30"


class CommandError(RuntimeError):
    """A command exited non-zero; the message names it and its exit code."""


def command_env(
    root: Path, *, run_id: str | None = None, gpu: str | None = None, threads: int | None = None
) -> dict[str, str]:
    """The environment of a pipeline command: our bin first on PATH, the absolute tracking URI
    (absolute: ``dvc exp run --temp`` runs the stages in a copy of the repository).

    ``run_id`` is the MLflow run the command's stages log into (``MLFLOW_RUN_ID``, see
    :mod:`diffusion.tracking`); ``gpu`` sets ``CUDA_VISIBLE_DEVICES``; ``threads`` the
    CPU threads of OpenMP, MKL and so torch (which starts with ``OMP_NUM_THREADS``).
    """
    env = {**os.environ, **QUIET}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["MLFLOW_TRACKING_URI"] = tracking_uri(root)
    env.pop("MLFLOW_RUN_ID", None)
    if run_id:
        env["MLFLOW_RUN_ID"] = run_id
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    if threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    env.setdefault("TQDM_MININTERVAL", PROGRESS_EVERY_S)
    env["PYTHONUNBUFFERED"] = "1"
    return env


# ---------------------------------------------------------------------------
# `dvc exp run -S key=value`: DVC parses overrides with Hydra's grammar
# ---------------------------------------------------------------------------

_BARE = re.compile(r"[A-Za-z_][\w\-/]*")


def hydra_value(value: Any) -> str:
    """A Python value in Hydra's override grammar: ``true``, ``null``, ``[1,2,2]``, ``'a b'``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    if _BARE.fullmatch(text) and text.lower() not in {"true", "false", "null", "nan", "inf"}:
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _has_key(raw: Mapping[str, Any], dotted: str) -> bool:
    node: Any = raw
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def set_args(overrides: Mapping[str, Any], raw_params: Mapping[str, Any]) -> list[str]:
    """``-S`` arguments for ``dvc exp run``; a key params.yaml lacks is added (``++key``)."""
    args: list[str] = []
    for key, value in overrides.items():
        prefix = "" if _has_key(raw_params, key) else "++"
        args += ["-S", f"{prefix}{key}={hydra_value(value)}"]
    return args


# ---------------------------------------------------------------------------
# Running a command with its log streamed
# ---------------------------------------------------------------------------


# Lines of a command's output that its outcome keeps, to tell why it failed.
TAIL_LINES = 50


@dataclass(frozen=True)
class Outcome:
    returncode: int
    stopped: bool  # stopped by ``watch`` (a pruned trial), not by its own failure
    tail: str = ""  # the last TAIL_LINES lines of its output


def stop_tree(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGINT to the command's process group (DVC and the stage it runs), SIGTERM after
    ``grace``, then SIGKILL (:func:`flows.processes.stop`).

    DVC ignores SIGINT while a stage runs and leaves it to the stage: ``diffusion train``
    writes a checkpoint at its step, marks its run and exits, and DVC then removes its
    temporary copy of the repository.
    """
    processes.stop([proc], grace)


def run_command(
    cmd: Sequence[str],
    *,
    cwd: Path,
    env: Mapping[str, str],
    log: Callable[[str], Any],
    watch: Callable[[], bool] | None = None,
    every: float = 2.0,
    grace: float = 30.0,
) -> Outcome:
    """Run ``cmd``, sending each output line to ``log``; it starts and stops as
    :mod:`flows.processes` says (SIGINT at its default, whatever the flow ignores).

    While it runs, ``watch()`` is called every ``every`` seconds; when it returns True
    the process tree is stopped (:func:`stop_tree`) and the outcome says so. When the flow
    stops, so does the command, and :class:`flows.processes.Interrupted` is raised.
    """
    log(f"$ {' '.join(cmd)}")
    proc = processes.spawn(
        list(cmd), cwd=cwd, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, errors="replace", bufsize=1,
    )
    tail: deque[str] = deque(maxlen=TAIL_LINES)

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line := line.rstrip():
                tail.append(line)
                log(line)

    reader = threading.Thread(target=pump, name=f"log-{proc.pid}", daemon=True)
    reader.start()
    stopped = False
    try:
        while True:
            try:
                proc.wait(timeout=every)
                break
            except subprocess.TimeoutExpired:
                if watch is not None and not stopped and watch():
                    stopped = True
                    stop_tree(proc, grace)
    except BaseException:
        # The flow itself was interrupted or cancelled: take the command down with it.
        stop_tree(proc, grace=processes.INTERRUPTED_GRACE_S)
        raise
    finally:
        reader.join(timeout=10)
        by_flow = processes.release(proc)
    if by_flow:
        raise processes.Interrupted(f"`{' '.join(cmd)}` was stopped (exit {proc.returncode}): the flow is stopping")
    return Outcome(proc.returncode, stopped, "\n".join(tail))


def check(outcome: Outcome, cmd: Sequence[str]) -> None:
    if outcome.returncode != 0:
        raise CommandError(f"`{' '.join(cmd)}` exited with {outcome.returncode}")


# ---------------------------------------------------------------------------
# DVC's locks: another DVC process holds the repository (dvc/lock.py, after DVC's own
# retries) or an output the command reads or writes (dvc/rwlock.py)
# ---------------------------------------------------------------------------

DVC_LOCK_ERROR = re.compile(r"^ERROR: .*(Unable to acquire lock|is busy, it is being blocked by)", re.MULTILINE)
LOCK_RETRIES = 4
LOCK_BACKOFF_S = 5.0


def dvc_lock_error(outcome: Outcome) -> bool:
    """The command failed only because another DVC process held a lock: running it again may succeed."""
    return outcome.returncode != 0 and not outcome.stopped and DVC_LOCK_ERROR.search(outcome.tail) is not None


def run_with_lock_retries(
    cmd: Sequence[str],
    *,
    log: Callable[[str], Any],
    retries: int = LOCK_RETRIES,
    backoff: float = LOCK_BACKOFF_S,
    **kwargs: Any,
) -> Outcome:
    """:func:`run_command`, run again up to ``retries`` times while it fails on a DVC lock.

    The n-th wait is ``backoff * 2**n`` seconds, stretched by up to half at random so
    that trials which collided once do not collide again.
    """
    outcome = run_command(cmd, log=log, **kwargs)
    for attempt in range(retries):
        if not dvc_lock_error(outcome):
            break
        delay = backoff * 2**attempt * random.uniform(1.0, 1.5)
        log(f"another DVC process holds a lock: `{' '.join(cmd[:3])}` again in {delay:.0f} s ({attempt + 1} of {retries})")
        time.sleep(delay)
        outcome = run_command(cmd, log=log, **kwargs)
    return outcome
