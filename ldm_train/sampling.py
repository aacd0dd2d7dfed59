"""The one sampling function: conditions -> latents (DDIM / PLMS / DDPM with classifier-free guidance) -> images.

A condition per sample follows the model's ``cond_kind``: a prompt (text; the empty caption is the unconditional
input), a class index (class; the null class is the unconditional input), None (none: unconditional, the
guidance scale is ignored), a low-resolution image [3, h, w] in [-1, 1] (concat: super-resolution; no guidance), the
[masked latent, mask] [z + 1, h, w] (inpaint), a one-hot segmentation [K, H, W] (semantic) or a list of objects
(layout; the tokenizer is the ``LayoutTokenizer``). Used by the trainer's sample grid and by ``eval``. Sample ``i`` of a call gets its own ``torch.Generator``
seeded ``seeds[i]`` for the initial noise and any sampler noise, so a sample does not depend on the batch
or the rank that drew it.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ldm_train.config import SAMPLERS, SPATIAL_KINDS
from ldm_train.diffusion.samplers import cfg_model_fn, ddim_sample, ddpm_sample, plms_sample
from ldm_train.models.ldm import LatentDiffusion
from ldm_train.runtime.precision import autocast


@dataclass
class SamplerSettings:
    sampler: str = "ddim"
    steps: int = 50
    eta: float = 0.0
    guidance_scale: float = 1.0
    seed: int = 0
    batch_size: int = 16
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast of UNet, text encoder and decoder; CUDA)
    # leading (exactly `steps`; diffusers / SD) | uniform_compvis (CompVis DDIMSampler: range(0, T, T // steps) + 1,
    # more than `steps` when they do not divide T) | trailing; ldm_train/diffusion/samplers.py make_timesteps
    spacing: str = "leading"


def conditioning(model: LatentDiffusion, tokenizer: Any, conds: Sequence[Any],
                 device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The UNet keywords of ``conds`` and of the unconditional input, for ``cfg_model_fn``."""
    kind = model.cond_kind
    if kind == "text":
        from ldm_train.data.tokenizer import tokenize

        max_len = model.cond_stage_model.cfg.max_seq_len
        prompts = [str(p) for p in conds]
        cond = model.encode_text(tokenize(tokenizer, prompts, max_len).to(device))
        uncond = model.encode_text(tokenize(tokenizer, [""] * len(prompts), max_len).to(device))
        return {"context": cond}, {"context": uncond}
    if kind == "class":
        stage = model.cond_stage_model
        n_real = stage.n_classes - (1 if stage.null_label is not None else 0)
        labels = [int(c) for c in conds]
        bad = [c for c in labels if not 0 <= c < n_real]
        if bad:
            raise ValueError(f"class labels {bad[:5]} are outside the model's classes 0..{n_real - 1}")
        cond = stage(torch.tensor(labels, dtype=torch.long, device=device))
        uncond = stage(stage.unconditional(len(labels), device)) if stage.null_label is not None else cond
        return {"context": cond}, {"context": uncond}
    if kind == "layout":  # ``tokenizer``: the model's LayoutTokenizer; the empty layout is the unconditional input
        layouts = [list(c) for c in conds]
        cond = model.encode_cond(tokenizer.batch(layouts).to(device))
        uncond = model.encode_cond(tokenizer.batch([[] for _ in layouts]).to(device))
        return {"context": cond}, {"context": uncond}
    if kind in SPATIAL_KINDS:
        raise ValueError(f"cond.kind={kind} conditioning needs the latent size: use sample_latents")
    return {}, {}


@torch.no_grad()
def sample_latents(model: LatentDiffusion, tokenizer: Any, conds: Sequence[Any], seeds: Sequence[int],
                   settings: SamplerSettings, latent_shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """Latents [B, *latent_shape], one per condition (unscaled: divide by the scale factor before decoding)."""
    if len(conds) != len(seeds):
        raise ValueError(f"{len(conds)} conditions but {len(seeds)} seeds: one each per sample")
    scale = float(settings.guidance_scale)
    if model.cond_kind == "none" or model.cond_kind in SPATIAL_KINDS:
        scale = 1.0  # unconditional, or a concatenated image (trained without dropout): nothing to guide with
    elif model.cond_kind == "class" and scale != 1 and model.cond_stage_model.null_label is None:
        raise ValueError(f"guidance_scale={scale:g} needs the null class (cond.null_class=true): use guidance_scale=1")
    if model.cond_kind in SPATIAL_KINDS:
        images = torch.stack([torch.as_tensor(c, dtype=torch.float32) for c in conds]).to(device)
        cond = uncond = {"concat": model.spatial_input(images, tuple(latent_shape[-2:]))}
    else:
        cond, uncond = conditioning(model, tokenizer, conds, device)
    model_fn = cfg_model_fn(model.unet, cond, uncond, scale)
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    shape = (len(seeds), *latent_shape)
    schedule = model.schedule_on(torch.device(device))
    common = dict(parameterization=model.parameterization, generator=generators, device=device,
                  spacing=settings.spacing)
    if settings.sampler == "ddim":
        return ddim_sample(model_fn, schedule, shape, num_steps=settings.steps, eta=settings.eta, **common)
    if settings.sampler == "plms":
        return plms_sample(model_fn, schedule, shape, num_steps=settings.steps, **common)
    if settings.sampler == "ddpm":
        return ddpm_sample(model_fn, schedule, shape, num_steps=settings.steps, **common)
    raise ValueError(f"sampler={settings.sampler!r}: use one of {SAMPLERS}")


@torch.no_grad()
def sample_images(model: LatentDiffusion, first_stage: torch.nn.Module | None, tokenizer: Any, conds: Sequence[Any],
                  seeds: Sequence[int], settings: SamplerSettings, latent_shape: Sequence[int], scale_factor: float,
                  device: torch.device) -> torch.Tensor:
    """Images [B, 3, H, W] in [-1, 1]: sampled latents decoded by ``first_stage``, one per condition (prompt,
    class index or None, as the model's ``cond_kind``).

    Without a first stage the first three latent channels are shown, each image normalised to [-1, 1]
    (enough to see whether colours follow the prompt in a run that has no decoder yet).
    """
    with autocast(device, settings.precision):
        z = sample_latents(model, tokenizer, conds, seeds, settings, latent_shape, device)
        return _decode(first_stage, z, scale_factor).float()


def _decode(first_stage: torch.nn.Module | None, z: torch.Tensor, scale_factor: float) -> torch.Tensor:
    if first_stage is not None:
        return first_stage.decode(z / scale_factor)
    images = z[:, :3]
    if images.shape[1] < 3:
        images = images.repeat(1, 3, 1, 1)[:, :3]
    lo = images.amin(dim=(1, 2, 3), keepdim=True)
    hi = images.amax(dim=(1, 2, 3), keepdim=True)
    return (images - lo) / (hi - lo).clamp_min(1e-6) * 2 - 1
