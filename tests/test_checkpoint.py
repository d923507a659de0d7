"""Checkpoint files: atomic writes, damaged files (CRC, NaN) rejected with one line, NaN never
written, the newest good file found, pruning that keeps the good ones."""

import math
import re

import pytest
import torch
from faults import fill_disk, overwrite_tensor_bytes, small_disk
from tiny_unet import tiny_unet

from diffusion.files import DiskFullError
from diffusion.training.checkpoint import (
    CheckpointError,
    checkpoint_path,
    list_checkpoints,
    load_checkpoint,
    load_newest,
    prune_checkpoints,
    save_checkpoint,
)
from diffusion.packaged import PackagedDiffusion


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


def test_disk_full_mid_save_leaves_the_previous_checkpoint_readable():
    """A real ENOSPC, half-way through ``torch.save`` (which turns it into a RuntimeError):
    one line naming the file, the previous checkpoint loads as saved, no temp file is left,
    and once there is space again the save succeeds."""
    states = {step: {"step": step, "model": tiny_unet(seed=step).state_dict()} for step in (10, 20, 30)}
    with small_disk(4 << 20) as disk:
        for step in (10, 20):
            save_checkpoint(checkpoint_path(disk, step), states[step])
        size = checkpoint_path(disk, 20).stat().st_size
        filler = fill_disk(disk, leave=size // 2)
        with pytest.raises(DiskFullError) as err:
            save_checkpoint(checkpoint_path(disk, 30), states[30])
        assert re.fullmatch(
            rf"{checkpoint_path(disk, 30)}: not written: No space left on device \(\d+ bytes free in {disk}\); "
            "the file there is as it was: free some space and run it again", str(err.value),
        )
        assert sorted(p.name for p in disk.iterdir()) == ["ckpt-00000010.pt", "ckpt-00000020.pt", "filler"]
        path, state, damaged = load_newest(disk)
        assert path == checkpoint_path(disk, 20) and damaged == [] and state["step"] == 20
        assert state["model"].keys() == states[20]["model"].keys()
        assert all(torch.equal(state["model"][k], v) for k, v in states[20]["model"].items())

        filler.unlink()
        save_checkpoint(checkpoint_path(disk, 30), states[30])
        assert load_newest(disk)[0] == checkpoint_path(disk, 30)


def test_overwritten_bytes_fail_the_crc_check(tmp_path):
    """64 bytes overwritten inside a tensor: torch loads the garbage silently, the CRC-32 does not match."""
    path = save_checkpoint(tmp_path / "ckpt.pt", _state(3))
    entry = overwrite_tensor_bytes(path, bytes(64))  # zeros: finite, so only the CRC can tell
    silently = torch.load(path, weights_only=True)["w"]
    assert int((silently != _state(3)["w"]).sum()) == 16 and bool(torch.isfinite(silently).all())
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert str(err.value) == (
        f"{path}: truncated or corrupt checkpoint (ValueError: entry {entry} fails its CRC-32 check)"
    )


def test_non_finite_weights_are_refused_on_load(tmp_path):
    """A file with NaN weights and valid CRCs (written by torch.save itself, not by us)."""
    w = torch.ones(100)
    w[10:26] = math.nan
    torch.save({"step": 1, "model": {"conv.weight": w, "conv.bias": torch.ones(3)}}, tmp_path / "nan.pt")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "nan.pt")
    assert str(err.value) == f"{tmp_path / 'nan.pt'}: damaged checkpoint (16 NaN or inf values in model/conv.weight)"


def test_non_finite_weights_are_never_written(tmp_path):
    state = _state(1) | {"ema": {"model": {"w": torch.tensor([1.0, math.inf, -math.inf])}}}
    with pytest.raises(CheckpointError) as err:
        save_checkpoint(tmp_path / "ckpt.pt", state)
    assert str(err.value) == f"{tmp_path / 'ckpt.pt'}: not written: 2 NaN or inf values in ema/model/w"
    assert list(tmp_path.iterdir()) == []  # no file, no temp file

    # models/model.pt as the train stage writes it: EMA weights with NaN are refused.
    spec = {"name": "unet-tiny", "in_channels": 1, "image_size": 8, "learn_sigma": False, "num_classes": None}
    process = {"schedule": "cosine", "timesteps": 20, "prediction": "eps", "variance": "fixed_small", "loss": "mse"}
    net = tiny_unet()
    with torch.no_grad():
        net.conv_in.weight.view(-1)[:16] = math.nan
    model = tmp_path / "models" / "model.pt"
    with pytest.raises(CheckpointError, match=r"model\.pt: not written: 16 NaN or inf values in state_dict/conv_in\.weight$"):
        PackagedDiffusion(spec, process, net=net).save(model)
    assert not model.parent.exists()  # nothing written, not even the folder


def test_load_newest_skips_damaged_checkpoints(tmp_path):
    assert load_newest(tmp_path / "absent") is None
    assert load_newest(tmp_path) is None
    for step in (10, 20, 30):
        save_checkpoint(checkpoint_path(tmp_path, step), _state(step))
    newest = checkpoint_path(tmp_path, 30)
    newest.write_bytes(newest.read_bytes()[:-100])  # truncated
    overwrite_tensor_bytes(checkpoint_path(tmp_path, 20), b"\xff" * 64)

    path, state, damaged = load_newest(tmp_path)
    assert path == checkpoint_path(tmp_path, 10) and state["step"] == 10
    assert [str(err).split(": ")[0] for err in damaged] == [str(newest), str(checkpoint_path(tmp_path, 20))]
    assert "fails its CRC-32 check" in str(damaged[1])

    overwrite_tensor_bytes(checkpoint_path(tmp_path, 10), b"\xff" * 64)
    with pytest.raises(CheckpointError) as err:
        load_newest(tmp_path)
    msg = str(err.value)
    assert msg.startswith(f"{tmp_path}: none of its 3 checkpoints is readable (newest: {newest}: truncated")
    assert msg.endswith("delete them to train from scratch") and "\n" not in msg


def test_list_and_prune(tmp_path):
    for step in (5, 100, 20, 7):
        save_checkpoint(checkpoint_path(tmp_path, step), _state(step))
    (tmp_path / "notes.txt").write_text("ignored")
    assert list_checkpoints(tmp_path) == [checkpoint_path(tmp_path, s) for s in (5, 7, 20, 100)]
    prune_checkpoints(tmp_path, 2, checkpoint_path(tmp_path, 100))
    assert list_checkpoints(tmp_path) == [checkpoint_path(tmp_path, 20), checkpoint_path(tmp_path, 100)]
    assert (tmp_path / "notes.txt").exists()


def test_prune_deletes_the_damaged_checkpoints_a_resume_went_back_past(tmp_path):
    """Resumed from step 5 past damaged 10 and 15, the run wrote 6: the files past it are the
    damaged ones; counted as the newest they would leave 6 the only good checkpoint."""
    for step in (5, 10, 15, 6):
        save_checkpoint(checkpoint_path(tmp_path, step), _state(step))
    prune_checkpoints(tmp_path, 3, checkpoint_path(tmp_path, 6))
    assert list_checkpoints(tmp_path) == [checkpoint_path(tmp_path, 5), checkpoint_path(tmp_path, 6)]
    with pytest.raises(ValueError, match="is not a checkpoint of"):
        prune_checkpoints(tmp_path, 3, checkpoint_path(tmp_path, 99))
