"""Load what sampling needs from the trainer's export (``ldm_train.checkpoints.export`` layout).

An export step dir holds ``model_ema.safetensors`` / ``model.safetensors`` (CompVis keys
``model.diffusion_model.*`` + ``cond_stage_model.*``: the text encoder or the class embedder, none when
unconditional), ``config.yaml`` (the resolved training config; its ``cond.kind`` says which) and, for text,
``tokenizer/``. The first stage is NOT in the export: it is the config's ``first_stage.checkpoint`` unless
eval overrides it. The latent scale factor comes from eval's override, else the config
(``first_stage.scale_factor``, ``data.scale_factor``), else the latent manifest the run trained on.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from ldm_train.checkpoints.export import latent_scale_factor
from ldm_train.config import CondConfig, FirstStageConfig, UNetConfig, cond_config, to_dataclass
from ldm_train.models.ldm import LatentDiffusion


@dataclass
class SamplingModel:
    ldm: LatentDiffusion  # UNet + cond stage + schedule, from build_ldm and the export's weights
    tokenizer: Any  # the WordPiece tokenizer (text), the LayoutTokenizer (layout), else None
    first_stage: torch.nn.Module
    scale_factor: float
    latent_shape: tuple[int, int, int]  # (C, h, w) of the diffusion model's z
    resolution: int  # image side after decoding
    config: DictConfig
    weights_file: Path
    weights_sha256: str
    first_stage_file: str
    cond: CondConfig  # the export's cond node (text for runs older than the choice)


def load_sampling_model(
    checkpoint: str,
    *,
    use_ema: bool = True,
    first_stage_checkpoint: str | None = None,
    scale_factor: float | None = None,
    device: torch.device | str = "cpu",
    allow_random_first_stage: bool = False,
) -> SamplingModel:
    """Build the LDM + tokenizer + first stage from an export (run dir, checkpoints dir or step dir)."""
    from ldm_train.build import build_ldm
    from ldm_train.checkpoints.compvis import load_strict
    from ldm_train.checkpoints.export import load_export
    from ldm_train.checkpoints.first_stage import is_loadable, load_first_stage
    from ldm_train.data.cond_inputs import layout_tokenizer
    from ldm_train.data.tokenizer import load_tokenizer

    exp = load_export(checkpoint, ema=use_ema)
    cfg = exp.config
    unet_cfg = to_dataclass(cfg.unet, UNetConfig)
    fs_cfg = to_dataclass(cfg.first_stage, FirstStageConfig)
    if first_stage_checkpoint:
        fs_cfg.checkpoint = first_stage_checkpoint
    if not is_loadable(fs_cfg) and not allow_random_first_stage:
        raise ValueError(f"the checkpoint config at {exp.step_dir} names no first_stage.checkpoint: pass "
                         "first_stage_checkpoint=PATH (the autoencoder the latents were encoded with), or "
                         "allow_random_first_stage=true for a plumbing run")
    if fs_cfg.checkpoint and not Path(fs_cfg.checkpoint).is_file() and "://" not in fs_cfg.checkpoint:
        raise FileNotFoundError(f"first stage checkpoint {fs_cfg.checkpoint} (from the checkpoint config or "
                                "first_stage_checkpoint=) does not exist: pass first_stage_checkpoint=PATH")

    ldm = build_ldm(cfg)
    cond = cond_config(cfg)
    load_strict(ldm.unet, exp.unet, "UNet", str(exp.weights_file))
    if ldm.cond_stage_model is not None:
        what = {"text": "text encoder", "layout": "layout encoder", "semantic": "SpatialRescaler"}.get(
            ldm.cond_kind, "class embedder")
        load_strict(ldm.cond_stage_model, exp.text_encoder, what, str(exp.weights_file))
    elif exp.text_encoder:
        raise ValueError(f"{exp.weights_file} holds cond_stage_model.* weights but its config builds an unconditional "
                         f"model (cond.kind={cond.kind}, unet.context_dim={unet_cfg.context_dim}): the config does not "
                         "match the weights")
    if is_loadable(fs_cfg):
        first_stage = load_first_stage(fs_cfg, map_location=device)
    else:
        from ldm_train.models.autoencoder import build_first_stage

        print("[eval] WARNING: no first_stage.checkpoint, decoding with a RANDOM first stage (seed 0, "
              "allow_random_first_stage=true): images and metrics are plumbing only", flush=True)
        with torch.random.fork_rng(devices=[]):  # a fixed init without touching the caller's RNG
            torch.manual_seed(0)
            first_stage = build_first_stage(fs_cfg).to(device).eval().requires_grad_(False)
    tokenizer = load_tokenizer(str(exp.tokenizer_dir), ldm.cond_stage_model.cfg.max_seq_len) \
        if ldm.cond_kind == "text" else layout_tokenizer(cond) if cond.kind == "layout" else None
    channels = unet_cfg.in_channels - unet_cfg.concat_channels
    return SamplingModel(
        ldm=ldm.to(device).eval().requires_grad_(False),
        tokenizer=tokenizer,
        first_stage=first_stage,
        scale_factor=latent_scale_factor(cfg, scale_factor),
        latent_shape=(channels, unet_cfg.image_size, unet_cfg.image_size),
        resolution=unet_cfg.image_size * fs_cfg.downsample_factor,
        config=cfg,
        weights_file=exp.weights_file,
        weights_sha256=exp.sha256,
        first_stage_file=str(fs_cfg.checkpoint or ("identity (pixel)" if fs_cfg.kind == "pixel" else "random-init")),
        cond=cond,
    )
