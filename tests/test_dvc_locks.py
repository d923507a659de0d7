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
