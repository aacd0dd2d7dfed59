"""The typed root config of the first-stage trainer (``conf/train_autoencoder.yaml``).

Registered in Hydra's ConfigStore as ``train_autoencoder_schema`` (``ldm_train.app.hydra_app``), which the
YAML lists first in its defaults: a mistyped key or value fails at composition. The YAML holds the presets.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ldm_train.config import LR_DECAYS, FirstStageConfig
from ldm_train.config_checks import bounded, one_of
from ldm_train.data.config import INPUT_FORMATS
from ldm_train.tracking import LoggerConfig

AE_PRECISIONS = ("fp32", "bf16")  # no fp16: it would need a loss scaler, which this trainer has not


@dataclass
class AEDataConfig:
    input: str = "???"  # tars (brace patterns, s3://), an image folder or ImageNet class folders
    # held-out images for PSNR, grids and latent stats; None: the first training images stand in (eval_train/)
    heldout: str | None = None
    input_format: str = one_of("auto", INPUT_FORMATS)  # auto | tar | folder | imagenet
    resolution: int = 64
    num_workers: int = bounded(2, ge=0)  # per rank; at most the number of input shards per rank
    shuffle_buffer: int = bounded(256, ge=0)  # samples, per worker


@dataclass
class AEOptimConfig:
    batch_size: int = bounded(8, ge=1)  # per rank
    base_lr: float = bounded(4.5e-6, ge=0)
    scale_lr: bool = True  # lr = base_lr * batch_size * world_size
    betas: list[float] = field(default_factory=lambda: [0.5, 0.9])  # Adam, both optimizers (VQGAN / LDM)
    grad_clip: float | None = bounded(None, ge=0)
    warmup_steps: int = bounded(0, ge=0)  # linear warm-up from 0 to the lr over this many steps
    decay: str = one_of("constant", LR_DECAYS)  # constant (CompVis) | cosine: lr -> min_lr_ratio * lr at train.max_steps
    min_lr_ratio: float = bounded(0.0, ge=0, le=1)


@dataclass
class AETrainConfig:
    max_steps: int = bounded(1000, ge=1)
    precision: str = one_of("fp32", AE_PRECISIONS)  # fp32 | bf16 (autocast)
    log_every: int = bounded(50, ge=1)
    image_every: int = bounded(500, ge=1)
    eval_every: int = bounded(500, ge=1)  # steps: held-out PSNR vs the mean-image baseline, latent stats
    eval_images: int = bounded(64, ge=1)
    checkpoint_every: int = bounded(500, ge=1)
    keep_checkpoints: int = bounded(2, ge=0)
    export_every_checkpoint: bool = True


@dataclass
class AELossConfig:
    # torchvision's vgg16-397923af.pth (never downloaded); needed when perceptual_weight > 0
    lpips_backbone: str | None = None
    lpips_random_backbone: bool = False  # plumbing tests only


@dataclass
class AutoencoderAppConfig:
    """Root of ``conf/train_autoencoder.yaml``."""

    seed: int = 0
    runs_root: str = "runs"
    run_group: str = "autoencoder"  # run dirs <runs_root>/<run_group>/<run>; also the W&B group
    run_name: str | None = None  # None: <index>-<first_stage>-gpus<N>-batch<B>; set it to resume a named run
    first_stage: FirstStageConfig = field(default_factory=FirstStageConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    data: AEDataConfig = field(default_factory=AEDataConfig)
    optim: AEOptimConfig = field(default_factory=AEOptimConfig)
    train: AETrainConfig = field(default_factory=AETrainConfig)
    loss: AELossConfig = field(default_factory=AELossConfig)
