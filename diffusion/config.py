"""The validated, typed config that params.yaml becomes.

Every section of params.yaml is one pydantic model with ``extra="forbid"``, so an
unknown key, a wrong type or a value out of range fails at load time with a
one-line message naming the key and what is allowed (:class:`ConfigError`).
Cross-field rules (image size vs. down-sampling, learned variance vs. loss,
sampler steps vs. T) live in :meth:`Params.check_combinations`.

Names and rules that code also uses come from that code's torch-free tables, never a
copy: schedules from :data:`diffusion.schedules.BETA_SCHEDULES`, samplers from
:data:`diffusion.sampler_table.SAMPLERS`, and the process options and how they combine
from :mod:`diffusion.process_options`.

Stages receive these objects; they never parse params.yaml themselves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from diffusion.errors import UserError
from diffusion.model_configs import UNET_CONFIGS, check_unet, resolved_unet
from diffusion.process_options import Loss, Prediction, Variance, check_combination, names
from diffusion.sampler_table import SAMPLERS
from diffusion.schedules import BETA_SCHEDULES

Device = Literal["auto", "cpu", "cuda"]
# Literal[("a", "b")] is Literal["a", "b"]: the allowed names, read from their one source.
ScheduleName = Literal[tuple(BETA_SCHEDULES)]
PredictionName = Literal[names(Prediction)]
VarianceName = Literal[names(Variance)]
LossName = Literal[names(Loss)]
SamplerName = Literal[tuple(SAMPLERS)]


class ConfigError(UserError, ValueError):
    """A params file that cannot be run; the message is one line naming the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataParams(_Section):
    source: Literal["mnist5k", "mnist", "fashion-mnist", "cifar10", "cifar100", "imagefolder"] = "mnist5k"
    root: str | None = None
    image_size: int = Field(28, ge=8, le=1024)
    holdout: int = Field(500, ge=0)
    reference_images: int = Field(1000, ge=2)
    seed: int = 0


class ModelParams(_Section):
    name: str = "unet-small"
    overrides: dict[str, Any] = Field(default_factory=dict)
    class_conditional: bool = False


class DiffusionParams(_Section):
    schedule: ScheduleName = "cosine"
    timesteps: int = Field(1000, ge=2, le=100_000)
    zero_terminal_snr: bool = False
    prediction: PredictionName = "eps"
    variance: VarianceName = "fixed_small"
    loss: LossName = "mse"


