"""Sharing data, DVC's run cache and trained models between hosts through a DVC remote.

A repository that has a default remote (``dvc remote add -d <name> <url>``, once per
repository; a shared directory or an object store) shares with every other worker's
clone:

- before a trial, ``dvc fetch --run-cache`` brings the remote's run cache (small files:
  which deps and params gave which outputs), and ``dvc exp run --pull`` then downloads,
  for each stage that a run elsewhere already ran with the same deps and params, the
  outputs of that run. ``--pull`` alone is not enough: DVC looks a stage up in the local
  run cache only, and pulls just the outputs of what it found there. So a trial on host
  B that differs from one on host A only in ``sample.*`` restores A's trained model and
  does not train;
- after a trial, :func:`push_runs` sends this host's run cache and the outputs of its runs.

Without a default remote both are skipped: one host's cache is its own run cache.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flows.commands import run_with_lock_retries


def default_remote(root: Path) -> str | None:
    """The repository's default DVC remote (``core.remote``), or None."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return repo.config["core"].get("remote")


def pull_args(root: Path) -> list[str]:
    """``dvc exp run``/``dvc repro`` arguments that restore runs from the default remote's run cache."""
    return ["--pull"] if default_remote(root) else []


def fetch_run_cache(root: Path, env: Mapping[str, str], logger: Any) -> bool:
    """``dvc fetch --run-cache`` from the default remote, so that ``dvc exp run --pull``
    finds the other hosts' runs; whether it fetched (nothing to do without a remote).

    A fetch that fails is one warning line: this host trains what it cannot restore.
    """
    return _with_remote(root, env, logger, ["dvc", "fetch", "--run-cache"], "this host trains what it cannot restore")


def push_runs(root: Path, env: Mapping[str, str], logger: Any) -> bool:
    """Push this host's run cache and every output its entries name to the default remote;
    whether it pushed.

    Not ``dvc push --run-cache``: that sends the run cache and the *workspace's* outputs,
    and a ``dvc exp run --temp`` trial leaves the workspace as it was. The outputs must
    include the uncached ones (metrics and plots, ``cache: false``), which DVC keeps in the
    cache for its run cache: a host that restores a stage needs every output of it. Only
    what the remote lacks is sent. It runs as a command in the repository's root (DVC
    resolves a run cache entry's paths against the working directory), with the retries
    of a DVC command that finds the repository locked. A push that fails is one warning
    line: the trial's result stands, and other hosts train what they cannot restore.
    """
    return _with_remote(root, env, logger, [sys.executable, "-m", "flows.remote"],
                        "other hosts will not restore this trial's runs")


def _with_remote(root: Path, env: Mapping[str, str], logger: Any, cmd: list[str], consequence: str) -> bool:
    """Run a transfer command with the default remote, with DVC's lock retries; whether it
    succeeded. Without a remote it does not run; a failure is one warning line saying
    what follows from it."""
    remote = default_remote(root)
    if remote is None:
        return False
    outcome = run_with_lock_retries(cmd, cwd=root, env=env, log=logger.info)
    if outcome.returncode != 0:
        logger.warning(f"`{' '.join(cmd)}` with DVC remote {remote!r} exited with {outcome.returncode}; {consequence}")
    return outcome.returncode == 0


def _push_runs_here() -> int:
    """:func:`push_runs` in the working directory, as a DVC command: 0, or 1 after an ``ERROR:`` line."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with Repo(".") as repo, repo.lock:
            entries = repo.stage_cache.push(None)
            outputs = set().union(*repo.stage_cache.get_used_objs(entries).values())
            result = repo.cloud.push(outputs)
    except DvcException as err:
        print(f"ERROR: {err}", file=sys.stderr)
        return 1
    if result.failed:
        print(f"ERROR: {len(result.failed)} outputs did not reach the remote", file=sys.stderr)
        return 1
    print(f"{len(entries)} run cache entries and {len(result.transferred)} new outputs pushed")
    return 0


if __name__ == "__main__":
    sys.exit(_push_runs_here())
