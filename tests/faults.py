"""The faults that the reliability tests reproduce for real (RELIABILITY.md): bytes
overwritten inside a checkpoint's tensor data, a writer killed with SIGKILL mid-write,
a full disk, a decompression bomb, an MLflow server killed and started again, a port where nothing listens."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


def overwrite_tensor_bytes(path: Path, data: bytes) -> str:
    """Overwrite ``len(data)`` bytes in the middle of the largest tensor storage (an
    ``<archive>/data/<n>`` entry) of the ``torch.save`` file at ``path`` with ``data``;
    returns the entry's name.

    Nothing else changes, so the archive still opens and torch loads it without complaint.
    """
    with zipfile.ZipFile(path) as archive:
        storages = [info for info in archive.infolist() if "/data/" in info.filename]
    entry = max(storages, key=lambda info: info.file_size)
    with open(path, "r+b") as fh:
        fh.seek(entry.header_offset + 26)  # the local header's name and extra-field lengths
        name_length, extra_length = struct.unpack("<HH", fh.read(4))
        data_start = entry.header_offset + 30 + name_length + extra_length
        fh.seek(data_start + ((entry.file_size - len(data)) // 2 & ~3))  # float-aligned
        fh.write(data)
    return entry.filename


def decompression_bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header says ``width`` x ``height`` 8-bit gray pixels, with one row of
    data: what a decompression bomb looks like to a reader before it inflates the data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(width + 1))) + chunk(b"IEND", b"")


WRITER = """
import sys, time
from diffusion.files import atomic_write
with atomic_write(sys.argv[1]) as fh:
    fh.write(b"x" * int(sys.argv[2]))
    fh.flush()
    print("writing", flush=True)
    time.sleep(600)
"""


def kill_mid_write(path: Path, size: int = 1 << 20) -> Path:
    """Start a process that writes ``size`` bytes to ``path`` through
    :func:`diffusion.files.atomic_write`, SIGKILL it mid-write; returns the temp file it left."""
    before = set(path.parent.glob(f".{path.name}.*.tmp"))
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(size)], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "writing"
    finally:
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait()
        writer.stdout.close()
    assert writer.returncode == -signal.SIGKILL
    (left,) = set(path.parent.glob(f".{path.name}.*.tmp")) - before
    assert left.stat().st_size == size
    return left


HOLD_MOUNT = 'mount -t tmpfs -o size="$1" tmpfs "$0" && echo mounted && exec cat >/dev/null'
"""Mount a tmpfs of ``$1`` bytes on ``$0``, say so, and hold it until stdin closes."""


@contextlib.contextmanager
def small_disk(size: int) -> Iterator[Path]:
    """A real filesystem of ``size`` bytes (rounded up to pages), as a folder of this process:
    a write past its size fails with ENOSPC, as on a full disk.

    It is a tmpfs in a mount namespace of its own (``unshare --mount --map-root-user``), held
    by a child process until the block ends (or this process dies: the child sees its stdin
    close) and reached through the child's ``/proc/<pid>/root``, so nothing is mounted on
    the machine. Skips the test, with one line, where the machine does not allow it."""
    if shutil.which("unshare") is None:
        pytest.skip("no small disk: util-linux's unshare is not installed")
    mountpoint = tempfile.mkdtemp(prefix="small-disk-")
    holder = subprocess.Popen(
        ["unshare", "--mount", "--map-root-user", "sh", "-c", HOLD_MOUNT, mountpoint, str(size)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        if holder.stdout.readline().strip() != "mounted":
            holder.wait()
            why = (holder.stderr.read().strip().splitlines() or ["no reason given"])[-1]
            pytest.skip(f"no small disk: this machine does not let unshare mount a tmpfs ({why})")
        yield Path(f"/proc/{holder.pid}/root{mountpoint}")
    finally:
        holder.stdin.close()
        holder.wait()
        holder.stdout.close()
        holder.stderr.close()
        os.rmdir(mountpoint)


def fill_disk(folder: Path, leave: int) -> Path:
    """Fill the filesystem of ``folder`` with one file, ``folder/filler``, until only ``leave``
    bytes are free; returns the file."""
    filler = folder / "filler"
    with open(filler, "wb") as fh:
        fh.write(bytes(max(shutil.disk_usage(folder).free - leave, 0)))
    return filler


STAGE_STARTS = re.compile(r"Running stage '(\w+)'")
TRAIN_PROGRESS = re.compile(r"train:[^\r\n]*?\| *(\d+)/\d+ \[")  # tqdm's bar: "train:  40%|####  | 12/30 ["


@dataclass
class Repro:
    """A `dvc repro` run by :func:`dvc_repro_killed`: what it printed, when each stage started
    and when it ended (seconds from the start), and, if the kill landed, the stage it hit and
    the last training step that train's progress bar showed."""

    output: str
    starts: dict[str, float]
    seconds: float
    killed_in: str | None
    step: int | None


def dvc_repro_killed(
    repo: Path, env: dict[str, str], stage: str | None = None, after_s: float = 0.0, at_step: int | None = None,
) -> Repro:
    """``dvc repro`` in ``repo``, in a process group of its own, which gets SIGKILL (every
    process of it, as ``kill -9 -<pgid>``) ``after_s`` seconds after ``stage`` starts, or with
    ``at_step`` once train's progress bar shows that step, unless it ends first or ``stage``
    is None; reaped either way."""
    proc = subprocess.Popen(
        ["dvc", "repro"], cwd=repo, env=env | {"TQDM_MININTERVAL": "0"},  # every step on the bar
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: proc.stdout.read1(65536), b"")), daemon=True)
    reader.start()
    start, starts, killed = time.monotonic(), {}, False
    try:
        while proc.poll() is None:
            text = b"".join(chunks).decode(errors="replace")
            for name in STAGE_STARTS.findall(text):
                starts.setdefault(name, time.monotonic() - start)
            if at_step is None:
                due = stage in starts and time.monotonic() - start >= starts[stage] + after_s
            else:
                due = any(int(step) >= at_step for step in TRAIN_PROGRESS.findall(text))
            if due:
                os.killpg(proc.pid, signal.SIGKILL)
                killed = True
                break
            time.sleep(0.02)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the stage's processes too, if dvc ended first
        proc.wait()
        reader.join()
        proc.stdout.close()
    output = b"".join(chunks).decode(errors="replace")
    for name in STAGE_STARTS.findall(output):
        starts.setdefault(name, time.monotonic() - start)
    hit = STAGE_STARTS.findall(output)[-1] if killed else None
    steps = TRAIN_PROGRESS.findall(output.split("Running stage 'train'")[-1]) if hit == "train" else []
    return Repro(output, starts, time.monotonic() - start, hit, int(steps[-1]) if steps else None)


def closed_port() -> int:
    """A localhost port where nothing listens (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MlflowServer:
    """A real ``mlflow server`` on a free localhost port, its SQLite store and artifacts in
    ``folder``; :meth:`kill` is ``kill -9`` of its process group, :meth:`start` brings it
    back on the same port and store. Use it as a context manager: it is killed at the end."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = closed_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180) -> MlflowServer:
        self.folder.mkdir(parents=True, exist_ok=True)
        cmd = [
            str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
            "--workers", "1", "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}",
            "--artifacts-destination", str(self.folder / "artifacts"),
        ]
        log = self.folder / "server.log"
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(cmd, cwd=self.folder, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"mlflow server exited ({self.proc.returncode}):\n{log.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=5) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        raise AssertionError(f"mlflow server not up after {timeout:.0f} s:\n{log.read_text()[-3000:]}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()
