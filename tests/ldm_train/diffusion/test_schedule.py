"""Schedules equal the reference formulas (CompVis ddpm.py) and diffusers' schedulers."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ldm_train.diffusion.schedule import DiffusionSchedule, make_beta_schedule, make_schedule, min_snr_weight

diffusers = pytest.importorskip("diffusers")


def test_paper_schedule_equals_compvis_formula() -> None:
    # CompVis make_beta_schedule("linear") + register_schedule: float64 numpy cumprod, stored float32
    betas = (np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2)
    alphas_cumprod = np.cumprod(1.0 - betas)
    s = make_schedule()
    assert s.num_timesteps == 1000
    assert s.betas.dtype == torch.float32
    np.testing.assert_allclose(s.betas.numpy(), betas.astype(np.float32), rtol=1e-7)
    np.testing.assert_allclose(s.alphas_cumprod.numpy(), alphas_cumprod.astype(np.float32), rtol=1e-7)
    np.testing.assert_allclose(s.alphas_cumprod_prev.numpy()[1:], s.alphas_cumprod.numpy()[:-1])
    assert s.alphas_cumprod_prev[0].item() == 1.0
    # the paper's end point: a_999 ~ 0.00466 (SD / LDM's terminal SNR)
    assert math.isclose(s.alphas_cumprod[-1].item(), 0.0046600, rel_tol=1e-3)


@pytest.mark.parametrize(
    ("kind", "diffusers_kind", "start", "end"),
    [("scaled_linear", "scaled_linear", 0.00085, 0.012), ("sqrt_linear", "linear", 1e-4, 0.02),
     ("cosine", "squaredcos_cap_v2", 0, 0)],
)
def test_schedules_equal_diffusers(kind: str, diffusers_kind: str, start: float, end: float) -> None:
    ref = diffusers.DDIMScheduler(
        num_train_timesteps=1000, beta_start=start, beta_end=end, beta_schedule=diffusers_kind
    )
    s = make_schedule(kind, 1000, start, end)
    # diffusers builds betas and the cumprod in float32; we do float64 then round: equal to float32 noise
    torch.testing.assert_close(s.betas, ref.betas, rtol=2e-6, atol=1e-9)
    torch.testing.assert_close(s.alphas_cumprod, ref.alphas_cumprod, rtol=2e-5, atol=1e-7)


def test_compvis_sqrt_and_sqrt_linear_formulas() -> None:
    # CompVis make_beta_schedule: "sqrt_linear" = linspace(start, end), "sqrt" = linspace(start, end) ** 0.5
    lin = np.linspace(1e-4, 0.02, 50, dtype=np.float64)
    np.testing.assert_allclose(make_beta_schedule("sqrt_linear", 50, 1e-4, 0.02).numpy(), lin, rtol=1e-12)
    np.testing.assert_allclose(make_beta_schedule("sqrt", 50, 1e-4, 0.02).numpy(), lin**0.5, rtol=1e-12)


def test_posterior_tables_are_the_ddpm_posterior() -> None:
    s = make_schedule("sqrt_linear", 100, 1e-4, 0.02)
    a, a_prev, b = s.alphas_cumprod.double(), s.alphas_cumprod_prev.double(), s.betas.double()
    # q(x_{t-1}|x_t,x0) mean coefficients must reproduce x_{t-1}'s marginal: for x_t built from x0 and
    # eps, E[x_{t-1}] = c1 x0 + c2 E[x_t | x0] = sqrt(a_prev) x0
    c1, c2 = s.posterior_mean_coef1.double(), s.posterior_mean_coef2.double()
    torch.testing.assert_close(c1 + c2 * a.sqrt(), a_prev.sqrt(), rtol=1e-6, atol=1e-7)
    # and the total variance: c2^2 (1 - a) + var = 1 - a_prev
    torch.testing.assert_close(c2**2 * (1 - a) + s.posterior_variance.double(), 1 - a_prev, rtol=1e-5, atol=1e-7)
    assert s.posterior_variance[0].item() == 0.0
    # float32 tables: 1 - a/a_prev cancels, so compare to float32 resolution of a (~1e-7)
    torch.testing.assert_close(b, 1 - a / a_prev, rtol=1e-5, atol=2e-7)


def test_to_moves_every_table_and_keeps_values() -> None:
    s = make_schedule()
    m = s.to("meta")
    assert all(getattr(m, name).device.type == "meta" for name in ("betas", "alphas_cumprod", "posterior_variance"))
    assert s.betas.device.type == "cpu"  # a copy, the original is untouched


def test_snr_and_min_snr_weight() -> None:
    s = make_schedule()
    t = torch.tensor([0, 10, 500, 999])
    snr = s.snr(t)
    a = s.alphas_cumprod[t].double()
    torch.testing.assert_close(snr.double(), a / (1 - a), rtol=1e-6, atol=0)
    assert torch.all(snr[:-1] > snr[1:])  # SNR falls with t
    torch.testing.assert_close(min_snr_weight(snr, math.inf, "eps"), torch.ones(4))
    torch.testing.assert_close(min_snr_weight(snr, math.inf, "v"), snr / (snr + 1))
    torch.testing.assert_close(min_snr_weight(snr, None, "v"), torch.ones(4))
    w = min_snr_weight(snr, 5.0, "eps")
    torch.testing.assert_close(w, torch.where(snr > 5, 5 / snr, torch.ones_like(snr)))
    assert w[0] < 0.01 and w[-1] == 1.0  # t=0 has SNR ~1175: heavily down-weighted


def test_bad_inputs_are_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match="scaled_linear"):
        make_beta_schedule("quadratic", 10)
    with pytest.raises(ValueError, match="strictly inside"):
        DiffusionSchedule.from_betas(torch.tensor([0.1, 1.0]))
    with pytest.raises(ValueError, match="min_snr_gamma"):
        min_snr_weight(torch.ones(2), 0.0)
