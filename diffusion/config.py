"""The validated, typed config that params.yaml becomes.

Every section of params.yaml is one pydantic model with ``extra="forbid"``, so an
unknown key, a wrong type or a value out of range fails at load time with a
one-line message naming the key and what is allowed (:class:`ConfigError`).
Cross-field rules (image size vs. down-sampling, learned variance vs. loss,
sampler steps vs. T) live in :meth:`Params.check_combinations`.

Names and rules that code also uses come from that code's torch-free tables, never a
copy: schedules from :data:`diffusion.process.schedules.BETA_SCHEDULES`, samplers from
:data:`diffusion.sampling.specs.SAMPLER_SPECS`, and the process options and how they combine
from :mod:`diffusion.process.options`.

Every key is required and none has a default here: the committed params.yaml is the
one place the embedded default's numbers live, so an empty or partial params.yaml is
a one-line error naming the first missing key, never a run on a second set of numbers.

Stages receive these objects; they never parse params.yaml themselves.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from diffusion.errors import UserError
from diffusion.models.configs import (
    CLASSIFIER_CONFIGS, FAMILY_OF, VAE_CONFIGS, check_model, check_unet, diffusers_autoencoder_config, family, latent_shape,
)
from diffusion.process.options import (
    Loss, Prediction, Process, Variance, check_combination, check_threshold, loss_weighting_name, names,
    process_option, time_max,
)
from diffusion.sampling.specs import (
    CHURN_OPTIONS, FITTED, SAMPLER_SPECS, SCHEDULE_NAMES, STEP_SCHEDULE_NAMES, eta_refused, fitted_refused, options_refused,
)
from diffusion.process.schedules import BETA_SCHEDULES

Device = Literal["auto", "cpu", "cuda"]
# Literal[("a", "b")] is Literal["a", "b"]: the allowed names, read from their one source.
ScheduleName = Literal[tuple(BETA_SCHEDULES)]
ProcessName = Literal[names(Process)]
PredictionName = Literal[names(Prediction)]
VarianceName = Literal[names(Variance)]
LossName = Literal[names(Loss)]
SamplerName = Literal[tuple(SAMPLER_SPECS)]
StepScheduleName = Literal[STEP_SCHEDULE_NAMES]
ScheduleChoice = Literal[SCHEDULE_NAMES]
ClassifierName = Literal[tuple(CLASSIFIER_CONFIGS)]
VaeName = Literal[tuple(VAE_CONFIGS)]


MAX_EMA_LENGTH = 12**-0.5
"""The longest relative length σ_rel of a power function EMA, that of exponent γ = 0 (the plain
average of all steps; EDM2 Eq. 123): diffusion/training/posthoc_ema.py."""


class ConfigError(UserError, ValueError):
    """A params file that cannot be run; the message is one line naming the key."""


class _Section(BaseModel):
    # allow_inf_nan: YAML's .inf and .nan pass every range (inf > 0) and fail only in a stage.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


CAPTION_SOURCES = {"measured": ("mnist5k", "mnist"), "metadata": ("imagefolder",)}
"""The data sources each ``data.captions`` reads captions from (diffusion/data/captions.py)."""


class DataParams(_Section):
    source: Literal["mnist5k", "mnist", "fashion-mnist", "cifar10", "cifar100", "imagefolder"]
    root: str | None
    image_size: int = Field(ge=8, le=1024)
    holdout: int = Field(ge=0)
    reference_images: int = Field(ge=2)
    seed: int
    captions: Literal[tuple(CAPTION_SOURCES)] | None  # measured: from the digits' pixels; metadata: the image folder's file

    @model_validator(mode="before")
    @classmethod
    def resolve_auto_captions(cls, raw: Any) -> Any:
        """``auto``: measured for a digit source, none for any other (an image folder's metadata
        file is named explicitly); the validated config holds what was resolved."""
        if isinstance(raw, dict) and raw.get("captions") == "auto":
            measured = raw.get("source") in CAPTION_SOURCES["measured"]
            raw = {**raw, "captions": "measured" if measured else None}
        return raw

    @model_validator(mode="after")
    def check_captions(self) -> DataParams:
        if self.captions is not None and self.source not in CAPTION_SOURCES[self.captions]:
            allowed = [name for name, sources in CAPTION_SOURCES.items() if self.source in sources] + ["null"]
            raise ValueError(
                f"data.captions: {self.captions} captions need data.source {' or '.join(CAPTION_SOURCES[self.captions])}; "
                f"with {self.source} allowed: {' | '.join(allowed)}"
            )
        return self


class ModelParams(_Section):
    name: str
    overrides: dict[str, Any]
    conditioning: Literal["none", "class", "text"]  # class: the labels; text: the captions (the text section)
    space: Literal["pixel", "latent"]  # latent: diffusion on the autoencoder's latents (the vae section)


class TextParams(_Section):
    """The text encoder of a text-conditional model (model.conditioning text; diffusion/models/text.py)."""

    encoder: str  # char-transformer (learned with the model) | a folder of a Hugging Face text encoder (frozen)
    overrides: dict[str, Any]  # the encoder's arguments, e.g. {width: 128, depth: 2, max_length: 48}
    cache: bool  # a pretrained encoder: its embeddings of the training captions computed once (stage encode_text)


class VaeParams(_Section):
    """The autoencoder of latent diffusion (stages train_vae and encode; used when model.space is latent)."""

    name: VaeName  # diffusion/models/configs.py: VAE_CONFIGS
    pretrained: str | None  # a diffusers AutoencoderKL folder (config.json + weights) used instead of training
    steps: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    lr: float = Field(gt=0)
    kl_weight: float = Field(ge=0)  # beta of recon + beta * KL (both per pixel value)
    seed: int
    device: Device
    precision: Literal["auto", "fp32", "bf16"]
    log_every: int = Field(ge=1)
    checkpoint_every: int = Field(ge=1)
    grid_images: int = Field(ge=1)  # held-out images in the reconstructions grid
    posterior: Literal["mean", "sample"]  # encode: the posterior's mean, or a draw from it (seeded)
    encode_batch_size: int = Field(ge=1)


class DiffusionParams(_Section):
    process: ProcessName  # diffusion/process/options.py: PROCESS_OPTIONS says what each allows
    schedule: ScheduleName | None  # null: the process's own (none for edm and flow)
    timesteps: int = Field(ge=2, le=100_000)  # the discrete chain's T (process ddpm)
    zero_terminal_snr: bool
    prediction: PredictionName | None  # null: the process's own
    variance: VarianceName
    loss: LossName
    sigma_data: float = Field(gt=0)  # EDM's σ_data (Karras et al. 2022, Table 1)


class TrainParams(_Section):
    steps: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    lr: float = Field(gt=0)
    weight_decay: float = Field(ge=0)
    warmup_steps: int = Field(ge=0)
    grad_clip: float | None = Field(gt=0)
    ema_decay: float = Field(ge=0, lt=1)
    ema_warmup: bool
    ema_lengths: list[float]  # σ_rel of the power function EMAs whose snapshots sample.ema_length reconstructs from (EDM2); []: none
    ema_snapshot_every: int = Field(ge=1)  # steps between their snapshots (models/ema_snapshots.pt); the last step is one too
    timestep_sampler: Literal["uniform", "loss-aware", "log-normal", "logit-normal"] | None  # null: the process's own
    timestep_mean: float | None  # log-normal's P_mean (null: EDM's -1.2), logit-normal's m (null: SD3's 0)
    timestep_std: float | None = Field(gt=0)  # log-normal's P_std (null: EDM's 1.2), logit-normal's s (null: 1)
    loss_weighting: Literal["simple", "min-snr", "edm", "flow"] | None  # null: the process's own
    hflip: bool
    seed: int
    device: Device
    precision: Literal["auto", "fp32", "bf16"]
    channels_last: bool
    checkpoint_every: int = Field(ge=1)
    log_every: int = Field(ge=1)
    bpd_images: int = Field(ge=0)
    val_every: int = Field(ge=1)
    val_images: int = Field(ge=0)
    # KID and FID of the EMA model's samples every eval_every steps (diffusion/stages/train.py: sample_quality):
    eval_every: int = Field(ge=1)
    eval_images: int = Field(ge=0)  # images sampled each time, from fixed seeds; 0: off, else >= 2
    eval_sampler: SamplerName  # on eval_steps log-snr steps, unguided: the curve measures the network
    eval_steps: int = Field(ge=1)
    p_uncond: float = Field(ge=0, lt=1)  # classifier-free guidance: labels dropped to the null class
    min_snr_gamma: float | None = Field(gt=0)  # γ of loss_weighting min-snr (Hang et al. 2023); null: none
    distributed: int = Field(ge=1)  # DistributedDataParallel processes (one per GPU); 1: this process alone
    micro_batch_size: int | None = Field(ge=1)  # examples a process computes at once (gradient accumulation); null: its share


class SampleParams(_Section):
    num_samples: int = Field(ge=2)  # evaluate's FID needs a covariance, KID pairs of images: N >= 2
    batch_size: int = Field(ge=1)
    sampler: SamplerName
    steps: int = Field(ge=1)
    schedule: ScheduleChoice  # fitted: the fit_schedule stage's (FitScheduleParams)
    eta: float = Field(ge=0)
    guidance_scale: float = Field(ge=0)  # ε_u + w (ε_c - ε_u): 1 is no guidance (diffusion/sampling/guidance.py)
    guidance_interval: tuple[float, float] | None  # guide only for model timesteps lo <= t <= hi
    precision: Literal["auto", "fp32", "bf16"]  # the network's (autocast); the protocol records what auto resolved to
    labels: list[int] | None  # class labels of the images, cycled; None: balanced over the classes
    prompts: list[str]  # a text-conditional model's evaluation prompts, cycled over the images
    ema_length: float | None  # σ_rel of the EMA reconstructed from train.ema_lengths' snapshots; None: train.ema_decay's
    s_churn: float = Field(ge=0)  # EDM's stochastic sampler (heun): S_churn, 0 = Algorithm 1
    s_tmin: float = Field(ge=0)  # churn only where S_tmin <= σ <= S_tmax (EDM's σ = e^-λ)
    s_tmax: float | None = Field(ge=0)  # null: ∞
    s_noise: float = Field(ge=0)  # the added noise's scale, S_noise
    clip_denoised: bool
    threshold: float | None  # dynamic thresholding's percentile p (diffusion.process.options.check_threshold)
    seed: int = Field(ge=0)  # image k is drawn from its own seed (seed, k): see diffusion.sampling.noise
    device: Device
    distributed: int = Field(ge=1)  # processes the images are sharded over (one per GPU); 1: this process alone
    grid_rows: int = Field(ge=1)


class FitScheduleParams(_Section):
    """The fit_schedule stage (sample.schedule fitted; diffusion/sampling/fitted.py)."""

    start: StepScheduleName  # the schedule the fit starts from; it never ends worse than it
    calibration_images: int = Field(ge=1)  # the batch of fixed x_T it is fitted on
    seed: int = Field(ge=0)  # their seed (image k from (seed, k)); another than sample.seed's: the FID's images stay unseen
    reference_steps: int = Field(ge=2)  # the reference: REFERENCE_SAMPLER on this many log-snr steps
    max_solves: int = Field(ge=1)  # the fit's budget: n-step solves of the calibration batch


class GuidanceParams(_Section):
    classifier: bool  # train a noise-aware classifier (stage train_classifier) and guide with it
    classifier_scale: float = Field(ge=0)  # s of Dhariwal & Nichol 2021, Algorithms 1-2
    # The classifier's training (diffusion/training/classifier.py), on x_t of the diffusion process:
    classifier_model: ClassifierName  # diffusion/models/configs.py: CLASSIFIER_CONFIGS
    classifier_steps: int = Field(ge=1)
    classifier_batch_size: int = Field(ge=1)
    classifier_lr: float = Field(gt=0)
    classifier_weight_decay: float = Field(ge=0)
    classifier_seed: int = Field(ge=0)
    classifier_device: Device
    classifier_log_every: int = Field(ge=1)
    classifier_eval_images: int = Field(ge=1)  # held-out images scored in each t bin (at most data.holdout)
    classifier_eval_bins: int = Field(ge=1)  # equal ranges of t for the accuracy curve


class EvaluateParams(_Section):
    kid: bool
    batch_size: int = Field(ge=1)
    device: Device
    prdc_k: int = Field(ge=1)  # k of precision/recall/density/coverage's k-NN balls (diffusion/evaluation/fidelity.py)
    reference: str | None  # null: the prepare stage's data/reference.npz; else that file (diffusion/evaluation/reference_files.py)
    bootstrap_replicates: int = Field(ge=20)  # fewer cannot place a 95% interval's ends (2.5% of 20 is half a replicate)
    confidence: float = Field(gt=0.5, lt=1)
    fid_infinity: bool
    digit_classifier_steps: int = Field(ge=1)  # digit data: the classifier that scores clear and named digits (stage train_digit_classifier)


class TrackingParams(_Section):
    experiment: str
    log_model: bool


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

    study_name: str
    storage: str | None  # None: a journal file in .optuna/; or an RDB URL / "journal:<path>"
    n_trials: int = Field(ge=1)
    max_trials: int | None = Field(ge=1)  # None: no cap; else the study's trials across every worker
    concurrency: int = Field(ge=1)
    heartbeat_s: int = Field(ge=1)  # an RDB storage's trial heartbeat; stale after 3 of them: FAIL, retried
    trial_retries: int = Field(ge=0)  # retries of a trial whose worker died (stale heartbeat)
    objectives: list[Literal["fid", "sampling_cost", "text_error"]]  # text_error: model.conditioning text, digit data
    pruning: bool
    prune_on: Literal["val_loss", "train_kid"]  # the train stage's metric the pruner compares trials on
    space: dict[str, SearchDim]


class Params(_Section):
    data: DataParams
    model: ModelParams
    text: TextParams
    diffusion: DiffusionParams
    train: TrainParams
    sample: SampleParams
    fit_schedule: FitScheduleParams
    vae: VaeParams
    guidance: GuidanceParams
    evaluate: EvaluateParams
    tracking: TrackingParams
    sweep: SweepParams

    @model_validator(mode="after")
    def check_combinations(self) -> Params:
        for path in self.sweep.space:
            _check_param_path(path)
        _check_network(self)  # name, overrides, shape (of the images or their latents)
        _check_swept_model(self.sweep.space)
        _check_swept_process(self)
        _check_swept_fitted(self)
        d = self.diffusion
        _check_process(self)
        if d.process == "ddpm" and d.schedule == "linear" and d.timesteps < 20:
            raise ValueError(
                f"diffusion.timesteps: the linear schedule scales its last beta by 1000/T, reaching 1 below "
                f"T=20; got {d.timesteps}, allowed 20..100000 (or another schedule)"
            )
        if why := eta_refused(self.sample.sampler, self.sample.eta):
            raise ValueError(f"sample.eta: {why}")
        churn = {key: getattr(self.sample, key) for key in CHURN_OPTIONS}
        if why := options_refused(self.sample.sampler, churn, d.process):
            raise ValueError(f"sample.{why}" if why.startswith("s_") else f"sample.sampler: {why}")
        if self.sample.schedule == FITTED and (why := fitted_refused(self.sample.sampler, self.sample.eta, churn)):
            raise ValueError(f"sample.schedule: {why}")
        if self.sample.s_tmax is not None and self.sample.s_tmin > self.sample.s_tmax:
            raise ValueError(f"sample.s_tmin: {self.sample.s_tmin} is above sample.s_tmax {self.sample.s_tmax}")
        check_threshold(self.sample.threshold, key="sample.threshold")
        _check_guidance(self)
        _check_text(self)
        if "text_error" in self.sweep.objectives and not (self.model.conditioning == "text" and self.data.captions == "measured"):
            raise ValueError(
                "sweep.objectives: text_error measures a text-conditional model's digits against their prompts; it needs "
                "model.conditioning text and data.captions measured; allowed otherwise: fid, sampling_cost"
            )
        if self.train.batch_size % self.train.distributed:
            raise ValueError(
                f"train.batch_size: {self.train.batch_size} does not split evenly over train.distributed "
                f"{self.train.distributed} processes; allowed: a multiple of {self.train.distributed}"
            )
        share = self.train.batch_size // self.train.distributed
        if self.train.micro_batch_size is not None and share % self.train.micro_batch_size:
            raise ValueError(
                f"train.micro_batch_size: {self.train.micro_batch_size} does not split the {share} examples each "
                f"process computes a step (train.batch_size / train.distributed); allowed: a divisor of {share}, or null"
            )
        for key in ("bpd_images", "val_images"):  # bits/dim divides by the images it scores: none is 0 / 0
            if self.data.holdout == 0 and getattr(self.train, key):
                raise ValueError(
                    f"train.{key}: {getattr(self.train, key)} held-out images are scored after training, but "
                    "data.holdout is 0; allowed: 0, or data.holdout >= 1"
                )
        _check_train_eval(self)
        _check_ema_lengths(self)
        _check_evaluate(self)
        if d.process == "ddpm" and self.sample.steps > d.timesteps:
            raise ValueError(
                f"sample.steps: {self.sample.steps} is more than diffusion.timesteps "
                f"({d.timesteps}); allowed 1..{d.timesteps}"
            )
        if d.process == "ddpm" and self.sample.schedule == FITTED and self.fit_schedule.reference_steps > d.timesteps:
            raise ValueError(
                f"fit_schedule.reference_steps: {self.fit_schedule.reference_steps} is more than diffusion.timesteps "
                f"({d.timesteps}); allowed 2..{d.timesteps}"
            )
        return self


def autoencoder_config(vae: VaeParams) -> dict[str, Any]:
    """The autoencoder's constructor arguments: those of ``vae.pretrained``'s config.json, or
    of the named config (without in_channels, which the data gives)."""
    if vae.pretrained is not None:
        return diffusers_autoencoder_config(vae.pretrained)
    return dict(VAE_CONFIGS[vae.name])


def diffusion_size(params: Params) -> int:
    """The side of what the diffusion model sees: the images or, with ``model.space: latent``,
    their latents."""
    if params.model.space == "pixel":
        return params.data.image_size
    return latent_shape(params.data.image_size, **autoencoder_config(params.vae))[1]


def _check_network(params: Params) -> None:
    """The network fits the images, or in latent space their latents; latent space has no
    pixels to flip or threshold."""
    model = params.model
    if model.space == "pixel":
        check_model(model.name, params.data.image_size, model.overrides)
        return
    size = diffusion_size(params)
    try:
        check_model(model.name, size, model.overrides)
    except ValueError as err:
        where = params.vae.pretrained or params.vae.name
        raise ValueError(
            f"model.space: latent: {model.name} does not fit the {size} x {size} latents of {where} "
            f"({str(err).replace('data.image_size: ', 'latent size ')})"
        ) from None
    if params.train.hflip:
        raise ValueError("train.hflip: flips pixels; with model.space latent the model trains on latents: use false")
    if params.data.holdout < 1:
        raise ValueError(
            "data.holdout: with model.space latent, train_vae scores and shows the autoencoder on held-out images; allowed: >= 1"
        )
    if params.sample.threshold is not None:
        raise ValueError(
            "sample.threshold: dynamic thresholding clips pixels; with model.space latent nothing is clipped: use null"
        )


def _check_process(params: Params) -> None:
    """The options the process allows (:data:`~diffusion.process.options.PROCESS_OPTIONS`), the
    discrete chain's own options on it alone, and the training distribution's parameters
    where they mean something."""
    d, train = params.diffusion, params.train
    prediction = process_option(d.process, "prediction", d.prediction, "diffusion.")
    if d.schedule is not None or d.process in ("ddpm", "vp"):
        schedule = process_option(d.process, "schedule", d.schedule, "diffusion.")
        if (d.process, schedule, prediction) == ("vp", "cosine", "eps"):
            raise ValueError(
                "diffusion.prediction: 'eps' cannot recover x0 where α reaches 0 (process 'vp' on the cosine "
                "schedule, at t = 1); allowed 'v' or 'x0', or schedule 'linear'"
            )
    check_combination(prediction, d.variance, d.loss, zero_terminal_snr=d.zero_terminal_snr, prefix="diffusion.")
    if d.process != "ddpm":
        for key, value, allowed in (
            ("zero_terminal_snr", d.zero_terminal_snr, False),
            ("variance", d.variance, "fixed_small"),
        ):
            if value != allowed and not (key == "variance" and value == "fixed_large"):
                raise ValueError(
                    f"diffusion.{key}: {value!r} is an option of the discrete chain (process ddpm); "
                    f"process {d.process!r} allows {allowed!r}"
                )
    if d.sigma_data != 0.5 and d.process != "edm":
        raise ValueError(f"diffusion.sigma_data: {d.sigma_data} is EDM's σ_data; process {d.process!r} uses none: use 0.5")
    sampler = process_option(d.process, "timestep_sampler", train.timestep_sampler, "train.")
    if sampler in ("uniform", "loss-aware"):
        for key in ("timestep_mean", "timestep_std"):
            if getattr(train, key) is not None:
                raise ValueError(
                    f"train.{key}: {getattr(train, key)} means nothing to the {sampler} timestep sampler; "
                    "use null, or timestep_sampler log-normal or logit-normal"
                )
    loss_weighting_name(d.process, train.loss_weighting, train.min_snr_gamma, "train.")


def _check_train_eval(params: Params) -> None:
    """The in-training KID curve: pairs of images, a sampler the process takes on steps it has,
    and pruning on it only where it is measured."""
    train, d = params.train, params.diffusion
    if train.eval_images == 1:
        raise ValueError("train.eval_images: 1 image has no covariance (FID) and no pairs (KID); allowed: 0 (off), or >= 2")
    if why := options_refused(train.eval_sampler, {}, d.process):
        raise ValueError(f"train.eval_sampler: {why}")
    if d.process == "ddpm" and train.eval_steps > d.timesteps:
        raise ValueError(
            f"train.eval_steps: {train.eval_steps} is more than diffusion.timesteps ({d.timesteps}); allowed 1..{d.timesteps}"
        )
    if params.sweep.pruning and params.sweep.prune_on == "train_kid" and not train.eval_images:
        raise ValueError("sweep.prune_on: train_kid is measured only with train.eval_images >= 2; set it, or use val_loss")


def _check_ema_lengths(params: Params) -> None:
    """Power function EMA lengths (diffusion/training/posthoc_ema.py); sample.ema_length needs their snapshots."""
    allowed = f"allowed 0 < sigma_rel < {MAX_EMA_LENGTH:.4f} (a power function EMA's: EDM2 Eq. 123)"
    lengths = params.train.ema_lengths
    for length in lengths:
        if not 0 < length < MAX_EMA_LENGTH:
            raise ValueError(f"train.ema_lengths: got {length}; {allowed}")
    if len(set(lengths)) != len(lengths):
        raise ValueError(f"train.ema_lengths: {lengths} names a length twice; allowed: distinct lengths")
    length = params.sample.ema_length
    if length is not None and not 0 < length < MAX_EMA_LENGTH:
        raise ValueError(f"sample.ema_length: got {length}; {allowed}, or null (train.ema_decay's EMA)")
    if length is not None and not lengths:
        raise ValueError(
            f"sample.ema_length: {length} is reconstructed from the snapshots of train.ema_lengths, which is []; "
            "set it (EDM2's [0.05, 0.1]), or sample.ema_length null"
        )


def _check_evaluate(params: Params) -> None:
    """A k-th nearest neighbour among the samples and the reference images (the reference
    file's own count is validate's check); a reference file that exists (validate reads it)."""
    cfg = params.evaluate
    counts = {"sample.num_samples": params.sample.num_samples}
    if cfg.reference is None:
        counts["data.reference_images"] = params.data.reference_images
    for key, count in counts.items():
        if cfg.prdc_k >= count:
            raise ValueError(
                f"evaluate.prdc_k: {cfg.prdc_k} needs more than {cfg.prdc_k} images, but {key} is {count}; "
                f"allowed 1..{count - 1}"
            )
    if cfg.reference is not None and not Path(cfg.reference).is_file():
        raise ValueError(
            f"evaluate.reference: {cfg.reference}: no such file; allowed: null (the prepare stage's data/reference.npz), "
            "or an .npz of reference statistics (ours, ADM's or clean-fid's: `diffusion reference check FILE`)"
        )


def _check_guidance(params: Params) -> None:
    """Classifier-free guidance needs a conditional model, given labels a class-conditional
    one; the interval lies in the process's timesteps."""
    sample, conditioning = params.sample, params.model.conditioning
    if sample.guidance_scale != 1 and conditioning == "none":
        raise ValueError(
            f"sample.guidance_scale: {sample.guidance_scale} guides a conditional model; "
            "set model.conditioning: class or text, or 1 (no guidance)"
        )
    if sample.labels is not None and not (conditioning == "class" or params.guidance.classifier):
        raise ValueError("sample.labels: labels need model.conditioning: class or guidance.classifier; use null")
    if sample.labels is not None and (not sample.labels or min(sample.labels) < 0):
        raise ValueError(f"sample.labels: got {sample.labels}; allowed: a non-empty list of class indices >= 0, or null")
    interval, top = sample.guidance_interval, time_max(params.diffusion.process, params.diffusion.timesteps)
    if interval is not None and not 0 <= interval[0] <= interval[1] <= top:
        raise ValueError(
            f"sample.guidance_interval: got {list(interval)}; allowed: [lo, hi] with "
            f"0 <= lo <= hi <= {top:g} (the process's times), or null"
        )
    if params.guidance.classifier:
        _check_classifier(params)


