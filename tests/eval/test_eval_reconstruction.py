"""Reconstruction metrics: PSNR / SSIM against known values, and the whole eval on a tiny first stage."""
from __future__ import annotations

import json
import math

import pytest
import torch

from eval.reconstruction_metrics import psnr, ssim


def test_psnr_known_values() -> None:
    x = torch.zeros(2, 3, 8, 8)
    y = x.clone()
    y[0] += 0.1  # mse 0.01 -> 20 dB
    p = psnr(x, y)
    assert p[0].item() == pytest.approx(20.0) and math.isinf(p[1].item())


def test_ssim_identity_one_and_degrades_with_noise() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g)
    assert ssim(x, x).tolist() == pytest.approx([1.0, 1.0])
    noisy = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    s_noisy = ssim(x, noisy)
    assert (s_noisy < 0.9).all()
    # a constant offset leaves structure intact: SSIM stays far above the noisy one
    assert (ssim(x * 0.8, x * 0.8 + 0.1) > s_noisy + 0.05).all()


def test_reconstruction_eval_end_to_end(tmp_path) -> None:
    from data_prep.synthetic import write_synthetic
    from eval.config import ReconstructionConfig
    from eval.reconstruction_metrics import run
    from ldm_train.app import compose
    from ldm_train.checkpoints.first_stage import export_first_stage
    from ldm_train.models.autoencoder import build_first_stage

    write_synthetic(str(tmp_path / "heldout"), 6, resolution=32, shard_size=6, split="heldout")
    cfg = compose("eval_reconstruction", ReconstructionConfig, [
        f"images={tmp_path / 'heldout'}", "num_images=5", "resolution=32", "batch_size=2",
        f"output_dir={tmp_path / 'out'}", "lpips.random_backbone=true", "metrics.extractor=random-init",
        "metrics.save_cpu_ram=true"])
    torch.manual_seed(0)
    fs = build_first_stage(cfg.first_stage)
    export_first_stage(fs, str(tmp_path / "fs.safetensors"))
    cfg.first_stage.checkpoint = str(tmp_path / "fs.safetensors")
    out = run(cfg)
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["num_images"] == 5 and len(list((tmp_path / "out" / "reconstructions").glob("*.png"))) == 5
    # a random autoencoder reconstructs badly: low PSNR, positive LPIPS and rFID
    assert 0 < saved["psnr"] < 20 and saved["lpips"] > 0 and saved["rfid"] > 0
    assert saved["feature_extractor"] == "random-init-plumbing-only"
    assert saved["lpips_backbone"] == "random-init-plumbing-only"
    assert out["first_stage"]["sha256"] and len(out["first_stage"]["sha256"]) == 64


def test_missing_lpips_backbone_is_refused_with_the_remedy(tmp_path) -> None:
    from eval.config import ReconstructionConfig
    from eval.reconstruction_metrics import run
    from ldm_train.app import compose

    cfg = compose("eval_reconstruction", ReconstructionConfig, [
        f"images={tmp_path}", f"lpips.backbone={tmp_path}/vgg.pth", "metrics.fid=false",
        f"output_dir={tmp_path / 'out'}"])
    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth"):
        run(cfg)
    assert not (tmp_path / "out").exists()


def test_a_smaller_rerun_into_the_same_folder_leaves_only_its_own_pngs(tmp_path) -> None:
    """rFID reads the PNG folders: PNGs of an earlier, larger run must not stay in them (the identity first stage
    ``pixel`` keeps the test about the files)."""
    from eval.reconstruction_metrics import reconstruction_metrics
    from ldm_train.app import compose
    from ldm_train.checkpoints.first_stage import load_first_stage
    from ldm_train.first_stage.config import AutoencoderAppConfig

    first_stage = load_first_stage(compose("train_autoencoder", AutoencoderAppConfig,
                                           ["first_stage=pixel", "data.input=unused"]).first_stage)
    images = torch.rand(6, 3, 16, 16) * 2 - 1
    out = reconstruction_metrics(first_stage, [images[:3], images[3:]], str(tmp_path), None)
    assert out["num_images"] == 6 and math.isinf(out["psnr"])
    out = reconstruction_metrics(first_stage, [images[:3], images[3:]], str(tmp_path), None, limit=2)
    assert out["num_images"] == 2
    for folder in ("originals", "reconstructions"):
        assert len(list((tmp_path / folder).glob("*.png"))) == 2
