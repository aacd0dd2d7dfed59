"""Parameter counts and FLOPs of a composed model, counted on the meta device (nothing is allocated).

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions, attention; a
multiply-add counts 2). ``train_flops_per_sample`` is forward + backward of everything trained (UNet + text
encoder or class embedder) for one sample, without activation-checkpoint recomputation: the model FLOPs to use for MFU.
The trainer logs MFU from it; ``python -m ldm_train.summary`` prints it.
"""
from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ldm_train.build import build_ldm
from ldm_train.config import FirstStageConfig, TextEncoderConfig, UNetConfig, to_dataclass
from ldm_train.models.autoencoder import build_first_stage


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _flops(fn: Any) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _first_stage_summary(cfg: FirstStageConfig, resolution: int) -> dict[str, Any]:
    with torch.device("meta"):
        model = build_first_stage(cfg).eval()
        out: dict[str, Any] = {"first_stage_params": _count(model)}
        image = torch.empty(1, cfg.ddconfig.in_channels, resolution, resolution)
        f = cfg.downsample_factor
        z = torch.empty(1, cfg.embed_dim, resolution // f, resolution // f)
        # VQ: the codebook lookup (bincount usage statistics) has no meta kernel; count the decoder proper
        decode = (lambda: model.decode(z, force_not_quantize=True)) if cfg.kind == "vq" else (lambda: model.decode(z))
        try:
            with torch.no_grad():
                out["first_stage_encode_gflops"] = _flops(lambda: model.encode_moments(image)) / 1e9
                out["first_stage_decode_gflops"] = _flops(decode) / 1e9
        except (NotImplementedError, RuntimeError) as err:  # the diffusion model's numbers stay useful
            out["first_stage_error"] = f"{type(err).__name__}: {str(err)[:200]}"
    return out


def summarize(cfg: DictConfig) -> dict[str, Any]:
    """Counts and FLOPs of the composed ``unet`` / cond stage / ``first_stage`` (meta device).

    The cond stage follows ``cond.kind``: the text encoder (``text_encoder_*``), the class embedder, or none;
    ``cond_stage_params`` counts whichever there is.
    """
    unet_cfg = to_dataclass(cfg.unet, UNetConfig)
    text_cfg = to_dataclass(cfg.text_encoder, TextEncoderConfig)
    fs_cfg = to_dataclass(cfg.first_stage, FirstStageConfig)
    resolution = int(cfg.data.resolution)
    side = unet_cfg.image_size
    with torch.device("meta"):
        ldm = build_ldm(cfg, activation_checkpointing=False)  # model FLOPs: no recomputation
        unet, stage = ldm.unet, ldm.cond_stage_model
        kind = ldm.cond_kind
        z_channels = unet_cfg.in_channels - unet_cfg.concat_channels
        x = torch.empty(1, z_channels, side, side)
        t = torch.zeros(1, dtype=torch.long)
        # the cond stage's input: token ids [1, L] (text) or a label [1] (class)
        ids = torch.zeros(1, text_cfg.max_seq_len, dtype=torch.long) if kind in ("text", "layout") else \
            torch.zeros(1, dtype=torch.long)
        if kind == "semantic":  # the SpatialRescaler's 1x1 map is part of the concat input, not a context
            stage_params_only, stage = stage, None
        kwargs: dict[str, torch.Tensor] = {}
        if unet_cfg.num_classes is not None:
            kwargs["y"] = torch.zeros(1, dtype=torch.long)
        if unet_cfg.concat_channels:
            kwargs["concat"] = torch.empty(1, unet_cfg.concat_channels, side, side)
        if kind in ("text", "layout"):
            context = torch.empty(1, text_cfg.max_seq_len, text_cfg.n_embed)
        elif kind == "class":
            context = torch.empty(1, 1, int(unet_cfg.context_dim))
        else:
            context = None

        with torch.no_grad():
            unet_fwd = _flops(lambda: unet(x, t, context, **kwargs))
            stage_fwd = _flops(lambda: stage(ids)) if stage is not None else 0

        def train_step() -> None:
            ctx = stage(ids) if stage is not None else None
            unet(x, t, ctx, **kwargs).float().square().mean().backward()

        unet.train()
        if stage is not None:
            stage.train()
        train = _flops(train_step)

    stage_params = _count(stage) if stage is not None else _count(stage_params_only) if kind == "semantic" else 0
    text = stage if kind in ("text", "layout") else None
    unused = sum(p.numel() for n, p in text.named_parameters() if n in text.unused_parameter_names()) if text else 0
    out: dict[str, Any] = {
        "first_stage": fs_cfg.name,
        "resolution": resolution,
        "latent_shape": [z_channels, side, side],
        "cond_kind": kind,
        "unet_params": _count(unet),
        "cond_stage_params": stage_params,  # text encoder, class embedder, or 0 (unconditional)
        "text_encoder_params": stage_params if text is not None else 0,
        "text_encoder_unused_params": unused,  # to_logits: kept for checkpoint parity, never trained
        "trainable_params": _count(unet) + stage_params - unused,
        "unet_forward_gflops": unet_fwd / 1e9,
        "text_encoder_forward_gflops": (stage_fwd if text is not None else 0) / 1e9,
        "train_flops_per_sample": train,
        "train_gflops_per_sample": train / 1e9,
    }
    out.update(_first_stage_summary(fs_cfg, resolution))
    return out


def frozen_encoder_flops(cfg: DictConfig) -> dict[str, float]:
    """Per-sample FLOPs of a step in which only the UNet trains (the published Stable Diffusion recipes): the UNet's
    forward + backward given a text context, the frozen text encoder's forward, and the first stage's encode of the
    image (what a recipe that does not precompute latents runs every step). Meta device; no cond stage is trained."""
    from ldm_train.models.text_encoder import BERTEmbedder
    from ldm_train.models.unet import UNetModel

    unet_cfg = to_dataclass(cfg.unet, UNetConfig)
    text_cfg = to_dataclass(cfg.text_encoder, TextEncoderConfig)
    fs_cfg = to_dataclass(cfg.first_stage, FirstStageConfig)
    resolution, side = int(cfg.data.resolution), unet_cfg.image_size
    with torch.device("meta"):
        unet, text, first_stage = UNetModel(unet_cfg).train(), BERTEmbedder(text_cfg).eval(), build_first_stage(fs_cfg)
        x = torch.empty(1, unet_cfg.in_channels, side, side)
        t = torch.zeros(1, dtype=torch.long)
        context = torch.empty(1, text_cfg.max_seq_len, text_cfg.n_embed)
        ids = torch.zeros(1, text_cfg.max_seq_len, dtype=torch.long)
        image = torch.empty(1, fs_cfg.ddconfig.in_channels, resolution, resolution)
        unet_train = _flops(lambda: unet(x, t, context).float().square().mean().backward())
        with torch.no_grad():
            text_forward = _flops(lambda: text(ids))
            encode = _flops(lambda: first_stage.eval().encode_moments(image))
    return {"unet_params": _count(unet), "unet_train_flops": float(unet_train),
            "text_encoder_forward_flops": float(text_forward), "first_stage_encode_flops": float(encode)}
