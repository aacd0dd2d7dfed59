"""The typed root config of the encode job: ``EncodeConfig`` mirrors ``conf/encode.yaml`` key for key.

Registered as ``encode_schema`` (``ldm_train.app.hydra_app``); ``conf/encode.yaml`` lists it first in its
defaults, so the YAML holds presets only and a mistyped key or value fails at composition.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from ldm_train.config import FirstStageConfig
from ldm_train.config_checks import AUTO_OR_BOOL, bounded, one_of
from ldm_train.data.config import INPUT_FORMATS
from ldm_train.runtime.precision import PRECISIONS


@dataclass
class FilterConfig:
    """Which input images are dropped before encoding."""

    min_size: int | None = None  # shorter side below this is dropped; None: below ``resolution`` (never upscale)
    max_aspect: float | None = bounded(None, ge=1)  # long/short side above this is dropped; None: keep all
    require_caption: bool = True
    # more pixels than this (read from the image header, before decoding) is dropped as too_large; None: no limit
    # of ours (PIL still refuses above 2 * PIL.Image.MAX_IMAGE_PIXELS)
    max_pixels: int | None = bounded(64_000_000, ge=1)
    # a caption that is not UTF-8: None drops the sample (caption_not_utf8); a codec name (e.g. cp1252) decodes it
    # with that codec instead (counted as caption_fallback)
    caption_fallback: str | None = None
    # img2dataset / LAION metadata (the sample's json, else the shard's <name>.parquet); None: off. A sample
    # without the field passes. Skips are counted as low_similarity, unsafe, watermark, low_aesthetic, small_original.
    min_similarity: float | None = None
    max_punsafe: float | None = None
    max_pwatermark: float | None = None
    min_aesthetic: float | None = None  # AESTHETIC_SCORE (or aesthetic)
    min_original_size: int | None = None  # shorter side of original_width x original_height


@dataclass
class EncodeConfig:
    """``python -m data_prep.encode``: images + captions -> latent WebDataset shards + manifest.json."""

    input: Any = MISSING  # str or list[str]: tars, an image folder or ImageNet class folders
    input_format: str = one_of("auto", INPUT_FORMATS)  # auto | tar | folder | imagenet
    files_per_shard: int = bounded(1000, ge=1)  # folder inputs: images per input shard
    caption_template: str = "a photo of a {class_name}"  # imagenet inputs
    output: str = "data/latents"  # latents root; shards go to <output>/<first_stage.name>/
    resolution: int = bounded(64, ge=1)  # image side after resize (shorter side) + centre crop
    # >0: also store each image downsampled by this factor (bicubic, antialiased) as lowres.png, the input of
    # super-resolution training (cond.kind=concat; CompVis bsr_sr: 4, with a vq-f4 first stage the LR image is
    # exactly the latent grid)
    lowres_factor: int = bounded(0, ge=0)
    # true: also store each image's inpainting mask (mask.png, the paper's large masks from seed and key) and the
    # latent of the image with the hole set to grey (masked.npy): the inputs of cond.kind=inpaint
    inpaint_masks: bool = False
    filter: FilterConfig = field(default_factory=FilterConfig)
    first_stage: FirstStageConfig = field(default_factory=FirstStageConfig)
    batch_size: int = bounded(32, ge=1)  # images per first-stage forward
    num_workers: int = bounded(2, ge=0)  # DataLoader processes decoding/resizing (0: in the encoding process)
    prefetch_factor: int = bounded(4, ge=1)
    device: str = "auto"  # auto (cuda if available) | cpu | cuda | cuda:N
    precision: str = one_of("auto", ("auto", *PRECISIONS))  # auto (bf16 autocast on cuda, fp32 on cpu) | fp32 | bf16 | fp16
    allow_random_first_stage: bool = False  # random weights when first_stage.checkpoint is null (plumbing only)
    seed: int = 0  # noise for the KL latent statistics (sampled z)
    # work split: task i of n takes the input shards j with j % n == i
    task_index: int | None = None  # None (both): from SLURM_ARRAY_TASK_ID/COUNT, else RANK/WORLD_SIZE, else 0/1
    num_tasks: int | None = None
    overwrite: bool = False  # redo shards that already have their stats part
    # re-hash every finished shard of this task (sha256) and re-encode the damaged ones; every run checks their
    # presence and size
    verify: bool = False
    # auto: write manifest.json when every input shard is done (the last task does it) | true | false
    finalize: bool | str = one_of("auto", AUTO_OR_BOOL)
    progress: bool = True
