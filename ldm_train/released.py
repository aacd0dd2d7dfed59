"""The released CompVis latent-diffusion configs as our presets: ``python -m ldm_train.released``.

Each row names a released config (``configs/latent-diffusion/*.yaml`` or ``models/ldm/*/config.yaml`` of
CompVis/latent-diffusion), the Hydra overrides that build the same model here, and the parameter count the paper
states for it (Rombach et al. 2022, Tabs. 12-15, rounded there). The command builds every row on the meta device
(no weights, nothing allocated) and prints one JSON object per row: parameters of each group under its CompVis
prefix, whether a checkpoint of that layout loads strictly into our modules, and why not where it does not.
``tests/ldm_train/test_released_rows.py`` checks every row against its released layout written out from the yaml's
numbers (names, shapes, a strict load of a state dict in that layout); ``tests/ldm_train/models/test_released_options.py``
checks the UNet layouts key for key against diffusers.
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
    # semantic synthesis' cond stage, built beside a unet_only UNet: SpatialRescaler(n_stages, in, out channels)
    spatial_rescaler: tuple[int, int, int] | None = None


VQ4_UNCOND = ("experiment=celebahq_ldm4",)
# CompVis "linear" 0.0015..0.0205 with an L1 loss: inpainting_big, semantic_synthesis*, layout2img-openimages256
L1_0205 = ("train.diffusion.linear_end=0.0205", "train.diffusion.loss_type=l1")
SEMANTIC = ("experiment=bsr_sr_ldm4", "unet=semantic_synthesis", *L1_0205)
# the v1 class model: cin-ldm-vq-f8's layout (vq-f8 latents 32x32x4, model_channels 256, heads of 32 channels),
# a ClassEmbedder of CompVis' default 1000 rows (no null class)
CIN_VQ_F8 = ("experiment=cin256_ldm4", "unet=cin_vq_f8", "first_stage=vq_f8", "cond.null_class=false")

ROWS = (
    Released("configs/latent-diffusion/celebahq-ldm-vq-4.yaml", VQ4_UNCOND, "274M"),
    Released("configs/latent-diffusion/ffhq-ldm-vq-4.yaml", VQ4_UNCOND, "274M"),
    Released("configs/latent-diffusion/lsun_bedrooms-ldm-vq-4.yaml", VQ4_UNCOND, "274M"),
    Released("configs/latent-diffusion/lsun_churches-ldm-kl-8.yaml", ("experiment=lsun_churches_ldm8",), "294M"),
    Released("configs/latent-diffusion/cin256-v2.yaml", ("experiment=cin256_ldm4",), "400M"),
    Released("configs/latent-diffusion/cin-ldm-vq-f8.yaml", CIN_VQ_F8, ""),
    Released("configs/latent-diffusion/txt2img-1p4B-eval.yaml", ("experiment=txt2img_1p45b",), "1.45B"),
    # the paper's 169M SR model is its ImageNet one (Tab. 5), not the released general-purpose bsr_sr: no count stated
    Released("models/ldm/bsr_sr/config.yaml", ("experiment=bsr_sr_ldm4",), ""),
    # the released unconditional checkpoints: the configs/latent-diffusion layouts above
    Released("models/ldm/celeba256/config.yaml", VQ4_UNCOND, "274M"),
    Released("models/ldm/cin256/config.yaml", CIN_VQ_F8, ""),
    Released("models/ldm/ffhq256/config.yaml", VQ4_UNCOND, "274M"),
    # the cond stage is the first stage itself (CompVis __is_first_stage__): no weights of its own
    Released("models/ldm/inpainting_big/config.yaml",
             ("experiment=bsr_sr_ldm4", "first_stage=vq_f4_noattn", "unet.in_channels=7", "unet.concat_channels=4",
              "unet.model_channels=256", "unet.num_heads=8", "unet.num_head_channels=-1",
              "unet.channel_mult=[1,2,3,4]", "unet.attention_resolutions=[8,4,2]", "unet.resblock_updown=true",
              *L1_0205),
             "387M", unet_only=True),
    # layout tokens (box coordinates and classes) through a BERTEmbedder without tokenizer: cond.kind=text's modules
    Released("models/ldm/layout2img-openimages256/config.yaml",
             ("experiment=celebahq_ldm4", "cond.kind=text", "unet=layout2img", "text_encoder=bert_layout2img",
              *L1_0205), ""),
    Released("models/ldm/lsun_beds256/config.yaml", VQ4_UNCOND, "274M"),
    Released("models/ldm/lsun_churches256/config.yaml", ("experiment=lsun_churches_ldm8",), "294M"),
    Released("models/ldm/semantic_synthesis256/config.yaml", SEMANTIC, "", unet_only=True,
             spatial_rescaler=(2, 182, 3)),
    Released("models/ldm/semantic_synthesis512/config.yaml", (*SEMANTIC, "data.resolution=512"), "",
             unet_only=True, spatial_rescaler=(2, 182, 3)),
    Released("models/ldm/text2img256/config.yaml",
             ("experiment=celebahq_ldm4", "cond.kind=text", "unet=text2img256", "text_encoder=bert_text2img256"), ""),
)


def _count(sd: dict[str, torch.Size], prefix: str) -> int:
    return sum(s.numel() for k, s in sd.items() if k.startswith(prefix))


def build_row(row: Released) -> tuple[torch.nn.Module, torch.nn.Module | None, torch.nn.Module]:
    """Our UNet, trainable cond stage (None where the release has none) and first stage for ``row``, on the meta
    device: the modules a checkpoint of the released layout loads into (``load_compvis``)."""
    from ldm_train.build import build_ldm
    from ldm_train.config import FirstStageConfig, UNetConfig, to_dataclass
    from ldm_train.models.autoencoder import build_first_stage
    from ldm_train.models.spatial_rescaler import SpatialRescaler
    from ldm_train.models.unet import UNetModel
    from ldm_train.summary import compose_config

    cfg = compose_config(list(row.overrides))
    with torch.device("meta"):
        if row.unet_only:
            unet = UNetModel(to_dataclass(cfg.unet, UNetConfig))
            stage = SpatialRescaler(*row.spatial_rescaler) if row.spatial_rescaler else None
        else:
            ldm = build_ldm(cfg, activation_checkpointing=False)
            unet, stage = ldm.unet, ldm.cond_stage_model
        first = build_first_stage(to_dataclass(cfg.first_stage, FirstStageConfig))
    return unet, stage, first


def shapes(unet: torch.nn.Module, stage: torch.nn.Module | None, first: torch.nn.Module) -> dict[str, torch.Size]:
    """The CompVis-layout state dict (key -> shape) of built modules: ``model.diffusion_model.*``,
    ``cond_stage_model.*`` (a trainable cond stage only) and ``first_stage_model.*`` (its loss excluded)."""
    out = {UNET_PREFIX + k: v.shape for k, v in unet.state_dict().items()}
    if stage is not None:
        out |= {TEXT_PREFIX + k: v.shape for k, v in stage.state_dict().items()}
    out |= {FIRST_STAGE_PREFIX + k: v.shape for k, v in first.state_dict().items() if not k.startswith("loss.")}
    return out


def layout(row: Released) -> dict[str, torch.Size]:
    """``shapes`` of the model ``row`` builds, on the meta device."""
    return shapes(*build_row(row))


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
