"""The README's commands as a newcomer types them: a fresh clone, a shell that never
activated the venv (PATH=/usr/bin:/bin), tiny params.

`make pipeline`, `.venv/bin/diffusion generate` (from the model file and the registry),
`.venv/bin/dvc exp run` (in the workspace and as a `--temp` copy), and
the whole orchestration path: `make services`, `make deploy`, `make worker`, a
`prefect deployment run` of the sweep, `.venv/bin/dvc exp show`, `.venv/bin/diffusion
promote`, the Python snippet that loads `models:/diffusion@champion`, and `make ui`.
Each service runs in its own process group and is stopped in a ``finally``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import BIN, ROOT, TINY_PARAMS, make_pipeline_repo
from test_deployment import free_port, start, stop, wait_http
from test_flows import SWEEP_PARAMS

pytestmark = pytest.mark.integration

VENV = Path(sys.prefix)
CLONED = ("Makefile", "pyproject.toml", "constraints.txt", "prefect.yaml", "README.md")


def newcomer_env(repo: Path, **extra: str) -> dict[str, str]:
    """What a fresh login shell has: no venv on PATH, no MLflow or Prefect settings."""
    env = {"HOME": os.environ.get("HOME", str(repo)), "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    env |= {k: v for k, v in os.environ.items() if k.endswith(("TELEMETRY", "ANALYTICS", "ANALYTICS_ENABLED", "TRACK"))}
    env |= {k: v for k, v in os.environ.items() if k.startswith("OPENBLAS")}
    return env | extra


def fresh_clone(path: Path, params: dict) -> Path:
    """The project's files as `git clone` lays them, with the installed venv at .venv.

    The venv is linked, and every file is older than its install stamp, so `make` does
    not reinstall (as on a machine where `make install` already ran).
    """
    repo = make_pipeline_repo(path, params)
    shutil.copytree(ROOT / "flows", repo / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "mlflow", repo / "mlflow", ignore=shutil.ignore_patterns("mlflow.db", "artifacts"))
    for name in CLONED:
        shutil.copy(ROOT / name, repo / name)
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", "commit", "-qm", "the rest of the project"], cwd=repo, check=True)
    (repo / ".venv").symlink_to(VENV)
    for file in repo.rglob("*"):
        if ".git" not in file.parts and file.is_file() and not file.is_symlink():
            os.utime(file, (0, 0))
    assert subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True).stdout == ""
    return repo


def sh(repo: Path, *cmd: str, env: dict, timeout: float = 900) -> subprocess.CompletedProcess:
    out = subprocess.run(list(cmd), cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    return out


def test_make_pipeline_and_dvc_commands_work_without_an_activated_venv(tmp_path: Path):
    assert str(BIN) not in "/usr/bin:/bin"
    repo = fresh_clone(tmp_path / "clone", TINY_PARAMS)
    env = newcomer_env(repo)
    out = sh(repo, "make", "pipeline", env=env)
    assert "command not found" not in out.stdout + out.stderr
    for stage in ("validate", "prepare", "train_vae", "encode", "train", "train_classifier", "sample", "evaluate"):
        assert f"Running stage '{stage}'" in out.stdout
    assert json.loads((repo / "metrics/evaluate.json").read_text())["fid"] > 0

    # The README's "Generating images": from the model file, and from the champion of the local store.
    sh(repo, ".venv/bin/diffusion", "generate", "models/model.pt", "-n", "64", "--out", "generated", env=env)
    assert len(list((repo / "generated").glob("image-*.png"))) == 64 and (repo / "generated/grid.png").is_file()
    sh(repo, ".venv/bin/diffusion", "promote", env=env)
    out = sh(repo, ".venv/bin/diffusion", "generate", "models:/diffusion@champion", "-n", "100", "--out", "generated/champion",
             env=env)
    assert f'"steps": {TINY_PARAMS["sample"]["steps"]}' in out.stdout  # the settings behind the champion's FID
    assert len(list((repo / "generated/champion").glob("image-*.png"))) == 100
    sh(repo, ".venv/bin/diffusion", "generate", "models/model.pt", "-n", "16", "--sampler", "ddpm", "--steps", "100",
       "--seed", "1", "--batch-size", "8", env=env)

    # The README's `.venv/bin/dvc exp run -S ...`: in the workspace, and in a temporary copy.
    out = sh(repo, ".venv/bin/dvc", "exp", "run", "-S", "sample.steps=4", env=env)
    assert "Running stage 'sample'" in out.stdout and "Running stage 'train'" not in out.stdout
    out = sh(repo, ".venv/bin/dvc", "exp", "run", "--temp", "--name", "temp-copy", "-S", "sample.steps=3", env=env)
    shown = sh(repo, ".venv/bin/dvc", "exp", "show", "--json", env=env).stdout
    assert "temp-copy" in shown


def test_the_readme_orchestration_path(tmp_path: Path):
    """make services / deploy / worker, a deployment run, exp show, promote, load the champion, make ui."""
    params = {**SWEEP_PARAMS, "sweep": {**SWEEP_PARAMS["sweep"], "study_name": "readme", "n_trials": 1,
                                         "space": {"sample.steps": {"type": "categorical", "choices": [3]}}}}
    repo = fresh_clone(tmp_path / "clone", params)
    prefect_port, mlflow_port, ui_port = free_port(), free_port(), free_port()
    uri = f"http://127.0.0.1:{mlflow_port}"
    env = newcomer_env(repo, PREFECT_PORT=str(prefect_port), MLFLOW_PORT=str(mlflow_port))
    api = {"PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api", "PREFECT_HOME": str(repo / ".prefect")}
    procs: list[subprocess.Popen] = []
    logs = {name: tmp_path / f"{name}.log" for name in ("services", "worker", "ui")}
    try:
        procs.append(start(["make", "services"], env=env, cwd=repo, log=logs["services"]))
        wait_http(f"http://127.0.0.1:{prefect_port}/api/health", procs[0], logs["services"], timeout=180)
        wait_http(f"{uri}/health", procs[0], logs["services"])
        procs.append(start(["make", "worker"], env=env, cwd=repo, log=logs["worker"]))
        sh(repo, "make", "deploy", env=env, timeout=300)

        run = sh(repo, ".venv/bin/prefect", "deployment", "run", "train-sweep/train-sweep", "-p", "n_trials=1",
                 "--watch", "--watch-interval", "5", "--watch-timeout", "480", env=env | api, timeout=540)
        assert re.search(r"UUID: [0-9a-f-]{36}", run.stdout), run.stdout[-2000:]
        assert "readme-0" in sh(repo, ".venv/bin/dvc", "exp", "show", env=env).stdout
        # The README's other deployment runs: the pipeline as one experiment, and promotion.
        watch = ["--watch", "--watch-interval", "5", "--watch-timeout", "480"]
        run = sh(repo, ".venv/bin/prefect", "deployment", "run", "train-pipeline/train-pipeline",
                 "-p", 'params={"sample.steps": 2}', "-p", "name=readme-pipeline", *watch, env=env | api, timeout=540)
        assert "Completed" in run.stdout, run.stdout[-2000:]
        assert "readme-pipeline" in sh(repo, ".venv/bin/dvc", "exp", "show", env=env).stdout
        run = sh(repo, ".venv/bin/prefect", "deployment", "run", "promote/promote", "-p", "study=readme", *watch,
                 env=env | api, timeout=540)
        assert "Completed" in run.stdout, run.stdout[-2000:]

        promoted = sh(repo, ".venv/bin/diffusion", "promote", "--study", "readme", env=env | {"MLFLOW_TRACKING_URI": uri})
        assert "already champion" in promoted.stdout  # the promote deployment made it champion
        snippet = (
            "import torch\n"
            "from diffusion.registry import load_model\n"
            f"model = load_model('models:/diffusion@champion', tracking_uri={uri!r})\n"
            "images = model(torch.randn(1, 1, 28, 28))\n"
            "assert images.shape == (1, 1, 28, 28) and images.abs().max() <= 1, images.shape\n"
            "print('sampled', tuple(images.shape))\n"
        )
        assert "sampled (1, 1, 28, 28)" in sh(repo, ".venv/bin/python", "-c", snippet, env=env).stdout

        procs.append(start(["make", "ui", f"UI_PORT={ui_port}"], env=env, cwd=repo, log=logs["ui"]))
        wait_http(f"http://127.0.0.1:{ui_port}/health", procs[-1], logs["ui"])
    finally:
        for proc in reversed(procs):
            stop(proc)
    for name, log in logs.items():
        assert "command not found" not in log.read_text(), f"make {name}:\n{log.read_text()[-3000:]}"
