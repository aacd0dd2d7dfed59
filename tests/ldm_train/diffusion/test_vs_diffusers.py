"""Our DDIM and PLMS reproduce diffusers' DDIMScheduler / PNDMScheduler step for step (the SD configuration)."""
from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from ldm_train.diffusion.samplers import ddim_sample, ddpm_sample, make_timesteps, plms_sample
from ldm_train.diffusion.schedule import DiffusionSchedule, make_beta_schedule

diffusers = pytest.importorskip("diffusers")
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

SHAPE = (3, 4, 8, 8)
# Stable Diffusion's scheduler config: the paper's schedule, leading spacing with steps_offset 1
SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
          set_alpha_to_one=False, steps_offset=1)


def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A deterministic, nonlinear, t-dependent stand-in for a UNet (a linear one could hide a wrong x0)."""
    tt = (t.float() / 1000).reshape(-1, 1, 1, 1)
    return torch.tanh(x) * (0.5 + tt) + 0.1 * torch.cos(3 * x)


def _collect() -> tuple[list[torch.Tensor], Callable]:
    xs: list[torch.Tensor] = []
    return xs, lambda i, t, x, x0: xs.append(x.clone())


@pytest.mark.parametrize(
    ("eta", "spacing", "steps", "prediction"),
    [(0.0, "leading", 50, "epsilon"), (0.8, "leading", 50, "epsilon"), (0.0, "trailing", 25, "epsilon"),
     (1.0, "leading", 30, "v_prediction")],
)
def test_ddim_matches_diffusers_step_for_step(
    schedule: DiffusionSchedule, eta: float, spacing: str, steps: int, prediction: str
) -> None:
    ref = diffusers.DDIMScheduler(**SD, clip_sample=False, timestep_spacing=spacing, prediction_type=prediction)
    ref.set_timesteps(steps)
    assert make_timesteps(1000, steps, spacing) == ref.timesteps.tolist()

    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(SHAPE, generator=g)
    noise = [torch.randn(SHAPE, generator=g) for _ in range(steps)]
    x, ref_xs = x_T.clone(), []
    for i, t in enumerate(ref.timesteps):
        out = model_fn(x, t.expand(SHAPE[0]))
        x = ref.step(out, t, x, eta=eta, variance_noise=noise[i] if eta > 0 else None).prev_sample
        ref_xs.append(x)

    xs, callback = _collect()
    param = "eps" if prediction == "epsilon" else "v"
    ddim_sample(model_fn, schedule, x_T=x_T.clone(), num_steps=steps, eta=eta, noise=noise,
                spacing=spacing, parameterization=param, callback=callback)
    assert len(xs) == len(ref_xs) == steps
    for i, (ours, theirs) in enumerate(zip(xs, ref_xs, strict=True)):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5, msg=lambda m, i=i: f"step {i}: {m}")
    assert not torch.allclose(xs[-1], x_T, atol=0.1)  # the chain did move


@pytest.mark.parametrize("per_sample", [False, True])
def test_ddim_generator_draws_like_a_diffusers_pipeline(schedule: DiffusionSchedule, per_sample: bool) -> None:
    """x_T then the step noise from the same generator(s), as diffusers' pipelines draw them."""
    def gens() -> torch.Generator | list[torch.Generator]:
        if per_sample:  # seed + sample index: eval's rank-independent seeding
            return [torch.Generator().manual_seed(100 + i) for i in range(SHAPE[0])]
        return torch.Generator().manual_seed(7)

    ref = diffusers.DDIMScheduler(**SD, clip_sample=False)
    ref.set_timesteps(20)
    g = gens()
    x = randn_tensor(SHAPE, generator=g)
    for t in ref.timesteps:
        x = ref.step(model_fn(x, t.expand(SHAPE[0])), t, x, eta=0.5, generator=g).prev_sample

    ours = ddim_sample(model_fn, schedule, SHAPE, num_steps=20, eta=0.5, generator=gens())
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)


