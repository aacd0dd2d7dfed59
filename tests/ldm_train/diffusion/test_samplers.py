"""Samplers on a problem with a known answer: Gaussian data and its exact eps predictor (conftest.GaussianData).

For data N(mu, sigma^2) the probability-flow ODE is solvable in closed form: with xbar = x / sqrt(a) and
s = sqrt((1 - a) / a), d xbar / d s = eps = (xbar - mu) s / (sigma^2 + s^2), so
xbar_end - mu = (xbar_start - mu) * sqrt(sigma^2 + s_end^2) / sqrt(sigma^2 + s_start^2).
Deterministic samplers are checked against that map; all samplers against the data's moments.
"""
from __future__ import annotations

import math

import pytest
import torch

from ldm_train.diffusion.losses import v_from_eps
from ldm_train.diffusion.samplers import ddim_sample, ddpm_sample, make_timesteps, plms_sample, randn
from ldm_train.diffusion.schedule import DiffusionSchedule

# latents are scaled to unit variance (scale_factor), so the realistic regime is sigma ~ 1
MU = [-1.0, 0.5, 2.0, 0.0]
SIGMA = [1.0, 0.75, 1.5, 1.25]
N = 16384


def _ode_exact(data, x_start: torch.Tensor, t_start: int) -> torch.Tensor:
    """x at alphas_cumprod[0] (where our DDIM/PLMS end) on the exact ODE path through x_start at t_start."""
    a_s, a_e = data.a[t_start], data.a[0]
    s_s, s_e = ((1 - a_s) / a_s).sqrt(), ((1 - a_e) / a_e).sqrt()
    xbar = x_start.double() / a_s.sqrt()
    ratio = (data.sigma**2 + s_e**2).sqrt() / (data.sigma**2 + s_s**2).sqrt()
    return a_e.sqrt() * (data.mu + (xbar - data.mu) * ratio)


def _ode_error(sampler, data, schedule: DiffusionSchedule, steps: int) -> float:
    t_start = make_timesteps(1000, steps)[0]
    x_T = data.marginal(t_start, 512, torch.Generator().manual_seed(0), torch.float64)
    out = sampler(data.eps, schedule, x_T=x_T, num_steps=steps)
    return ((out - _ode_exact(data, x_T, t_start)).abs().amax(0) / data.sigma).max().item()


def test_ddim_and_plms_converge_to_the_exact_ode_solution(schedule: DiffusionSchedule, gaussian_data) -> None:
    data = gaussian_data(MU, SIGMA)
    ddim = {s: _ode_error(ddim_sample, data, schedule, s) for s in (25, 50, 100)}
    plms = {s: _ode_error(plms_sample, data, schedule, s) for s in (25, 50, 100)}
    # DDIM is Euler in (s, xbar): first order, doubling the steps about halves the error
    assert 0.35 < ddim[50] / ddim[25] < 0.7 and 0.35 < ddim[100] / ddim[50] < 0.7, ddim
    # PLMS is 4th-order multistep after its warm-up: far below DDIM, and falling faster than 2nd order
    assert plms[50] < ddim[50] / 5 and plms[100] < plms[50] / 4, (plms, ddim)
    assert plms[100] < 2e-3 and ddim[100] < 0.1


# Discretisation allowances on the relative std error, measured with 200k samples per dimension for
# these sigmas (|bias| at most: DDPM-1000 0.5%, also found exactly by a variance recursion; DDIM-250
# eta 0 0.9%; DDIM-250 eta 1 2.0%; PLMS-50 0.35%). DDPM's beta-tilde variance and DDIM's first-order
# steps shrink the spread a little at any finite step count; the allowance is that bias rounded up, and
# the statistical part (5 standard errors) is added separately. A wrong coefficient moves it by far more.
CASES = {
    "ddpm_1000": (ddpm_sample, {}, 0.008),
    "ddim_250_eta0": (ddim_sample, {"num_steps": 250}, 0.012),
    "ddim_250_eta1": (ddim_sample, {"num_steps": 250, "eta": 1.0}, 0.03),
    "plms_50": (plms_sample, {"num_steps": 50}, 0.006),
}


