"""The first-stage trainer's data: an endless, resumable image stream and the held-out images.

The stream is deterministic given (seed, rank, world size, worker count): shard order per epoch and the
shuffle buffer are seeded, and DataLoader hands out worker batches round-robin. Resuming replays the
stream and skips the batches already consumed, so a resumed run sees exactly the batches an
uninterrupted run would (the skipped images are decoded again: resume cost grows with the position).
"""
from __future__ import annotations

import itertools
import random
from collections.abc import Iterator

import torch

from ldm_train.first_stage.config import AEDataConfig
from ldm_train.runtime import preemption


class ImageStream(torch.utils.data.IterableDataset):
    """Endless batches ``[B, 3, R, R]`` for one rank, resuming after ``skip_batches`` batches.

    Batch ``j`` of the run comes from stream ``j % num_workers`` (DataLoader hands out worker batches
    round-robin). A resumed loader starts again at worker 0, so worker ``w`` plays stream
    ``(w + skip_batches) % num_workers`` and skips that stream's batches already consumed.
    """

    def __init__(self, cfg: AEDataConfig, batch_size: int, seed: int, rank: int, world_size: int,
                 skip_batches: int = 0) -> None:
        from ldm_train.data.input_shards import list_input_shards

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
        from ldm_train.data.input_shards import InputShardError
        from ldm_train.data.readers import Filters, Sample, iter_shard

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
                                         prefetch_factor=4 if self.num_workers > 0 else None,
                                         worker_init_fn=preemption.ignore_in_worker)  # SIGTERM: the trainer's
        with preemption.held():
            it = iter(dl)  # the workers start here
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
