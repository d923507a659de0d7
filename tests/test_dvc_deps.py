"""dvc.yaml names, for each stage, the modules of diffusion/ that its command imports and
that can change its numbers (weights, samples, metrics): the import closure less
:data:`INERT`.

A module a stage imports but dvc.yaml does not list lets DVC skip the stage after that
module changed (its results then silently come from old code); a listed module it
does not import, or one of :data:`INERT`, re-runs it for nothing (hours on a GPU for a
comment). The import closure is read from the source (every ``import`` statement, those
inside functions too), from the stage's command (``diffusion <stage>``: diffusion/cli.py
and the stage's module).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from diffusion.cli import STAGES

PACKAGE = "diffusion"


def module_file(module: str) -> Path | None:
    """The file of a module of the package, or None when it is not one of ours."""
    path = ROOT.joinpath(*module.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def direct_imports(path: Path) -> set[str]:
    """Every module of the package that ``path`` imports (``from a import b`` counts a.b when it is a module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name for name in names if name.split(".")[0] == PACKAGE and module_file(name)}
    return found


def import_closure(*modules: str) -> set[str]:
    """The files (relative to the repository) of ``modules``, their packages and all they import."""
    todo, seen = list(modules), set()
    while todo:
        module = todo.pop()
        parts = module.split(".")
        for name in [".".join(parts[: i + 1]) for i in range(len(parts))]:  # packages run their __init__
            if name not in seen and module_file(name):
                seen.add(name)
                todo += direct_imports(module_file(name))
    return {module_file(name).relative_to(ROOT).as_posix() for name in seen}


def dep_files(deps: list[str]) -> set[str]:
    """The Python files of the package that ``deps`` name (a folder names all files in it)."""
    files = set()
    for dep in deps:
        path = ROOT / dep
        if dep.split("/")[0] != PACKAGE or not path.exists():
            continue
        found = sorted(path.rglob("*.py")) if path.is_dir() else [path] if path.suffix == ".py" else []  # data files: deps of their own
        files |= {p.relative_to(ROOT).as_posix() for p in found if "__pycache__" not in p.parts}
    return files


INERT = {
    "diffusion/cli.py": "the command line: it hands the stage the params config.py validated (a dep) and runs it",
    "diffusion/errors.py": "UserError: how a refusal is said, not what a stage computes",
    "diffusion/interrupt.py": "how SIGINT and SIGTERM stop a stage; a checkpoint it has written resumes the same "
                              "trajectory bit for bit",
    "diffusion/files.py": "atomic writes, stale temp files, file locks: they write the bytes they are given; file "
                          "hashes are named by their algorithm (md5, sha256), so their values cannot change",
    "diffusion/registry.py": "train_vae registers its autoencoder after writing its outputs; no stage loads a model "
                             "through the registry",
    "diffusion/tracking/__init__.py": "the names of the tracking modules below",
    "diffusion/tracking/store.py": "the MLflow store: its URI, whether it answers, the experiment",
    "diffusion/tracking/runs.py": "the MLflow run a stage logs into and what it logs there, after computing it",
    "diffusion/tracking/metric_log.py": "sends logged metrics to MLflow from a thread; the stage never reads them back",
    "diffusion/tracking/model_format.py": "the MLflow copy of a model file the stage already wrote",
    "diffusion/tracking/provenance.py": "git commit and DVC hashes as run tags; file_md5 is md5, fixed by its name",
}
"""The modules a stage imports that cannot change its numbers, each with why: logging, the
registry, errors, the command line, file helpers. They are not among dvc.yaml's deps, so
editing one re-runs nothing. A module they import is still a dep if the stage imports it."""


STAGE_DEPS = {name: stage.get("deps", []) for name, stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items()}


@pytest.mark.parametrize("stage", sorted(STAGE_DEPS))
def test_stage_deps_are_its_import_closure_less_the_inert_modules(stage: str):
    assert stage in STAGES, f"dvc.yaml stage {stage!r} is not a `diffusion` sub-command"
    imported = import_closure("diffusion.cli", STAGES[stage])
    needed = imported - INERT.keys()
    listed = dep_files(STAGE_DEPS[stage])
    assert not needed - listed, f"dvc.yaml: stage {stage} imports but does not depend on {sorted(needed - listed)}"
    inert = sorted(listed & INERT.keys())
    assert not inert, f"dvc.yaml: stage {stage} depends on {inert}, which cannot change its numbers (INERT)"
    assert not listed - imported, f"dvc.yaml: stage {stage} depends on but never imports {sorted(listed - imported)}"


def test_inert_modules_exist_and_some_stage_imports_each():
    """A module moved or renamed leaves no stale entry: each is a file some stage imports."""
    imported = set().union(*(import_closure("diffusion.cli", module) for module in STAGES.values()))
    assert not INERT.keys() - imported, f"INERT names modules no stage imports: {sorted(INERT.keys() - imported)}"


def test_closure_follows_imports_inside_functions():
    """The reader is right: tracking imports nothing of ours at the top, registry does inside a function."""
    assert "diffusion/tracking/__init__.py" in import_closure("diffusion.registry")
    assert import_closure("diffusion.errors") == {"diffusion/__init__.py", "diffusion/errors.py"}


def test_every_stage_command_runs_the_launcher():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert {name: stage["cmd"] for name, stage in stages.items()} == {
        name: f"sh diffusion/stage.sh {name}" for name in stages
    }