@pytest.mark.parametrize("name", list(CASES))
def test_samplers_draw_the_data_distribution(schedule: DiffusionSchedule, gaussian_data, name: str) -> None:
    sampler, kwargs, allowance = CASES[name]
    data = gaussian_data(MU, SIGMA)
    gen = torch.Generator().manual_seed(1234)
    t_start = 999 if "num_steps" not in kwargs else make_timesteps(1000, kwargs["num_steps"])[0]
    # start from the exact marginal at the first timestep: N(0, I) at t=999 would leave a mean bias of
    # ~mu * sqrt(a_999) that the ODE samplers carry to the end, unrelated to the sampler's correctness
    x_T = data.marginal(t_start, N, gen)
    out = sampler(data.eps, schedule, x_T=x_T, generator=gen, **kwargs).double()
    a0 = data.a[0]
    if sampler is ddpm_sample:  # DDPM ends on E[x0 | x at t=0]: a 0.1%-level shrink of the spread
        exp_mean, exp_std = data.mu, data.sigma**2 * (a0 / (a0 * data.sigma**2 + 1 - a0)).sqrt()
    else:  # DDIM / PLMS end on q(x) at alphas_cumprod[0]
        exp_mean, exp_std = a0.sqrt() * data.mu, (a0 * data.sigma**2 + 1 - a0).sqrt()
    # 5 standard errors: of the mean sigma/sqrt(N), of the std sigma/sqrt(2N) (Gaussian)
    mean_err = (out.mean(0) - exp_mean).abs() / exp_std
    std_err = (out.std(0) / exp_std - 1).abs()
    assert torch.all(mean_err < 5 / math.sqrt(N)), (name, mean_err)
    assert torch.all(std_err < 5 / math.sqrt(2 * N) + allowance), (name, std_err)


@pytest.mark.parametrize("sampler", [ddpm_sample, ddim_sample, plms_sample])
def test_v_parameterization_gives_the_same_chain(schedule: DiffusionSchedule, gaussian_data, sampler) -> None:
    data = gaussian_data(MU, SIGMA)
    v_model = lambda x, t: v_from_eps(x, t, data.eps(x, t), schedule)  # noqa: E731
    kw = {"num_steps": 20} if sampler is not ddpm_sample else {"num_steps": 50}
    if sampler is ddim_sample:
        kw["eta"] = 0.5
    runs = []
    for model, param in ((data.eps, "eps"), (v_model, "v")):
        runs.append(sampler(model, schedule, (64, 4), parameterization=param, dtype=torch.float64,
                            generator=torch.Generator().manual_seed(9), **kw))
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-7, atol=1e-7)


def test_ddpm_all_steps_is_the_compvis_chain(schedule: DiffusionSchedule, gaussian_data) -> None:
    """num_steps=None visits t = 999..0 and adds no noise at t=0 (CompVis p_sample's nonzero_mask)."""
    data = gaussian_data(MU, SIGMA)
    seen: list[int] = []
    noise = [torch.zeros(2, 4) for _ in range(1000)]
    noise[-1] = torch.full((2, 4), 1e6)  # must be ignored: the last step is the posterior mean
    x_T = data.marginal(999, 2, torch.Generator().manual_seed(0))
    out = ddpm_sample(data.eps, schedule, x_T=x_T, noise=noise, callback=lambda i, t, x, x0: seen.append(t))
    assert seen == list(range(999, -1, -1))
    assert out.abs().max() < 10
    again = ddpm_sample(data.eps, schedule, x_T=x_T, noise=noise, num_steps=1000)  # T steps == the full chain
    assert torch.equal(again, out)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_generators_give_the_same_samples_on_cuda(schedule: DiffusionSchedule, gaussian_data) -> None:
    data = gaussian_data(MU, SIGMA)
    eps = lambda x, t: data.eps(x.cpu(), t.cpu()).to(x.device)  # noqa: E731

    def run(device: str) -> torch.Tensor:
        gens = [torch.Generator().manual_seed(s) for s in range(8)]
        return ddim_sample(eps, schedule.to(device), (8, 4), num_steps=20, eta=1.0, generator=gens, device=device)

    torch.testing.assert_close(run("cuda").cpu(), run("cpu"), rtol=1e-5, atol=1e-5)


