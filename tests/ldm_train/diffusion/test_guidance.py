"""Classifier-free guidance: one batched forward per step, [uncond; cond] order, scalar and per-sample scales."""
from __future__ import annotations

import pytest
import torch

from ldm_train.diffusion.samplers import cfg_model_fn, ddim_sample
from ldm_train.diffusion.schedule import DiffusionSchedule

B = 3


class CondModel:
    """A stand-in UNet whose output depends on x, t and the context; it records every call's batch size."""

    def __init__(self) -> None:
        self.batch_sizes: list[int] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None = None):
        self.batch_sizes.append(x.shape[0])
        out = torch.tanh(x) * context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1) + t.reshape(-1, 1, 1, 1) / 1000
        return out if y is None else out + y.reshape(-1, 1, 1, 1).float()


@pytest.fixture
def inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "x": torch.randn(B, 4, 8, 8, generator=g),
        "t": torch.tensor([10, 500, 999]),
        "cond": torch.randn(B, 77, 16, generator=g) + 1.0,
        "uncond": torch.randn(B, 77, 16, generator=g) - 1.0,
    }


def test_scale_one_is_the_conditional_model_alone(inputs) -> None:
    model = CondModel()
    out = cfg_model_fn(model, inputs["cond"], inputs["uncond"], 1.0)(inputs["x"], inputs["t"])
    assert torch.equal(out, CondModel()(inputs["x"], inputs["t"], inputs["cond"]))
    assert model.batch_sizes == [B]  # no wasted unconditional half


def test_scale_zero_is_uncond_and_larger_scales_extrapolate(inputs) -> None:
    x, t, c, u = inputs["x"], inputs["t"], inputs["cond"], inputs["uncond"]
    ref = CondModel()
    out_c, out_u = ref(x, t, c), ref(x, t, u)
    model = CondModel()
    torch.testing.assert_close(cfg_model_fn(model, c, u, 0.0)(x, t), out_u, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cfg_model_fn(model, c, u, 7.5)(x, t), out_u + 7.5 * (out_c - out_u), rtol=1e-5, atol=1e-5)
    assert model.batch_sizes == [2 * B, 2 * B]  # one batched forward each
    # per-sample scales: each row gets its own
    s = torch.tensor([0.0, 1.0, 3.0])
    out = cfg_model_fn(model, c, u, s)(x, t)
    torch.testing.assert_close(out[0], out_u[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out[1], out_c[1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out[2], out_u[2] + 3 * (out_c[2] - out_u[2]), rtol=1e-5, atol=1e-5)


def test_mapping_conditioning_is_concatenated_per_key_and_passed_as_keywords(inputs) -> None:
    x, t = inputs["x"], inputs["t"]
    cond = {"context": inputs["cond"], "y": torch.tensor([1, 2, 3])}
    uncond = {"context": inputs["uncond"], "y": torch.tensor([0, 0, 0])}
    ref = CondModel()
    out_c, out_u = ref(x, t, **cond), ref(x, t, **uncond)
    torch.testing.assert_close(cfg_model_fn(CondModel(), cond, uncond, 2.0)(x, t), out_u + 2 * (out_c - out_u))


def test_sampling_with_guidance_calls_the_model_once_per_step(schedule: DiffusionSchedule, inputs) -> None:
    model = CondModel()
    fn = cfg_model_fn(model, inputs["cond"], inputs["uncond"], 5.0)
    out = ddim_sample(fn, schedule, (B, 4, 8, 8), num_steps=12, generator=torch.Generator().manual_seed(0))
    assert out.shape == (B, 4, 8, 8) and torch.isfinite(out).all()
    assert model.batch_sizes == [2 * B] * 12
