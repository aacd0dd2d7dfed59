"""Forward process, eps/v/x0 conversions and the training loss."""
from __future__ import annotations

import math

import pytest
import torch

from ldm_train.diffusion.losses import (
    diffusion_loss,
    eps_from_v,
    pred_x0_from_eps,
    pred_x0_from_v,
    q_sample,
    sample_timesteps,
    to_eps,
    v_from_eps,
    v_target,
)
from ldm_train.diffusion.schedule import DiffusionSchedule

diffusers = pytest.importorskip("diffusers")


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 4, 8, 8, generator=g)
    noise = torch.randn(6, 4, 8, 8, generator=g)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    return x0, noise, t


def test_q_sample_equals_diffusers_add_noise(schedule: DiffusionSchedule, batch) -> None:
    x0, noise, t = batch
    ref = diffusers.DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    torch.testing.assert_close(q_sample(x0, t, noise, schedule), ref.add_noise(x0, noise, t), rtol=1e-5, atol=1e-5)
    # and v_target equals diffusers' get_velocity
    torch.testing.assert_close(v_target(x0, t, noise, schedule), ref.get_velocity(x0, noise, t), rtol=1e-5, atol=1e-5)


def test_conversions_are_mutually_consistent(schedule: DiffusionSchedule, batch) -> None:
    x0, noise, t = (b.double() if b.is_floating_point() else b for b in batch)
    x_t = q_sample(x0, t, noise, schedule)
    v = v_target(x0, t, noise, schedule)
    # the tables are float32 (as CompVis): sqrt(a)^2 + sqrt(1-a)^2 = 1 only to ~1e-7, amplified by 1/sqrt(a_999) ~ 15
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(eps_from_v(x_t, t, v, schedule), noise, **tol)
    torch.testing.assert_close(v_from_eps(x_t, t, noise, schedule), v, **tol)
    torch.testing.assert_close(pred_x0_from_v(x_t, t, v, schedule), x0, **tol)
    torch.testing.assert_close(pred_x0_from_eps(x_t[:-1], t[:-1], noise[:-1], schedule), x0[:-1], **tol)
    torch.testing.assert_close(to_eps(x_t, t, v, schedule, "v"), noise, **tol)
    assert to_eps(x_t, t, noise, schedule, "eps") is noise
    # v is a rotation of (eps, x0): |v|^2 + |x_t|^2 = |eps|^2 + |x0|^2 per sample
    lhs = (v**2 + x_t**2).flatten(1).sum(1)
    rhs = (noise**2 + x0**2).flatten(1).sum(1)
    torch.testing.assert_close(lhs, rhs, rtol=1e-6, atol=1e-6)


