"""`diffusion unlock` frees the DVC locks of dead and zombie processes, never of live ones."""

import json
import subprocess
import sys
import time

import psutil

from diffusion.dvc_locks import release_stale_locks, running


def test_only_the_locks_of_processes_that_no_longer_run_are_released(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        while running(zombie.pid):  # until it exits; unreaped (no wait, no poll), it is a zombie
            time.sleep(0.01)
        assert psutil.Process(zombie.pid).status() == psutil.STATUS_ZOMBIE
        assert running(live.pid) and not running(zombie.pid) and not running(dead.pid)
        holder = {pid: {"pid": pid, "cmd": f"dvc repro {pid}"} for pid in (live.pid, zombie.pid, dead.pid)}
        lock = {
            "write": {"/r/models/model.pt": holder[zombie.pid], "/r/samples/s.npz": holder[live.pid]},
            "read": {"/r/data/train.npz": [holder[dead.pid], holder[live.pid]], "/r/data/h.npz": [holder[dead.pid]]},
        }
        (tmp_path / ".dvc" / "tmp").mkdir(parents=True)
        (tmp_path / ".dvc" / "tmp" / "rwlock").write_text(json.dumps(lock))
        released = release_stale_locks(tmp_path)
        assert sorted(released) == sorted(
            f"released the DVC locks of PID {pid} (dvc repro {pid}), which no longer runs" for pid in (zombie.pid, dead.pid)
        )
        assert json.loads((tmp_path / ".dvc" / "tmp" / "rwlock").read_text()) == {
            "write": {"/r/samples/s.npz": holder[live.pid]},
            "read": {"/r/data/train.npz": [holder[live.pid]]},
        }
        assert release_stale_locks(tmp_path) == []
    finally:
        live.kill()
        live.wait()
        zombie.wait()


def test_no_lock_file_is_nothing_to_release(tmp_path):
    assert release_stale_locks(tmp_path) == []


def test_a_torn_dvc_lock_is_set_aside_and_the_next_repro_restores_from_the_run_cache(tmp_path):
    """The kill loop (tests/kill_loop.py) once left dvc.lock cut mid-write: every later
    `dvc repro` failed with "'./dvc.lock' validation failed"."""
    from conftest import run_in

    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  count:\n    cmd: python -c \"open('out.txt', 'w').write('1')\" && echo ran >> runs.log\n"
        "    deps:\n      - in.txt\n    outs:\n      - out.txt\n"
    )
    (tmp_path / "in.txt").write_text("0")
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "repro"]):
        run_in(tmp_path, *cmd)
    lockfile = tmp_path / "dvc.lock"
    lockfile.write_text(lockfile.read_text().split("    cmd:")[0])  # as a write killed part-way leaves it
    assert "validation failed" in run_in(tmp_path, "dvc", "repro", check=False).stderr

    out = run_in(tmp_path, "diffusion", "unlock").stdout
    (aside,) = tmp_path.glob("dvc.lock.torn-*")
    assert out.startswith("diffusion unlock: dvc.lock was torn by a killed write (expected a dictionary") and aside.name in out
    assert out.count("\n") == 1
    repro = run_in(tmp_path, "dvc", "repro")
    assert "skipping run, checking out outputs" in repro.stdout  # from DVC's run cache: the command did not run again
    assert (tmp_path / "runs.log").read_text() == "ran\n" and (tmp_path / "out.txt").read_text() == "1"
    assert run_in(tmp_path, "diffusion", "unlock").stdout == ""  # a valid dvc.lock stays