def _check_text(params: Params) -> None:
    """A text-conditional model needs captions, prompts that are not blank and no classifier
    guidance (the classifier guides towards labels); a pretrained encoder's folder holds a
    config (the validate stage builds the encoder with its overrides)."""
    if params.model.conditioning != "text":
        return
    if params.data.captions is None:
        raise ValueError("model.conditioning: text trains on captions, and data.captions is null; allowed: measured (digit "
                         "sources) or metadata (imagefolder), or model.conditioning none or class")
    if not params.sample.prompts or any(not prompt.strip() for prompt in params.sample.prompts):
        raise ValueError(f"sample.prompts: got {params.sample.prompts}; allowed: a non-empty list of non-blank captions")
    if params.guidance.classifier:
        raise ValueError("guidance.classifier: the classifier guides towards class labels, and model.conditioning is text; "
                         "allowed: false (classifier-free guidance on the prompts: sample.guidance_scale)")
    encoder = params.text.encoder
    if encoder != "char-transformer" and not (Path(encoder) / "config.json").is_file():
        raise ValueError(f"text.encoder: {encoder}: no config.json there; allowed: char-transformer, or a folder "
                         "holding a Hugging Face text encoder and its tokenizer (save_pretrained)")


def _check_classifier(params: Params) -> None:
    """The classifier's network fits the images, its accuracy curve has held-out images and,
    on the discrete chain, no more t bins than timesteps."""
    guide = params.guidance
    try:
        check_unet(diffusion_size(params), **CLASSIFIER_CONFIGS[guide.classifier_model])
    except ValueError as err:
        raise ValueError(f"guidance.classifier_model: '{guide.classifier_model}' does not fit: {err}") from None
    if params.data.holdout < 1:
        raise ValueError("data.holdout: the classifier's accuracy curve needs held-out images; allowed: >= 1")
    if params.diffusion.process == "ddpm" and guide.classifier_eval_bins > params.diffusion.timesteps:
        raise ValueError(
            f"guidance.classifier_eval_bins: {guide.classifier_eval_bins} is more than diffusion.timesteps "
            f"({params.diffusion.timesteps}); allowed 1..{params.diffusion.timesteps}"
        )


