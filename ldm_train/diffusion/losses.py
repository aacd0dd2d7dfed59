"""Forward process, prediction-space conversions and the training loss (pure functions).

Notation: ``a_t = alphas_cumprod[t]``; ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps``;
``v = sqrt(a_t) eps - sqrt(1 - a_t) x0`` (Salimans & Ho 2022). Per-timestep coefficients are gathered
from the float32 tables, broadcast over the non-batch dims, and cast to the data's dtype.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from ldm_train.config import LOSS_TYPES, PARAMETERIZATIONS
from ldm_train.diffusion.schedule import DiffusionSchedule, min_snr_weight

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _coef(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """table[t] shaped [B, 1, ..., 1] to broadcast against ``like`` ([B, ...]), in like's dtype/device."""
    vals = table.to(like.device)[t.to(like.device).long()]
    return vals.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def _check_param(parameterization: str) -> None:
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}, got {parameterization!r}")


def q_sample(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, schedule: DiffusionSchedule) -> torch.Tensor:
    """Draw x_t ~ q(x_t | x0) with the given noise: ``sqrt(a_t) x0 + sqrt(1 - a_t) noise``."""
    return (
        _coef(schedule.sqrt_alphas_cumprod, t, x0) * x0
        + _coef(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * noise
    )


def v_target(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, schedule: DiffusionSchedule) -> torch.Tensor:
    """The v-prediction target ``sqrt(a_t) eps - sqrt(1 - a_t) x0``."""
    return (
        _coef(schedule.sqrt_alphas_cumprod, t, x0) * noise
        - _coef(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * x0
    )


def pred_x0_from_eps(
    x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, schedule: DiffusionSchedule
) -> torch.Tensor:
    """x0 implied by an eps prediction: ``(x_t - sqrt(1 - a_t) eps) / sqrt(a_t)``."""
    return (x_t - _coef(schedule.sqrt_one_minus_alphas_cumprod, t, x_t) * eps) / _coef(
        schedule.sqrt_alphas_cumprod, t, x_t
    )


def pred_x0_from_v(x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor, schedule: DiffusionSchedule) -> torch.Tensor:
    """x0 implied by a v prediction: ``sqrt(a_t) x_t - sqrt(1 - a_t) v``."""
    return (
        _coef(schedule.sqrt_alphas_cumprod, t, x_t) * x_t
        - _coef(schedule.sqrt_one_minus_alphas_cumprod, t, x_t) * v
    )


def eps_from_v(x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor, schedule: DiffusionSchedule) -> torch.Tensor:
    """eps implied by a v prediction: ``sqrt(a_t) v + sqrt(1 - a_t) x_t``."""
    return (
        _coef(schedule.sqrt_alphas_cumprod, t, x_t) * v
        + _coef(schedule.sqrt_one_minus_alphas_cumprod, t, x_t) * x_t
    )


def v_from_eps(x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, schedule: DiffusionSchedule) -> torch.Tensor:
    """v implied by an eps prediction: ``(eps - sqrt(1 - a_t) x_t) / sqrt(a_t)``."""
    return (eps - _coef(schedule.sqrt_one_minus_alphas_cumprod, t, x_t) * x_t) / _coef(
        schedule.sqrt_alphas_cumprod, t, x_t
    )


def to_eps(
    x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor, schedule: DiffusionSchedule, parameterization: str
) -> torch.Tensor:
    """A model output in ``parameterization`` space turned into an eps prediction (samplers work in eps)."""
    _check_param(parameterization)
    return out if parameterization == "eps" else eps_from_v(x_t, t, out, schedule)


def sample_timesteps(
    batch_size: int,
    schedule: DiffusionSchedule,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Training timesteps drawn uniformly from {0, ..., T-1} (LongTensor [B]), as CompVis ``p_losses``."""
    gen_device = generator.device if generator is not None else "cpu"
    t = torch.randint(0, schedule.num_timesteps, (batch_size,), generator=generator, device=gen_device)
    return t.to(device if device is not None else schedule.device)


def diffusion_loss(
    model_fn: ModelFn,
    x0: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    schedule: DiffusionSchedule,
    parameterization: str = "eps",
    min_snr_gamma: float | None = None,
    loss_type: str = "l2",
) -> torch.Tensor:
    """Per-sample loss ([B], float32) between ``model_fn(x_t, t)`` and the eps or v target: the mean squared
    (``loss_type="l2"``) or absolute (``"l1"``) error.

    The trainer wraps the UNet and its conditioning into ``model_fn``; this is the paper's L_LDM
    (CompVis ``loss_simple``, mean over C, H, W) optionally reweighted by Min-SNR-gamma (l2 only: its weights
    are derived for a squared error). Take ``.mean()`` of the result for the batch loss.
    """
    _check_param(parameterization)
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if loss_type == "l1" and min_snr_gamma is not None:
        raise ValueError("min_snr_gamma weights a squared error: use loss_type='l2' with it, or min_snr_gamma=None")
    if x0.shape != noise.shape:
        raise ValueError(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} must have the same shape")
    x_t = q_sample(x0, t, noise, schedule)
    target = noise if parameterization == "eps" else v_target(x0, t, noise, schedule)
    pred = model_fn(x_t, t)
    if pred.shape != target.shape:
        raise ValueError(
            f"model_fn returned {tuple(pred.shape)} but the {parameterization} target is {tuple(target.shape)}: "
            "check the UNet's out_channels against the latent channels"
        )
    # float32 reduction: a bf16 model output must not make the loss itself bf16-rounded
    err = pred.float() - target.float()
    loss = (err.abs() if loss_type == "l1" else err.pow(2)).flatten(1).mean(dim=1)
    if min_snr_gamma is not None:
        loss = loss * min_snr_weight(schedule.snr(t.to(schedule.device)), min_snr_gamma, parameterization).to(
            loss.device
        )
    return loss


def sample_noise(shape: torch.Size | tuple[int, ...], offset_noise: float, generator: torch.Generator | None,
                 device: torch.device | str) -> torch.Tensor:
    """The forward process's noise: N(0, I), plus ``offset_noise`` * N(0, 1) per sample and channel, constant over
    the image (offset noise), when ``offset_noise`` > 0. With 0 it draws exactly what ``torch.randn`` would."""
    noise = torch.randn(shape, device=device, generator=generator)
    if offset_noise:
        noise = noise + offset_noise * torch.randn((*shape[:2], *([1] * (len(shape) - 2))), device=device,
                                                   generator=generator)
    return noise
