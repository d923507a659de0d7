"""Where a result came from: the repository, its git commit and the hashes DVC recorded.

A stage's run is tagged with :func:`git_commit` and :func:`dvc_lock_hashes`; a file a
stage reads is named by :func:`file_md5`, the hash DVC records for it. Reading only:
nothing here contacts MLflow.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from diffusion.files import file_digest


def repo_root() -> Path:
    """The repository root: DVC's (``DVC_ROOT``, set for a stage), else git's, else the working directory."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"])
    try:
        out = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True)
        return Path(out.stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        return Path.cwd()


def git_commit(root: Path | None = None) -> str | None:
    """The commit checked out at ``root`` (default :func:`repo_root`); None outside git."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root or repo_root(), capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def dvc_lock_hashes(root: Path | None = None) -> dict[str, str]:
    """``dvc.lock`` as tags: ``dvc.<stage>.<path>`` -> md5 of every dep and out recorded so far."""
    lock = (root or repo_root()) / "dvc.lock"
    if not lock.is_file():
        return {}
    import yaml

    data = yaml.safe_load(lock.read_text()) or {}
    tags = {}
    for stage, entry in (data.get("stages") or {}).items():
        for item in (entry.get("deps") or []) + (entry.get("outs") or []):
            if "md5" in item:
                tags[f"dvc.{stage}.{item['path']}"] = item["md5"]
    return tags


def file_md5(path: str | Path) -> str:
    """MD5 of a file's bytes: the hash DVC records for a file output."""
    return file_digest(path, "md5")
