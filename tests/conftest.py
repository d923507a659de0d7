import os

# Keep every test offline and quiet: no telemetry, no analytics.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")  # tiny stages last seconds

# `make test` runs the suite on pytest-xdist's workers, one a core: each worker, and every process
# a test starts, computes on its share of the cores. torch's default, a thread per core in every
# process, has two workers' kernels wait on each other's threads (many times slower, not 2x).
if workers := os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // int(workers))))

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# The files that run pipelines, servers and sweeps, slowest first (by the durations CI prints).
# `make test` hands each pytest-xdist worker a whole file at a time, in the order of the items
# (--no-loadscope-reorder; xdist's own order, most tests first, left the one-test scale-out
# file for last): the longest start first and the short files fill in after them, so neither
# worker ends alone on a long one.
SLOWEST_FIRST = (
    "test_readme.py", "test_scaleout.py", "test_pipeline.py", "test_tracking_faults.py", "test_flows.py",
    "test_latent.py", "test_transformers.py", "test_registry.py", "test_distributed.py", "test_ui.py",
    "test_stopping.py", "test_concurrency.py",
)


def pytest_collection_modifyitems(config, items) -> None:
    """Order the files :data:`SLOWEST_FIRST`, the rest after them as collected (a stable sort:
    the tests of a file keep their order)."""
    rank = {name: index for index, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


# A config small enough for a whole `dvc repro` in about a minute on 2 cores.
TINY_PARAMS = {
    "data": {"source": "mnist5k", "image_size": 28, "holdout": 16, "reference_images": 16},
    "model": {"name": "unet-tiny"},
    # eval_images 0: no in-training KID curve (Inception in every training); tests/test_train_eval.py and
    # the make-pipeline test of tests/test_readme.py turn it on
    "train": {
        "steps": 30, "batch_size": 16, "warmup_steps": 5, "checkpoint_every": 10, "log_every": 5, "bpd_images": 2,
        "eval_images": 0,
    },
    "sample": {"num_samples": 16, "batch_size": 16, "steps": 5, "grid_rows": 4},
    "evaluate": {"batch_size": 16, "bootstrap_replicates": 20, "digit_classifier_steps": 20},
    "diffusion": {"timesteps": 100},
    "sweep": {"n_trials": 2, "space": {"sample.steps": {"type": "categorical", "choices": [3, 5]}}},
}


# The committed params.yaml: every key, the embedded default's values. Tests state only
# what they change (TINY_PARAMS and the like) and merge it over these.
DEFAULT_PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())


def full_params(overrides: dict | None = None) -> dict:
    """The committed params with ``overrides`` merged in, section by section, key by key."""
    from diffusion.config import merge_params

    return merge_params(DEFAULT_PARAMS, overrides or {})


def section(name: str, **changes):
    """One validated section of params.yaml: the committed values with ``changes``."""
    from diffusion.config import Params

    return Params.model_fields[name].annotation.model_validate(DEFAULT_PARAMS[name] | changes)


def pipeline_env(repo: Path) -> dict[str, str]:
    """The environment a stage command sees: our venv first on PATH, the repo's own store."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{repo / 'mlflow' / 'mlflow.db'}"
    env.pop("MLFLOW_RUN_ID", None)
    return env


def run_in(repo: Path, *cmd: str, check: bool = True, timeout: float = 900, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``cmd`` in ``repo`` with :func:`pipeline_env` (and ``env`` over it)."""
    out = subprocess.run(cmd, cwd=repo, env=pipeline_env(repo) | (env or {}), capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}")
    return out


def make_pipeline_repo(path: Path, params: dict | None = None) -> Path:
    """A real git + DVC repo with the project's dvc.yaml, source tree and a tiny params.yaml."""
    path.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", ".gitignore", ".dvcignore"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, path / name)
    shutil.copytree(ROOT / "diffusion", path / "diffusion", ignore=shutil.ignore_patterns("__pycache__"))
    (path / "params.yaml").write_text(yaml.safe_dump(full_params(params if params is not None else TINY_PARAMS)))
    run_in(path, "git", "init", "-q")
    run_in(path, "git", "config", "user.email", "tests@localhost")
    run_in(path, "git", "config", "user.name", "tests")
    run_in(path, "dvc", "init", "-q")
    run_in(path, "git", "add", "-A")
    run_in(path, "git", "commit", "-qm", "pipeline under test")
    return path


@pytest.fixture(scope="session")
def prepared_repo(tmp_path_factory) -> Path:
    """The repository of TINY_PARAMS after `dvc repro prepare train_digit_classifier` (validate, prepare, the digit classifier), built once a
    session (by the first xdist worker that asks; the others wait for it and share it): a test
    that needs prepared data takes a :func:`copy_repo` of it, whose DVC cache and run cache
    already hold the data, instead of preparing it again. Nothing writes to it."""
    from filelock import FileLock

    session = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        session = session.parent  # each worker's basetemp lies in the session's
    repo = session / "prepared" / "repo"
    with FileLock(session / "prepared.lock"):
        if not (repo.parent / "ready").is_file():
            shutil.rmtree(repo.parent, ignore_errors=True)
            make_pipeline_repo(repo)
            run_in(repo, "dvc", "repro", "prepare", "train_digit_classifier")  # the stages that read the data alone
            (repo.parent / "ready").touch()
    return repo


@pytest.fixture(scope="session")
def shared_cache(prepared_repo: Path, tmp_path_factory) -> Path:
    """One DVC cache (with its run cache) for every orchestration test of the session, holding
    :func:`prepared_repo`'s data from the start: a repository of the same data params restores
    prepare from it, and a later one with the same params restores train, whichever test runs first."""
    path = tmp_path_factory.mktemp("orchestration-dvc-cache")
    shutil.copytree(prepared_repo / ".dvc" / "cache", path, dirs_exist_ok=True)
    return path


def copy_repo(template: Path, path: Path, params: dict | None = None) -> Path:
    """A copy of the repository ``template`` at ``path`` (git, DVC cache and run cache, outputs,
    dvc.lock), with ``params`` merged over the committed params.yaml and committed, if given."""
    shutil.copytree(template, path, symlinks=True)
    if params is not None:
        (path / "params.yaml").write_text(yaml.safe_dump(full_params(params)))
        run_in(path, "git", "commit", "-q", "--allow-empty", "-am", "params under test")
    return path


@pytest.fixture
def single_thread():
    """One intra-op thread for tests of small tensors: faster, and steady on a shared CPU."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
