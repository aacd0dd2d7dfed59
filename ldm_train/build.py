"""The one builder of the latent diffusion model, used by the trainer, its sample grid, eval and the summary.

``build_ldm(cfg)`` takes any config with ``unet``, ``text_encoder`` and (optionally) ``cond`` and
``train.diffusion`` nodes: the composed ``conf/train.yaml`` or the ``config.yaml`` an export carries. Missing
diffusion keys take ``DiffusionConfig``'s defaults (the paper's schedule) and a missing ``cond`` is text, so old
exports build the same model. ``cond.kind`` picks the cond stage: the text encoder, the ``ClassEmbedder`` or none.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from omegaconf import OmegaConf

from ldm_train.config import (
    SPATIAL_KINDS,
    CondConfig,
    TextEncoderConfig,
    UNetConfig,
    cond_config,
    to_dataclass,
)
from ldm_train.models.ldm import LatentDiffusion


def diffusion_config(cfg: Any) -> Any:
    """The ``train.diffusion`` node of ``cfg`` as a DiffusionConfig (defaults for absent keys)."""
    from ldm_train.config import AMBIGUOUS_LINEAR, BETA_SCHEDULES, LOSS_TYPES
    from ldm_train.trainer.config import DiffusionConfig

    node = OmegaConf.select(cfg, "train.diffusion", default=None) if OmegaConf.is_config(cfg) else \
        getattr(getattr(cfg, "train", None), "diffusion", None)
    d = to_dataclass(node, DiffusionConfig)
    if d.beta_schedule == "linear":
        raise ValueError(f"train.diffusion.beta_schedule=linear: {AMBIGUOUS_LINEAR}")
    if d.beta_schedule not in BETA_SCHEDULES:
        raise ValueError(f"train.diffusion.beta_schedule={d.beta_schedule!r}: use one of {', '.join(BETA_SCHEDULES)}")
    if d.loss_type not in LOSS_TYPES:
        raise ValueError(f"train.diffusion.loss_type={d.loss_type!r}: use l2 (mean squared error, the default) or l1 "
                         "(mean absolute error, CompVis loss_type l1)")
    if d.loss_type == "l1" and d.min_snr_gamma is not None:
        raise ValueError(f"train.diffusion.min_snr_gamma={d.min_snr_gamma} weights a squared error but "
                         "train.diffusion.loss_type=l1: set train.diffusion.min_snr_gamma=null or loss_type=l2")
    return d


def check_cond(cond: CondConfig, unet_cfg: UNetConfig, text_cfg: TextEncoderConfig | None = None,
               trainable: bool = False) -> None:
    """Refuse a ``cond`` / ``unet`` pair that cannot work, naming the keys to set.

    ``trainable``: also what only the trainer refuses (a text model without cross-attention, a label
    embedding added to the timestep, which no data path feeds).
    """
    kind = cond.kind
    if kind == "layout":
        _check_layout(cond, unet_cfg, text_cfg)
    elif kind == "text":
        if unet_cfg.context_dim is not None and text_cfg is not None and unet_cfg.context_dim != text_cfg.n_embed:
            raise ValueError(f"unet.context_dim={unet_cfg.context_dim} but text_encoder.n_embed={text_cfg.n_embed}: "
                             "set unet.context_dim=${text_encoder.n_embed} (as the presets do)")
        if trainable and unet_cfg.context_dim is None:
            raise ValueError("cond.kind=text but unet.context_dim is null (no cross-attention): set "
                             "unet.context_dim=${text_encoder.n_embed}, or cond.kind=none for an unconditional model")
    elif kind == "class":
        if unet_cfg.context_dim is None:
            raise ValueError("cond.kind=class feeds the class embedding through cross-attention: set unet.context_dim "
                             "(the embedding width; 512 in CompVis cin256-v2)")
    elif unet_cfg.context_dim is not None:
        raise ValueError(f"cond.kind={kind} ({'unconditional' if kind == 'none' else 'concat only'}) but "
                         f"unet.context_dim={unet_cfg.context_dim}: set unet.context_dim=null (no cross-attention)")
    z = unet_cfg.in_channels - unet_cfg.concat_channels
    if kind == "inpaint" and unet_cfg.concat_channels != z + 1:
        raise ValueError(f"cond.kind=inpaint feeds the masked image's latent and the mask: set unet.concat_channels="
                         f"<latent channels> + 1 and unet.in_channels=2 * <latent channels> + 1 (got concat_channels="
                         f"{unet_cfg.concat_channels}, in_channels={unet_cfg.in_channels}; CompVis inpainting_big: 4 and 7)")
    if kind == "semantic" and unet_cfg.concat_channels < 1:
        raise ValueError("cond.kind=semantic concatenates the SpatialRescaler's map: set unet.concat_channels (its "
                         "output channels, 3 as released) and unet.in_channels=<latent channels> + concat_channels")
    if kind == "concat" and unet_cfg.concat_channels != 3:
        raise ValueError(f"cond.kind=concat feeds the RGB low-resolution image: set unet.concat_channels=3 (got "
                         f"{unet_cfg.concat_channels}) and unet.in_channels=<latent channels> + 3 (CompVis bsr_sr: 6)")
    if trainable and unet_cfg.num_classes is not None:
        raise ValueError(f"unet.num_classes={unet_cfg.num_classes} (a label embedding added to the timestep) is not fed "
                         "by the trainer: set unet.num_classes=null and use cond.kind=class (cross-attention, CompVis cin256-v2)")
    if kind not in SPATIAL_KINDS and unet_cfg.concat_channels:
        raise ValueError(f"unet.concat_channels={unet_cfg.concat_channels} but cond.kind={kind}: concat conditioning "
                         f"needs cond.kind={' or '.join(SPATIAL_KINDS)}, else set unet.concat_channels=0")


def _check_layout(cond: CondConfig, unet_cfg: UNetConfig, text_cfg: TextEncoderConfig | None) -> None:
    from ldm_train.data.cond_inputs import layout_tokenizer

    tok = layout_tokenizer(cond)
    if unet_cfg.context_dim is None:
        raise ValueError("cond.kind=layout cross-attends to the layout tokens: set unet.context_dim=${text_encoder.n_embed}")
    if text_cfg is None:
        return
    if unet_cfg.context_dim != text_cfg.n_embed:
        raise ValueError(f"unet.context_dim={unet_cfg.context_dim} but text_encoder.n_embed={text_cfg.n_embed}: set "
                         "unet.context_dim=${text_encoder.n_embed}")
    if text_cfg.vocab_size < tok.vocab_size or text_cfg.max_seq_len < tok.length:
        raise ValueError(f"cond.kind=layout with {cond.num_classes} classes, layout_bins={cond.layout_bins} and "
                         f"layout_max_objects={cond.layout_max_objects} needs text_encoder.vocab_size >= {tok.vocab_size} "
                         f"and text_encoder.max_seq_len >= {tok.length} (got {text_cfg.vocab_size} and "
                         f"{text_cfg.max_seq_len})")


def build_ldm(cfg: Any, activation_checkpointing: bool | None = None) -> LatentDiffusion:
    """UNet + cond stage + noise schedule, randomly initialised (load weights with ``load_strict``).

    ``activation_checkpointing`` overrides both models' ``use_checkpoint`` (the FLOP counter turns it off).
    """
    from ldm_train.diffusion.schedule import make_schedule
    from ldm_train.models.class_embedder import ClassEmbedder
    from ldm_train.models.spatial_rescaler import SpatialRescaler
    from ldm_train.models.text_encoder import BERTEmbedder
    from ldm_train.models.unet import UNetModel

    unet_cfg = to_dataclass(cfg.unet, UNetConfig)
    cond = cond_config(cfg)
    text_cfg = to_dataclass(cfg.text_encoder, TextEncoderConfig) if cond.kind in ("text", "layout") else None
    if activation_checkpointing is not None:
        unet_cfg = dataclasses.replace(unet_cfg, use_checkpoint=activation_checkpointing)
        if text_cfg is not None:
            text_cfg = dataclasses.replace(text_cfg, use_checkpoint=activation_checkpointing)
    check_cond(cond, unet_cfg, text_cfg)
    d = diffusion_config(cfg)
    with torch.device("cpu"):  # the schedule is config, on the CPU even when the modules are built on meta
        schedule = make_schedule(d.beta_schedule, d.timesteps, linear_start=d.linear_start, linear_end=d.linear_end)
    stage: torch.nn.Module | None = None
    if cond.kind == "class":
        stage = ClassEmbedder(cond.embedding_rows(), int(unet_cfg.context_dim), cond.null_label())
    elif cond.kind == "semantic":
        f = int(OmegaConf.select(cfg, "first_stage.downsample_factor", default=1) if OmegaConf.is_config(cfg)
                else cfg.first_stage.downsample_factor)
        stage = SpatialRescaler(max(0, f.bit_length() - 1), int(cond.num_classes), unet_cfg.concat_channels)
    elif cond.kind in ("text", "layout") and unet_cfg.context_dim is not None:
        stage = BERTEmbedder(text_cfg)
    return LatentDiffusion(UNetModel(unet_cfg), stage, schedule, d.parameterization, d.min_snr_gamma,
                           cond_kind=cond.kind if stage is not None or cond.kind in SPATIAL_KINDS else "none",
                           loss_type=d.loss_type)
