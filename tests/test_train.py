"""The training loop on a tiny U-Net on the CPU: resume bit for bit (past damaged
checkpoints too), NaN stop, a batch too large for memory, learning."""

import math
import os
from pathlib import Path

import pytest
import torch
from faults import overwrite_tensor_bytes

from diffusion.training.checkpoint import CheckpointError, checkpoint_path, list_checkpoints, load_checkpoint, save_checkpoint
from conftest import section
from diffusion.config import TrainParams
from diffusion.training.devices import BatchMemoryError
from diffusion.packaged import PackagedDiffusion
from diffusion.process.gaussian import GaussianDiffusion
from diffusion.models.factory import create_model
from diffusion.process.schedules import make_betas
from diffusion.training.devices import native_bf16, precision_name, resolve_device, resolve_precision
from diffusion.training.reference_loss import reference_loss
from diffusion.training.loop import NonFiniteLossError, draw_batch, heldout_bpd, seeded_init, to_model_range, train, warmup_lr

T = 20
SIZE = 8
NUM_CLASSES = 3

pytestmark = pytest.mark.usefixtures("single_thread")


def _cfg(**changes) -> TrainParams:
    base = dict(
        steps=20, batch_size=4, lr=1e-3, warmup_steps=4, log_every=2, checkpoint_every=5,
        ema_decay=0.9, ema_warmup=True, hflip=True, seed=7, device="cpu", precision="fp32", bpd_images=0,
    )
    return section("train", **(base | changes))


def _model(*, num_classes=None, learn_sigma=False, dropout=0.1):
    torch.manual_seed(0)
    return create_model(
        "unet-tiny", in_channels=1, image_size=SIZE, learn_sigma=learn_sigma, num_classes=num_classes, dropout=dropout
    )


def _diffusion(variance="fixed_small", loss="mse"):
    return GaussianDiffusion(make_betas("cosine", T, False), prediction="eps", variance=variance, loss=loss)


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (32, 1, SIZE, SIZE), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, NUM_CLASSES, (32,), generator=g)
    return images, labels


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ---------------------------------------------------------------- small functions


def test_warmup_lr():
    assert warmup_lr(1, 1e-3, 4) == pytest.approx(2.5e-4)
    assert warmup_lr(2, 1e-3, 4) == pytest.approx(5e-4)
    assert warmup_lr(4, 1e-3, 4) == pytest.approx(1e-3)
    assert warmup_lr(1000, 1e-3, 4) == pytest.approx(1e-3)
    assert warmup_lr(1, 1e-3, 0) == 1e-3