def _check_swept_model(space: dict[str, SearchDim]) -> None:
    """Where the sweep searches ``model.name``, every choice is a network that takes every
    ``model.overrides.<key>`` the sweep searches. (With one network, the sweep drops the
    dimensions it does not take: :func:`flows.study.searched_space`.)"""
    if "model.name" not in space:
        return
    for name in space["model.name"].choices or []:
        if not isinstance(name, str) or name not in FAMILY_OF:
            raise ValueError(f"sweep.space.model.name: unknown choice '{name}'; allowed: {', '.join(FAMILY_OF)}")
        for path in space:
            key = path.removeprefix("model.overrides.")
            if key != path and key not in family(name).overridable:
                raise ValueError(
                    f"sweep.space: '{path}' is not an argument of {name} (a {FAMILY_OF[name]}), a choice of "
                    f"model.name; allowed: {', '.join(family(name).overridable)}"
                )


PER_PROCESS = ("diffusion.schedule", "diffusion.prediction", "train.timestep_sampler", "train.loss_weighting")
"""The options whose allowed values differ per process, null for each process's own
(:data:`~diffusion.process.options.PROCESS_OPTIONS`): what a sweep over the process must leave null."""


def _check_swept_process(params: Params) -> None:
    """Where the sweep searches ``diffusion.process``, each choice validates with the other
    params as they stand (a trial changes only what it searches), and none of
    :data:`PER_PROCESS` is searched beside it: one line saying what to set otherwise."""
    dim = params.sweep.space.get("diffusion.process")
    if dim is None:
        return
    advice = (
        f"where the sweep searches diffusion.process, set {', '.join(PER_PROCESS)} to null "
        "(each process's own) and search none of them"
    )
    searched = [key for key in PER_PROCESS if key in params.sweep.space]
    if dim.type != "categorical" or searched:
        why = f"searched beside it: {', '.join(searched)}" if searched else "search it as {type: categorical, choices: [...]}"
        raise ValueError(f"sweep.space.diffusion.process: {why}; {advice}")
    base = params.model_dump()
    base["sweep"]["space"] = {}
    for choice in dim.choices:
        if choice not in names(Process):
            raise ValueError(
                f"sweep.space.diffusion.process: unknown choice {choice!r}; allowed: {', '.join(names(Process))}"
            )
        try:
            Params.model_validate(merge_params(base, {"diffusion.process": choice}))
        except ValidationError as err:
            why = _one_line(err, f"process {choice!r}")
            raise ValueError(f"sweep.space.diffusion.process: {why}; {advice}") from None


