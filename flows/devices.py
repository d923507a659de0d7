"""What a sweep trial runs on: a GPU leased host-wide, or its share of the CPU cores.

**GPU leases.** A worker's GPUs are its ``CUDA_VISIBLE_DEVICES``. A worker started
with ``GPU=0,1`` runs two flow runs at once, and several workers may share a host, so
a GPU is leased to one trial at a time across every flow run and process on the host:
an exclusive ``flock`` on ``<LEASE_DIR>/<entry>.lock``, one file per
``CUDA_VISIBLE_DEVICES`` entry. The directory (``DIFFUSION_GPU_LEASE_DIR``, default
``/tmp/diffusion-gpu-leases``) is world-writable with the sticky bit, so workers of
several users share it. A trial takes the first free GPU of its worker's and waits,
logging once, while all are held. The kernel drops the lock when the lease ends or
its process dies, so a killed flow leaves no stale lease.

**CPU share.** Without GPUs, ``concurrency`` trials at once would each start as many
OpenMP threads as there are cores, and oversubscribed threads wait on each other (a
training step beside a second training took many times as long as alone). Each trial
gets ``cores // concurrency`` threads instead (at least one).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

LEASE_DIR_ENV = "DIFFUSION_GPU_LEASE_DIR"
LEASE_DIR = Path("/tmp/diffusion-gpu-leases")
POLL_S = 1.0


def worker_gpus() -> list[str]:
    """The worker's GPUs (``CUDA_VISIBLE_DEVICES``); none: trials keep the worker's device."""
    return [g.strip() for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]


def lease_dir() -> Path:
    """The host's lease directory, created world-writable with the sticky bit (like /tmp)."""
    path = Path(os.environ.get(LEASE_DIR_ENV) or LEASE_DIR)
    try:
        path.mkdir(parents=True)
        path.chmod(0o1777)  # mkdir's mode is cut by the umask
    except FileExistsError:
        pass
    return path


def lease_file(directory: Path, gpu: str) -> Path:
    """``0.lock`` for ``CUDA_VISIBLE_DEVICES`` entry ``0``; a UUID (``GPU-…``, ``MIG-…``) likewise."""
    return directory / f"{re.sub(r'[^A-Za-z0-9._-]', '_', gpu)}.lock"


def _try_lock(path: Path) -> int | None:
    """An open descriptor holding ``path``'s exclusive lock, or None while another holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    if os.fstat(fd).st_uid == os.getuid():
        os.fchmod(fd, 0o666)  # other users' workers lease the same GPU
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _lock_first_free(directory: Path, gpus: Sequence[str]) -> tuple[str, int] | None:
    for gpu in gpus:
        fd = _try_lock(lease_file(directory, gpu))
        if fd is not None:
            return gpu, fd
    return None


def _holders(directory: Path, gpus: Sequence[str]) -> str:
    return "; ".join(f"{gpu}: {lease_file(directory, gpu).read_text().strip() or '?'}" for gpu in gpus)


@contextlib.contextmanager
def lease_gpu(
    gpus: Sequence[str], *, holder: str, log: Callable[[str], Any], poll: float = POLL_S
) -> Iterator[str | None]:
    """One of ``gpus``, held by this block alone on the host; ``None`` (no lease) without GPUs.

    ``holder`` names the lease in its file (with the process id) for whoever waits.
    """
    if not gpus:
        yield None
        return
    directory = lease_dir()
    leased = _lock_first_free(directory, gpus)
    if leased is None:
        log(f"{holder}: waiting for a free GPU of {','.join(gpus)} (held by {_holders(directory, gpus)})")
        while (leased := _lock_first_free(directory, gpus)) is None:
            time.sleep(poll)
    gpu, fd = leased
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}, {holder}\n".encode())
        yield gpu
    finally:
        os.close(fd)  # releases the lock


def available_cores() -> int:
    """The cores this process may run on (its affinity, as a container or taskset limits it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_threads(concurrency: int) -> int | None:
    """Each of ``concurrency`` CPU trials' threads; None when one trial keeps every core."""
    return max(1, available_cores() // concurrency) if concurrency > 1 else None
