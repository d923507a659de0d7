"""dvc.yaml names, for each stage, exactly the modules of diffusion/ that its command imports.

A module a stage imports but dvc.yaml does not list lets DVC skip the stage after that
module changed (its results then silently come from old code); a listed module it
does not import re-runs it for nothing. The import closure is read from the source
(every ``import`` statement, those inside functions too), from the stage's command
(``diffusion <stage>``: diffusion/cli.py and the stage's module).
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
        found = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        files |= {p.relative_to(ROOT).as_posix() for p in found if "__pycache__" not in p.parts}
    return files


STAGE_DEPS = {name: stage.get("deps", []) for name, stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items()}


@pytest.mark.parametrize("stage", sorted(STAGE_DEPS))
def test_stage_deps_are_its_import_closure(stage: str):
    assert stage in STAGES, f"dvc.yaml stage {stage!r} is not a `diffusion` sub-command"
    needed = import_closure("diffusion.cli", STAGES[stage])
    listed = dep_files(STAGE_DEPS[stage])
    assert not needed - listed, f"dvc.yaml: stage {stage} imports but does not depend on {sorted(needed - listed)}"
    assert not listed - needed, f"dvc.yaml: stage {stage} depends on but never imports {sorted(listed - needed)}"


def test_closure_follows_imports_inside_functions():
    """The reader is right: tracking imports nothing of ours at the top, registry does inside a function."""
    assert "diffusion/tracking/__init__.py" in import_closure("diffusion.registry")
    assert import_closure("diffusion.errors") == {"diffusion/__init__.py", "diffusion/errors.py"}


def test_every_stage_command_runs_the_launcher():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert {name: stage["cmd"] for name, stage in stages.items()} == {
        name: f"sh diffusion/stage.sh {name}" for name in stages
    }