def test_resolve_device_and_precision():
    cpu = torch.device("cpu")
    assert resolve_device("cpu") == cpu
    flags = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()
    native = bool(flags & {"avx512_bf16", "amx_tile"}) if flags else native_bf16(cpu)  # Linux: the kernel's word
    assert native_bf16(cpu) == native
    assert resolve_precision("auto", cpu) == (torch.bfloat16 if native else torch.float32)
    assert precision_name(resolve_precision("auto", cpu)) == ("bf16" if native else "fp32")
    assert resolve_precision("bf16", cpu) == torch.bfloat16
    assert resolve_precision("fp32", cpu) == torch.float32
    with pytest.raises(ValueError, match="precision: got 'fp16'"):
        resolve_precision("fp16", cpu)
    with pytest.raises(ValueError, match="device: got 'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == cpu
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            resolve_device("cuda")


def test_draw_batch_flips_and_label_drop(data):
    images, labels = data
    g = torch.Generator().manual_seed(0)
    x, y = draw_batch(images, labels, 64, g, hflip=True, null_condition=NUM_CLASSES, label_drop=0.5)
    assert x.dtype == torch.float32 and x.shape == (64, 1, SIZE, SIZE)
    assert x.min() >= -1 and x.max() <= 1
    scaled = images.float() / 127.5 - 1
    plain = (x[:, None] == scaled[None]).flatten(2).all(2).any(1)
    flipped = (x[:, None] == scaled.flip(3)[None]).flatten(2).all(2).any(1)
    assert bool((plain | flipped).all())
    assert 10 < int(flipped.sum()) < 54 and 10 < int(plain.sum()) < 54
    assert 10 < int((y == NUM_CLASSES).sum()) < 54
    _, y_all = draw_batch(images, labels, 16, g, hflip=False, null_condition=NUM_CLASSES, label_drop=1.0)
    assert bool((y_all == NUM_CLASSES).all())
    x_none, y_none = draw_batch(images, labels, 16, g, hflip=False, null_condition=None)
    assert y_none is None and bool((x_none[:, None] == scaled[None]).flatten(2).all(2).any(1).all())


# ---------------------------------------------------------------- resume


def _run(tmp, data, cfg, *, caller_seed=123, **kw):
    """Train a class-conditional, learned-variance model; the caller's RNG is set to ``caller_seed``."""
    images, labels = data
    model = _model(num_classes=NUM_CLASSES, learn_sigma=True)
    torch.manual_seed(caller_seed)
    caller_rng = torch.get_rng_state()
    result = train(
        model, _diffusion("learned_range", "hybrid"), images, labels, cfg,
        checkpoint_dir=tmp, conditional=True, progress=False, **kw,
    )
    assert torch.equal(torch.get_rng_state(), caller_rng)  # train() leaves the caller's RNG alone
    return model, result


def test_resume_is_bit_for_bit(tmp_path, data):
    """10 steps, then fresh objects resume and run 10 more == 20 straight steps."""
    # log_every=3: the resume at 10 falls inside a log window, which must carry over.
    # Each call sees a different caller RNG: none may leak into the trajectory.
    every = {"log_every": 3, "ema_snapshot_every": 5}
    straight, straight_result = _run(tmp_path / "straight", data, _cfg(steps=20, **every), caller_seed=1)
    _run(tmp_path / "split", data, _cfg(steps=10, **every), caller_seed=2)
    resumed, resumed_result = _run(tmp_path / "split", data, _cfg(steps=20, **every), caller_seed=3)

    _assert_same_weights(_state(straight), _state(resumed))
    _assert_same_weights(straight_result.ema_model.state_dict(), resumed_result.ema_model.state_dict())
    assert resumed_result.loss_curve == straight_result.loss_curve
    assert [s for s, _ in straight_result.loss_curve] == [3, 6, 9, 12, 15, 18]
    assert resumed_result.loss == straight_result.loss
    assert resumed_result.step == 20 and resumed_result.checkpoint == checkpoint_path(tmp_path / "split", 20)
    assert not torch.equal(straight.conv_out.weight, straight_result.ema_model.conv_out.weight)
    # The power function EMAs' snapshots (train.ema_lengths) resume with the checkpoint.
    snapshots = [(s["sigma_rel"], s["step"]) for s in resumed_result.ema_snapshots]
    assert snapshots == [(length, step) for step in (5, 10, 15, 20) for length in (0.05, 0.1)]
    for ours, theirs in zip(resumed_result.ema_snapshots, straight_result.ema_snapshots, strict=True):
        _assert_same_weights(ours["state_dict"], theirs["state_dict"])


def test_resume_uses_saved_dropout_rng(tmp_path, data):
    """Control for the test above: changing the saved global RNG (dropout) changes the result."""
    straight, _ = _run(tmp_path / "straight", data, _cfg(steps=12))
    _run(tmp_path / "split", data, _cfg(steps=10))
    path = checkpoint_path(tmp_path / "split", 10)
    state = load_checkpoint(path)
    state["rng_cpu"] = torch.Generator().manual_seed(5).get_state()
    save_checkpoint(path, state)
    resumed, _ = _run(tmp_path / "split", data, _cfg(steps=12))
    assert not torch.equal(straight.conv_out.weight, resumed.conv_out.weight)


def test_checkpoints_kept_and_finished_run_not_rerun(tmp_path, data):
    images, labels = data
    cfg = _cfg(steps=12, checkpoint_every=3, log_every=4, timestep_sampler="loss-aware")
    first = train(_model(), _diffusion(), images, labels, cfg, checkpoint_dir=tmp_path, progress=False)
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "ckpt-00000006.pt", "ckpt-00000009.pt", "ckpt-00000012.pt"
    ]
    state = load_checkpoint(first.checkpoint)
    assert state["step"] == 12
    assert state["loss_curve"] == first.loss_curve and [s for s, _ in first.loss_curve] == [4, 8, 12]
    assert {"model", "ema", "optimizer", "timestep_sampler", "data_generator", "rng_cpu", "log_window"} <= state.keys()
    assert int(state["timestep_sampler"]["counts"].sum()) == 12 * 4  # every loss seen so far
    assert first.img_per_s > 0

    again = train(_model(), _diffusion(), images, labels, cfg, checkpoint_dir=tmp_path, progress=False)
    assert again.step == 12 and again.loss_curve == first.loss_curve and again.img_per_s is None
    _assert_same_weights(again.ema_model.state_dict(), first.ema_model.state_dict())