def _check_swept_fitted(params: Params) -> None:
    """Where the sweep may sample on a fitted schedule (sample.schedule fitted, or a choice of it),
    every sampler it may pick is one a schedule can be fitted to: one line naming the first other."""
    space, sample = params.sweep.space, params.sample
    if "sample.sampler" not in space and "sample.schedule" not in space:
        return  # the params themselves: sample.schedule's own check
    schedules = space["sample.schedule"].choices if "sample.schedule" in space else [sample.schedule]
    samplers = space["sample.sampler"].choices if "sample.sampler" in space else [sample.sampler]
    if FITTED not in (schedules or []):
        return
    for sampler in samplers or []:
        if sampler in SAMPLER_SPECS and (why := fitted_refused(sampler, sample.eta, {"s_churn": sample.s_churn})):
            raise ValueError(f"sweep.space.sample.sampler: choice {sampler!r} with sample.schedule fitted: {why}")


def _check_param_path(path: str) -> None:
    """A sweep dimension must name a real param (``model.overrides.*`` is free-form)."""
    section, _, rest = path.partition(".")
    if section not in Params.model_fields or section == "sweep" or not rest:
        raise ValueError(f"sweep.space: '{path}' is not a param; use <section>.<key>, sections: data, model, diffusion, train, sample, vae, guidance, evaluate")
    model = Params.model_fields[section].annotation
    key = rest.split(".")[0]
    if key not in model.model_fields:
        raise ValueError(f"sweep.space: '{path}': unknown key '{key}'; allowed: {', '.join(model.model_fields)}")
    if "." in rest and not (section == "model" and key == "overrides"):
        raise ValueError(f"sweep.space: '{path}' is too deep; only model.overrides.<name> nests")


