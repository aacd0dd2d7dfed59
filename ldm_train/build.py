"""The one builder of the latent diffusion model, used by the trainer, its sample grid, eval and the summary.

``build_ldm(cfg)`` takes any config with ``unet``, ``text_encoder`` and (optionally) ``train.diffusion``
nodes: the composed ``conf/train.yaml`` or the ``config.yaml`` an export carries. Missing diffusion keys
take ``DiffusionConfig``'s defaults (the paper's schedule), so old exports build the same model.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from omegaconf import OmegaConf

from ldm_train.config import TextEncoderConfig, UNetConfig, to_dataclass
from ldm_train.models.ldm import LatentDiffusion


def diffusion_config(cfg: Any) -> Any:
    """The ``train.diffusion`` node of ``cfg`` as a DiffusionConfig (defaults for absent keys)."""
    from ldm_train.trainer.config import DiffusionConfig

    node = OmegaConf.select(cfg, "train.diffusion", default=None) if OmegaConf.is_config(cfg) else \
        getattr(getattr(cfg, "train", None), "diffusion", None)
    return to_dataclass(node, DiffusionConfig)


def build_ldm(cfg: Any, activation_checkpointing: bool | None = None) -> LatentDiffusion:
    """UNet + text encoder + noise schedule, randomly initialised (load weights with ``load_strict``).

    ``activation_checkpointing`` overrides both models' ``use_checkpoint`` (the FLOP counter turns it off).
    """
    from ldm_train.diffusion.schedule import make_schedule
    from ldm_train.models.text_encoder import BERTEmbedder
    from ldm_train.models.unet import UNetModel

    unet_cfg = to_dataclass(cfg.unet, UNetConfig)
    text_cfg = to_dataclass(cfg.text_encoder, TextEncoderConfig)
    if activation_checkpointing is not None:
        unet_cfg = dataclasses.replace(unet_cfg, use_checkpoint=activation_checkpointing)
        text_cfg = dataclasses.replace(text_cfg, use_checkpoint=activation_checkpointing)
    if unet_cfg.context_dim is not None and unet_cfg.context_dim != text_cfg.n_embed:
        raise ValueError(f"unet.context_dim={unet_cfg.context_dim} but text_encoder.n_embed={text_cfg.n_embed}: "
                         "set unet.context_dim=${text_encoder.n_embed} (as the presets do)")
    d = diffusion_config(cfg)
    with torch.device("cpu"):  # the schedule is config, on the CPU even when the modules are built on meta
        schedule = make_schedule(d.beta_schedule, d.timesteps, linear_start=d.linear_start, linear_end=d.linear_end)
    text = BERTEmbedder(text_cfg) if unet_cfg.context_dim is not None else None
    return LatentDiffusion(UNetModel(unet_cfg), text, schedule, d.parameterization, d.min_snr_gamma)
