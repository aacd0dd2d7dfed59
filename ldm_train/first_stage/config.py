"""The typed root config of the first-stage trainer (``conf/train_autoencoder.yaml``).

Registered in Hydra's ConfigStore as ``train_autoencoder_schema`` (``ldm_train.app.hydra_app``), which the
YAML lists first in its defaults: a mistyped key or value fails at composition. The YAML holds the presets.

A setting that means the same as one of the LDM trainer's (``ldm_train.trainer.config``) has its name:
``train.micro_batch``, ``train.precision``, ``train.optim.*``, ``train.checkpoint.*``. Lengths and intervals count
optimizer steps, as CompVis and taming train autoencoders, and a name says so where the LDM trainer's counts samples
(``train.optim.warmup_steps``, ``train.checkpoint.every_steps``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ldm_train.config import LR_DECAYS, LR_SCALINGS, FirstStageConfig
from ldm_train.config_checks import bounded, one_of
from ldm_train.data.config import INPUT_FORMATS
from ldm_train.tracking import LoggerConfig

AE_PRECISIONS = ("fp32", "bf16")  # no fp16: it would need a loss scaler, which this trainer has not
# all: the whole autoencoder. decoder: the decoder and post_quant_conv only (encoder, quant_conv and codebook frozen),
# so every latent stays what it was and latents encoded before the fine-tune remain valid for the LDM
AE_TRAINABLE = ("all", "decoder")

# Earlier first-stage keys, old -> new (the LDM trainer's names): an old key is refused at composition naming its
# new one (the schema's ``renamed_keys``, checked by ``ldm_train.app`` on the command line and in the typed config).
RENAMED_KEYS = {
    "optim": "train.optim (and optim.batch_size: train.micro_batch)",
    "optim.batch_size": "train.micro_batch",
    "optim.base_lr": "train.optim.base_lr",
    "optim.scale_lr": "train.optim.lr_scaling (true: compvis, false: none)",
    "optim.warmup_steps": "train.optim.warmup_steps",
    "optim.decay": "train.optim.lr_decay",
    "optim.min_lr_ratio": "train.optim.min_lr_ratio",
    "optim.betas": "train.optim.betas",
    "optim.grad_clip": "train.optim.grad_clip (0 disables it)",
    "train.checkpoint_every": "train.checkpoint.every_steps",
    "train.keep_checkpoints": "train.checkpoint.keep_last",
    "train.export_every_checkpoint": "train.checkpoint.export_weights",
}


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
    """Adam, one for the autoencoder and one for the discriminator, both with these settings (VQGAN / LDM)."""

    base_lr: float = bounded(4.5e-6, ge=0)
    # "compvis": lr = base_lr * train.micro_batch * world_size (CompVis main.py scale_lr); "none": lr = base_lr
    lr_scaling: str = one_of("compvis", LR_SCALINGS)
    warmup_steps: int = bounded(0, ge=0)  # linear warm-up from 0 to the lr over this many steps
    lr_decay: str = one_of("constant", LR_DECAYS)  # constant (CompVis) | cosine: lr -> min_lr_ratio * lr at train.max_steps
    min_lr_ratio: float = bounded(0.0, ge=0, le=1)  # cosine: the final lr as a share of lr
    betas: list[float] = field(default_factory=lambda: [0.5, 0.9])
    grad_clip: float = bounded(0.0, ge=0)  # the autoencoder's global L2 norm; 0 disables


@dataclass
class AECheckpointConfig:
    every_steps: int = bounded(500, ge=1)
    keep_last: int = bounded(2, ge=0)
    export_weights: bool = True  # first_stage.safetensors beside each checkpoint's state.pt


@dataclass
class AETrainConfig:
    max_steps: int = bounded(1000, ge=1)
    micro_batch: int = bounded(8, ge=1)  # per rank per step; no accumulation: the global batch is micro_batch * world
    precision: str = one_of("fp32", AE_PRECISIONS)  # fp32 | bf16 (autocast)
    # what the optimizer updates; "decoder" fine-tunes a trained first stage (first_stage.checkpoint: the weights a
    # new run starts from) without changing its latents, e.g. with the patch GAN from step 0 (lossconfig.disc_start=0)
    trainable: str = one_of("all", AE_TRAINABLE)
    log_every: int = bounded(50, ge=1)
    image_every: int = bounded(500, ge=1)
    eval_every: int = bounded(500, ge=1)  # steps: held-out PSNR vs the mean-image baseline, latent stats
    eval_images: int = bounded(64, ge=1)
    optim: AEOptimConfig = field(default_factory=AEOptimConfig)
    checkpoint: AECheckpointConfig = field(default_factory=AECheckpointConfig)


@dataclass
class AELossConfig:
    # torchvision's vgg16-397923af.pth (never downloaded); needed when perceptual_weight > 0
    lpips_backbone: str | None = None
    lpips_random_backbone: bool = False  # plumbing tests only


@dataclass
class AutoencoderAppConfig:
    """Root of ``conf/train_autoencoder.yaml``."""

    renamed_keys: ClassVar[dict[str, str]] = RENAMED_KEYS
    seed: int = 0
    runs_root: str = "runs"
    run_group: str = "autoencoder"  # run dirs <runs_root>/<run_group>/<run>; also the W&B group
    run_name: str | None = None  # None: <index>-<first_stage>-gpus<N>-batch<B>; set it to resume a named run
    first_stage: FirstStageConfig = field(default_factory=FirstStageConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    data: AEDataConfig = field(default_factory=AEDataConfig)
    train: AETrainConfig = field(default_factory=AETrainConfig)
    loss: AELossConfig = field(default_factory=AELossConfig)
