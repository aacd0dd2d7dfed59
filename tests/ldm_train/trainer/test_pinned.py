"""A resume that changes what the run means is refused unless accepted."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from ldm_train.trainer.pinned import changed_settings, check_resume_settings

BASE = {"data": {"latents_root": "/d/lat", "resolution": 64}, "first_stage": {"name": "kl", "checkpoint": "/m/a.st"},
        "unet": {"model_channels": 32}, "train": {"global_batch": 32, "total_samples": 1000, "max_steps": None,
                                                  "diffusion": {"parameterization": "v"}}}


def _with(**changes: object) -> dict:
    cfg = OmegaConf.create(BASE)
    for key, value in changes.items():
        OmegaConf.update(cfg, key.replace("__", "."), value)
    return OmegaConf.to_container(cfg)


def test_only_pinned_keys_count_as_changes() -> None:
    assert changed_settings(BASE, _with(train__max_steps=5)) == {}
    assert changed_settings(BASE, _with(train__total_samples=2000)) == {"train.total_samples": (1000, 2000)}
    assert set(changed_settings(BASE, _with(first_stage__checkpoint="/m/b.st", unet__model_channels=64))) == {
        "first_stage.checkpoint", "unet"}


def test_resume_refuses_then_accepts_with_allow_changed(tmp_path) -> None:
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(BASE)))
    assert check_resume_settings(tmp_path, BASE, []) == []
    changed = _with(train__total_samples=2000, first_stage__checkpoint="/m/b.st")
    with pytest.raises(ValueError) as err:
        check_resume_settings(tmp_path, changed, [])
    msg = str(err.value)
    assert "train.total_samples: 1000 -> 2000" in msg and "first_stage.checkpoint: '/m/a.st' -> '/m/b.st'" in msg
    assert "train.allow_changed=[first_stage.checkpoint,train.total_samples]" in msg
    with pytest.raises(ValueError, match="first_stage.checkpoint"):
        check_resume_settings(tmp_path, changed, ["train.total_samples"])
    assert check_resume_settings(tmp_path, changed, ["train.total_samples", "first_stage.checkpoint"]) == [
        "first_stage.checkpoint", "train.total_samples"]
    assert check_resume_settings(tmp_path, changed, ["*"])


def test_a_setting_added_since_the_previous_session_counts_as_its_default() -> None:
    """A run started before train.diffusion.loss_type existed trained with l2: resuming with l2 is no change, l1 is."""
    assert changed_settings(BASE, _with(train__diffusion__loss_type="l2")) == {}
    assert changed_settings(BASE, _with(train__diffusion__loss_type="l1")) == {
        "train.diffusion": ({"parameterization": "v", "loss_type": "l2"}, {"parameterization": "v", "loss_type": "l1"})}