def test_loss_is_zero_for_the_oracle_and_per_sample(schedule: DiffusionSchedule, batch) -> None:
    x0, noise, t = batch
    eps_oracle = lambda x_t, tt: noise  # noqa: E731
    v_oracle = lambda x_t, tt: v_target(x0, tt, noise, schedule)  # noqa: E731
    assert diffusion_loss(eps_oracle, x0, t, noise, schedule).abs().max() == 0
    assert diffusion_loss(v_oracle, x0, t, noise, schedule, "v").abs().max() == 0
    zero = lambda x_t, tt: torch.zeros_like(x_t)  # noqa: E731
    loss = diffusion_loss(zero, x0, t, noise, schedule)
    assert loss.shape == (6,) and loss.dtype == torch.float32
    torch.testing.assert_close(loss, noise.pow(2).flatten(1).mean(1))
    # the model sees x_t and t, not x0
    seen = {}

    def spy(x_t: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
        seen.update(x_t=x_t, t=tt)
        return x_t

    diffusion_loss(spy, x0, t, noise, schedule)
    torch.testing.assert_close(seen["x_t"], q_sample(x0, t, noise, schedule))
    assert torch.equal(seen["t"], t)


def test_l1_loss_is_the_compvis_mean_absolute_error(schedule: DiffusionSchedule, batch) -> None:
    """CompVis get_loss(pred, target, mean=False) with loss_type l1: (target - pred).abs(), then mean over C, H, W."""
    x0, noise, t = batch
    g = torch.Generator().manual_seed(3)
    eps_hat = noise + 0.5 * torch.randn(noise.shape, generator=g)
    l1 = diffusion_loss(lambda *_: eps_hat, x0, t, noise, schedule, loss_type="l1")
    torch.testing.assert_close(l1, (noise - eps_hat).abs().mean(dim=[1, 2, 3]))
    l2 = diffusion_loss(lambda *_: eps_hat, x0, t, noise, schedule, loss_type="l2")
    torch.testing.assert_close(l2, torch.nn.functional.mse_loss(eps_hat, noise, reduction="none").mean(dim=[1, 2, 3]))
    assert not torch.allclose(l1, l2)
    v_oracle = lambda x_t, tt: v_target(x0, tt, noise, schedule)  # noqa: E731
    assert diffusion_loss(v_oracle, x0, t, noise, schedule, "v", loss_type="l1").abs().max() == 0
    with pytest.raises(ValueError, match="loss_type"):
        diffusion_loss(lambda *_: eps_hat, x0, t, noise, schedule, loss_type="huber")
    with pytest.raises(ValueError, match="min_snr_gamma"):
        diffusion_loss(lambda *_: eps_hat, x0, t, noise, schedule, min_snr_gamma=5.0, loss_type="l1")


def test_min_snr_weighting(schedule: DiffusionSchedule, batch) -> None:
    x0, noise, t = batch
    x_t = q_sample(x0, t, noise, schedule)
    g = torch.Generator().manual_seed(1)
    eps_hat = noise + 0.3 * torch.randn(noise.shape, generator=g)
    v_hat = v_from_eps(x_t, t, eps_hat, schedule)  # the same prediction expressed in v
    plain = diffusion_loss(lambda *_: eps_hat, x0, t, noise, schedule)
    torch.testing.assert_close(diffusion_loss(lambda *_: eps_hat, x0, t, noise, schedule, min_snr_gamma=math.inf), plain)
    # gamma = inf makes the v loss exactly the eps loss of the same prediction (weight snr / (snr + 1) = a_t)
    v_inf = diffusion_loss(lambda *_: v_hat, x0, t, noise, schedule, "v", min_snr_gamma=math.inf)
    torch.testing.assert_close(v_inf, plain, rtol=1e-4, atol=1e-6)
    # gamma = 5: low-t (high-SNR) samples are down-weighted by 5 / snr, high-t ones keep weight 1
    w = diffusion_loss(lambda *_: eps_hat, x0, t, noise, schedule, min_snr_gamma=5.0) / plain
    snr = schedule.snr(t)
    torch.testing.assert_close(w, torch.clamp(snr, max=5.0) / snr, rtol=1e-5, atol=1e-7)
    assert w[0] < 0.01 and w[-1] == 1.0


def test_loss_refuses_shape_and_parameterization_mistakes(schedule: DiffusionSchedule, batch) -> None:
    x0, noise, t = batch
    with pytest.raises(ValueError, match="out_channels"):
        diffusion_loss(lambda x_t, tt: x_t[:, :3], x0, t, noise, schedule)
    with pytest.raises(ValueError, match="parameterization"):
        diffusion_loss(lambda x_t, tt: x_t, x0, t, noise, schedule, "x0")


def test_loss_gradient_reaches_the_model_and_timesteps_are_uniform(schedule: DiffusionSchedule, batch) -> None:
    x0, noise, _ = batch
    conv = torch.nn.Conv2d(4, 4, 3, padding=1)
    t = sample_timesteps(6, schedule, torch.Generator().manual_seed(0))
    diffusion_loss(lambda x_t, tt: conv(x_t), x0, t, noise, schedule).mean().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    many = sample_timesteps(100_000, schedule, torch.Generator().manual_seed(0))
    assert many.min() == 0 and many.max() == 999 and abs(many.double().mean().item() - 499.5) < 3


def test_offset_noise_adds_a_per_channel_constant():
    from ldm_train.diffusion.losses import sample_noise

    shape = (256, 4, 16, 16)
    plain = sample_noise(shape, 0.0, torch.Generator().manual_seed(0), "cpu")
    assert torch.equal(plain, torch.randn(shape, generator=torch.Generator().manual_seed(0)))
    offset = sample_noise(shape, 0.5, torch.Generator().manual_seed(0), "cpu")
    # the image mean of each (sample, channel) varies by 1/HW for white noise, plus 0.5^2 with the offset
    var_plain = plain.mean(dim=(2, 3)).var().item()
    var_offset = offset.mean(dim=(2, 3)).var().item()
    assert abs(var_plain - 1 / 256) < 0.002 and abs(var_offset - (0.25 + 1 / 256)) < 0.05
