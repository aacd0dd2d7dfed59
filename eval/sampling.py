"""Distributed sampling to PNG files: identical sets at any world size, resumable by skipping what exists.

Sample ``i`` (0 <= i < num_samples) gets condition ``prompts[i % len(prompts)]`` (a prompt, a class index or
None, as the checkpoint's ``cond.kind``) and its own
``torch.Generator`` seeded ``seed + i`` for the initial noise and any sampler noise. The samples are cut
into GLOBAL batches ``[b * B, (b + 1) * B)`` and each rank takes a contiguous run of whole batches, so a
sample is always computed in the same batch whatever the world size (batch composition can change the
last bits of a float result on some kernels). Files are written under a temporary name then renamed:
a killed job never leaves a half-written PNG, and a re-run skips every batch whose files all exist.
Identity across world sizes also needs the same kernels: the same GPU type, or on CPU the same thread count
per process (torchrun sets OMP_NUM_THREADS=1; a 2-thread process can round differently from a 1-thread one).
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from eval.checkpoint import SamplingModel
from ldm_train.data.fsspec_io import atomic_write
from ldm_train.sampling import SamplerSettings, sample_images


# ---------------------------------------------------------------------------------------------- prompts
def load_prompts(source: str | Sequence[str], limit: int | None = None) -> list[str]:
    """Prompts from an MS-COCO captions JSON, a text file (one per line), tar shards' ``.txt``, or a list."""
    if not isinstance(source, str):
        prompts = [str(p) for p in source]
    elif source.endswith(".json"):
        prompts = _coco_captions(source)
    elif source.endswith(".txt"):
        import fsspec

        with fsspec.open(source, "rt", encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
    else:
        prompts = _shard_captions(source, limit)
    if limit is not None:
        prompts = prompts[:limit]
    if not prompts:
        raise ValueError(f"prompts={source!r} holds no prompts: give a COCO captions .json, a .txt with one "
                         "prompt per line, a folder of (latent or image) shards with .txt captions, or a list")
    return prompts


def _coco_captions(path: str) -> list[str]:
    import fsspec

    with fsspec.open(path, "rt", encoding="utf-8") as f:
        data = json.load(f)
    if "annotations" not in data:
        raise ValueError(f"{path} has no 'annotations': expected MS-COCO captions_*.json "
                         "(annotations[].caption)")
    return [" ".join(a["caption"].split()) for a in data["annotations"]]


def _shard_captions(source: str, limit: int | None) -> list[str]:
    """Captions (``.txt`` members) of WebDataset tars, in manifest or sorted order."""
    from ldm_train.data import fsspec_io
    from ldm_train.data.shard_reader import shard_captions

    urls: list[str]
    if fsspec_io.exists(source.rstrip("/") + "/manifest.json"):
        from ldm_train.data.manifest import read_manifest, shard_list

        urls = [u for u, _ in shard_list(read_manifest(source), source)]
    elif source.endswith(".tar") or "{" in source:
        import braceexpand

        urls = list(braceexpand.braceexpand(source))
    elif fsspec_io.isdir(source):
        urls = [fsspec_io.join(source, n) for n in fsspec_io.ls(source) if n.endswith(".tar")]
    else:
        raise FileNotFoundError(f"prompts={source!r}: no such file or shard folder")
    return shard_captions(urls, limit)


# ---------------------------------------------------------------------------------------------- work split
def rank_batches(num_samples: int, batch_size: int, rank: int, world_size: int) -> list[range]:
    """This rank's contiguous run of global batches (each a range of sample indices)."""
    n_batches = -(-num_samples // batch_size)
    lo, hi = rank * n_batches // world_size, (rank + 1) * n_batches // world_size
    return [range(b * batch_size, min((b + 1) * batch_size, num_samples)) for b in range(lo, hi)]


def sample_path(folder: str, index: int) -> str:
    return os.path.join(folder, f"{index:06d}.png")


def scale_dir(samples_root: str, guidance_scale: float) -> str:
    return os.path.join(samples_root, f"gs{guidance_scale:g}")


def save_png(image: torch.Tensor, path: str) -> None:
    """[3, H, W] in [-1, 1] -> PNG, atomically (``atomic_write``)."""
    arr = ((image.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    with atomic_write(path) as f:
        Image.fromarray(np.ascontiguousarray(arr)).save(f, format="PNG")


# ---------------------------------------------------------------------------------------------- sampling
def sample_batch(model: SamplingModel, prompts: list, indices: Sequence[int], settings: SamplerSettings,
                 device: torch.device) -> torch.Tensor:
    """Images [B, 3, H, W] in [-1, 1] for ``prompts`` (prompts, class indices or None) with per-sample
    generators ``seed + index``."""
    seeds = [settings.seed + int(i) for i in indices]
    return sample_images(model.ldm, model.first_stage, model.tokenizer, prompts, seeds, settings,
                         model.latent_shape, model.scale_factor, device)


def sample_to_folder(model: SamplingModel, prompts: list, num_samples: int, folder: str,
                     settings: SamplerSettings, rank: int = 0, world_size: int = 1,
                     device: torch.device | str = "cpu", progress: bool = True) -> dict[str, float]:
    """Write this rank's share of samples ``0..num_samples-1`` to ``folder``; returns counts and throughput."""
    device = torch.device(device)
    os.makedirs(folder, exist_ok=True)
    batches = rank_batches(num_samples, settings.batch_size, rank, world_size)
    todo = [b for b in batches if not all(os.path.exists(sample_path(folder, i)) for i in b)]
    total = sum(len(b) for b in batches)
    bar = tqdm(total=sum(len(b) for b in todo), unit="img", disable=not progress or rank != 0,
               desc=f"gs={settings.guidance_scale:g} rank0")
    start, written = time.perf_counter(), 0
    for batch in todo:
        images = sample_batch(model, [prompts[i % len(prompts)] for i in batch], batch, settings, device)
        for i, image in zip(batch, images, strict=True):
            path = sample_path(folder, i)
            if not os.path.exists(path):  # a batch can be partly done after a kill: keep what exists
                save_png(image, path)
                written += 1
        bar.update(len(batch))
    bar.close()
    seconds = time.perf_counter() - start
    # "skipped": files that already existed and were kept (a re-run after a kill)
    return {"written": written, "skipped": total - written, "assigned": total, "seconds": seconds,
            "images_per_s": (sum(len(b) for b in todo) / seconds) if seconds > 0 and todo else 0.0}
