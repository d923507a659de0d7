"""The README's commands as a newcomer types them: a fresh clone, a shell that never
activated the venv (PATH=/usr/bin:/bin), tiny params.

`make pipeline`, `.venv/bin/diffusion generate` (from the model file and the registry),
`.venv/bin/dvc exp run` (in the workspace and as a `--temp` copy), and
the whole orchestration path: `make services`, `make deploy`, `make worker`, a
`prefect deployment run` of the sweep, `.venv/bin/dvc exp show`, `.venv/bin/diffusion
promote`, the Python snippet that loads `models:/diffusion@champion`, and `make ui`.
Each service runs in its own process group and is stopped in a ``finally``.

The fast test at the end checks that every command README.md and docs/*.md show is run
by one of the tests in tests/, or is listed, with the reason, as one no test can run.
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
from mlflow import MlflowClient

from conftest import BIN, ROOT, TINY_PARAMS, make_pipeline_repo
from diffusion.config import merge_params
from services import flow_run_id, free_port, start, stop, wait_http
from test_pipeline import assert_bad_param_stops_before_outputs_go, assert_only_sampling_reran, assert_tracked_everything, ran_stages
from test_flows import SWEEP_PARAMS

VENV = Path(sys.prefix)
CLONED = ("Makefile", "pyproject.toml", "constraints.txt", "prefect.yaml", "README.md", "BENCHMARKS.md", "RELIABILITY.md")


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
    shutil.copytree(ROOT / "docs", repo / "docs")  # the pages whose commands these tests run
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


@pytest.mark.integration
def test_make_pipeline_tracks_everything_and_the_readme_commands_work_without_a_venv(tmp_path: Path):
    assert str(BIN) not in "/usr/bin:/bin"
    repo = fresh_clone(tmp_path / "clone", merge_params(TINY_PARAMS, {"train.eval_images": 4}))  # with the KID curve
    env = newcomer_env(repo)
    out = sh(repo, "make", "pipeline", env=env)
    assert "command not found" not in out.stdout + out.stderr
    assert_tracked_everything(repo, out.stdout)  # every stage ran, its files and MLflow runs
    model_run_id = json.loads((repo / "models/run.json").read_text())["run_id"]
    sample_run_id = json.loads((repo / "samples/run.json").read_text())["run_id"]

    # docs/sampling.md's "Generating images": from the model file, and from the champion of the local store.
    sh(repo, ".venv/bin/diffusion", "generate", "models/model.pt", "-n", "64", "--out", "generated", env=env)
    assert len(list((repo / "generated").glob("image-*.png"))) == 64 and (repo / "generated/grid.png").is_file()
    sh(repo, ".venv/bin/diffusion", "promote", env=env)
    out = sh(repo, ".venv/bin/diffusion", "generate", "models:/diffusion@champion", "-n", "100", "--out", "generated/champion",
             env=env)
    assert f'"steps": {TINY_PARAMS["sample"]["steps"]}' in out.stdout  # the settings behind the champion's FID
    assert len(list((repo / "generated/champion").glob("image-*.png"))) == 100
    sh(repo, ".venv/bin/diffusion", "generate", "models/model.pt", "-n", "16", "--sampler", "ddpm", "--steps", "100",
       "--seed", "1", "--batch-size", "8", env=env)

    # docs/pipeline.md's `.venv/bin/dvc exp run -S ...`: in the workspace, and in a temporary copy.
    out = sh(repo, ".venv/bin/dvc", "exp", "run", "-S", "sample.steps=4", env=env)
    assert_only_sampling_reran(repo, out.stdout, model_run_id, sample_run_id)
    assert_bad_param_stops_before_outputs_go(repo)
    out = sh(repo, ".venv/bin/dvc", "exp", "run", "--temp", "--name", "temp-copy", "-S", "evaluate.confidence=0.9",
             env=env)
    assert ran_stages(out.stdout) == ["validate", "evaluate"]  # a stage command in the copy, for a newcomer
    shown = sh(repo, ".venv/bin/dvc", "exp", "show", "--json", env=env).stdout
    assert "temp-copy" in shown


@pytest.mark.integration
def test_the_readme_orchestration_path(tmp_path: Path, prepared_repo: Path):
    """make services / deploy / worker, a deployment run, exp show, promote, load the champion, make ui.

    The worker starts at the same moment as `make deploy` (which must not race it). The sweep's
    space is one point: trial 0 runs the pipeline, trial 1 is the same experiment again and comes
    whole from DVC's run cache, its FID from the experiment's metrics; both are nested MLflow runs
    under the sweep's parent run, on the SQLite store of `make services`' MLflow server.
    """
    params = {**SWEEP_PARAMS, "sweep": {**SWEEP_PARAMS["sweep"], "study_name": "readme", "n_trials": 2,
                                         "space": {"sample.steps": {"type": "categorical", "choices": [3]}}}}
    repo = fresh_clone(tmp_path / "clone", params)
    # The session's prepared data in the clone's DVC cache: the first trial restores prepare.
    shutil.copytree(prepared_repo / ".dvc" / "cache", repo / ".dvc" / "cache", dirs_exist_ok=True)
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

        watch = ["--watch", "--watch-interval", "2", "--watch-timeout", "480"]
        run = sh(repo, ".venv/bin/prefect", "deployment", "run", "train-sweep/train-sweep", "-p", "n_trials=2",
                 *watch, env=env | api, timeout=540)
        flow_run = flow_run_id(run.stdout)
        assert flow_run, run.stdout[-2000:]
        inspected = sh(repo, ".venv/bin/prefect", "flow-run", "inspect", flow_run, "--output", "json", env=env | api)
        assert json.loads(inspected.stdout)["state"]["type"] == "COMPLETED"
        assert {"readme-0", "readme-1"} <= set(re.findall(r"readme-\d+", sh(repo, ".venv/bin/dvc", "exp", "show", env=env).stdout))
        client = MlflowClient(uri)
        runs = client.search_runs([client.get_experiment_by_name("diffusion").experiment_id], "tags.`sweep.study` = 'readme'")
        parents = [r for r in runs if r.data.tags.get("sweep.role") == "parent"]
        trials = [r for r in runs if "sweep.trial" in r.data.tags]
        assert len(parents) == 1 and len(trials) == 2
        assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in trials)
        assert all(r.info.status == "FINISHED" and r.data.metrics["fid"] > 0 for r in trials)
        first, second = sorted(trials, key=lambda r: int(r.data.tags["sweep.trial"]))
        assert second.data.tags["train.model_run_id"] == first.info.run_id  # the run cache's model
        assert second.data.metrics["fid"] == first.data.metrics["fid"]

        # docs/sweeps.md's other deployment runs: the pipeline as one experiment (at the sweep's
        # point, so its stages restore from the run cache), and promotion.
        run = sh(repo, ".venv/bin/prefect", "deployment", "run", "train-pipeline/train-pipeline",
                 "-p", 'params={"sample.steps": 3}', "-p", "name=readme-pipeline", *watch, env=env | api, timeout=540)
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


# ---- Every command the docs show is run by a test --------------------------------------

# The commands that README.md and docs/*.md show and that no test runs, each with the
# reason it cannot run in one. A key is the command as `doc_commands` yields it: no `$ `,
# no trailing comment, no leading `VAR=value`, `.venv/bin/` dropped, quotes resolved.
NOT_RUN_BY_A_TEST = {
    "make test": "runs this very suite",
    "make install": "installs the pinned set from the package registries; the tests run in that venv, installed once",
    "make worker GPU=0": "needs a GPU (it sets CUDA_VISIBLE_DEVICES); the tests start `make worker` without GPU=",
    "dvc exp run -S model.name=ddpm-cifar10 -S data.source=cifar10 -S data.image_size=32 -S train.batch_size=128 "
    "-S train.steps=200000 -S train.channels_last=true": "a GPU run that downloads CIFAR-10 from the internet",
    "dvc exp run -S train.distributed=8 -S train.batch_size=256": "needs 8 GPUs (tests/test_distributed.py runs 2 gloo ranks)",
    "torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint host0:29400 -m diffusion.cli train":
        "needs two nodes of 8 GPUs",
    # Runs of the default's size, minutes each on 2 cores. No test runs them, nor yet
    # their settings on a tiny config; the params of each `dvc exp run` are validated below.
    "dvc exp run -S model.name=diffit-cpu -S ++model.overrides.window_size=14": "about 11 minutes",
    "dvc exp run -S model.space=latent -S model.name=dit-cpu -S ++model.overrides.patch_size=1": "about 7 minutes",
    "dvc exp run -S sample.sampler=dpm++2m -S sample.steps=10 -S sample.schedule=log-snr":
        "re-samples and scores the 500 digits of a trained default",
    "dvc exp run -S model.conditioning=none -S sample.guidance_scale=1": "trains the default again, unconditional",
    "dvc exp run -S model.conditioning=text":
        "trains the default again, text-conditional (tests/test_text_pipeline.py runs the tiny config's text path through dvc repro)",
    "dvc exp run -S sample.ema_length=0.12":
        "re-samples and scores 500 digits of a trained default (tests/test_registry.py samples a reconstructed EMA through dvc repro)",
    "dvc exp run -S sample.sampler=unipc -S sample.steps=8 -S sample.schedule=fitted":
        "fits a schedule to a trained default and scores 500 digits (tests/test_registry.py fits one through dvc repro)",
    "prefect deployment run train-sweep/train-sweep -p study_name=schedules -p concurrency=2":
        "8 trials of the default, two at a time",
    "dvc exp run -S diffusion.process=flow -S diffusion.schedule=null -S diffusion.prediction=null "
    "-S train.timestep_sampler=null": "trains the default again, on the flow (BENCHMARKS.md measures it)",
    "dvc exp run -S diffusion.process=edm -S diffusion.schedule=null -S diffusion.prediction=null "
    "-S train.timestep_sampler=null -S sample.sampler=heun -S sample.steps=13 -S sample.schedule=karras":
        "trains the default again, on EDM (BENCHMARKS.md measures it)",
}

SHELL_BLOCK = re.compile(r"^```(bash|sh|shell|console)[ \t]*\n(.*?)^```", re.M | re.S)
ANY_BLOCK = re.compile(r"^```.*?^```", re.M | re.S)
UNKNOWN = "…"  # a value the test computes at run time (a port, a path)


def _words(line: str) -> list[str]:
    """Shell words of one command line: quotes resolved, a trailing comment dropped."""
    import shlex

    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split, lexer.commenters = True, "#"
    return [word for word in lexer if word]  # shlex yields "" for the space before a comment


def doc_commands(text: str) -> list[tuple[list[str], list[str]]]:
    """Each command a page shows: (the variables it sets, its words), in order.

    Commands are the lines of ```bash / ```sh / ```shell blocks, the `$ ` lines of
    ```console blocks, and `$ ` lines outside any block; `\\` continues a line, and `;`,
    `&&`, `||` and `|` separate commands.
    """
    lines = []
    for kind, body in SHELL_BLOCK.findall(text):
        body = body.replace("\\\n", " ")
        lines += [ln.strip() for ln in body.splitlines() if kind != "console" or ln.strip().startswith("$ ")]
    lines += [ln.strip() for ln in ANY_BLOCK.sub("", text).splitlines() if ln.strip().startswith("$ ")]
    commands = []
    for line in lines:
        words, current = _words(line.removeprefix("$ ")), []
        for word in [*words, ";"]:
            if word not in (";", "&&", "||", "|", "&"):
                current.append(word)
                continue
            env = []
            if current[:1] == ["export"]:
                env, current = current[1:], []
            while current and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", current[0]):
                env.append(current.pop(0))
            if current:
                current[0] = current[0].removeprefix(".venv/bin/")
            if env or current:
                commands.append(([e.split("=", 1)[0] for e in env], current))
            current = []
    return commands


def _test_invocations() -> tuple[list[list[str]], str]:
    """Every argument list the tests build (list and tuple literals, a call's positional
    arguments) as words, names and `BIN / "tool"` resolved, with the tests' source."""
    import ast

    trees = {path: ast.parse(path.read_text()) for path in sorted((ROOT / "tests").glob("*.py"))}
    values: dict[str, list] = {}
    for tree in trees.values():  # what each name is bound to, anywhere in the tests
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and len(node.targets) == 1:
                target, value = node.targets[0], node.value
                pairs = (zip(target.elts, value.elts) if isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple)
                         and len(target.elts) == len(value.elts) else [(target, value)])
                for name, expr in pairs:
                    if isinstance(name, ast.Name):
                        values.setdefault(name.id, []).append(expr)

    def word(node: ast.AST, depth: int = 0) -> list[str]:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return [node.value]
        if isinstance(node, ast.JoinedStr):
            return ["".join(v.value if isinstance(v, ast.Constant) else UNKNOWN for v in node.values)]
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):  # BIN / "prefect"
            return word(node.right, depth)
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "str" and len(node.args) == 1:
            return word(node.args[0], depth)
        if isinstance(node, ast.Name) and len(values.get(node.id, ())) == 1 and depth < 3:
            bound = values[node.id][0]
            return word(bound, depth + 1) if not isinstance(bound, (ast.List, ast.Tuple)) else [UNKNOWN]
        if isinstance(node, ast.Starred):
            inner = node.value
            if isinstance(inner, ast.Name) and len(values.get(inner.id, ())) == 1 and depth < 3:
                inner = values[inner.id][0]
            if isinstance(inner, (ast.List, ast.Tuple)):
                return [w for elt in inner.elts for w in word(elt, depth + 1)]
        return [UNKNOWN]

    invocations = []
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, (ast.List, ast.Tuple, ast.Call)):
                args = node.args if isinstance(node, ast.Call) else node.elts
                words = [w for arg in args for w in word(arg)]
                if words:
                    invocations.append([w.removeprefix(".venv/bin/") for w in words])
    return invocations, "\n".join(path.read_text() for path in trees)


