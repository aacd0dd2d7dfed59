"""Noise schedules of the discrete-time diffusion process (DDPM, Ho et al. 2020; LDM, Rombach et al. 2022).

Everything is computed in float64 and stored in float32, as CompVis ``ddpm.py`` does, so our tables equal
the reference ones to float32 rounding. Kinds (CompVis ``make_beta_schedule`` names where they exist):

- ``"scaled_linear"``: the paper's LDM schedule, ``betas = linspace(sqrt(start), sqrt(end), T) ** 2`` (start
  0.00085, end 0.012 for the text-to-image model). Every released CompVis LDM uses it; CompVis configs call it
  ``linear``, diffusers ``scaled_linear``.
- ``"sqrt_linear"``: plain ``linspace(start, end, T)`` (DDPM; start 1e-4, end 0.02 for Ho et al.). CompVis'
  name; diffusers calls it ``linear``.
- ``"sqrt"``: ``linspace(start, end, T) ** 0.5`` (CompVis ``sqrt``).
- ``"cosine"``: Nichol & Dhariwal 2021, ``alpha_bar(t) = cos(((t/T + s) / (1 + s)) * pi/2) ** 2`` with s=0.008,
  betas clipped at 0.999. diffusers' ``squaredcos_cap_v2``.

``"linear"`` alone is refused: CompVis and diffusers give it different formulas (max |delta alphas_cumprod| 0.126
at 0.0015..0.0195). A CompVis config's ``beta_schedule`` (default ``linear``) is translated by
:func:`from_compvis_name`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from ldm_train.config import AMBIGUOUS_LINEAR, BETA_SCHEDULES

# CompVis make_beta_schedule's names -> ours (its default, and every released LDM's, is "linear")
COMPVIS_BETA_SCHEDULES = {"linear": "scaled_linear", "sqrt_linear": "sqrt_linear", "sqrt": "sqrt", "cosine": "cosine"}


def from_compvis_name(name: str) -> str:
    """Our name of a CompVis config's ``beta_schedule`` (``linear`` -> ``scaled_linear``)."""
    if name not in COMPVIS_BETA_SCHEDULES:
        raise ValueError(f"CompVis beta_schedule {name!r} is not one of {', '.join(COMPVIS_BETA_SCHEDULES)}")
    return COMPVIS_BETA_SCHEDULES[name]


def make_beta_schedule(
    kind: str,
    num_timesteps: int,
    linear_start: float = 0.00085,
    linear_end: float = 0.012,
    cosine_s: float = 8e-3,
) -> torch.Tensor:
    """Betas (float64, shape [T]) of a named schedule; see the module docstring for the formulas."""
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    if kind == "scaled_linear":
        return torch.linspace(linear_start**0.5, linear_end**0.5, num_timesteps, dtype=torch.float64) ** 2
    if kind == "sqrt_linear":
        return torch.linspace(linear_start, linear_end, num_timesteps, dtype=torch.float64)
    if kind == "sqrt":
        return torch.linspace(linear_start, linear_end, num_timesteps, dtype=torch.float64) ** 0.5
    if kind == "cosine":
        steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
        alpha_bar = torch.cos((steps + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
        betas = 1 - alpha_bar[1:] / alpha_bar[:-1]
        # the cap keeps the last step from being a pure-noise division by ~0 (Nichol & Dhariwal, sec. 3.2)
        return betas.clamp(0, 0.999)
    if kind == "linear":
        raise ValueError(AMBIGUOUS_LINEAR)
    raise ValueError(f"unknown beta schedule {kind!r}: pick one of {', '.join(BETA_SCHEDULES)}")


@dataclass(frozen=True)
class DiffusionSchedule:
    """The per-timestep tables of q(x_t | x_0) and the DDPM posterior, all float32 tensors of shape [T].

    ``alphas_cumprod[t]`` is the paper's alpha-bar_t: ``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps``.
    Build one with :meth:`from_betas` or :func:`make_schedule`; ``.to(device)`` returns a moved copy.
    """

    betas: torch.Tensor
    alphas_cumprod: torch.Tensor
    alphas_cumprod_prev: torch.Tensor  # a_{t-1}, with a_{-1} = 1 (CompVis / DDPM convention)
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    posterior_variance: torch.Tensor  # beta-tilde_t of q(x_{t-1} | x_t, x_0)
    posterior_mean_coef1: torch.Tensor  # multiplies x_0
    posterior_mean_coef2: torch.Tensor  # multiplies x_t

    @classmethod
    def from_betas(cls, betas: torch.Tensor) -> DiffusionSchedule:
        """Derive every table from betas in float64, then store float32 (as CompVis ``register_schedule``)."""
        b = torch.as_tensor(betas, dtype=torch.float64).flatten()
        if b.numel() == 0 or bool((b <= 0).any()) or bool((b >= 1).any()):
            raise ValueError("betas must be non-empty and strictly inside (0, 1)")
        a = torch.cumprod(1.0 - b, dim=0)
        a_prev = torch.cat([a.new_ones(1), a[:-1]])
        tables = {
            "betas": b,
            "alphas_cumprod": a,
            "alphas_cumprod_prev": a_prev,
            "sqrt_alphas_cumprod": a.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1 - a).sqrt(),
            "posterior_variance": b * (1 - a_prev) / (1 - a),
            "posterior_mean_coef1": b * a_prev.sqrt() / (1 - a),
            "posterior_mean_coef2": (1 - a_prev) * (1 - b).sqrt() / (1 - a),
        }
        return cls(**{k: v.to(torch.float32) for k, v in tables.items()})

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])

    @property
    def device(self) -> torch.device:
        return self.betas.device

    def to(self, device: torch.device | str) -> DiffusionSchedule:
        """A copy with every table on ``device`` (tables stay float32)."""
        return DiffusionSchedule(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio a_t / (1 - a_t) at integer timesteps ``t`` (float32, shape of ``t``)."""
        a = self.alphas_cumprod.to(t.device)[t.long()].double()
        return (a / (1 - a)).float()


def make_schedule(
    kind: str = "scaled_linear",
    num_timesteps: int = 1000,
    linear_start: float = 0.00085,
    linear_end: float = 0.012,
) -> DiffusionSchedule:
    """The schedule of a named beta schedule; defaults are the paper's (T=1000, scaled_linear 0.00085..0.012)."""
    return DiffusionSchedule.from_betas(make_beta_schedule(kind, num_timesteps, linear_start, linear_end))


def min_snr_weight(
    snr: torch.Tensor, gamma: float | None, parameterization: str = "eps"
) -> torch.Tensor:
    """Min-SNR-gamma loss weight (Hang et al. 2023) for a loss measured in ``parameterization`` space.

    The paper clamps the x0-space weight at ``min(snr, gamma)``. The eps-space MSE already carries a
    factor ``snr`` and the v-space MSE a factor ``snr + 1`` relative to the x0-space MSE, so the weights
    are ``min(snr, gamma) / snr`` (eps) and ``min(snr, gamma) / (snr + 1)`` (v). With ``gamma=inf``
    the eps weight is 1 and the v weight turns the v loss into exactly the plain eps loss.
    ``gamma=None`` means no weighting (all ones).
    """
    if gamma is None:
        return torch.ones_like(snr)
    if gamma <= 0:
        raise ValueError(f"min_snr_gamma must be > 0 (the paper uses 5), got {gamma}")
    clamped = snr.clamp(max=gamma)
    if parameterization == "eps":
        return clamped / snr
    if parameterization == "v":
        return clamped / (snr + 1)
    raise ValueError(f"parameterization must be 'eps' or 'v', got {parameterization!r}")
