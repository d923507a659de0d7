"""Trials side by side, with real processes: GPU leases, CPU threads.

Every party here is a separate process, as trials of concurrent flow runs are: lease
holders that print the GPU they got.
"""

from __future__ import annotations

import os
import queue
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

from conftest import ROOT

# ---------------------------------------------------------------------------
# GPU leases
# ---------------------------------------------------------------------------

# Leases one of argv[1]'s GPUs, prints it and holds it until its stdin closes.
HOLDER = """
import sys
from flows.devices import lease_gpu
with lease_gpu(sys.argv[1].split(","), holder=sys.argv[2], log=lambda m: print("log:", m, flush=True), poll=0.2) as gpu:
    print("gpu:", gpu, flush=True)
    sys.stdin.read()
"""


class Holder:
    """A lease-holding process and the lines it printed."""

    def __init__(self, gpus: str, name: str, lease_dir: Path):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "DIFFUSION_GPU_LEASE_DIR": str(lease_dir)}
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, gpus, name], env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip())

    def next(self, timeout: float) -> str | None:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            return None
        self.seen.append(line)
        return line

    def gpu(self, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while (line := self.next(max(0.0, deadline - time.monotonic()))) is not None:
            if line.startswith("gpu: "):
                return line.removeprefix("gpu: ")
        raise AssertionError(f"no GPU after {timeout} s; printed {self.seen}")

    def release(self) -> None:
        self.proc.stdin.close()
        assert self.proc.wait(timeout=30) == 0, self.seen

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)


def test_gpu_leases_hold_across_processes(tmp_path):
    """Two processes get different GPUs of {0, 1}; a third waits (logging once) for a release;
    a holder killed with SIGKILL frees its GPU."""
    lease_dir = tmp_path / "leases"
    holders = []
    try:
        a, b = Holder("0,1", "a", lease_dir), Holder("0,1", "b", lease_dir)
        holders += [a, b]
        gpu_a, gpu_b = a.gpu(), b.gpu()
        assert {gpu_a, gpu_b} == {"0", "1"}
        assert stat.S_IMODE(lease_dir.stat().st_mode) == 0o1777
        assert sorted(p.name for p in lease_dir.iterdir()) == ["0.lock", "1.lock"]

        c = Holder("0,1", "c", lease_dir)
        holders.append(c)
        waiting = c.next(timeout=30)
        assert waiting.startswith("log: c: waiting for a free GPU of 0,1") and ", a" in waiting and ", b" in waiting
        assert c.next(timeout=2) is None  # still waiting, and said so once
        a.release()
        assert c.gpu() == gpu_a
        assert [line for line in c.seen if line.startswith("log:")] == [waiting]

        b.kill()
        d = Holder("0,1", "d", lease_dir)
        holders.append(d)
        assert d.gpu() == gpu_b
        assert not [line for line in d.seen if line.startswith("log:")]  # no wait: the kernel freed it
    finally:
        for holder in holders:
            if holder.proc.poll() is None:
                holder.kill()


def test_without_gpus_there_is_no_lease(tmp_path, monkeypatch):
    from flows.devices import lease_gpu

    monkeypatch.setenv("DIFFUSION_GPU_LEASE_DIR", str(tmp_path / "leases"))
    with lease_gpu([], holder="cpu", log=print) as gpu:
        assert gpu is None
    assert not (tmp_path / "leases").exists()


# ---------------------------------------------------------------------------
# CPU threads
# ---------------------------------------------------------------------------


def test_cpu_trials_share_the_cores():
    """cores // concurrency threads each, at least one; torch in the trial's command starts with them."""
    from flows.commands import command_env
    from flows.devices import available_cores, cpu_threads

    cores = available_cores()
    assert cpu_threads(1) is None
    assert cpu_threads(2) == max(1, cores // 2)
    assert cpu_threads(cores + 1) == 1
    env = command_env(ROOT, threads=1)
    out = subprocess.run(
        [sys.executable, "-c", "import os, torch; print(os.environ['MKL_NUM_THREADS'], torch.get_num_threads())"],
        env=env, capture_output=True, text=True, check=True,
    )
    assert out.stdout.split() == ["1", "1"]