# ---------------------------------------------------------------- damaged checkpoints


def _non_finite(obj) -> int:
    """NaN and inf values in every floating tensor of nested dicts and lists."""
    if isinstance(obj, torch.Tensor):
        return int((~torch.isfinite(obj)).sum()) if obj.is_floating_point() else 0
    if isinstance(obj, dict | list | tuple):
        return sum(_non_finite(v) for v in (obj.values() if isinstance(obj, dict) else obj))
    return 0


def _overwrite_64_bytes(path: Path) -> None:
    """What was seen on main: 64 bytes of 0xff inside a tensor; torch.load reads 16 NaN without complaint."""
    overwrite_tensor_bytes(path, b"\xff" * 64)
    assert _non_finite(torch.load(path, weights_only=True)) == 16


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage", [_overwrite_64_bytes, _truncate], ids=["overwritten", "truncated"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, data, capsys, damage):
    """Resume skips the damaged ckpt-10 with one warning naming it and ckpt-5, and continues
    the same trajectory from ckpt-5: the result equals 15 straight steps bit for bit."""
    straight, straight_result = _run(tmp_path / "straight", data, _cfg(steps=15))
    _run(tmp_path / "split", data, _cfg(steps=10))
    damage(checkpoint_path(tmp_path / "split", 10))
    capsys.readouterr()
    resumed, resumed_result = _run(tmp_path / "split", data, _cfg(steps=15))

    out = capsys.readouterr()
    (warning,) = out.err.splitlines()
    bad, good = checkpoint_path(tmp_path / "split", 10), checkpoint_path(tmp_path / "split", 5)
    assert warning.startswith(f"train: warning: {bad}: truncated or corrupt checkpoint (")
    assert warning.endswith(f"; resuming from the older {good}")
    assert f"resuming from {good} at step 5" in out.out
    _assert_same_weights(_state(straight), _state(resumed))
    _assert_same_weights(straight_result.ema_model.state_dict(), resumed_result.ema_model.state_dict())
    assert resumed_result.loss_curve == straight_result.loss_curve
    assert [load_checkpoint(p)["step"] for p in list_checkpoints(tmp_path / "split")] == [5, 10, 15]


def test_pruning_keeps_good_checkpoints_when_newer_ones_are_damaged(tmp_path, data, capsys):
    """ckpt-10 and ckpt-15 damaged: the resume from ckpt-5 (checkpoints now every 3 steps)
    must end with the newest three good checkpoints, not with the damaged ones kept."""
    straight, _ = _run(tmp_path / "straight", data, _cfg(steps=15))
    _run(tmp_path / "split", data, _cfg(steps=15))
    for step in (10, 15):
        _overwrite_64_bytes(checkpoint_path(tmp_path / "split", step))
    capsys.readouterr()
    resumed, _ = _run(tmp_path / "split", data, _cfg(steps=15, checkpoint_every=3))

    warnings = capsys.readouterr().err.splitlines()
    assert [w.split(": ")[2] for w in warnings] == [str(checkpoint_path(tmp_path / "split", s)) for s in (15, 10)]
    assert all(w.endswith(f"resuming from the older {checkpoint_path(tmp_path / 'split', 5)}") for w in warnings)
    _assert_same_weights(_state(straight), _state(resumed))
    assert [load_checkpoint(p)["step"] for p in list_checkpoints(tmp_path / "split")] == [9, 12, 15]


