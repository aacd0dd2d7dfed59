"""Fixtures of the trainer-io tests: tiny latent shards + manifest following DESIGN.md "Latent shards"."""
from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import webdataset as wds
from s3_server import moto_server

COLOURS = ["red", "green", "blue", "yellow"]
SHAPES = ["circle", "square", "triangle"]


def write_latent_shards(
    out_dir: str | Path,
    shard_sizes: list[int],
    name: str = "tiny_kl_f4",
    kind: str = "kl",
    downsample_factor: int = 4,
    z_channels: int = 3,
    resolution: int = 64,
) -> dict[str, Any]:
    """Write shard-NNNNNN.tar files and manifest.json; sample i's latent is filled with the value i.

    So a test can tell samples apart by key ("%08d" % i) and by content.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    side = resolution // downsample_factor
    channels = 2 * z_channels if kind == "kl" else z_channels
    shards, index = [], 0
    for s, size in enumerate(shard_sizes):
        shard_name = f"shard-{s:06d}.tar"
        with wds.TarWriter(str(out / shard_name)) as sink:
            for _ in range(size):
                latent = np.full((channels, side, side), index % 2048, dtype=np.float16)
                buf = io.BytesIO()
                np.save(buf, latent)
                caption = f"a {COLOURS[index % 4]} {SHAPES[index % 3]} number {index}"
                sink.write({
                    "__key__": f"{index:08d}",
                    "latent.npy": buf.getvalue(),
                    "txt": caption,
                    "json": json.dumps({"source_key": f"src{index}", "original_size": [resolution] * 2}),
                })
                index += 1
        shards.append({"name": shard_name, "num_samples": size})
    manifest = {
        "schema_version": 1,
        "first_stage": {"name": name, "kind": kind, "downsample_factor": downsample_factor,
                        "z_channels": z_channels, "checkpoint": None, "sha256": None},
        "resolution": resolution,
        "latent_shape": [channels, side, side],
        "stored": "moments" if kind == "kl" else "prequant",
        "num_samples": index,
        "num_shards": len(shard_sizes),
        "shards": shards,
        "mean": [0.0] * z_channels,
        "std": [2.0] * z_channels,
        "scale_factor": 0.5,
        "skipped": {},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


@pytest.fixture
def latent_shards(tmp_path: Path) -> Path:
    """Seven shards of uneven sizes (10..16 samples, 91 in all) of a tiny_kl_f4 first stage."""
    root = tmp_path / "latents" / "tiny_kl_f4"
    write_latent_shards(root, [10, 11, 12, 13, 14, 15, 16])
    return root


@pytest.fixture
def s3_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 (own process, stopped by PID); the AWS env points at it. Yields its URL."""
    with moto_server(tmp_path / "moto.log") as env:
        for key, value in env.items():
            monkeypatch.setenv(key, value)  # loader workers fork with it
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()  # an instance made before would miss the endpoint
        yield env["AWS_ENDPOINT_URL"]
        s3fs.S3FileSystem.clear_instance_cache()
