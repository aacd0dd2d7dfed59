"""Prompt adherence on data_prep.synthetic's own images (~1.0) and on noise (~chance)."""
from __future__ import annotations

import numpy as np

from data_prep.synthetic import write_synthetic
from eval.adherence import adherence
from ldm_train.data.readers import image_dataset


def _real_images(tmp_path, split: str, n: int) -> tuple[list[np.ndarray], list[str]]:
    write_synthetic(str(tmp_path / split), n, resolution=64, shard_size=n, seed=3, split=split)
    images, prompts = [], []
    for rec in image_dataset(str(tmp_path / split), 64):
        images.append(((rec["image"].permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8))
        prompts.append(rec["caption"])
    return images, prompts


def test_synthetic_images_adhere_to_their_captions(tmp_path) -> None:
    imgs, prompts = [], []
    for split in ("train", "heldout"):
        i, p = _real_images(tmp_path, split, 40)
        imgs += i
        prompts += p
    out = adherence(imgs, prompts)
    assert out["all_count"] == 80 and out["heldout_combos_count"] == 40
    assert out["colour_accuracy"] >= 0.97
    assert out["all_shape_accuracy"] >= 0.9
    assert out["all_position_accuracy"] >= 0.95
    assert out["all_background_accuracy"] >= 0.97


def test_noise_is_near_chance_and_swapped_prompts_fail(tmp_path) -> None:
    imgs, prompts = _real_images(tmp_path, "train", 40)
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, im.shape, dtype=np.uint8) for im in imgs]
    assert adherence(noise, prompts)["colour_accuracy"] <= 0.35  # chance is 1/8
    # the same real images scored against other images' prompts: colour mostly wrong
    rolled = prompts[1:] + prompts[:1]
    same = sum(a.split()[2] == b.split()[2] for a, b in zip(prompts, rolled, strict=True)) / len(prompts)
    assert adherence(imgs, rolled)["colour_accuracy"] <= same + 0.1


def test_shapes_with_softened_edges_keep_their_names(tmp_path) -> None:
    # what a first stage or a sampler does to a shape: edges and tips slightly soft. The star is told from the
    # convex shapes by its solidity, so a rounded triangle tip does not make a star, nor rounded star tips a square.
    from PIL import Image, ImageFilter

    imgs, prompts = _real_images(tmp_path, "heldout", 60)
    soft = [np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(1.2))) for im in imgs]
    assert adherence(soft, prompts)["all_shape_accuracy"] >= 0.8
