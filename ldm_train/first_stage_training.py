"""Pieces of the first-stage trainer that are not the loop: the image stream, checkpoints, metrics.

The stream is deterministic given (seed, rank, world size, worker count): shard order per epoch and the
shuffle buffer are seeded, and DataLoader hands out worker batches round-robin. Resuming replays the
stream and skips the batches already consumed, so a resumed run sees exactly the batches an
uninterrupted run would (the skipped images are decoded again: resume cost grows with the position).
"""
from __future__ import annotations

import itertools
import os
import random
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

CKPT_PREFIX = "step_"


@dataclass
class AEDataConfig:
    input: str = "???"
    heldout: str | None = None
    input_format: str = "auto"
    resolution: int = 64
    num_workers: int = 2
    shuffle_buffer: int = 256


@dataclass
class AEOptimConfig:
    batch_size: int = 8
    base_lr: float = 4.5e-6
    scale_lr: bool = True
    betas: list[float] = field(default_factory=lambda: [0.5, 0.9])
    grad_clip: float | None = None


@dataclass
class AETrainConfig:
    max_steps: int = 1000
    precision: str = "fp32"
    log_every: int = 50
    image_every: int = 500
    eval_every: int = 500
    eval_images: int = 64
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    export_every_checkpoint: bool = True


@dataclass
class AELossConfig:
    lpips_backbone: str | None = None
    lpips_random_backbone: bool = False


class ImageStream(torch.utils.data.IterableDataset):
    """Endless batches ``[B, 3, R, R]`` for one rank, resuming after ``skip_batches`` batches.

    Batch ``j`` of the run comes from stream ``j % num_workers`` (DataLoader hands out worker batches
    round-robin). A resumed loader starts again at worker 0, so worker ``w`` plays stream
    ``(w + skip_batches) % num_workers`` and skips that stream's batches already consumed.
    """

    def __init__(self, cfg: AEDataConfig, batch_size: int, seed: int, rank: int, world_size: int,
                 skip_batches: int = 0) -> None:
        from ldm_train.data.readers import list_input_shards

        super().__init__()
        self.cfg, self.batch_size, self.seed = cfg, batch_size, seed
        self.rank, self.world_size, self.skip_batches = rank, world_size, skip_batches
        self.shards = list_input_shards(cfg.input, cfg.input_format)
        workers = max(cfg.num_workers, 1)
        # whole shards per (rank, stream) when there are enough, else every rank reads all and keeps its share
        self.split_shards = len(self.shards) >= world_size * workers
        self.num_workers = cfg.num_workers if self.split_shards else 0
        if not self.split_shards and (world_size > 1 or cfg.num_workers > 1):
            print(f"[train_autoencoder] {len(self.shards)} input shard(s) < {world_size} ranks x {workers} workers: "
                  f"each rank reads every shard and keeps 1/{world_size} of the samples (num_workers=0); "
                  f"write more shards for faster loading", flush=True)

    def _images(self, stream: int, num_streams: int) -> Iterator[torch.Tensor]:
        from ldm_train.data.readers import Filters, InputShardError, Sample, iter_shard

        filters = Filters(min_size=0, require_caption=False)  # an autoencoder needs images only
        for epoch in itertools.count():
            order = torch.randperm(len(self.shards), generator=torch.Generator().manual_seed(self.seed + epoch))
            shards = [self.shards[i] for i in order.tolist()]
            if self.split_shards:
                shards = shards[self.rank :: self.world_size][stream::num_streams]
            n = 0
            for shard in shards:
                try:
                    for rec in iter_shard(shard, self.cfg.resolution, filters):
                        if isinstance(rec, Sample):
                            n += 1
                            if self.split_shards or n % self.world_size == self.rank:
                                yield rec.image
                except InputShardError as e:  # keep training; the encode job is where damage fails a run
                    print(f"[train_autoencoder] warning: {e}", flush=True)

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        stream = (worker + self.skip_batches) % num_workers
        skip = self.skip_batches // num_workers + (1 if stream < self.skip_batches % num_workers else 0)
        rng = random.Random(f"{self.seed}-{self.rank}-{stream}")
        buffer: list[torch.Tensor] = []
        batch: list[torch.Tensor] = []
        for image in self._images(stream, num_workers):
            if len(buffer) < self.cfg.shuffle_buffer:
                buffer.append(image)
                continue
            j = rng.randrange(len(buffer))
            buffer[j], image = image, buffer[j]
            batch.append(image)
            if len(batch) == self.batch_size:
                if skip > 0:
                    skip -= 1
                else:
                    yield torch.stack(batch)
                batch = []

    def loader(self) -> Iterator[torch.Tensor]:
        """An iterator over the batches; creating it leaves the global RNG untouched (resume determinism)."""
        state = torch.get_rng_state()  # DataLoader draws its worker base seed from the global generator
        dl = torch.utils.data.DataLoader(self, batch_size=None, num_workers=self.num_workers,
                                         persistent_workers=self.num_workers > 0,
                                         prefetch_factor=4 if self.num_workers > 0 else None)
        it = iter(dl)
        torch.set_rng_state(state)
        return it


