"""Each preset of a released CompVis LDM trains the released objective: its schedule is the reference formula applied
to the released yaml's numbers, and its parameterization, loss (l2 / l1) and latent scale-factor rule are the released ones.

The reference formula is written out here, not imported: CompVis ``make_beta_schedule("linear", n, start, end)`` is
``torch.linspace(start ** 0.5, end ** 0.5, n, dtype=torch.float64) ** 2``; ``register_schedule`` takes the float64
cumprod and stores it as float32.
"""
from __future__ import annotations

import pytest
import torch

# preset -> the released config's model.params (configs/latent-diffusion/*.yaml, models/ldm/*/config.yaml); CompVis
# LatentDiffusion's defaults where the yaml is silent: loss_type l2, parameterization eps, scale_factor 1.0
RELEASED = {
    "cin256_ldm4": dict(config="cin256-v2", linear_start=0.0015, linear_end=0.0195, timesteps=1000,
                        parameterization="eps", loss_type="l2", scale_factor=1.0),
    "celebahq_ldm4": dict(config="celebahq-ldm-vq-4", linear_start=0.0015, linear_end=0.0195, timesteps=1000,
                          parameterization="eps", loss_type="l2", scale_factor=1.0),
    "lsun_churches_ldm8": dict(config="lsun_churches-ldm-kl-8", linear_start=0.0015, linear_end=0.0155,
                               timesteps=1000, parameterization="eps", loss_type="l1",
                               scale_by_std=True),
    "bsr_sr_ldm4": dict(config="bsr_sr", linear_start=0.0015, linear_end=0.0155, timesteps=1000,
                        parameterization="eps", loss_type="l2", scale_factor=1.0),
    "txt2img_1p45b": dict(config="txt2img-1p4B", linear_start=0.00085, linear_end=0.012, timesteps=1000,
                          parameterization="eps", loss_type="l2", scale_factor=0.18215),
}


def _reference_alphas_cumprod(start: float, end: float, n: int) -> torch.Tensor:
    betas = torch.linspace(start**0.5, end**0.5, n, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0).float()


@pytest.fixture(scope="module", params=list(RELEASED))
def preset(request):
    from ldm_train.build import build_ldm
    from ldm_train.summary import compose_config

    cfg = compose_config([f"experiment={request.param}"])
    with torch.device("meta"):
        model = build_ldm(cfg, activation_checkpointing=False)
    return request.param, cfg, model


def test_schedule_is_the_released_formula(preset) -> None:
    name, _, model = preset
    ref = RELEASED[name]
    expected = _reference_alphas_cumprod(ref["linear_start"], ref["linear_end"], ref["timesteps"])
    got = model.schedule.alphas_cumprod
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)


def test_parameterization_and_loss_are_the_released_ones(preset) -> None:
    name, _, model = preset
    assert model.parameterization == RELEASED[name]["parameterization"]
    assert model.loss_type == RELEASED[name]["loss_type"]


def test_scale_factor_rule_is_the_released_one(preset) -> None:
    """A fixed number where the release has one (scale_by_std false), the first batch's 1/std where it sets scale_by_std:
    never the manifest's 1/std, which a released model was not trained with."""
    name, cfg, _ = preset
    ref = RELEASED[name]
    if ref.get("scale_by_std"):
        assert cfg.first_stage.scale_factor is None and cfg.first_stage.scale_factor_from == "first_batch"
    else:
        assert cfg.first_stage.scale_factor == ref["scale_factor"] and cfg.data.scale_factor == ref["scale_factor"]


def test_plain_linspace_is_far_from_the_released_schedule() -> None:
    """What the presets trained before: 'linear' read as plain linspace. The gap the test above would catch."""
    from ldm_train.diffusion.schedule import make_schedule

    plain = make_schedule("sqrt_linear", 1000, 0.0015, 0.0195).alphas_cumprod
    gap = (plain - _reference_alphas_cumprod(0.0015, 0.0195, 1000)).abs()
    assert gap.max() > 0.1 and 250 < int(gap.argmax()) < 350


def test_linear_is_refused_naming_both_meanings() -> None:
    from ldm_train.build import build_ldm
    from ldm_train.diffusion.schedule import from_compvis_name, make_beta_schedule
    from ldm_train.summary import compose_config

    cfg = compose_config(["experiment=celebahq_ldm4", "train.diffusion.beta_schedule=linear"])
    with pytest.raises(ValueError, match=r"train.diffusion.beta_schedule=linear.*scaled_linear.*sqrt_linear"), \
            torch.device("meta"):
        build_ldm(cfg)
    with pytest.raises(ValueError, match="ambiguous"):
        make_beta_schedule("linear", 10)
    assert from_compvis_name("linear") == "scaled_linear"
    assert from_compvis_name("sqrt_linear") == "sqrt_linear"
