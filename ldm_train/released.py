"""The released CompVis latent-diffusion configs as our presets: ``python -m ldm_train.released``.

Each row names a released config (``configs/latent-diffusion/*.yaml`` or ``models/ldm/*/config.yaml`` of
CompVis/latent-diffusion), the Hydra overrides that build the same model here, and the parameter count the paper
states for it (Rombach et al. 2022, Tabs. 12-15, rounded there). The command builds every row on the meta device
(no weights, nothing allocated) and prints one JSON object per row: parameters of each group under its CompVis
prefix, whether a checkpoint of that layout loads strictly into our modules, and why not where it does not.
``tests/ldm_train/models/test_released_options.py`` checks the same layouts key for key against diffusers.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass

import torch

from ldm_train.checkpoints.compvis import FIRST_STAGE_PREFIX, TEXT_PREFIX, UNET_PREFIX


@dataclass(frozen=True)
class Released:
    config: str  # path in CompVis/latent-diffusion
    overrides: tuple[str, ...]  # ours: conf/train.yaml + these
    paper_params: str  # the total the paper states (UNet + trainable cond stage), "" where it states none
    loadable: bool = True
    why_not: str = ""
    unet_only: bool = False  # build the UNet alone (a layout no cond kind of ours feeds)


ROWS = (
    Released("configs/latent-diffusion/celebahq-ldm-vq-4.yaml", ("experiment=celebahq_ldm4",), "274M"),
    Released("configs/latent-diffusion/ffhq-ldm-vq-4.yaml", ("experiment=celebahq_ldm4",), "274M"),
    Released("configs/latent-diffusion/lsun_bedrooms-ldm-vq-4.yaml", ("experiment=celebahq_ldm4",), "274M"),
    Released("configs/latent-diffusion/lsun_churches-ldm-kl-8.yaml", ("experiment=lsun_churches_ldm8",), "294M"),
    # the v1 class model: cin-ldm-vq-f8's layout (vq-f8 latents 32x32x4, model_channels 256, heads of 32 channels),
    # a ClassEmbedder of CompVis' default 1000 rows (no null class)
    Released("models/ldm/cin256/config.yaml",
             ("experiment=cin256_ldm4", "unet=cin_vq_f8", "first_stage=vq_f8", "cond.null_class=false"), ""),
    Released("configs/latent-diffusion/cin256-v2.yaml", ("experiment=cin256_ldm4",), "400M"),
    Released("configs/latent-diffusion/cin-ldm-vq-f8.yaml",
             ("experiment=cin256_ldm4", "unet=cin_vq_f8", "first_stage=vq_f8", "cond.null_class=false"), ""),
    Released("configs/latent-diffusion/txt2img-1p4B-eval.yaml", ("experiment=txt2img_1p45b",), "1.45B"),
    # the paper's 169M SR model is its ImageNet one (Tab. 5), not the released general-purpose bsr_sr: no count stated
    Released("models/ldm/bsr_sr/config.yaml", ("experiment=bsr_sr_ldm4",), ""),
    Released("models/ldm/inpainting_big/config.yaml",
             ("experiment=bsr_sr_ldm4", "first_stage=vq_f4_noattn", "unet.in_channels=7", "unet.concat_channels=4",
              "unet.model_channels=256",
              "unet.channel_mult=[1,2,3,4]", "unet.attention_resolutions=[8,4,2]", "unet.resblock_updown=true"),
             "387M", loadable=False, unet_only=True,
             why_not="the UNet layout builds (7 input channels: latent + masked image + mask), but there is no "
                     "inpainting data path (mask + masked image as the concat input), so the model cannot be trained "
                     "or sampled here"),
)


def _count(sd: dict[str, torch.Size], prefix: str) -> int:
    return sum(s.numel() for k, s in sd.items() if k.startswith(prefix))


def layout(row: Released) -> dict[str, torch.Size]:
    """The CompVis-layout state dict (key -> shape) of the model ``row`` builds: ``model.diffusion_model.*``,
    ``cond_stage_model.*`` (a trainable cond stage only) and ``first_stage_model.*``, on the meta device."""
    from ldm_train.build import build_ldm
    from ldm_train.config import FirstStageConfig, UNetConfig, to_dataclass
    from ldm_train.models.autoencoder import build_first_stage
    from ldm_train.models.unet import UNetModel
    from ldm_train.summary import compose_config

    cfg = compose_config(list(row.overrides))
    with torch.device("meta"):
        if row.unet_only:
            unet, stage = UNetModel(to_dataclass(cfg.unet, UNetConfig)), None
        else:
            ldm = build_ldm(cfg, activation_checkpointing=False)
            unet, stage = ldm.unet, ldm.cond_stage_model
        first = build_first_stage(to_dataclass(cfg.first_stage, FirstStageConfig))
    out = {UNET_PREFIX + k: v.shape for k, v in unet.state_dict().items()}
    if stage is not None:
        out |= {TEXT_PREFIX + k: v.shape for k, v in stage.state_dict().items()}
    out |= {FIRST_STAGE_PREFIX + k: v.shape for k, v in first.state_dict().items() if not k.startswith("loss.")}
    return out


def table() -> list[dict]:
    rows = []
    for row in ROWS:
        sd = layout(row)
        unet, cond = _count(sd, UNET_PREFIX), _count(sd, TEXT_PREFIX)
        rows.append({
            "config": row.config, "overrides": " ".join(row.overrides),
            "unet_params": unet, "cond_stage_params": cond, "first_stage_params": _count(sd, FIRST_STAGE_PREFIX),
            "params": unet + cond, "paper_params": row.paper_params or None,
            "cond_stage_keys": {k: list(s) for k, s in sd.items() if k.startswith(TEXT_PREFIX)} if cond < 10**6 else
            f"{sum(k.startswith(TEXT_PREFIX) for k in sd)} tensors",
            "loadable": row.loadable, "why_not": row.why_not or None,
        })
    return rows


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        return
    for row in table():
        print(json.dumps(row))


if __name__ == "__main__":
    main()
