"""``diffusion unlock``: release DVC's output locks held by processes that no longer run.

DVC records the process that holds each output's lock in ``.dvc/tmp/rwlock`` and frees
an entry only when that PID is gone. A ``dvc repro`` killed with ``kill -9`` whose
parent has not reaped it yet (a zombie, as a script or orchestrator that never waits
leaves it) still has its PID, so the next ``dvc repro`` refuses with "'<out>' is busy,
it is being blocked by: (PID …)". This tool drops exactly the entries of PIDs that are
gone or zombies, under DVC's own guard of that file, and leaves live holders alone:
unlike deleting the file by hand, it never frees the lock of a run that is still going.
``make pipeline`` runs it before ``dvc repro``.

DVC writes ``dvc.lock`` in place, so a kill mid-write can leave it torn, and every later
``dvc repro`` then fails with "'./dvc.lock' validation failed". A ``dvc.lock`` that is not
valid YAML or fails DVC's own lockfile schema is moved aside (one line naming where): the
next ``dvc repro`` finds each stage's outputs in DVC's run cache and restores them.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def running(pid: int) -> bool:
    """Is ``pid`` a process that can still hold a lock (alive and not a zombie)?"""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def release_stale_locks(root: Path) -> list[str]:
    """Drop the rwlock entries of processes that are gone; one line per released holder."""
    from dvc.fs import localfs
    from dvc.rwlock import _edit_rwlock

    tmp_dir = root / ".dvc" / "tmp"
    if not (tmp_dir / "rwlock").is_file():
        return []
    released: dict[int, str] = {}
    with _edit_rwlock(str(tmp_dir), localfs, False) as lock:
        for path, info in list(lock["write"].items()):
            if not running(info["pid"]):
                released[info["pid"]] = info["cmd"]
                del lock["write"][path]
        for path, infos in list(lock["read"].items()):
            live = [info for info in infos if running(info["pid"])]
            released |= {info["pid"]: info["cmd"] for info in infos if info not in live}
            if live:
                lock["read"][path] = live
            else:
                del lock["read"][path]
    return [f"released the DVC locks of PID {pid} ({cmd}), which no longer runs" for pid, cmd in released.items()]


def set_aside_torn_lockfile(root: Path) -> str | None:
    """Move a ``dvc.lock`` that DVC cannot read to ``dvc.lock.torn-<time>``; the line saying so, or None."""
    import yaml
    from dvc.schema import COMPILED_LOCKFILE_SCHEMA
    from voluptuous import Invalid

    lockfile = root / "dvc.lock"
    if not lockfile.is_file():
        return None
    try:
        COMPILED_LOCKFILE_SCHEMA(yaml.safe_load(lockfile.read_text()) or {})
        return None
    except (yaml.YAMLError, UnicodeDecodeError, Invalid) as err:
        why = str(err).splitlines()[0]
    aside = lockfile.with_name(f"dvc.lock.torn-{time.strftime('%Y%m%d-%H%M%S')}")
    lockfile.rename(aside)
    return (
        f"{lockfile} was torn by a killed write ({why}); moved to {aside.name}: the next `dvc repro` restores "
        "the stages' outputs from DVC's run cache"
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="diffusion unlock", description=__doc__.splitlines()[0])
    parser.add_argument("--repo", default=".", help="the DVC repository (default: .)")
    args = parser.parse_args(argv)
    torn = set_aside_torn_lockfile(Path(args.repo))
    for line in release_stale_locks(Path(args.repo)) + ([torn] if torn else []):
        print(f"diffusion unlock: {line}")
    return 0
