"""The faults that the reliability tests reproduce for real (RELIABILITY.md): bytes
overwritten inside a checkpoint's tensor data, a writer killed with SIGKILL mid-write,
an MLflow server killed and started again, a port where nothing listens."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path


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
