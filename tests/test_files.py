"""Atomic writes killed with SIGKILL: the target is untouched, and the temp file they leave is
what :func:`~diffusion.files.remove_stale_temps` deletes (and nothing else). On a full disk
the target is untouched too, no temp file is left, and the error is one line."""

import pytest
from faults import fill_disk, kill_mid_write, small_disk

from diffusion.files import DiskFullError, atomic_write, remove_stale_temps


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


def test_a_full_disk_is_one_line_naming_the_file_and_leaves_it_as_it_was():
    with small_disk(1 << 20) as disk:
        with atomic_write(disk / "run.json") as fh:
            fh.write(b"old")
        fill_disk(disk, leave=8192)
        with pytest.raises(DiskFullError) as err, atomic_write(disk / "run.json") as fh:
            fh.write(b"x" * 20000)
        assert str(err.value).startswith(f"{disk / 'run.json'}: not written: No space left on device (")
        assert "\n" not in str(err.value)
        assert (disk / "run.json").read_bytes() == b"old"
        assert sorted(p.name for p in disk.iterdir()) == ["filler", "run.json"]
