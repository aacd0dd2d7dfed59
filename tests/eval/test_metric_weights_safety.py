"""No user-named weights file runs code in eval: each is a torch pickle whose unpickling would create a marker file.

eval.run's metric weights (``metrics.inception_weights``, ``metrics.vgg16_weights``) used to reach torch-fidelity,
which loads them with ``weights_only=False``; so did its cached statistics. Now they are refused before any
sampling, naming the file, and torch-fidelity's own loads are weights-only.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from data_prep.synthetic import write_synthetic
from eval.pipeline import run
from tests.malicious_pickle import write_malicious

PROMPTS = ["a large red circle in the center on a white background"]


def _refused(err: pytest.ExceptionInfo, path: Path) -> None:
    msg = str(err.value)
    assert f"refusing to load {path}" in msg, msg
    assert "builtins.exec" in msg or "GLOBAL exec" in msg, msg  # the global it asked for


@pytest.mark.parametrize("metric", ["inception", "vgg16"])
def test_eval_run_refuses_metric_weights_that_carry_code(metric, tiny_export, tmp_path, eval_config) -> None:
    marker = tmp_path / "marker"
    evil = write_malicious(tmp_path / f"{metric}.pth", marker)
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    metrics = ({"metrics.isc": "true", "metrics.fid": "false", "metrics.prc": "false",
                "metrics.inception_weights": evil} if metric == "inception" else
               {"metrics.isc": "false", "metrics.fid": "false", "metrics.prc": "true",
                "metrics.prc_features": "vgg16", "metrics.vgg16_weights": evil})
    write_synthetic(str(tmp_path / "ref"), 4, resolution=32, shard_size=4)
    out = tmp_path / "out"
    cfg = eval_config(checkpoint=tiny_export, prompts=tmp_path / "prompts.txt", num_samples=2, steps=2, batch_size=2,
                      output_dir=out, progress="false", adherence="false",
                      **{"reference.path": tmp_path / "ref", "reference.num_images": 4, "metrics.save_cpu_ram": "true",
                         "metrics.batch_size": 2, "wandb.mode": "disabled"}, **metrics)
    with pytest.raises(ValueError) as err:
        run(cfg)
    _refused(err, evil)
    key = "metrics.inception_weights" if metric == "inception" else "metrics.vgg16_weights"
    assert f"({key})" in str(err.value)
    assert not marker.exists()
    assert not out.exists()  # refused before any sampling


def test_eval_run_refuses_a_first_stage_checkpoint_that_carries_code(tiny_export, tmp_path, eval_config) -> None:
    marker = tmp_path / "marker"
    evil = write_malicious(tmp_path / "first_stage.ckpt", marker)
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    cfg = eval_config(checkpoint=tiny_export, prompts=tmp_path / "prompts.txt", num_samples=2, steps=2, batch_size=2,
                      output_dir=tmp_path / "out", progress="false", first_stage_checkpoint=evil,
                      **{"metrics.fid": "false", "metrics.isc": "false", "metrics.prc": "false",
                         "wandb.mode": "disabled"})
    with pytest.raises(ValueError) as err:
        run(cfg)
    _refused(err, evil)
    assert not marker.exists()


def test_torch_fidelity_loads_weights_and_cached_statistics_weights_only(tmp_path, colour_images, write_pngs) -> None:
    """Below the early check: what torch-fidelity itself loads (a weights path, a planted cache file) is weights-only."""
    from eval.fidelity import FidelityConfig, _call, compute_fidelity

    gen = write_pngs(str(tmp_path / "gen"), colour_images(np.random.default_rng(1).uniform(0, 255, (6, 3))))
    marker = tmp_path / "marker"
    evil = write_malicious(tmp_path / "inception.pth", marker)
    cfg = FidelityConfig(save_cpu_ram=True, batch_size=2, isc_splits=1)
    with pytest.raises(ValueError) as err:
        _call(cfg, gen, "", "", "inception-v3-compat", str(evil), isc=True)
    _refused(err, evil)
    assert not marker.exists()

    cache = tmp_path / "cache"
    cache.mkdir()
    planted = write_malicious(cache / "ref-ldm-random-init-a-stat-fid-feat.pt", marker)  # the name FID looks up
    cfg = FidelityConfig(extractor="random-init", isc=False, prc=False, save_cpu_ram=True, batch_size=2,
                         cache_dir=str(cache), kid_subset_size=2)
    with pytest.raises(ValueError) as err:
        compute_fidelity(cfg, gen, gen, "ref")
    _refused(err, planted)
    assert not marker.exists()


@pytest.mark.parametrize("setting", ["first_stage.checkpoint", "lpips.backbone", "metrics.inception_weights"])
def test_eval_reconstruction_refuses_files_that_carry_code(setting, tmp_path) -> None:
    """eval.reconstruction's user files. It computes rFID only (IS is off whatever metrics.isc says), so
    metrics.inception_weights is never opened there; the first-stage file and the LPIPS backbone are refused."""
    import torch

    from eval.config import ReconstructionConfig
    from eval.reconstruction_metrics import run as reconstruct
    from ldm_train.app import compose
    from ldm_train.checkpoints.first_stage import export_first_stage
    from ldm_train.models.autoencoder import build_first_stage

    marker = tmp_path / "marker"
    evil = write_malicious(tmp_path / "evil.pth", marker)
    write_synthetic(str(tmp_path / "heldout"), 2, resolution=32, shard_size=2, split="heldout")
    overrides = [f"images={tmp_path / 'heldout'}", "num_images=2", "resolution=32", "batch_size=2",
                 f"output_dir={tmp_path / 'out'}", "metrics.extractor=random-init", "metrics.save_cpu_ram=true",
                 "lpips.enabled=false", f"{setting}={evil}"]
    if setting == "lpips.backbone":
        overrides.remove("lpips.enabled=false")
    if setting == "metrics.inception_weights":
        overrides.append("metrics.isc=true")
    cfg = compose("eval_reconstruction", ReconstructionConfig, overrides)
    if setting != "first_stage.checkpoint":
        torch.manual_seed(0)
        export_first_stage(build_first_stage(cfg.first_stage), str(tmp_path / "fs.safetensors"))
        cfg.first_stage.checkpoint = str(tmp_path / "fs.safetensors")
    if setting == "metrics.inception_weights":
        out = reconstruct(cfg)
        assert out["rfid"] > 0 and "is_mean" not in out
    else:
        with pytest.raises(ValueError) as err:
            reconstruct(cfg)
        _refused(err, evil)
    assert not marker.exists()
