"""Typed config of the latent loader (the ``data`` node of conf/train.yaml): torch-free, so composing or printing
a config (``--help``) does not load the loader. The loader itself is ``ldm_train.data.latents``."""
from __future__ import annotations

from dataclasses import dataclass

from ldm_train.config_checks import bounded

# input_format of the image readers (ldm_train.data.input_shards) in the encode job and the first-stage trainer:
# auto (detected from the input) | tar | folder | imagenet (class folders)
INPUT_FORMATS = ("auto", "tar", "folder", "imagenet")


@dataclass
class LatentDataConfig:
    """``conf/data/latents.yaml``: where the shards are and how they are streamed."""

    resolution: int = bounded(64, ge=1)  # image side the latents were encoded at (checked against the manifest)
    latents_root: str = "data/latents"  # folder/prefix holding one shard folder per first stage
    shards: str = "data/latents/tiny_kl_f4"  # shard folder (manifest.json + shard-*.tar); local or fsspec URL
    manifest: str | None = None  # default <shards>/manifest.json
    batch_size: int = bounded(8, ge=1)  # micro batch per rank
    num_workers: int = bounded(2, ge=0)  # loader processes per rank (0: in the training process)
    shuffle_buffer: int = bounded(1000, ge=0)  # samples held per worker for shuffling within a block
    shards_per_block: int = bounded(4, ge=1)  # shards interleaved per block (mixing across shards)
    caption_dropout: float = bounded(0.1, ge=0, le=1)  # probability a caption is replaced by "" (the uncond input for CFG)
    scale_factor: float | None = bounded(None, gt=0)  # None: the manifest's (1/std of the latents)
    seed: int = 0
    prefetch_factor: int = bounded(4, ge=1)
    pin_memory: bool = True  # only used with CUDA