def test_randn_and_bad_arguments() -> None:
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    z = randn((2, 3), gens)
    torch.testing.assert_close(z[1], torch.randn(3, generator=torch.Generator().manual_seed(2)))
    with pytest.raises(ValueError, match="one per sample"):
        randn((3, 3), gens)
    with pytest.raises(ValueError, match="steps_offset=0"):
        make_timesteps(1000, 1000)  # leading + offset 1 would ask for t=1000
    assert make_timesteps(1000, 1000, steps_offset=0) == list(range(999, -1, -1))
    assert make_timesteps(1000, 4, "trailing") == [999, 749, 499, 249]
    with pytest.raises(ValueError, match="shape or x_T"):
        ddim_sample(lambda x, t: x, DiffusionSchedule.from_betas(torch.full((10,), 0.1)), num_steps=2)


def _compvis_ddim_timesteps(num_ddim: int, num_ddpm: int = 1000) -> list[int]:
    """CompVis make_ddim_timesteps("uniform", S, T), written out: range(0, T, T // S) + 1 (ascending)."""
    c = num_ddpm // num_ddim
    return [t + 1 for t in range(0, num_ddpm, c)]


@pytest.mark.parametrize(("steps", "count", "first", "last"), [(30, 31, 991, 1), (150, 167, 997, 1), (50, 50, 981, 1),
                                                               (250, 250, 997, 1)])
def test_uniform_compvis_spacing_is_compvis_make_ddim_timesteps(steps: int, count: int, first: int, last: int) -> None:
    ts = make_timesteps(1000, steps, "uniform_compvis")
    assert ts == _compvis_ddim_timesteps(steps)[::-1]  # DDIMSampler walks np.flip(ddim_timesteps)
    assert (len(ts), ts[0], ts[-1]) == (count, first, last)
    if 1000 % steps == 0:  # the default "leading" is the same where S divides T, S steps otherwise
        assert ts == make_timesteps(1000, steps)
    else:
        assert len(make_timesteps(1000, steps)) == steps


def test_uniform_compvis_spacing_past_the_schedule_is_refused() -> None:
    # 300 steps: c = 3, range(0, 1000, 3) has 334 entries, the last 999 + 1 = 1000: CompVis indexes alphas_cumprod[1000]
    assert len(range(0, 1000, 3)) == 334
    with pytest.raises(ValueError, match=r"outside \[0, 999\]"):
        make_timesteps(1000, 300, "uniform_compvis")
    assert make_timesteps(1000, 300, "uniform_compvis", steps_offset=0)[0] == 999
    with pytest.raises(ValueError, match="uniform_compvis"):
        make_timesteps(1000, 30, "uniform")


def test_ddim_with_uniform_compvis_is_the_compvis_ddim_sampler(schedule: DiffusionSchedule) -> None:
    """CompVis DDIMSampler: alphas = ac[ddim_timesteps], alphas_prev = [ac[0]] + ac[ddim_timesteps[:-1]], the model
    called at the same (shifted) timesteps, walked in reverse; eta 0."""
    ac = schedule.alphas_cumprod.double()
    ts = _compvis_ddim_timesteps(30)
    alphas, alphas_prev = ac[ts], torch.cat([ac[:1], ac[ts[:-1]]])
    x_T = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def eps_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 0.3 * x + 1e-3 * t.double().reshape(-1, 1, 1, 1)

    x, called = x_T.clone(), []
    for index in reversed(range(len(ts))):
        t = torch.full((2,), ts[index], dtype=torch.long)
        e = eps_model(x, t)
        a_t, a_prev = alphas[index], alphas_prev[index]
        x0 = (x - (1 - a_t).sqrt() * e) / a_t.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * e
        called.append(ts[index])
    seen: list[int] = []

    def spy(x_: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append(int(t[0]))
        return eps_model(x_, t)

    ours = ddim_sample(spy, schedule, x_T=x_T, num_steps=30, spacing="uniform_compvis")
    assert seen == called and len(seen) == 31
    torch.testing.assert_close(ours, x, rtol=1e-10, atol=1e-10)
