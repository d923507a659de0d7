"""Trials side by side, with real processes: GPU leases, CPU threads, DVC's locks, one SQLite store.

Every party here is a separate process, as trials of concurrent flow runs are: lease
holders that print the GPU they got, real ``dvc`` commands holding and waiting for
DVC's locks, and MLflow clients writing one SQLite file.
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

import pytest

from conftest import ROOT, pipeline_env, run_in

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


# ---------------------------------------------------------------------------
# DVC's locks
# ---------------------------------------------------------------------------

# A stage that says when it has started, then holds its output's write lock for a while.
SLOW_DVC_YAML = """
stages:
  slow: {cmd: "touch started && sleep 8 && echo done > out.txt", outs: [out.txt]}
"""
# Holds the repository's lock (dvc/lock.py) as a running `dvc` command does.
HOLD_REPO_LOCK = """
import sys, time
from dvc.repo import Repo
with Repo(".").lock:
    print("locked", flush=True)
    time.sleep(float(sys.argv[1]))
"""


@pytest.fixture
def dvc_repo(tmp_path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "dvc.yaml").write_text(SLOW_DVC_YAML)
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "t@localhost"], ["git", "config", "user.name", "t"],
                ["dvc", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "slow"]):
        run_in(repo, *cmd)
    return repo


def start_slow_stage(repo: Path) -> subprocess.Popen:
    proc = subprocess.Popen(["dvc", "repro", "slow"], cwd=repo, env=pipeline_env(repo),
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not (repo / "started").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the slow stage did not start"
        time.sleep(0.1)
    return proc


def test_a_dvc_lock_error_is_retried_until_the_lock_is_free(dvc_repo):
    """`dvc repro` beside a running `dvc repro` fails on the output's lock; retried, it succeeds."""
    from flows.commands import dvc_lock_error, run_command, run_with_lock_retries

    env = pipeline_env(dvc_repo)
    holder = start_slow_stage(dvc_repo)
    try:
        blocked = run_command(["dvc", "repro", "slow"], cwd=dvc_repo, env=env, log=lambda line: None)
        assert blocked.returncode != 0 and "is busy, it is being blocked by" in blocked.tail
        assert dvc_lock_error(blocked)
        lines: list[str] = []
        outcome = run_with_lock_retries(["dvc", "repro", "slow"], cwd=dvc_repo, env=env, log=lines.append,
                                        retries=6, backoff=1.0)
    finally:
        holder.wait(timeout=120)
    assert outcome.returncode == 0, outcome.tail
    assert any("another DVC process holds a lock" in line for line in lines), lines
    assert (dvc_repo / "out.txt").read_text() == "done\n"


def test_other_failures_are_not_lock_errors(dvc_repo):
    """The repository lock held by another process is a lock error; a missing stage or a stopped run is not."""
    from flows.commands import Outcome, dvc_lock_error, run_command

    env = pipeline_env(dvc_repo)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_REPO_LOCK, "30"], cwd=dvc_repo, env=env,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        locked = run_command(["dvc", "status"], cwd=dvc_repo, env=env, log=lambda line: None)
    finally:
        holder.kill()
        holder.wait()
    assert locked.returncode != 0 and "ERROR: Unable to acquire lock" in locked.tail
    assert dvc_lock_error(locked)
    missing = run_command(["dvc", "repro", "nosuchstage"], cwd=dvc_repo, env=env, log=lambda line: None)
    assert missing.returncode != 0 and missing.tail.startswith("ERROR")
    assert not dvc_lock_error(missing)
    assert not dvc_lock_error(Outcome(-2, stopped=True, tail=locked.tail))


# ---------------------------------------------------------------------------
# One SQLite MLflow store, several writers
# ---------------------------------------------------------------------------

# A trial's stages: one metric point per transaction, as training logs them, plus a batch.
WRITER = """
import sys
from mlflow import MlflowClient
from mlflow.entities import Metric
client = MlflowClient(sys.argv[1])
run_id = sys.argv[2]
for step in range(int(sys.argv[3])):
    client.log_metric(run_id, "loss", 1.0 / (step + 1), step=step)
client.log_batch(run_id, metrics=[Metric("val_loss", float(s), 0, s) for s in range(20)])
"""
# The pruning poller: reads the histories while the writers write.
POLLER = """
import sys, time
from mlflow import MlflowClient
client = MlflowClient(sys.argv[1])
deadline = time.monotonic() + float(sys.argv[3])
while time.monotonic() < deadline:
    for run_id in sys.argv[2].split(","):
        client.get_metric_history(run_id, "loss")
    time.sleep(0.05)
"""


def test_concurrent_trials_log_into_one_sqlite_store(tmp_path):
    """Four writer processes and a poller on one SQLite file at once: no error, every point stored."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    client = MlflowClient(uri)  # the flow creates the store before any trial starts
    exp = client.create_experiment("concurrent")
    runs = [client.create_run(exp).info.run_id for _ in range(4)]
    steps = 150
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, uri, run_id, str(steps)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for run_id in runs]
    procs.append(subprocess.Popen([sys.executable, "-c", POLLER, uri, ",".join(runs), "20"], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * len(procs), "\n".join(o[-2000:] for o in outputs)
    for run_id in runs:
        history = client.get_metric_history(run_id, "loss")
        assert sorted(m.step for m in history) == list(range(steps))
        assert len(client.get_metric_history(run_id, "val_loss")) == 20
