"""Where eval takes the latent scale factor from: override, config, then the latent manifest."""
from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from ldm_train.checkpoints.export import latent_scale_factor as _scale_factor


def test_scale_factor_precedence(tmp_path) -> None:
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": 1, "scale_factor": 0.5}))
    cfg = OmegaConf.create({"first_stage": {"scale_factor": None},
                            "data": {"scale_factor": None, "manifest": None, "shards": str(tmp_path)}})
    assert _scale_factor(cfg, None) == 0.5  # the manifest the run trained on
    cfg.data.scale_factor = 0.25
    assert _scale_factor(cfg, None) == 0.25  # the training config's override
    cfg.first_stage.scale_factor = 0.18215
    assert _scale_factor(cfg, None) == 0.18215
    assert _scale_factor(cfg, 2.0) == 2.0  # eval's own override wins
    cfg = OmegaConf.create({"data": {"shards": str(tmp_path / "missing")}})
    with pytest.raises(ValueError, match="pass scale_factor=VALUE"):
        _scale_factor(cfg, None)
