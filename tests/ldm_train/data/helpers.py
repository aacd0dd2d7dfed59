"""Helpers of the loader tests: small latent shards with captions."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tests.latent_shards import write_latent_shards as write_shards

COLOURS = ["red", "green", "blue", "yellow"]
SHAPES = ["circle", "square", "triangle"]


def write_latent_shards(out_dir: str | Path, shard_sizes: list[int], name: str = "tiny_kl_f4", kind: str = "kl",
                        downsample_factor: int = 4, z_channels: int = 3, resolution: int = 64) -> dict[str, Any]:
    """Shards whose sample i has key "%08d" % i and a latent filled with the value i, so a test can tell samples
    apart by key and by content."""
    side = resolution // downsample_factor
    channels = 2 * z_channels if kind == "kl" else z_channels

    def make(i: int) -> tuple[str, np.ndarray, str, dict[str, Any]]:
        latent = np.full((channels, side, side), i % 2048, dtype=np.float16)
        caption = f"a {COLOURS[i % 4]} {SHAPES[i % 3]} number {i}"
        return f"{i:08d}", latent, caption, {"source_key": f"src{i}", "original_size": [resolution] * 2}

    return write_shards(out_dir, shard_sizes, make, name=name, kind=kind, downsample_factor=downsample_factor,
                        z_channels=z_channels, resolution=resolution, std=2.0, scale_factor=0.5)