def test_per_sample_generators_make_samples_independent_of_the_batch(schedule: DiffusionSchedule) -> None:
    """Sample i depends only on its own generator: the same seed gives the same sample in any batch split."""
    full = ddim_sample(model_fn, schedule, SHAPE, num_steps=10, eta=1.0,
                       generator=[torch.Generator().manual_seed(s) for s in (5, 6, 7)])
    part = ddim_sample(model_fn, schedule, (1, *SHAPE[1:]), num_steps=10, eta=1.0,
                       generator=[torch.Generator().manual_seed(6)])
    torch.testing.assert_close(part[0], full[1], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(full[0], full[1], atol=1e-2)


@pytest.mark.parametrize("steps", [50, 7])
def test_plms_matches_diffusers_pndm_without_prk(schedule: DiffusionSchedule, steps: int) -> None:
    """CompVis PLMS == diffusers PNDMScheduler(skip_prk_steps=True), whose first call is the Euler half-step.

    (Only for eps: with v-prediction diffusers averages the raw v history and converts it with the current
    x, while CompVis/SD2's PLMS converts each output to eps at its own x and t, as we do; see
    test_samplers.py for our v path.)"""
    ref = diffusers.PNDMScheduler(**SD, skip_prk_steps=True)
    ref.set_timesteps(steps)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    x, ref_xs = x_T.clone(), []
    for t in ref.timesteps:
        x = ref.step(model_fn(x, t.expand(SHAPE[0])), t, x).prev_sample
        ref_xs.append(x)
    ref_xs = ref_xs[1:]  # drop the intermediate Euler sample of the first step

    calls = 0

    def counting(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return model_fn(x, t)

    xs, callback = _collect()
    plms_sample(counting, schedule, x_T=x_T.clone(), num_steps=steps, callback=callback)
    assert calls == steps + 1
    assert len(xs) == len(ref_xs) == steps
    for i, (ours, theirs) in enumerate(zip(xs, ref_xs, strict=True)):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5, msg=lambda m, i=i: f"step {i}: {m}")


def test_ddpm_respaced_matches_diffusers_ddpm_scheduler(schedule: DiffusionSchedule) -> None:
    """Ancestral sampling with the beta-tilde variance (diffusers "fixed_small") on 40 respaced steps."""
    ref = diffusers.DDPMScheduler(**{k: v for k, v in SD.items() if k != "set_alpha_to_one"},
                                  clip_sample=False, variance_type="fixed_small")
    ref.set_timesteps(40)
    g = torch.Generator().manual_seed(11)
    x = randn_tensor(SHAPE, generator=g)
    for t in ref.timesteps:
        x = ref.step(model_fn(x, t.expand(SHAPE[0])), t, x, generator=g).prev_sample
    ours = ddpm_sample(model_fn, schedule, SHAPE, num_steps=40, generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)


def test_ddpm_full_chain_is_closer_to_float64_than_diffusers(schedule: DiffusionSchedule) -> None:
    """All 1000 steps. diffusers recomputes beta_t = 1 - a_t / a_{t-1} in float32 (catastrophic cancellation,
    ~1e-4 relative per step); we use CompVis' float64-derived posterior tables. Judge both against the
    CompVis chain computed entirely in float64 from the paper's betas."""
    ref = diffusers.DDPMScheduler(**{k: v for k, v in SD.items() if k != "set_alpha_to_one"},
                                  clip_sample=False, variance_type="fixed_small")
    ref.set_timesteps(1000)
    ref.timesteps, ref.config.steps_offset = torch.arange(999, -1, -1), 0  # leading+offset 1 would start at 1000
    g = torch.Generator().manual_seed(11)
    x_T = randn_tensor(SHAPE, generator=g)
    noise = [torch.randn(SHAPE, generator=g) for _ in range(999)]  # what diffusers draws for t = 999..1
    x, g = x_T.clone(), torch.Generator().manual_seed(11)
    randn_tensor(SHAPE, generator=g)  # replay the stream: diffusers then draws the noise of t = 999..1
    for t in ref.timesteps:
        x = ref.step(model_fn(x, t.expand(SHAPE[0])), t, x, generator=g).prev_sample
    ours = ddpm_sample(model_fn, schedule, x_T=x_T.clone(), noise=noise)

    b = make_beta_schedule("scaled_linear", 1000)  # float64 throughout: CompVis register_schedule + p_sample
    a = torch.cumprod(1 - b, 0)
    a_prev = torch.cat([a.new_ones(1), a[:-1]])
    exact = x_T.double()
    for t, z in zip(range(999, -1, -1), [*noise, None], strict=True):
        x0 = (exact - (1 - a[t]).sqrt() * model_fn(exact, torch.full((SHAPE[0],), t))) / a[t].sqrt()
        exact = (b[t] * a_prev[t].sqrt() * x0 + (1 - a_prev[t]) * (1 - b[t]).sqrt() * exact) / (1 - a[t])
        if z is not None:
            exact = exact + (b[t] * (1 - a_prev[t]) / (1 - a[t])).sqrt() * z.double()
    ours_err = (ours.double() - exact).abs().max().item()
    theirs_err = (x.double() - exact).abs().max().item()
    assert ours_err < 1e-4 and ours_err < theirs_err / 4, (ours_err, theirs_err)
    assert theirs_err < 2e-3  # the same algorithm, only diffusers' rounding differs
