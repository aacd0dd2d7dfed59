"""The latent scale factor's rules (ldm_train/trainer/scale_factor.py): a fixed number, a CompVis checkpoint's
``scale_factor`` buffer on train.init_from, the value a resumed run recorded, the manifest's 1/std, or the first
batch's 1/std (CompVis scale_by_std), measured once, recorded in config.yaml and kept on resume."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm_train.trainer.scale_factor import (
    first_batch_scale_factor,
    recorded_scale_factor,
    resolve_scale_factor,
)
from tests.ldm_train.trainer.helpers import only_run_dir, run_trainer, tiny_overrides

pytestmark = pytest.mark.integration  # starts processes or servers


def _never() -> float:
    raise AssertionError("the first batch must not be read")


def test_precedence_fixed_then_checkpoint_then_recorded_then_rule() -> None:
    assert resolve_scale_factor(1.0, "first_batch", 0.2, 0.3, 0.4, False, _never).value == 1.0
    got = resolve_scale_factor(None, "manifest", 0.2, 0.18215, None, False, _never)
    assert (got.value, got.record) == (0.18215, True) and "init_from" in got.source
    got = resolve_scale_factor(None, "first_batch", 0.2, None, 0.4, True, _never)
    assert (got.value, got.record) == (0.4, True)  # written back: the resumed config pins the same value
    got = resolve_scale_factor(None, "first_batch", 0.2, None, None, False, lambda: 0.5)
    assert (got.value, got.record) == (0.5, True) and "first batch" in got.source
    got = resolve_scale_factor(None, "manifest", 0.2, None, None, False, _never)
    assert (got.value, got.record) == (0.2, False)
    assert resolve_scale_factor(None, "manifest", None, None, None, False, _never).value == 1.0


def test_an_unrecorded_resume_is_refused_naming_the_key() -> None:
    with pytest.raises(ValueError, match="set first_stage.scale_factor to the value"):
        resolve_scale_factor(None, "first_batch", 0.2, None, None, True, _never)


def test_first_batch_scale_factor_is_one_over_the_std_of_every_element(tmp_path: Path) -> None:
    z = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 5.0 + 1.0
    assert first_batch_scale_factor(z) == pytest.approx(1.0 / z.flatten().std().item(), rel=1e-6)  # CompVis: unbiased
    assert recorded_scale_factor(tmp_path) is None
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml({"first_stage": {"scale_factor": 0.25}}))
    assert recorded_scale_factor(tmp_path) == 0.25


def _expected_first_batch(latents_root: Path, tokenizer_dir: Path) -> float:
    """Rank 0's first batch of the same loader, its moments sampled with the trainer's seed: 1/std."""
    from ldm_train.app import compose
    from ldm_train.data.latents import build_latent_loader, sample_latents
    from ldm_train.trainer.config import TrainAppConfig

    cfg = compose("train", TrainAppConfig, tiny_overrides(latents_root, Path("unused"),
                                                          **{"text_encoder.tokenizer": tokenizer_dir}))
    loader = build_latent_loader(cfg.data, cfg.first_stage, cfg.unet, None, 0, 1)
    moments = next(iter(loader))["moments"]
    z = sample_latents(moments, 1.0, torch.Generator().manual_seed(cfg.train.seed * 1000))
    return 1.0 / z.flatten().std().item()


def test_first_batch_rule_measures_records_and_keeps_on_resume(tmp_path, latents_root, tokenizer_dir) -> None:
    runs = tmp_path / "runs"
    args = tiny_overrides(latents_root, runs, **{"first_stage.scale_factor_from": "first_batch", "run_name": "sf",
                                                 "train.max_steps": 1, "text_encoder.tokenizer": tokenizer_dir})
    first = run_trainer(args, nproc=1)
    assert "(1/std of the first batch (first_stage.scale_factor_from=first_batch))" in first.stdout
    run = only_run_dir(runs)
    recorded = OmegaConf.load(run / "config.yaml")
    assert recorded.first_stage.scale_factor == pytest.approx(_expected_first_batch(latents_root, tokenizer_dir),
                                                              rel=1e-5)
    assert recorded.data.scale_factor == recorded.first_stage.scale_factor
    exported = sorted((run / "checkpoints").glob("step_*"))[-1] / "config.yaml"
    assert OmegaConf.load(exported).first_stage.scale_factor == recorded.first_stage.scale_factor
    second = run_trainer(args, nproc=1)  # resumes: the recorded value, no new measurement, no pinned-setting refusal
    assert "recorded in the run's config.yaml" in second.stdout and "resumed" in second.stdout
    assert OmegaConf.load(run / "config.yaml").first_stage.scale_factor == recorded.first_stage.scale_factor