def _units(words: list[str]) -> list[tuple[str, ...]]:
    """Words as units: an option with its value (`-n 64`), or one word."""
    units, i = [], 0
    while i < len(words):
        if words[i].startswith("-") and i + 1 < len(words) and not words[i + 1].startswith("-"):
            units.append((words[i], words[i + 1]))
            i += 2
        else:
            units.append((words[i],))
            i += 1
    return units


def _same_word(doc: str, test: str) -> bool:
    """Equal; or KEY=VALUE of the same KEY (the tests run tiny values); or a value the test computes."""
    if doc == test or (test == UNKNOWN and not doc.startswith("-")):
        return True
    key = re.fullmatch(r"([^=\s]+)=.*", doc, re.S)
    return bool(key) and (test.startswith(key[1] + "=") or test.startswith(UNKNOWN))


def _same_unit(doc: tuple[str, ...], test: tuple[str, ...]) -> bool:
    if len(doc) != len(test) or not _same_word(doc[0], test[0]):
        return False
    if len(doc) == 1:
        return True
    # An option's value may differ, but not a KEY=VALUE's key (`-S model.name=...`).
    return "=" not in doc[1] or _same_word(doc[1], test[1])


def runs(doc: list[str], invocation: list[str]) -> bool:
    """Whether an invocation runs the doc's command: its program, then each of the doc's
    words or options in order, the test free to add more (`--watch-timeout 480`)."""
    for start, word in enumerate(invocation):
        if word != doc[0]:
            continue
        units, rest = _units(doc[1:]), iter(_units(invocation[start + 1:]))
        if all(any(_same_unit(unit, test) for test in rest) for unit in units):
            return True
    return False


