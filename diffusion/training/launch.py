"""The launcher of ``train.distributed`` / ``sample.distributed``: N local processes of one
``diffusion <stage>`` command, as ranks of one job (torch-free: the launcher stays a small
process; the ranks use :mod:`diffusion.training.distributed`).

The ranks stay in the launcher's process group (``kill -9`` of a ``dvc repro``'s group takes
them all), and the kernel kills each rank when the launcher dies (``PR_SET_PDEATHSIG``), so
no rank outlives the job. When one rank fails, the others are stopped and the job fails with
one line naming the rank; the next run resumes from the last checkpoint. SIGINT or SIGTERM
to the launcher goes on to the ranks, which stop together at one step, checkpointed
(:mod:`diffusion.interrupt`). (torch's elastic agent, torchrun, starts each rank in a new
session: a killed agent leaves its ranks running.)
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

from diffusion.interrupt import die_with_parent

STOP_GRACE_S = 10.0
"""Seconds the other ranks get to stop after SIGTERM before SIGKILL, when one rank failed."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _exit_reason(code: int) -> str:
    return f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with {code}"


def launch(command: Sequence[str], processes: int, *, key: str) -> int:
    """Run ``command`` (a ``diffusion <stage>`` command line) as ``processes`` ranks of one job
    on this machine and return its exit status: 0 when every rank succeeded, else that of the
    first rank to fail, after stopping the others (one line naming it and ``key``).

    CPU ranks share the cores out (``OMP_NUM_THREADS``, unless it is set).
    """
    port = free_port()
    threads = max(1, (os.cpu_count() or 1) // processes)
    ranks = []
    for rank in range(processes):
        env = os.environ | {
            "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(processes),
            "LOCAL_WORLD_SIZE": str(processes), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
        }
        env.setdefault("OMP_NUM_THREADS", str(threads))
        ranks.append(subprocess.Popen(list(command), env=env, preexec_fn=die_with_parent))  # SIGKILL when the launcher dies
    try:
        while True:
            codes = [proc.poll() for proc in ranks]
            # A rank killed by a signal first: the others then fail for want of it.
            failed = sorted(((rank, code) for rank, code in enumerate(codes) if code not in (None, 0)), key=lambda rc: rc[1] > 0)
            if failed:
                rank, code = failed[0]
                _stop(ranks)
                if code != 1:  # 1: the rank said why itself, in one line
                    print(
                        f"{key}: rank {rank} of {processes} (pid {ranks[rank].pid}) {_exit_reason(code)}; the other "
                        "ranks were stopped; run again to resume from the last checkpoint",
                        file=sys.stderr, flush=True,
                    )
                return code if code > 0 else 128 - code
            if all(code == 0 for code in codes):
                return 0
            time.sleep(0.2)
    except BaseException as err:
        _stop(ranks, getattr(err, "signum", signal.SIGTERM))  # stopped by a signal (diffusion.interrupt): that one
        raise


def _stop(ranks: list[subprocess.Popen], signum: int = signal.SIGTERM) -> None:
    """``signum`` to the ranks still running, SIGKILL to those left after :data:`STOP_GRACE_S`."""
    for proc in ranks:
        if proc.poll() is None:
            proc.send_signal(signum)
    deadline = time.monotonic() + STOP_GRACE_S
    for proc in ranks:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