class TrainParams(_Section):
    steps: int = Field(3000, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(100, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    ema_warmup: bool = True
    timestep_sampler: Literal["uniform", "loss-aware"] = "uniform"
    hflip: bool = False
    seed: int = 0
    device: Device = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    channels_last: bool = False
    checkpoint_every: int = Field(500, ge=1)
    log_every: int = Field(50, ge=1)
    bpd_images: int = Field(64, ge=0)
    val_every: int = Field(50, ge=1)
    val_images: int = Field(128, ge=0)


class SampleParams(_Section):
    num_samples: int = Field(500, ge=1)
    batch_size: int = Field(250, ge=1)
    sampler: SamplerName = "ddim"
    steps: int = Field(50, ge=1)
    eta: float = Field(0.0, ge=0)
    clip_denoised: bool = True
    threshold: float | None = Field(None, gt=0.5, le=1.0)
    seed: int = Field(0, ge=0)  # image k is drawn from its own seed (seed, k): see diffusion.image_noise
    device: Device = "auto"
    grid_rows: int = Field(10, ge=1)


class EvaluateParams(_Section):
    kid: bool = True
    batch_size: int = Field(50, ge=1)
    device: Device = "auto"


class TrackingParams(_Section):
    experiment: str = "diffusion"
    log_model: bool = True


class SearchDim(_Section):
    """One dimension of the sweep's search space (Optuna's suggest_* arguments)."""

    type: Literal["categorical", "float", "int"]
    choices: list[Any] | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False

    @model_validator(mode="after")
    def check_bounds(self) -> SearchDim:
        if self.type == "categorical" and not self.choices:
            raise ValueError("categorical needs a non-empty 'choices' list")
        if self.type != "categorical" and (self.low is None or self.high is None or self.low >= self.high):
            raise ValueError(f"{self.type} needs 'low' < 'high'")
        return self


class SweepParams(_Section):
    """The Optuna sweep (flows/sweep.py): study, storage, objectives, search space."""

    study_name: str = "diffusion-sweep"
    storage: str | None = None  # None: a journal file in .optuna/; or an RDB URL / "journal:<path>"
    n_trials: int = Field(8, ge=1)
    concurrency: int = Field(1, ge=1)
    objectives: list[Literal["fid", "sampling_cost"]] = ["fid"]
    pruning: bool = True
    space: dict[str, SearchDim] = Field(default_factory=dict)


class Params(_Section):
    data: DataParams = DataParams()
    model: ModelParams = ModelParams()
    diffusion: DiffusionParams = DiffusionParams()
    train: TrainParams = TrainParams()
    sample: SampleParams = SampleParams()
    evaluate: EvaluateParams = EvaluateParams()
    tracking: TrackingParams = TrackingParams()
    sweep: SweepParams = SweepParams()

    @model_validator(mode="after")
    def check_combinations(self) -> Params:
        for path in self.sweep.space:
            _check_param_path(path)
        _check_model(self.model, self.data.image_size)
        d = self.diffusion
        check_combination(
            d.prediction, d.variance, d.loss, zero_terminal_snr=d.zero_terminal_snr, prefix="diffusion."
        )
        if d.schedule == "linear" and d.timesteps < 20:
            raise ValueError(
                f"diffusion.timesteps: the linear schedule scales its last beta by 1000/T, reaching 1 below "
                f"T=20; got {d.timesteps}, allowed 20..100000 (or another schedule)"
            )
        if self.sample.sampler == "ddim" and self.sample.eta > 1:
            raise ValueError(f"sample.eta: {self.sample.eta} is outside DDIM's range; allowed 0..1")
        if self.sample.steps > d.timesteps:
            raise ValueError(
                f"sample.steps: {self.sample.steps} is more than diffusion.timesteps "
                f"({d.timesteps}); allowed 1..{d.timesteps}"
            )
        return self


def _check_model(model: ModelParams, image_size: int) -> None:
    """The named network exists, its overrides are constructor arguments of the right
    type and range, and its shape fits ``data.image_size``."""
    if model.name not in UNET_CONFIGS:
        raise ValueError(f"model.name: got '{model.name}'; allowed {', '.join(UNET_CONFIGS)}")
    check_unet(image_size, **resolved_unet(model.name, model.overrides))


def _check_param_path(path: str) -> None:
    """A sweep dimension must name a real param (``model.overrides.*`` is free-form)."""
    section, _, rest = path.partition(".")
    if section not in Params.model_fields or section == "sweep" or not rest:
        raise ValueError(f"sweep.space: '{path}' is not a param; use <section>.<key>, sections: data, model, diffusion, train, sample, evaluate")
    model = Params.model_fields[section].annotation
    key = rest.split(".")[0]
    if key not in model.model_fields:
        raise ValueError(f"sweep.space: '{path}': unknown key '{key}'; allowed: {', '.join(model.model_fields)}")
    if "." in rest and not (section == "model" and key == "overrides"):
        raise ValueError(f"sweep.space: '{path}' is too deep; only model.overrides.<name> nests")


def _allowed_keys(loc: tuple) -> list[str]:
    """Field names of the section at ``loc`` (e.g. ``("train",)``)."""
    model: type[BaseModel] = Params
    for part in loc:
        model = model.model_fields[part].annotation
    return list(model.model_fields)


def _one_line(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = f"unknown key; allowed: {', '.join(_allowed_keys(first['loc'][:-1]))}"
    elif first["type"] == "literal_error":
        msg = f"got {first['input']!r}; {msg[0].lower()}{msg[1:]}"
    elif "input" in first and first["type"] != "value_error":
        msg = f"{msg} (got {first['input']!r})"
    if first["type"] == "value_error" and msg.split(":", 1)[0].count(".") == 1:
        return f"{source}: {msg}"
    return f"{source}: {key}: {msg}"


def parse_params(raw: dict[str, Any], source: str = "params") -> Params:
    """Validate a params mapping, raising :class:`ConfigError` with one line."""
    try:
        return Params.model_validate(raw or {})
    except ValidationError as err:
        raise ConfigError(_one_line(err, source)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params.yaml file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such params file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err.__class__.__name__})") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return parse_params(raw or {}, str(path))
