"""Samplers (DDPM ancestral, DDIM, PLMS) and classifier-free guidance, as pure functions.

Every sampler takes ``model_fn(x, t) -> eps`` (or v with ``parameterization="v"``), where ``t`` is a
LongTensor [B] of training timesteps, plus either ``shape`` or an explicit ``x_T``. Randomness comes only
from ``generator``: one ``torch.Generator`` for the whole batch, or a list with one generator per sample
(seed + sample index) so a sample does not depend on which rank or batch drew it. ``x_T`` is drawn
first, then the per-step noise in step order, the same order as diffusers' pipelines; per-step noise can
instead be given explicitly with ``noise`` (one tensor per step).

Timestep spacing (``make_timesteps``) defaults to ``"leading"`` with ``steps_offset=1``: ``arange(S) * (T//S)
+ 1`` reversed, diffusers' DDIMScheduler / PNDMScheduler with ``timestep_spacing="leading", steps_offset=1`` as
Stable Diffusion configures them. It equals CompVis ``make_ddim_timesteps(..., "uniform")`` when S divides T;
otherwise CompVis takes all of ``range(0, T, T//S) + 1`` (more than S steps): ``spacing="uniform_compvis"``. The
step after the last one lands on ``alphas_cumprod[0]`` (diffusers ``set_alpha_to_one=False``, CompVis
``alphas_prev[0]``), except DDPM whose last step lands on clean data (a = 1), as in CompVis ``p_sample``.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from ldm_train.config import TIMESTEP_SPACINGS
from ldm_train.diffusion.schedule import DiffusionSchedule

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
GeneratorArg = torch.Generator | Sequence[torch.Generator] | None
# callback(step_index, timestep, x after the step, predicted x0 at this step)
Callback = Callable[[int, int, torch.Tensor, torch.Tensor], None]


def randn(
    shape: Sequence[int],
    generator: GeneratorArg = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal noise of ``shape``; with a list of generators, sample i comes from generator i.

    Noise is drawn on each generator's own device and then moved, so a CPU generator gives the same
    numbers whichever device samples (diffusers ``randn_tensor`` draws the same values).
    """
    shape = tuple(shape)
    if generator is None:
        return torch.randn(shape, device=device, dtype=dtype)
    if isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)
    if len(generator) != shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}: pass one per sample")
    return torch.stack(
        [torch.randn(shape[1:], generator=g, device=g.device, dtype=dtype).to(device) for g in generator]
    )


