"""The latent loader's stream order (``ldm_train/data/latents.py``, "Stream order and resume guarantee"): which
shards make block g of the endless epoch-by-epoch stream, where a sample position falls, and where a resumed
stream of another layout starts. Pure functions of the shard list, the seed and the counts (no I/O)."""
from __future__ import annotations

import math
from typing import Any

import numpy as np


def seeded_rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed % 2**63, *stream]))


class BlockPlan:
    """Which shards make block g, and how many samples it holds (no I/O)."""

    TAG_EPOCH, TAG_ORDER, TAG_DROP = 1, 2, 3

    def __init__(self, shards: list[tuple[str, int]], shards_per_block: int, seed: int) -> None:
        self.shards = shards
        self.k = max(1, min(shards_per_block, len(shards)))
        self.seed = seed
        self.blocks_per_epoch = math.ceil(len(shards) / self.k)
        self._perm: dict[int, np.ndarray] = {}

    def block_shards(self, g: int) -> list[int]:
        epoch, i = divmod(g, self.blocks_per_epoch)
        if epoch not in self._perm:
            self._perm = {epoch: seeded_rng(self.seed, self.TAG_EPOCH, epoch).permutation(len(self.shards))}
        return [int(j) for j in self._perm[epoch][i * self.k : (i + 1) * self.k]]

    def block_size(self, g: int) -> int:
        return sum(self.shards[j][1] for j in self.block_shards(g))

    def locate(self, first_block: int, step: int, position: int) -> tuple[int, int]:
        """The block of the stream first_block, first_block + step, ... holding sample ``position``.

        Returns (block, offset in block); offset 0 means the block has not been started.
        """
        g = first_block
        while True:
            size = self.block_size(g)
            if position < size:
                return g, position
            position -= size
            g += step


def next_unstarted_block(state: dict[str, Any], plan: BlockPlan) -> int:
    """First block index that no stream of the saved topology had started (resume at another topology)."""
    workers = max(1, int(state["num_workers"]))
    streams = int(state["world_size"]) * workers
    n, batch = int(state["batches_yielded"]), int(state["batch_size"])
    last = int(state.get("base_block", 0)) - 1
    for s in range(streams):
        worker = s % workers
        done = max(0, -(-(n - worker) // workers))
        g, offset = plan.locate(int(state.get("base_block", 0)) + s, streams, done * batch)
        last = max(last, g if offset > 0 else g - streams)
    return last + 1