def test_no_readable_checkpoint_is_one_line_and_trains_nothing(tmp_path, data):
    _run(tmp_path, data, _cfg(steps=10))
    for step in (5, 10):
        _overwrite_64_bytes(checkpoint_path(tmp_path, step))
    before = {p: p.read_bytes() for p in list_checkpoints(tmp_path)}
    with pytest.raises(CheckpointError) as err:
        _run(tmp_path, data, _cfg(steps=15))
    msg = str(err.value)
    assert msg.startswith(f"{tmp_path}: none of its 2 checkpoints is readable (newest: {checkpoint_path(tmp_path, 10)}: ")
    assert "\n" not in msg
    assert {p: p.read_bytes() for p in list_checkpoints(tmp_path)} == before


@pytest.mark.parametrize("key", ["loss_curve", "val_curve", "posthoc_ema"])
def test_checkpoint_missing_a_key_is_one_line(tmp_path, data, key):
    """A checkpoint of an older version, without ``loss_curve`` (or the newer ``val_curve``)."""
    _run(tmp_path, data, _cfg(steps=5))
    path = checkpoint_path(tmp_path, 5)
    state = load_checkpoint(path)
    del state[key]
    save_checkpoint(path, state)
    with pytest.raises(CheckpointError) as err:
        _run(tmp_path, data, _cfg(steps=10))
    assert str(err.value) == f"{path}: not a training checkpoint of this version (no key {key!r})"


def test_training_checkpoint_is_not_a_model_file(tmp_path, data):
    _run(tmp_path, data, _cfg(steps=5))
    path = checkpoint_path(tmp_path, 5)
    with pytest.raises(CheckpointError) as err:
        PackagedDiffusion.load(path)
    assert str(err.value) == (
        f"{path}: not a model file (no key 'model_spec'): give the models/model.pt that train writes, "
        "not a training checkpoint"
    )


# ---------------------------------------------------------------- failures


@pytest.mark.skipif(
    Path("/proc/sys/vm/overcommit_memory").read_text().strip() == "1",
    reason="with unconditional overcommit the allocation succeeds and the kernel kills the process later",
)
def test_batch_too_large_for_memory_is_one_line(tmp_path, data):
    """A batch whose first allocation (8 bytes an index) is twice the machine's memory:
    the allocator refuses it at once, in the first step, and nothing is written."""
    images, labels = data
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    batch_size = memory // 4
    with pytest.raises(BatchMemoryError) as err:
        train(_model(), _diffusion(), images, labels, _cfg(batch_size=batch_size), checkpoint_dir=tmp_path,
              progress=False)
    assert str(err.value) == (
        f"train.batch_size: {batch_size} does not fit in cpu memory (tried to allocate {batch_size * 8} bytes); "
        "allowed: a smaller train.batch_size"
    )
    assert list_checkpoints(tmp_path) == []


class NaNAtCall(torch.nn.Module):
    """Wraps a model; its ``k``-th call (1-based) returns NaN."""

    def __init__(self, model, k):
        super().__init__()
        self.model, self.k, self.calls = model, k, 0

    def forward(self, x, t, y=None):
        self.calls += 1
        out = self.model(x, t, y)
        return out * math.nan if self.calls == self.k else out


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, data):
    images, labels = data
    cfg = _cfg(steps=20, checkpoint_every=3)
    with pytest.raises(NonFiniteLossError) as err:
        train(NaNAtCall(_model(), 8), _diffusion(), images, labels, cfg, checkpoint_dir=tmp_path, progress=False)
    msg = str(err.value)
    good = checkpoint_path(tmp_path, 6)
    assert msg.startswith("step 8: non-finite loss (nan)") and str(good) in msg and "\n" not in msg
    assert latest_checkpoint_step(tmp_path) == 6
    state = load_checkpoint(good)
    assert state["step"] == 6
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def latest_checkpoint_step(directory):
    return load_checkpoint(list_checkpoints(directory)[-1])["step"]


