"""Parameter counts and FLOPs of a composed model: ``python -m ldm_train.summary experiment=txt2img_1p45b``.

Composes ``conf/train.yaml`` with the given Hydra overrides (any ``first_stage=``, ``unet=``,
``text_encoder=``, ``data.resolution=``...) and prints ONE JSON object. Every model is built on the meta
device, so the 1.45B configuration allocates nothing; FLOPs come from
``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions, attention; a multiply-add counts 2).
``train_flops_per_sample`` is forward + backward of everything trained (UNet + text encoder) for one
sample, without activation-checkpoint recomputation: the model FLOPs to use for MFU.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ldm_train.config import FirstStageConfig, TextEncoderConfig, UNetConfig, register_configs, to_dataclass
from ldm_train.models.text_encoder import BERTEmbedder
from ldm_train.models.unet import UNetModel

CONF_DIR = Path(os.environ.get("LDM_TRAIN_CONF", Path(__file__).resolve().parent.parent / "conf"))


def compose_config(overrides: list[str], config_name: str = "train") -> DictConfig:
    """The composed root config (Hydra compose API: no output dir, no logging setup)."""
    from hydra import compose, initialize_config_dir

    register_configs()
    try:  # the trainer's schema (``/schema/train``) is referenced by conf/train.yaml
        from ldm_train.trainer.config import register_trainer_configs

        register_trainer_configs()
    except ImportError:
        pass
    if not (CONF_DIR / f"{config_name}.yaml").is_file():
        raise FileNotFoundError(f"no {config_name}.yaml in {CONF_DIR}: set LDM_TRAIN_CONF to the repo's conf/ directory")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _flops(fn: Any) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _first_stage_summary(cfg: FirstStageConfig, resolution: int) -> dict[str, Any]:
    try:
        from ldm_train.models.autoencoder import build_first_stage
    except ImportError as err:  # the summary of the diffusion model stays useful without it
        return {"first_stage_params": None, "first_stage_error": str(err)}
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
    """Counts and FLOPs of the composed ``unet`` / ``text_encoder`` / ``first_stage`` (meta device)."""
    unet_cfg = dataclasses.replace(to_dataclass(cfg.unet, UNetConfig), use_checkpoint=False)
    text_cfg = dataclasses.replace(to_dataclass(cfg.text_encoder, TextEncoderConfig), use_checkpoint=False)
    fs_cfg = to_dataclass(cfg.first_stage, FirstStageConfig)
    resolution = int(cfg.data.resolution)
    side = unet_cfg.image_size
    with_text = unet_cfg.context_dim is not None
    if with_text and unet_cfg.context_dim != text_cfg.n_embed:
        raise ValueError(f"unet.context_dim={unet_cfg.context_dim} but text_encoder.n_embed={text_cfg.n_embed}")

    with torch.device("meta"):
        unet = UNetModel(unet_cfg)
        text = BERTEmbedder(text_cfg) if with_text else None
        z_channels = unet_cfg.in_channels - unet_cfg.concat_channels
        x = torch.empty(1, z_channels, side, side)
        t = torch.zeros(1, dtype=torch.long)
        ids = torch.zeros(1, text_cfg.max_seq_len, dtype=torch.long)
        kwargs: dict[str, torch.Tensor] = {}
        if unet_cfg.num_classes is not None:
            kwargs["y"] = torch.zeros(1, dtype=torch.long)
        if unet_cfg.concat_channels:
            kwargs["concat"] = torch.empty(1, unet_cfg.concat_channels, side, side)
        context = torch.empty(1, text_cfg.max_seq_len, text_cfg.n_embed) if with_text else None

        with torch.no_grad():
            unet_fwd = _flops(lambda: unet(x, t, context, **kwargs))
            text_fwd = _flops(lambda: text(ids)) if text is not None else 0

        def train_step() -> None:
            ctx = text(ids) if text is not None else None
            unet(x, t, ctx, **kwargs).float().square().mean().backward()

        unet.train()
        if text is not None:
            text.train()
        train = _flops(train_step)

    text_params = _count(text) if text is not None else 0
    unused = sum(p.numel() for n, p in text.named_parameters() if n in text.unused_parameter_names()) if text else 0
    out: dict[str, Any] = {
        "first_stage": fs_cfg.name,
        "resolution": resolution,
        "latent_shape": [z_channels, side, side],
        "unet_params": _count(unet),
        "text_encoder_params": text_params,
        "text_encoder_unused_params": unused,  # to_logits: kept for checkpoint parity, never trained
        "trainable_params": _count(unet) + text_params - unused,
        "unet_forward_gflops": unet_fwd / 1e9,
        "text_encoder_forward_gflops": text_fwd / 1e9,
        "train_flops_per_sample": train,
        "train_gflops_per_sample": train / 1e9,
    }
    out.update(_first_stage_summary(fs_cfg, resolution))
    return out


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        return
    print(json.dumps(summarize(compose_config(args))))


if __name__ == "__main__":
    main()
