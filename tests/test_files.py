"""Atomic writes killed with SIGKILL: the target is untouched, and the temp file they leave is
what :func:`~diffusion.files.remove_stale_temps` deletes (and nothing else)."""

from faults import kill_mid_write

from diffusion.files import atomic_write, remove_stale_temps


def test_stale_temp_files_of_killed_writers_are_removed_and_nothing_else(tmp_path):
    with atomic_write(tmp_path / "ckpt-00000010.pt") as fh:
        fh.write(b"good checkpoint")
    left = [kill_mid_write(tmp_path / "ckpt-00000010.pt"), kill_mid_write(tmp_path / "run.json", size=10)]
    assert (tmp_path / "ckpt-00000010.pt").read_bytes() == b"good checkpoint"  # the kill left the old file
    keep = ["ckpt-00000010.pt", ".lock", "notes.tmp", ".notes.tmp", ".ckpt.pt.short.tmp", ".ckpt.pt.abcdefgh.tmp.bak"]
    for name in keep[1:]:
        (tmp_path / name).write_text("not a temp file of atomic_write")

    assert remove_stale_temps(tmp_path) == sorted(left)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)
    assert remove_stale_temps(tmp_path) == []
    assert remove_stale_temps(tmp_path / "absent") == []
