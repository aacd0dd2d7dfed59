"""Shared fixtures of the eval tests: small PNG folders with known structure."""
from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image


def write_pngs(folder: str, images: np.ndarray) -> str:
    """uint8 [N, H, W, 3] -> folder/000000.png ..."""
    os.makedirs(folder, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img).save(os.path.join(folder, f"{i:06d}.png"))
    return folder


def colour_images(colours: np.ndarray, size: int = 32, noise: float = 6.0, seed: int = 0) -> np.ndarray:
    """Flat-colour images (one per row of ``colours`` 0..255) with a little pixel noise."""
    rng = np.random.default_rng(seed)
    base = np.broadcast_to(colours[:, None, None, :].astype(np.float64), (len(colours), size, size, 3))
    img = base + rng.normal(0, noise, base.shape)
    # a gradient stripe gives the conv features some spatial structure to respond to
    img[:, : size // 4] += np.linspace(-30, 30, size)[None, None, :, None]
    return np.clip(img, 0, 255).round().astype(np.uint8)


@pytest.fixture(name="write_pngs")
def write_pngs_fixture():
    return write_pngs


@pytest.fixture(name="colour_images")
def colour_images_fixture():
    return colour_images


@pytest.fixture
def wide_colours() -> np.ndarray:
    return np.random.default_rng(1).uniform(0, 255, (48, 3))
