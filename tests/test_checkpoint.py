"""Checkpoint files: atomic writes, damaged files rejected with one line, newest file found."""

import pytest
import torch

from diffusion import checkpoint
from diffusion.checkpoint import (
    CheckpointError,
    checkpoint_path,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)


def _state(step: int) -> dict:
    return {"step": step, "w": torch.arange(1000, dtype=torch.float32) * step, "curve": [(1, 0.5)]}


def test_round_trip(tmp_path):
    path = save_checkpoint(tmp_path / "sub" / "a.pt", _state(3))
    got = load_checkpoint(path)
    assert got["step"] == 3
    assert torch.equal(got["w"], _state(3)["w"])
    assert got["curve"] == [(1, 0.5)]
    assert [p.name for p in path.parent.iterdir()] == ["a.pt"]  # no temporary left behind


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.pt: no such checkpoint file"):
        load_checkpoint(tmp_path / "nope.pt")


def test_corrupt_file(tmp_path):
    path = tmp_path / "bad.pt"
    path.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: truncated or corrupt checkpoint")
    assert "\n" not in msg


def test_truncated_file(tmp_path):
    good = save_checkpoint(tmp_path / "good.pt", _state(1))
    data = good.read_bytes()
    half = tmp_path / "half.pt"
    half.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(half)
    assert str(err.value).startswith(f"{half}: truncated or corrupt checkpoint")
    assert "\n" not in str(err.value)


def test_not_a_dict(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([1, 2], path)
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_checkpoint(path)


def test_failed_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, _state(1))
    real_save = torch.save

    def dies_half_way(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.seek(f.tell() // 2)
        f.truncate()
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", dies_half_way)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, _state(2))
    monkeypatch.undo()

    got = load_checkpoint(path)
    assert got["step"] == 1
    assert torch.equal(got["w"], _state(1)["w"])
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # the partial temp file is gone


def test_latest_and_prune(tmp_path):
    assert latest_checkpoint(tmp_path / "absent") is None
    assert latest_checkpoint(tmp_path) is None
    for step in (5, 100, 20, 7):
        save_checkpoint(checkpoint_path(tmp_path, step), _state(step))
    (tmp_path / "notes.txt").write_text("ignored")
    assert latest_checkpoint(tmp_path) == checkpoint_path(tmp_path, 100)
    prune_checkpoints(tmp_path, 2)
    assert list_checkpoints(tmp_path) == [checkpoint_path(tmp_path, 20), checkpoint_path(tmp_path, 100)]
    assert (tmp_path / "notes.txt").exists()
