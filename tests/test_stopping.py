"""SIGINT and SIGTERM, sent for real to stages, DVC and flows started under a parent that
ignores SIGINT (``nohup``, ``setsid … &`` from a script, a batch scheduler): each stops the
same way, a checkpoint at its step where it trains, its MLflow run KILLED, nothing left
running (RELIABILITY.md; diffusion/interrupt.py, flows/processes.py)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from conftest import ROOT, TINY_PARAMS, copy_repo, pipeline_env, run_in
from faults import TRAIN_PROGRESS

# TINY_PARAMS training far longer than any test waits: a stop always lands mid-training,
# between the periodic checkpoints.
LONG_TRAIN = {**TINY_PARAMS, "train": {**TINY_PARAMS["train"], "steps": 5000, "checkpoint_every": 1000, "bpd_images": 0}}
STOP_LINE = re.compile(r"diffusion train: stopped by (SIG\w+) at step (\d+); checkpoint written; run it again to resume")
DIFFUSION = str(Path(sys.executable).parent / "diffusion")  # the console script, as DVC's stage runs it
EXITS_WITHIN_S = 30  # a step, a checkpoint and the run's end take a few seconds; 2 busy cores are slow


def ignore_sigint() -> None:
    """In the child before exec: what a parent that ignores SIGINT leaves its children."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Started:
    """A command started under a parent that ignores SIGINT, in a session of its own, its
    output collected; :meth:`leftovers` are the processes of its session still running."""

    def __init__(self, cmd: list[str], cwd: Path, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            cmd, cwd=cwd, env=env | {"TQDM_MININTERVAL": "0"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            preexec_fn=ignore_sigint, start_new_session=True,
        )
        self.chunks: list[bytes] = []
        self.reader = threading.Thread(target=lambda: self.chunks.extend(iter(lambda: self.proc.stdout.read1(65536), b"")))
        self.reader.start()

    def output(self) -> str:
        return b"".join(self.chunks).decode(errors="replace")

    def wait_for(self, done, timeout: float = 240, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        while not done(self.output()):
            assert self.proc.poll() is None, f"exited ({self.proc.returncode}) before {what}:\n{self.output()[-3000:]}"
            assert time.monotonic() < deadline, f"no {what} within {timeout} s:\n{self.output()[-3000:]}"
            time.sleep(0.05)

    def wait_for_step(self, step: int) -> None:
        self.wait_for(lambda text: any(int(s) >= step for s in TRAIN_PROGRESS.findall(text)), what=f"train step {step}")

    def stop(self, signum: int, pid: int | None = None) -> float:
        """Send ``signum`` to ``pid`` (the command's), wait for the command to exit; the seconds it took."""
        start = time.monotonic()
        os.kill(pid or self.proc.pid, signum)
        self.proc.wait(timeout=120)
        self.reader.join(timeout=30)
        return time.monotonic() - start

    def leftovers(self, timeout: float = 0.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while True:
            left = []
            for proc in psutil.process_iter(["pid", "cmdline", "status"]):
                try:
                    if os.getsid(proc.pid) == self.proc.pid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                        left.append(" ".join(proc.info["cmdline"] or []))
                except (ProcessLookupError, PermissionError):
                    pass
            if not left or time.monotonic() >= deadline:
                return left
            time.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL to whatever of its session still runs (the test's own clean-up)."""
        for proc in psutil.process_iter():
            try:
                if os.getsid(proc.pid) == self.proc.pid:
                    proc.kill()
            except (ProcessLookupError, PermissionError, psutil.Error):
                pass
        self.proc.wait()
        self.reader.join(timeout=10)


@pytest.fixture
def started():
    commands: list[Started] = []

    def start(cmd: list[str], cwd: Path, env: dict[str, str]) -> Started:
        commands.append(Started(cmd, cwd, env))
        return commands[-1]

    yield start
    for command in commands:
        command.kill()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, prepared_repo) -> Path:
    """A copy of the session's prepared repository with the params of :data:`LONG_TRAIN`."""
    return copy_repo(prepared_repo, tmp_path_factory.mktemp("stopping") / "repo", LONG_TRAIN)


def checkpoints(repo: Path) -> dict[int, Path]:
    return {int(path.stem.split("-")[1]): path for path in repo.glob("checkpoints/*/ckpt-*.pt")}


def train_run(repo: Path):
    """The MLflow run that the training's checkpoint folder names."""
    from mlflow import MlflowClient

    (run_file,) = repo.glob("checkpoints/*/run.json")
    return MlflowClient(pipeline_env(repo)["MLFLOW_TRACKING_URI"]).get_run(json.loads(run_file.read_text())["run_id"])


def stop_line(output: str) -> tuple[str, int]:
    found = STOP_LINE.findall(output)
    assert found, f"no stop line:\n{output[-3000:]}"
    return found[-1][0], int(found[-1][1])


def test_training_stops_with_a_checkpoint_at_its_step_and_its_run_killed_then_resumes(prepared: Path, started):
    """SIGTERM, then SIGINT in the resumed training, each to `diffusion train` alone: the step
    under way ends, a checkpoint at it, the run KILLED, exit 128 + signal, one line."""
    repo, env = prepared, pipeline_env(prepared)
    first = started(["diffusion", "train"], repo, env)
    first.wait_for_step(5)
    took = first.stop(signal.SIGTERM)
    assert first.proc.returncode == 128 + signal.SIGTERM and took < EXITS_WITHIN_S
    name, step = stop_line(first.output())
    assert name == "SIGTERM" and step >= 5 and step in checkpoints(repo)
    run = train_run(repo)
    assert run.info.status == "KILLED"
    assert first.leftovers() == []

    second = started(["diffusion", "train"], repo, env)
    second.wait_for(lambda text: "train: resuming from" in text, what="the resume")
    assert f"{checkpoints(repo)[step].name} at step {step}\n" in second.output()
    second.wait_for_step(step + 3)
    took = second.stop(signal.SIGINT)  # ignored by its parent: the stage handles it anyway
    assert second.proc.returncode == 128 + signal.SIGINT and took < EXITS_WITHIN_S
    name, later = stop_line(second.output())
    assert name == "SIGINT" and later >= step + 3 and later in checkpoints(repo)
    resumed = train_run(repo)
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "KILLED"


def test_a_stage_stops_when_sigterm_kills_its_dvc(prepared: Path, started):
    """SIGTERM to `dvc repro` alone kills DVC outright; its stage stops with it (the kernel's
    parent-death signal), checkpointed, instead of training on as an orphan."""
    repo = prepared
    repro = started(["dvc", "repro", "train"], repo, pipeline_env(repo))
    repro.wait_for(lambda text: "Running stage 'train'" in text, what="the train stage")
    before = max(checkpoints(repo), default=0)
    repro.wait_for_step(before + 3)
    (stage,) = [p for p in psutil.Process(repro.proc.pid).children(recursive=True) if p.cmdline()[-2:] == [DIFFUSION, "train"]]
    repro.stop(signal.SIGTERM)
    assert repro.proc.returncode == -signal.SIGTERM  # DVC does not handle SIGTERM
    stage.wait(timeout=EXITS_WITHIN_S)
    assert repro.leftovers(timeout=5) == []
    name, step = stop_line(repro.output())
    assert name == "SIGTERM" and step >= before + 3 and step in checkpoints(repo)
    assert train_run(repo).info.status == "KILLED"


def test_the_ranks_of_a_distributed_training_stop_together_with_one_checkpoint(prepared: Path, started):
    """SIGINT to the launcher of `train.distributed: 2` alone: it passes the signal on, the two
    ranks agree on a step (one all-reduce a step) and stop there, rank 0 writes its checkpoint and
    says so once, and no rank is left."""
    import yaml

    repo = prepared
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["distributed"] = 2  # not in the checkpoint key: it resumes the same training
    (repo / "params-ddp.yaml").write_text(yaml.safe_dump(params))
    job = started(["diffusion", "train", "--params", "params-ddp.yaml"], repo, pipeline_env(repo) | {"OMP_NUM_THREADS": "1"})
    job.wait_for(lambda text: "train: resuming from" in text or "train:   0%" in text, what="the training")
    before = max(checkpoints(repo), default=0)
    job.wait_for_step(before + 3)
    took = job.stop(signal.SIGINT)
    assert job.proc.returncode == 128 + signal.SIGINT and took < EXITS_WITHIN_S
    assert len(STOP_LINE.findall(job.output())) == 1
    name, step = stop_line(job.output())
    assert name == "SIGINT" and step >= before + 3 and step in checkpoints(repo)
    assert job.leftovers() == []


def test_a_flow_command_stops_on_sigint_though_the_flow_ignores_it():
    """flows.commands under a flow process that ignores SIGINT (as one started in the
    background does): the command gets SIGINT at its default, so a Python one raises
    KeyboardInterrupt and stops at once, not SIGKILLed after the grace."""
    from flows.commands import command_env, run_command

    lines: list[str] = []
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        start = time.monotonic()
        outcome = run_command(
            [sys.executable, "-c", "import time; print('training', flush=True); time.sleep(60)"],
            cwd=ROOT, env=command_env(ROOT), log=lines.append, watch=lambda: "training" in lines, every=0.2, grace=20,
        )
    finally:
        signal.signal(signal.SIGINT, previous)
    assert outcome.stopped and outcome.returncode != 0
    assert outcome.tail.endswith("KeyboardInterrupt")  # SIGINT, not SIGTERM or SIGKILL
    assert time.monotonic() - start < 15


def test_a_command_that_ignores_sigint_gets_sigterm_then_sigkill(monkeypatch):
    """SIGINT first, SIGTERM after the grace, SIGKILL after TERM_GRACE_S: a command that
    ignores the first two ends anyway, and so does a child that it left in its group."""
    from flows import processes
    from flows.commands import command_env, run_command

    monkeypatch.setattr(processes, "TERM_GRACE_S", 1.0)
    stubborn = (
        "import signal, subprocess, sys, time\n"
        "for s in (signal.SIGINT, signal.SIGTERM): signal.signal(s, signal.SIG_IGN)\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print('started', flush=True); time.sleep(60)\n"
    )
    lines: list[str] = []
    start = time.monotonic()
    outcome = run_command([sys.executable, "-c", stubborn], cwd=ROOT, env=command_env(ROOT), log=lines.append,
                          watch=lambda: "started" in lines, every=0.2, grace=1.0)
    assert outcome.stopped and outcome.returncode == -signal.SIGKILL
    assert time.monotonic() - start < 15


TOY_DVC_YAML = """
stages:
  train:
    cmd: python toy.py
    outs: [out.txt]
"""
TOY_PY = """
import sys, time
print("training", flush=True)
try:
    time.sleep(600)
except KeyboardInterrupt:
    print("toy: stopped by SIGINT", flush=True)
    sys.exit(130)
"""


def test_sigterm_to_a_flow_stops_its_command_with_sigint_and_ends_every_process_it_started(tmp_path: Path, started):
    """`python -m flows.pipeline` (its own ephemeral Prefect server) under a parent that ignores
    SIGINT: SIGTERM to the flow gives its command SIGINT (which DVC's stage handles), and the
    flow, its Prefect server, DVC and the stage all end."""
    repo = tmp_path / "toy"
    repo.mkdir()
    (repo / "dvc.yaml").write_text(TOY_DVC_YAML)
    (repo / "toy.py").write_text(TOY_PY)
    (repo / "params.yaml").write_text("{}\n")
    shutil.copytree(ROOT / "flows", repo / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "t@localhost"], ["git", "config", "user.name", "t"],
                ["dvc", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "toy"]):
        run_in(repo, *cmd)
    env = pipeline_env(repo) | {
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp_path / 'prefect.db'}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    env.pop("PREFECT_API_URL", None)
    flow = started([sys.executable, "-m", "flows.pipeline"], repo, env)
    flow.wait_for(lambda text: "training" in text.split("dvc repro --single-item train")[-1], what="the toy stage")
    assert any("uvicorn" in cmd for cmd in flow.leftovers())  # the ephemeral server runs
    took = flow.stop(signal.SIGTERM)
    assert flow.proc.returncode == 128 + signal.SIGTERM and took < EXITS_WITHIN_S
    output = flow.output()
    assert "toy: stopped by SIGINT" in output  # the stage got SIGINT, though the flow's parent ignores it
    assert "train-pipeline: stopped by SIGTERM; its commands were stopped" in output
    assert flow.leftovers(timeout=5) == []  # no uvicorn, DVC or stage
