"""ldm_train.metrics.fid: the seeded random-init extractor, PNG rounding, and agreement of our streaming
Frechet with torch-fidelity on the same images through the same (random-init) extractor."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from eval.fidelity import FidelityConfig, compute_fidelity
from ldm_train.metrics.fid import (
    FeatureStats,
    RandomInitFeatures,
    accumulate_stats,
    fid_from_stats,
    to_uint8,
)


def _images(colour_images, colours: np.ndarray, seed: int) -> torch.Tensor:
    return torch.from_numpy(colour_images(colours, seed=seed)).permute(0, 3, 1, 2).contiguous()


def test_random_init_extractor_is_fixed_by_its_seed() -> None:
    x = torch.randint(0, 256, (4, 3, 40, 40), dtype=torch.uint8)
    assert torch.equal(RandomInitFeatures(seed=3)(x), RandomInitFeatures(seed=3)(x))
    assert not torch.equal(RandomInitFeatures(seed=3)(x), RandomInitFeatures(seed=4)(x))


def test_our_frechet_agrees_with_torch_fidelity_on_the_same_images(tmp_path, wide_colours, colour_images) -> None:
    gen_colours = np.clip(wide_colours * 0.7 + 40, 0, 255)
    folders = {}
    for name, colours, seed in (("gen", gen_colours, 1), ("ref", wide_colours, 2)):
        folders[name] = tmp_path / name
        folders[name].mkdir()
        for i, img in enumerate(colour_images(colours, seed=seed)):
            Image.fromarray(img).save(folders[name] / f"{i:06d}.png")
    cfg = FidelityConfig(extractor="random-init", isc=False, prc=False, save_cpu_ram=True, cache_dir=None)
    theirs = compute_fidelity(cfg, str(folders["gen"]), str(folders["ref"]), "ref")["fid"]

    # the same network torch-fidelity ran (registered name ldm-random-init-a -> seed 1234), fed the same uint8
    ext = RandomInitFeatures(seed=1234)
    stats = []
    for name in ("gen", "ref"):
        imgs = torch.stack([torch.from_numpy(np.array(Image.open(p))).permute(2, 0, 1)
                            for p in sorted(folders[name].glob("*.png"))])
        s = accumulate_stats(ext, imgs, FeatureStats(ext.feature_dim), batch_size=7)
        stats.append(s)
    assert fid_from_stats(*stats) == pytest.approx(theirs, rel=1e-6)
    assert theirs > 1.0  # a real difference, not two zeros agreeing


def test_to_uint8_matches_png_rounding() -> None:
    x = torch.tensor([-1.0, -0.5, 0.0, 0.999, 1.0, 2.0])
    assert to_uint8(x).tolist() == [0, 64, 128, 255, 255, 255]