def _set_params(params: dict, words: list[str]) -> None:
    """`dvc exp run -S key=value ...` applied to a params mapping, as DVC applies it: a
    key params.yaml lacks needs `++`, and the value is read as YAML."""
    import yaml

    for option, assignment in zip(words, words[1:]):
        if option != "-S":
            continue
        path, value = assignment.split("=", 1)
        *parents, leaf = path.removeprefix("++").split(".")
        node = params
        for key in parents:
            node = node.setdefault(key, {})
        assert path.startswith("++") or leaf in node, f"-S {assignment}: params.yaml has no {path}; DVC needs ++{path}"
        node[leaf] = yaml.safe_load(value)


def test_every_command_the_docs_show_is_run_by_a_test():
    """Each command in README.md and docs/*.md is run by a test in tests/, or listed in
    NOT_RUN_BY_A_TEST with its reason; every `dvc exp run -S` shown sets valid params."""
    import copy

    from conftest import DEFAULT_PARAMS
    from diffusion.config import parse_params

    invocations, source = _test_invocations()
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    shown, unrun = set(), []
    for page in pages:
        for env, words in doc_commands(page.read_text()):
            for name in env:  # `export X=...` or `X=... cmd`: the tests set X too
                assert name in source, f"{page.name}: no test sets {name}"
            if not words:
                continue
            command = " ".join(words)
            shown.add(command)
            if command not in NOT_RUN_BY_A_TEST and not any(runs(words, inv) for inv in invocations):
                unrun.append(f"{page.relative_to(ROOT)}: {command}")
            if words[:3] == ["dvc", "exp", "run"]:
                params = copy.deepcopy(DEFAULT_PARAMS)
                _set_params(params, words)
                parse_params(params, source=f"{page.name}: {command}")
    assert not unrun, "no test runs these (run them in one, or list them in NOT_RUN_BY_A_TEST with the reason):\n" + "\n".join(unrun)
    stale = set(NOT_RUN_BY_A_TEST) - shown
    assert not stale, f"NOT_RUN_BY_A_TEST lists commands no page shows: {sorted(stale)}"