def load_heldout(cfg: AEDataConfig, max_images: int) -> torch.Tensor | None:
    """The first ``max_images`` held-out images ``[N, 3, R, R]`` (every rank holds the same set).

    Without ``data.heldout`` the first training images stand in (reconstruction grids and latent
    statistics still work; the trainer labels their PSNR ``eval_train/``, not ``eval/``).
    """
    from ldm_train.data.readers import image_dataset

    images = []
    for sample in image_dataset(cfg.heldout or cfg.input, cfg.resolution, input_format=cfg.input_format):
        images.append(sample["image"])
        if len(images) >= max_images:
            break
    if not images:
        raise FileNotFoundError(f"{cfg.heldout or cfg.input} holds no readable images (data.heldout / data.input)")
    return torch.stack(images)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for images in [-1, 1] (peak = 1 after mapping to [0, 1])."""
    mse = ((x.clamp(-1, 1) - y.clamp(-1, 1)) / 2).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


# ---------------------------------------------------------------- checkpoints


def _is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _is_dist():
        dist.barrier()


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    if not ckpt_dir.is_dir():
        return None
    done = sorted(p for p in ckpt_dir.iterdir() if p.name.startswith(CKPT_PREFIX) and (p / "state.pt").is_file())
    return done[-1] if done else None


def save_checkpoint(ckpt_dir: Path, step: int, state: dict[str, Any], rank: int, keep: int,
                    export_fn: Any = None) -> Path:
    """All ranks call: rank 0 writes the shared state, every rank its RNG; then one atomic rename."""
    final = ckpt_dir / f"{CKPT_PREFIX}{step:07d}"
    tmp = ckpt_dir / f".{final.name}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # leftover of a run killed mid-save
        tmp.mkdir(parents=True)
    _barrier()
    torch.save(rng_state(), tmp / f"rng_rank{rank:05d}.pt")
    if rank == 0:
        torch.save(state, tmp / "state.pt")
        if export_fn is not None:
            export_fn(tmp / "first_stage.safetensors")
    _barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)  # the checkpoint appears whole or not at all
        old = sorted(p for p in ckpt_dir.iterdir() if p.name.startswith(CKPT_PREFIX))
        for p in old[:-keep] if keep > 0 else []:
            shutil.rmtree(p, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(path: Path, rank: int, world_size: int) -> dict[str, Any]:
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    rng_file = path / f"rng_rank{rank:05d}.pt"
    if state.get("world_size") == world_size and rng_file.is_file():
        set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=True))
    else:
        print(f"[train_autoencoder] resuming {path} at world size {world_size} (saved at "
              f"{state.get('world_size')}): RNG re-seeded and the data stream restarts at a new seed", flush=True)
        state["reseed"] = True
    return state
