"""Sharing data, DVC's run cache and trained models between hosts through a DVC remote.

A repository that has a default remote (``dvc remote add -d <name> <url>``, once per
repository; a shared directory or an object store) shares with every other worker's
clone:

- before a trial, ``dvc exp run --pull`` fetches the remote's run cache (small files)
  and, for each stage that a run there already ran with the same deps and params, the
  outputs of that run: a trial on host B that differs from one on host A only in
  ``sample.*`` restores A's trained model and does not train;
- after a trial, ``dvc push --run-cache`` sends this host's run cache and the outputs of
  its runs.

Without a default remote both are skipped: one host's cache is its own run cache.
"""

from __future__ import annotations

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


def push_run_cache(root: Path, env: Mapping[str, str], logger: Any) -> bool:
    """``dvc push --run-cache`` to the default remote; whether it pushed.

    A push that fails is one warning line: the trial's result stands, and other hosts
    train what they cannot restore.
    """
    remote = default_remote(root)
    if remote is None:
        return False
    cmd = ["dvc", "push", "--run-cache"]
    outcome = run_with_lock_retries(cmd, cwd=root, env=env, log=logger.info)
    if outcome.returncode != 0:
        logger.warning(f"`{' '.join(cmd)}` to DVC remote {remote!r} exited with {outcome.returncode}; "
            "other hosts will not restore this trial's runs")
    return outcome.returncode == 0