def make_timesteps(
    num_train_timesteps: int, num_steps: int, spacing: str = "leading", steps_offset: int = 1
) -> list[int]:
    """Descending sampling timesteps. ``"leading"``: ``arange(S) * (T // S) + steps_offset``, exactly S steps
    (diffusers DDIM / PNDM as Stable Diffusion configures them); ``"trailing"``: ``round(arange(T, 0, -T / S)) - 1``
    (ends at T-1, ignores steps_offset); ``"uniform_compvis"``: CompVis ``make_ddim_timesteps("uniform", S, T)``,
    ``range(0, T, T // S) + steps_offset``, which has MORE than S steps when S does not divide T (30 -> 31,
    150 -> 167). CompVis' DDIMSampler calls the model at these shifted values and takes a_t from them too."""
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_train_timesteps}], got {num_steps}")
    if spacing == "leading":
        ts = [i * (num_train_timesteps // num_steps) + steps_offset for i in range(num_steps)][::-1]
    elif spacing == "trailing":
        ratio = num_train_timesteps / num_steps
        ts = [round(num_train_timesteps - i * ratio) - 1 for i in range(num_steps)]
    elif spacing == "uniform_compvis":
        ts = [t + steps_offset for t in range(0, num_train_timesteps, num_train_timesteps // num_steps)][::-1]
    else:
        raise ValueError(f"spacing must be one of {', '.join(TIMESTEP_SPACINGS)}, got {spacing!r}")
    if ts[0] >= num_train_timesteps or ts[-1] < 0:
        raise ValueError(
            f"timesteps {ts[-1]}..{ts[0]} fall outside [0, {num_train_timesteps - 1}]: with {num_steps} steps use "
            "steps_offset=0 or spacing='trailing'"
        )
    return ts


def _start(
    shape: Sequence[int] | None,
    x_T: torch.Tensor | None,
    generator: GeneratorArg,
    device: torch.device | str | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    if x_T is not None:
        return x_T
    if shape is None:
        raise ValueError("pass either shape or x_T")
    return randn(shape, generator, device, dtype)


def _step_noise(
    i: int, x: torch.Tensor, generator: GeneratorArg, noise: Sequence[torch.Tensor] | None
) -> torch.Tensor:
    if noise is not None:
        if i >= len(noise):
            raise ValueError(f"noise has {len(noise)} tensors but step {i} needs one: pass one per step")
        return noise[i].to(device=x.device, dtype=x.dtype)
    return randn(x.shape, generator, x.device, x.dtype)


def _eps_and_x0(out: torch.Tensor, x: torch.Tensor, a_t: float, parameterization: str):
    """(eps, x0) from a model output at a noise level a_t (python floats keep the host from syncing)."""
    sa, s1a = math.sqrt(a_t), math.sqrt(1.0 - a_t)
    if parameterization == "eps":
        return out, (x - s1a * out) / sa
    if parameterization == "v":
        return sa * out + s1a * x, sa * x - s1a * out
    raise ValueError(f"parameterization must be 'eps' or 'v', got {parameterization!r}")


def _call(model_fn: ModelFn, x: torch.Tensor, t: int) -> torch.Tensor:
    return model_fn(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long))


def _ddim_update(
    x0: torch.Tensor, eps: torch.Tensor, a_prev: float, sigma: float, z: torch.Tensor | None
) -> torch.Tensor:
    x_prev = math.sqrt(a_prev) * x0 + math.sqrt(max(1.0 - a_prev - sigma**2, 0.0)) * eps
    return x_prev if z is None else x_prev + sigma * z


def ddim_sample(
    model_fn: ModelFn,
    schedule: DiffusionSchedule,
    shape: Sequence[int] | None = None,
    *,
    x_T: torch.Tensor | None = None,
    num_steps: int = 50,
    eta: float = 0.0,
    parameterization: str = "eps",
    generator: GeneratorArg = None,
    noise: Sequence[torch.Tensor] | None = None,
    spacing: str = "leading",
    steps_offset: int = 1,
    callback: Callback | None = None,
    progress: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """DDIM (Song et al. 2021); ``eta=0`` deterministic, ``eta=1`` the DDPM posterior variance.

    ``sigma_t = eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))`` as in CompVis ``DDIMSampler``.
    """
    a = schedule.alphas_cumprod.double().cpu().tolist()  # one host copy up front, none per step
    ts = make_timesteps(len(a), num_steps, spacing, steps_offset)
    x = _start(shape, x_T, generator, device, dtype)
    for i, t in enumerate(tqdm(ts, disable=not progress, desc="DDIM")):
        a_t = a[t]
        a_prev = a[ts[i + 1]] if i + 1 < len(ts) else a[0]
        eps, x0 = _eps_and_x0(_call(model_fn, x, t), x, a_t, parameterization)
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
        z = _step_noise(i, x, generator, noise) if eta > 0 else None
        x = _ddim_update(x0, eps, a_prev, sigma, z)
        if callback is not None:
            callback(i, t, x, x0)
    return x


def ddpm_sample(
    model_fn: ModelFn,
    schedule: DiffusionSchedule,
    shape: Sequence[int] | None = None,
    *,
    x_T: torch.Tensor | None = None,
    num_steps: int | None = None,
    parameterization: str = "eps",
    generator: GeneratorArg = None,
    noise: Sequence[torch.Tensor] | None = None,
    spacing: str = "leading",
    steps_offset: int = 1,
    callback: Callback | None = None,
    progress: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Ancestral sampling from the DDPM posterior q(x_prev | x_t, x0_hat) with variance beta-tilde.

    ``num_steps=None`` (or T) runs all T steps (t = T-1 .. 0), exactly CompVis ``p_sample_loop`` without
    clipping. With fewer steps the chain is respaced (Nichol & Dhariwal): beta_t = 1 - a_t / a_prev
    between consecutive sampled timesteps. The last step returns the posterior mean at a = 1 (no noise).
    """
    a = schedule.alphas_cumprod.double().cpu().tolist()
    # adjacent steps use the posterior tables, which were derived from betas in float64: recomputing
    # beta_t = 1 - a_t / a_{t-1} from float32 a's cancels to ~1e-4 relative error per step
    tables = [
        getattr(schedule, n).double().cpu().tolist()
        for n in ("posterior_mean_coef1", "posterior_mean_coef2", "posterior_variance")
    ]
    T = len(a)
    full = num_steps is None or num_steps == T  # T steps can only mean every timestep
    ts = list(range(T - 1, -1, -1)) if full else make_timesteps(T, num_steps, spacing, steps_offset)
    x = _start(shape, x_T, generator, device, dtype)
    for i, t in enumerate(tqdm(ts, disable=not progress, desc="DDPM")):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1  # -1: clean data, a = 1
        a_t, a_prev = a[t], (a[t_prev] if t_prev >= 0 else 1.0)
        if t_prev == t - 1:
            c_x0, c_xt, var = (tab[t] for tab in tables)
        else:  # respaced: the posterior between two non-adjacent timesteps
            beta = 1.0 - a_t / a_prev
            c_x0 = math.sqrt(a_prev) * beta / (1 - a_t)
            c_xt = math.sqrt(1 - beta) * (1 - a_prev) / (1 - a_t)
            var = beta * (1 - a_prev) / (1 - a_t)
        _, x0 = _eps_and_x0(_call(model_fn, x, t), x, a_t, parameterization)
        mean = c_x0 * x0 + c_xt * x
        x = (mean + math.sqrt(var) * _step_noise(i, x, generator, noise)) if var > 0 else mean
        if callback is not None:
            callback(i, t, x, x0)
    return x


def plms_sample(
    model_fn: ModelFn,
    schedule: DiffusionSchedule,
    shape: Sequence[int] | None = None,
    *,
    x_T: torch.Tensor | None = None,
    num_steps: int = 50,
    parameterization: str = "eps",
    generator: GeneratorArg = None,
    spacing: str = "leading",
    steps_offset: int = 1,
    callback: Callback | None = None,
    progress: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Pseudo linear multistep (Liu et al. 2022) as CompVis ``PLMSSampler`` (eta 0).

    The first step is a pseudo improved Euler (two model calls, so S steps cost S + 1 calls), then
    Adams-Bashforth of order 2, 3 and 4 on the eps history, each applied through the DDIM update.
    Equal to diffusers' PNDMScheduler with ``skip_prk_steps=True``.
    """
    a = schedule.alphas_cumprod.double().cpu().tolist()
    ts = make_timesteps(len(a), num_steps, spacing, steps_offset)
    x = _start(shape, x_T, generator, device, dtype)
    old_eps: list[torch.Tensor] = []

    def update(x: torch.Tensor, eps: torch.Tensor, a_t: float, a_prev: float) -> tuple[torch.Tensor, torch.Tensor]:
        x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        return _ddim_update(x0, eps, a_prev, 0.0, None), x0

    for i, t in enumerate(tqdm(ts, disable=not progress, desc="PLMS")):
        a_t = a[t]
        t_next = ts[i + 1] if i + 1 < len(ts) else ts[-1]
        a_prev = a[ts[i + 1]] if i + 1 < len(ts) else a[0]
        eps, _ = _eps_and_x0(_call(model_fn, x, t), x, a_t, parameterization)
        if not old_eps:
            x_euler, _ = update(x, eps, a_t, a_prev)
            eps_next, _ = _eps_and_x0(_call(model_fn, x_euler, t_next), x_euler, a[t_next], parameterization)
            eps_prime = (eps + eps_next) / 2
        elif len(old_eps) == 1:
            eps_prime = (3 * eps - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            eps_prime = (23 * eps - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            eps_prime = (55 * eps - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x, x0 = update(x, eps_prime, a_t, a_prev)
        old_eps = [*old_eps[-2:], eps]
        if callback is not None:
            callback(i, t, x, x0)
    return x


def _cat_cond(uncond: Any, cond: Any) -> Any:
    if isinstance(cond, Mapping):
        return {k: _cat_cond(uncond[k], v) for k, v in cond.items()}
    if cond is None:
        return None
    return torch.cat([uncond, cond])


def _call_model(model: Callable[..., torch.Tensor], x: torch.Tensor, t: torch.Tensor, c: Any) -> torch.Tensor:
    return model(x, t, **c) if isinstance(c, Mapping) else model(x, t, c)


def cfg_model_fn(
    model: Callable[..., torch.Tensor],
    cond: torch.Tensor | Mapping[str, torch.Tensor],
    uncond: torch.Tensor | Mapping[str, torch.Tensor],
    guidance_scale: float | torch.Tensor,
) -> ModelFn:
    """Classifier-free guidance (Ho & Salimans 2022): ``uncond + s * (cond - uncond)`` as a model_fn.

    ``model(x, t, c)`` is called once per step on the batch ``[uncond; cond]`` (CompVis order); a mapping
    ``cond`` (e.g. ``{"context": ..., "y": ...}``) is concatenated key by key and passed as keywords, so
    ``cfg_model_fn(unet, {"context": c}, {"context": u}, 7.5)`` works with ``UNetModel`` directly.
    ``guidance_scale`` is a float or a per-sample tensor [B]. A float scale of exactly 1 is the
    conditional model alone, so it skips the unconditional half of the batch.
    """
    if isinstance(guidance_scale, (int, float)) and guidance_scale == 1:
        return lambda x, t: _call_model(model, x, t, cond)
    c_in = _cat_cond(uncond, cond)  # concatenated once, not per step

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out_uncond, out_cond = _call_model(model, torch.cat([x, x]), torch.cat([t, t]), c_in).chunk(2)
        s = guidance_scale
        if isinstance(s, torch.Tensor):
            s = s.to(device=out_cond.device, dtype=out_cond.dtype).reshape(-1, *([1] * (out_cond.ndim - 1)))
        return out_uncond + s * (out_cond - out_uncond)

    return guided
