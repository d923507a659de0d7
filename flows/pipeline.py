"""train-pipeline: the DVC pipeline as Prefect tasks.

Without ``params`` each stage of dvc.yaml is one task, ``dvc repro --single-item
<stage>`` in the workspace, in the pipeline's order; DVC skips a stage whose deps and
params did not change. With ``params`` the whole pipeline is one task, ``dvc exp run
--temp -S key=value ...``: an experiment in a temporary copy of the repository,
listed by ``dvc exp show``, that leaves the workspace alone. Every command's output
streams into the task's log; a command that fails is retried, then fails the task
and the flow.

    prefect deployment run 'train-pipeline/train-pipeline' -p 'params={"train.lr": 0.001}'
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows import processes
from flows.commands import check, command_env, run_command, set_args

RETRIES = 2
RETRY_DELAY_S = 10


@task(retries=RETRIES, retry_delay_seconds=RETRY_DELAY_S, cache_policy=NO_CACHE, task_run_name="{title}")
def dvc(title: str, args: list[str], repo: str) -> None:
    """One ``dvc`` command; a non-zero exit raises, so Prefect retries it."""
    root = Path(repo)
    cmd = ["dvc", *args]
    check(run_command(cmd, cwd=root, env=command_env(root), log=get_run_logger().info), cmd)


def stage_order(root: Path) -> list[str]:
    """dvc.yaml's stages, each after the stages it depends on."""
    import networkx as nx
    from dvc.repo import Repo

    def address(stage) -> str:  # as `dvc repro` in the repository root takes it
        dvcfile = os.path.relpath(stage.dvcfile.path, root)
        return stage.name if dvcfile == "dvc.yaml" else f"{dvcfile}:{stage.name}"

    with Repo(str(root)) as repo:
        graph = repo.index.graph  # an edge runs from a stage to a stage it depends on
        return [address(stage) for stage in reversed(list(nx.topological_sort(graph)))]


@flow(name="train-pipeline", log_prints=True)
def train_pipeline(
    params: dict[str, Any] | None = None, name: str | None = None, retries: int = RETRIES, repo: str = "."
) -> list[str]:
    """Reproduce the pipeline stage by stage, or, given ``params``, run it as one DVC experiment.

    ``params``: dotted keys of params.yaml and their values (``{"sample.steps": 100}``);
    ``name``: the experiment's name in ``dvc exp show``; ``retries``: of each failed
    command (training resumes from its last checkpoint); ``repo``: the repository root.
    Returns the commands run.
    """
    root = Path(repo).resolve()
    if params is None and name is None:
        commands = [["repro", "--single-item", stage] for stage in stage_order(root)]
    else:
        raw = yaml.safe_load((root / "params.yaml").read_text()) or {}
        commands = [["exp", "run", "--temp", *(["--name", name] if name else []), *set_args(params or {}, raw)]]
    for args in commands:
        title = f"dvc repro {args[-1]}" if args[0] == "repro" else f"dvc exp run {name or ''}".strip()
        dvc.with_options(retries=retries)(title, args, str(root))
    return [" ".join(["dvc", *args]) for args in commands]


if __name__ == "__main__":
    processes.run_main(train_pipeline)
