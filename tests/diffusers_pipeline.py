"""A random text-to-image pipeline built with diffusers' own classes and saved with save_pretrained, with the
architecture of one of our configs: what a model trained elsewhere with diffusers looks like on disk."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def save_diffusers_pipeline(folder: Path, cfg: Any, tokenizer_dir: str | Path, seed: int = 0) -> Any:
    """Write ``folder`` (model_index.json, unet/, vqvae/, bert/, tokenizer/, scheduler/); returns the pipeline.
    Its LDMBert config is diffusers' default shape (77 positions, no ldm_train key), weights perturbed from
    diffusers' init so that every tensor matters."""
    import diffusers
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel

    from ldm_train.checkpoints.compvis import UNET_PREFIX
    from ldm_train.checkpoints.diffusers_export import _vae_config, unet_diffusers_config
    from ldm_train.checkpoints.ldmbert import ldmbert_config
    from ldm_train.config import FirstStageConfig, TextEncoderConfig, UNetConfig, to_dataclass
    from ldm_train.data.tokenizer import load_tokenizer
    from ldm_train.models.unet import UNetModel

    unet_cfg = to_dataclass(cfg.unet, UNetConfig)
    fs_cfg = to_dataclass(cfg.first_stage, FirstStageConfig)
    text_cfg = to_dataclass(cfg.text_encoder, TextEncoderConfig)
    with torch.device("meta"):
        shapes = {UNET_PREFIX + k: v for k, v in UNetModel(unet_cfg).state_dict().items()}
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(**unet_diffusers_config(unet_cfg, fs_cfg, shapes))
    vae = diffusers.AutoencoderKL(**_vae_config(fs_cfg, 0.9))
    bert_config = {k: v for k, v in ldmbert_config(text_cfg).items() if k != "ldm_train_max_seq_len"}
    bert = LDMBertModel(LDMBertConfig(**{**bert_config, "max_position_embeddings": 77}))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in (unet, vae, bert):
            for p in module.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    pipe = diffusers.LDMTextToImagePipeline(vqvae=vae.eval(), bert=bert.eval(), tokenizer=load_tokenizer(
        str(tokenizer_dir)), unet=unet.eval(), scheduler=diffusers.DDIMScheduler())
    pipe.save_pretrained(str(folder))
    return pipe
