"""One LDM training step in one place: the loss the trainer's micro-step and every benchmark compute.

Given a micro-batch of latents ``z0`` [B, C, h, w] (the first stage's ``E(x)`` times ``scale_factor``) and what
the cond stage takes (``cond``: token ids [B, L] for text, class labels [B] for class, the low-resolution image
[B, 3, h', w'] for concat, [masked latent, mask] for inpaint, a one-hot map for semantic, layout tokens for layout,
None unconditional), a step is::

    t, noise = draw_t_and_noise(z0, T, offset_noise, gen)  # t ~ U{0, ..., T-1}; eps ~ N(0, I) (+ offset noise)
    loss = training_loss(model, z0, cond, t, noise)        # model: the LatentDiffusion, or the DeepSpeed engine
    loss.backward()                                        # the trainer: engine.backward(loss); engine.step()

and ``training_loss`` runs the model's forward, which is ``ldm_loss`` below: the paper's L_LDM (eq. 2)::

    context = cond_stage(cond)                            # text encoder / class embedder, trained jointly
    x_t     = sqrt(a_t) z0 + sqrt(1 - a_t) eps            # q(x_t | z0): the forward process at t
    pred    = unet(x_t, t, context)                       # concat/inpaint/semantic: unet(cat(x_t, map), t)
    target  = eps  (or v = sqrt(a_t) eps - sqrt(1 - a_t) z0)
    loss    = mean_B [ w(t) mean_CHW (pred - target)^2 ]  # w: Min-SNR-gamma, or 1; l1: |pred - target|

The whole loss runs inside the model's forward (one module call): DeepSpeed's engine hooks the tensor its
forward returns (gradient-accumulation scaling, fp16 loss scaling) and gathers ZeRO-3 parameters around it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ldm_train.config import SPATIAL_KINDS
from ldm_train.diffusion.losses import diffusion_loss, sample_noise

if TYPE_CHECKING:
    from ldm_train.models.ldm import LatentDiffusion


def draw_t_and_noise(z0: torch.Tensor, num_timesteps: int, offset_noise: float,
                     generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's randomness, in this order from ``generator`` (on ``z0``'s device): timesteps [B] uniform in
    [0, num_timesteps), then float32 noise of ``z0``'s shape (``sample_noise``: offset noise when > 0)."""
    t = torch.randint(0, num_timesteps, (z0.shape[0],), device=z0.device, generator=generator)
    return t, sample_noise(z0.shape, offset_noise, generator, z0.device)


def ldm_loss(ldm: LatentDiffusion, z0: torch.Tensor, cond: Any, t: torch.Tensor,
             noise: torch.Tensor) -> torch.Tensor:
    """Per-sample L_LDM [B] (float32) of ``ldm``'s pieces: its cond stage, UNet and schedule
    (``LatentDiffusion.forward``; call it through ``training_loss``)."""
    if ldm.cond_kind in SPATIAL_KINDS:  # a map goes beside the noisy latent (concat, inpaint, semantic)
        if cond is None:
            what = {"concat": "low-resolution image", "inpaint": "masked image and mask"}.get(ldm.cond_kind, "map")
            raise ValueError(f"this model is conditioned on a concatenated {what} (cond.kind={ldm.cond_kind}) but "
                             "got none")
        concat = ldm.spatial_input(cond, z0.shape[-2:]).to(z0.dtype)

        def model_fn(x_t: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
            return ldm.unet(x_t, tt, concat=concat)
    else:
        context = ldm.encode_cond(cond)  # the cond stage: [B, L, D] context (text, class) or None

        def model_fn(x_t: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
            return ldm.model(x_t, tt, context=context)
    # x_t = q_sample(z0, t, noise); pred = model_fn(x_t, t); the eps or v target; the (weighted) error
    return diffusion_loss(model_fn, z0, t, noise, ldm.schedule_on(z0.device), parameterization=ldm.parameterization,
                          min_snr_gamma=ldm.min_snr_gamma, loss_type=ldm.loss_type)


def training_loss(model: Any, z0: torch.Tensor, cond: Any, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The micro-batch's loss (a float32 scalar, what backward takes): ``model`` is a ``LatentDiffusion``, the
    DeepSpeed engine wrapping one, or anything whose call is ``ldm_loss``. ``z0`` and ``noise`` in the dtype the
    model computes in (the trainer casts them to its bf16/fp16 precision; a benchmark may autocast instead)."""
    return model(z0, cond, t, noise).float().mean()
