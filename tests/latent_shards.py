"""One writer of small latent-shard folders (shard-NNNNNN.tar + manifest.json, the data_prep.encode contract) for
tests that need shards without running the encode job; the caller says what each sample holds."""
from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds

# sample index -> (key, latent array [C, h, w], caption, json metadata)
MakeSample = Callable[[int], tuple[str, np.ndarray, str, dict[str, Any]]]


def write_latent_shards(out_dir: str | Path, shard_sizes: list[int], make_sample: MakeSample, *,
                        name: str = "tiny_kl_f4", kind: str = "kl", downsample_factor: int = 4, z_channels: int = 3,
                        resolution: int = 64, std: float = 1.0, scale_factor: float = 1.0) -> dict[str, Any]:
    """Write ``len(shard_sizes)`` shards holding ``make_sample(0..N-1)`` in order, and their manifest."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    side = resolution // downsample_factor
    channels = 2 * z_channels if kind == "kl" else z_channels
    shards, index = [], 0
    for s, size in enumerate(shard_sizes):
        shard_name = f"shard-{s:06d}.tar"
        with wds.TarWriter(str(out / shard_name)) as sink:
            for _ in range(size):
                key, latent, caption, meta = make_sample(index)
                assert latent.shape == (channels, side, side), latent.shape
                buf = io.BytesIO()
                np.save(buf, latent.astype(np.float16))
                sink.write({"__key__": key, "latent.npy": buf.getvalue(), "txt": caption, "json": json.dumps(meta)})
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
        "std": [std] * z_channels,
        "scale_factor": scale_factor,
        "skipped": {},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def write_class_shards(out_dir: str | Path, num_samples: int, num_classes: int = 10, *, shard_size: int = 64,
                       with_label: bool = True, name: str = "fmnist_kl_f4", z_channels: int = 3,
                       downsample_factor: int = 4, resolution: int = 32, seed: int = 0) -> dict[str, Any]:
    """KL-moment shards whose latent is a class-dependent pattern (sample i is class i % num_classes) and whose json
    carries ``label`` (``with_label=False``: none, as unlabelled caption data); captions "a photo of class N"."""
    side = resolution // downsample_factor
    rng = np.random.default_rng(seed)
    patterns = np.random.default_rng(1000 + seed).standard_normal((num_classes, z_channels, side, side))

    def make(i: int) -> tuple[str, np.ndarray, str, dict[str, Any]]:
        label = i % num_classes
        mean = patterns[label] + 0.1 * rng.standard_normal((z_channels, side, side))
        logvar = np.full((z_channels, side, side), -6.0)
        meta: dict[str, Any] = {"source_key": f"{i:09d}"}
        if with_label:
            meta["label"] = label
        return f"{i:09d}", np.concatenate([mean, logvar]), f"a photo of class {label}", meta

    sizes = [min(shard_size, num_samples - start) for start in range(0, num_samples, shard_size)]
    return write_latent_shards(out_dir, sizes, make, name=name, downsample_factor=downsample_factor,
                               z_channels=z_channels, resolution=resolution)