def test_non_finite_before_any_checkpoint(tmp_path, data):
    images, labels = data
    with pytest.raises(NonFiniteLossError, match=r"step 2: .*last good checkpoint: none written yet"):
        train(NaNAtCall(_model(), 2), _diffusion(), images, labels, _cfg(), checkpoint_dir=tmp_path, progress=False)
    assert list_checkpoints(tmp_path) == []


def test_bad_inputs_fail_with_one_line(tmp_path, data):
    images, labels = data
    cfg = _cfg(steps=1)
    with pytest.raises(ValueError, match=r"train: images must be a uint8 \(images\) or float \(latents\) tensor \[N, C, H, W\]; got torch.int64"):
        train(_model(), _diffusion(), images.long(), labels, cfg, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="needs a model built with num_classes"):
        train(_model(), _diffusion(), images, labels, cfg, checkpoint_dir=tmp_path, conditional=True,
              progress=False)
    with pytest.raises(ValueError, match=r"labels must lie in 0\.\.1 \(the model's classes\); got 0\.\.2"):
        train(_model(num_classes=2), _diffusion(), images, labels, cfg, checkpoint_dir=tmp_path,
              conditional=True, progress=False)
    assert list_checkpoints(tmp_path) == []


def test_checkpoint_of_another_model_is_refused(tmp_path, data):
    images, labels = data
    train(_model(), _diffusion(), images, labels, _cfg(steps=1), checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(CheckpointError) as err:
        train(_model(num_classes=NUM_CLASSES), _diffusion(), images, labels, _cfg(steps=2),
              checkpoint_dir=tmp_path, conditional=True, progress=False)
    msg = str(err.value)
    assert msg.startswith(f"{checkpoint_path(tmp_path, 1)}: does not fit this model/config") and "\n" not in msg


# ---------------------------------------------------------------- learning


def test_loss_falls_on_a_learnable_dataset(tmp_path):
    """Every image is the same pattern: the loss must drop well below its start."""
    pattern = torch.zeros(1, SIZE, SIZE, dtype=torch.uint8)
    pattern[:, :, SIZE // 2 :] = 255
    images = pattern.expand(16, -1, -1, -1).clone()
    logs = []
    cfg = _cfg(steps=60, batch_size=8, lr=2e-3, log_every=10, checkpoint_every=60, hflip=False, bpd_images=4)
    result = train(
        _model(dropout=0.0), _diffusion(), images, None, cfg, checkpoint_dir=tmp_path,
        heldout_images=images[:4], log=lambda step, m: logs.append((step, m)), progress=False,
    )
    first, last = result.loss_curve[0][1], result.loss_curve[-1][1]
    assert last < 0.3 * first, result.loss_curve  # about 0.18 of it with seeds 7-9
    assert result.loss == last
    logs = [(step, m) for step, m in logs if "loss" in m]  # val_loss has its own log points
    assert [s for s, _ in logs] == list(range(10, 61, 10))
    assert set(logs[0][1]) == {"loss", "mse", "grad_norm", "lr", "img_per_s"}
    assert logs[0][1]["lr"] == pytest.approx(2e-3)  # warm-up over after 4 steps
    assert all(m["grad_norm"] > 0 and m["img_per_s"] > 0 for _, m in logs)
    expected = heldout_bpd(result.ema_model, _diffusion(), images[:4], batch_size=8, seed=cfg.seed)
    untrained = heldout_bpd(_model(dropout=0.0), _diffusion(), images[:4], batch_size=8, seed=cfg.seed)
    assert result.bpd == expected and 0 < result.bpd < 0.5 * untrained, (result.bpd, untrained)


def test_bf16_channels_last_smoke(tmp_path, data):
    images, labels = data
    logs = []
    cfg = _cfg(steps=2, log_every=1, precision="bf16", channels_last=True, grad_clip=None)
    model = _model()
    train(model, _diffusion(), images, labels, cfg, checkpoint_dir=tmp_path, log=lambda s, m: logs.append(m),
          progress=False)
    assert model.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert [m["lr"] for m in logs] == pytest.approx([warmup_lr(1, 1e-3, 4), warmup_lr(2, 1e-3, 4)])
    assert all(math.isfinite(m["loss"]) and m["grad_norm"] > 0 for m in logs)


def test_reference_loss_is_logged_falls_and_leaves_the_trajectory_alone(tmp_path):
    """val_loss every val_every steps, on the EMA model; training with it equals training without it."""
    pattern = torch.zeros(1, SIZE, SIZE, dtype=torch.uint8)
    pattern[:, :, SIZE // 2 :] = 255
    images = pattern.expand(16, -1, -1, -1).clone()
    cfg = _cfg(steps=60, batch_size=8, lr=2e-3, log_every=10, checkpoint_every=60, bpd_images=0, val_every=20, val_images=8)
    logs = []
    result = train(
        _model(dropout=0.0), _diffusion(), images, None, cfg, checkpoint_dir=tmp_path / "a",
        heldout_images=images[:8], log=lambda step, m: logs.append((step, m)), progress=False,
    )
    val = [(step, m["val_loss"]) for step, m in logs if "val_loss" in m]
    assert [step for step, _ in val] == [20, 40, 60] and result.val_curve == val
    assert val[-1][1] < 0.5 * val[0][1], val
    assert val[-1][1] == reference_loss(result.ema_model, _diffusion(), to_model_range(images[:8]), seed=cfg.seed)
    without = train(
        _model(dropout=0.0), _diffusion(), images, None, cfg.model_copy(update={"val_images": 0}),
        checkpoint_dir=tmp_path / "b", heldout_images=images[:8], progress=False,
    )
    assert without.val_curve == []
    for a, b in zip(result.ema_model.state_dict().values(), without.ema_model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_seeded_init_gives_each_seed_its_own_weights():
    def weights(seed):
        with seeded_init(seed):
            model = create_model("unet-tiny", in_channels=1, image_size=SIZE)
        return torch.cat([p.flatten() for p in model.parameters()])

    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    first = weights(0)
    assert torch.equal(torch.rand(3), before)  # the caller's RNG stream is untouched
    assert torch.equal(first, weights(0))
    assert not torch.equal(first, weights(1))


@pytest.mark.parametrize("process", ["vp", "edm", "flow"])
def test_reference_loss_on_a_continuous_process_asks_at_the_exact_times_of_the_levels(process):
    """val_loss on a continuous process: each reference level at the time whose log-SNR it is,
    x_t of the process itself, ε̂ from the prediction; an oracle of the flow scores 0."""
    import numpy as np

    from diffusion.process.factory import make_diffusion
    from diffusion.training.reference_loss import reference_log_snr, reference_times

    diffusion = make_diffusion({"process": process, "schedule": None, "prediction": None, "sigma_data": 0.5})
    p = diffusion.process
    t = torch.as_tensor(reference_times(p, reference_log_snr()), dtype=torch.float64)
    alpha, sigma = p.alpha_sigma(t)
    np.testing.assert_allclose((2 * (alpha / sigma).log()).numpy(), reference_log_snr(), rtol=1e-9, atol=1e-9)
    x0 = torch.rand(32, 1, SIZE, SIZE) * 2 - 1
    model = _model()
    loss = reference_loss(model, diffusion, x0, seed=3)
    assert math.isfinite(loss) and loss == reference_loss(model, diffusion, x0, seed=3)
    if process == "flow":  # x_0 = 0: x_t = t ε, so the velocity ε - x_0 is x_t / t, with t = network time / 999
        oracle = torch.nn.Linear(1, 1)  # only for its parameters' device
        oracle.forward = lambda x, time: x / (time.double() / 999).view(-1, 1, 1, 1).to(x.dtype)
        assert reference_loss(oracle, diffusion, torch.zeros(32, 1, SIZE, SIZE)) == pytest.approx(0.0, abs=1e-8)
