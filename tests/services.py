"""Services for the integration tests: a command in its own process group with its output in a
log, stopped with SIGTERM then SIGKILL; free localhost ports; waiting for a server's health URL;
the id of a flow run that ``prefect deployment run`` created; make's targets run from a test
repository with this checkout's venv."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from conftest import ROOT


# Make's targets from a test repository, with this checkout's venv, which is installed.
MAKE = ["make", "-s", "-f", str(ROOT / "Makefile"), f"VENV={ROOT / '.venv'}", "-o", str(ROOT / ".venv" / ".installed")]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(cmd: list[str], *, env: dict, cwd: Path, log: Path) -> subprocess.Popen:
    """A service in its own process group, its output in ``log``."""
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group, SIGKILL if it lingers."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{url}: the server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"{url}: not up after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def flow_run_id(out: str) -> str | None:
    """The id of the flow run that ``prefect deployment run`` printed it created, or None."""
    found = re.search(r"UUID: ([0-9a-f-]{36})", out)
    return found.group(1) if found else None


def cli(cmd: list[str], *, env: dict, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out