def _allowed_keys(loc: tuple) -> list[str]:
    """Field names of the section at ``loc`` (e.g. ``("train",)``; in a mapping such as
    ``sweep.space``, the part after it is a key, and the section is its value's)."""
    model: Any = Params
    for part in loc:
        model = get_args(model)[1] if get_origin(model) is dict else model.model_fields[part].annotation
    return list(model.model_fields)


def _one_line(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    # a key with a space or a control character (a damaged file: "\n") is shown quoted, on one line
    key = ".".join(repr(str(p)) if any(c.isspace() or not c.isprintable() for c in str(p)) else str(p) for p in first["loc"])
    key = key or "(top level)"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "missing":
        msg = "missing; every key must be set (the committed params.yaml sets them all)"
    elif first["type"] == "extra_forbidden":
        msg = f"unknown key; allowed: {', '.join(_allowed_keys(first['loc'][:-1]))}"
    elif first["type"] == "literal_error":
        msg = f"got {first['input']!r}; {msg[0].lower()}{msg[1:]}"
    elif "input" in first and first["type"] != "value_error":
        msg = f"{msg} (got {first['input']!r})"
    if first["type"] == "value_error" and (not first["loc"] or msg.split(":", 1)[0].count(".") == 1):
        return f"{source}: {msg}"
    return f"{source}: {key}: {msg}"


WHOLE_VALUES = ("overrides", "space")
"""Keys whose mapping is one value: merged over, it replaces the old mapping whole."""


def merge_params(base: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` (a params mapping) with ``changes`` merged in, section by section and key by
    key; ``model.overrides`` and ``sweep.space`` are replaced whole. A dotted key of
    ``changes`` (``train.lr``, as ``dvc exp run -S`` takes it) names the value it changes,
    in sections created where ``base`` lacks them. ``base`` is not changed."""
    import copy

    merged = copy.deepcopy(dict(base))
    for key, value in changes.items():
        *sections, leaf = key.split(".")
        node = merged
        for part in sections:
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                raise ConfigError(f"{key}: '{part}' is not a section")
            node = node[part]
        if isinstance(value, Mapping) and isinstance(node.get(leaf), dict) and leaf not in WHOLE_VALUES:
            node[leaf] = merge_params(node[leaf], value)
        else:
            node[leaf] = copy.deepcopy(value)
    return merged


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
    except (yaml.YAMLError, UnicodeDecodeError) as err:  # a file of another encoding, or bytes
        raise ConfigError(f"{path}: not valid YAML ({err.__class__.__name__})") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return parse_params(raw or {}, str(path))
