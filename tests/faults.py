"""The faults that the reliability tests reproduce for real (RELIABILITY.md): bytes
overwritten inside a checkpoint's tensor data, a writer killed with SIGKILL mid-write."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
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
