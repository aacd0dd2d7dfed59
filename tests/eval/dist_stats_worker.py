"""Run under torchrun by test_eval_frechet.py: each rank streams its slice, all_reduce, rank 0 saves the result."""
from __future__ import annotations

import sys

import numpy as np
import torch
import torch.distributed as dist

from ldm_train.metrics.fid import FeatureStats

if __name__ == "__main__":
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(101, 5)))
    lo, hi = rank * 101 // world, (rank + 1) * 101 // world
    stats = FeatureStats(5)
    stats.update(x[lo:hi])
    stats.all_reduce()
    if rank == 0:
        stats.save(sys.argv[1])
    dist.destroy_process_group()
