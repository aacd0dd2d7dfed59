"""A grid of samples for fixed prompts during training (rank 0; DDIM few steps with classifier-free guidance).

The weights come in as a full CompVis-layout state dict (EMA by default), loaded into a plain copy of the
model kept on rank 0, so sampling never touches the DeepSpeed engine (ZeRO-3 partitions included).
Latents are decoded by the first stage when ``first_stage.checkpoint`` is set; otherwise the grid shows
the first three latent channels, normalised, which still shows whether colours follow the prompt.
"""
from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig

from ldm_train.config import FirstStageConfig, to_dataclass

_CACHE: dict[str, Any] = {}


def clear_cache() -> None:
    _CACHE.clear()


def _plain_model(cfg: DictConfig, device: torch.device) -> torch.nn.Module:
    if "model" not in _CACHE:
        from ldm_train.trainer.build import build_model

        _CACHE["model"] = build_model(cfg).to(device).eval()
    return _CACHE["model"]


def _first_stage(cfg: DictConfig, device: torch.device) -> torch.nn.Module | None:
    if cfg.first_stage.get("checkpoint") is None:
        return None
    if "first_stage" not in _CACHE:
        from ldm_train.models.autoencoder import load_first_stage

        _CACHE["first_stage"] = load_first_stage(to_dataclass(cfg.first_stage, FirstStageConfig)).to(device).eval()
    return _CACHE["first_stage"]


@torch.no_grad()
def render_grid(
    cfg: DictConfig,
    state_dict: dict[str, torch.Tensor],
    tokenizer: Any,
    sampling: Any,
    scale_factor: float,
    device: torch.device,
) -> torch.Tensor:
    """Sample one image per prompt (seed fixed by ``sampling.seed``) -> images [N, 3, H, W] in [-1, 1]."""
    from ldm_train.data.tokenizer import tokenize
    from ldm_train.diffusion.samplers import cfg_model_fn, ddim_sample

    model = _plain_model(cfg, device)
    model.load_state_dict(state_dict, strict=True)
    prompts = list(sampling.prompts)
    max_len = int(cfg.text_encoder.max_seq_len)
    cond = model.encode_text(tokenize(tokenizer, prompts, max_len).to(device))
    uncond = model.encode_text(tokenize(tokenizer, [""] * len(prompts), max_len).to(device))
    unet = model.model.diffusion_model
    model_fn = cfg_model_fn(unet, {"context": cond}, {"context": uncond}, float(sampling.guidance_scale))
    c, size = int(cfg.unet.out_channels), int(cfg.unet.image_size)
    gen = torch.Generator(device="cpu").manual_seed(int(sampling.seed))
    z = ddim_sample(model_fn, model.schedule.to(device), (len(prompts), c, size, size), num_steps=int(sampling.steps),
                    eta=float(sampling.eta), parameterization=model.parameterization, generator=gen, device=device)
    first_stage = _first_stage(cfg, device)
    if first_stage is not None:
        images = first_stage.decode(z / scale_factor).clamp(-1, 1)
    else:
        images = z[:, :3]
        if images.shape[1] < 3:
            images = images.repeat(1, 3, 1, 1)[:, :3]
        lo = images.amin(dim=(1, 2, 3), keepdim=True)
        hi = images.amax(dim=(1, 2, 3), keepdim=True)
        images = (images - lo) / (hi - lo).clamp_min(1e-6) * 2 - 1
    return images.float().cpu()
