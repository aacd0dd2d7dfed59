"""Benchmark: one attention call (forward + backward) on CPU through SDPA and through ``NarrowHeadAttention``, over a
grid of shapes (prints JSON): the measurements behind ``ldm_train.models.attention``'s choice of path.

Usage: ``python bench/attention_paths.py [--threads 1] [--iters 30]``. Per shape ``[B, H, N, M, D]`` (queries N,
keys M, head width D): median milliseconds of each path, their ratio (narrow / SDPA), the MiB of probabilities the
narrow path keeps, and whether ``attention()`` takes it (``uses_narrow_head_path``; eager, not compiling).
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ldm_train.models.attention import NarrowHeadAttention, uses_narrow_head_path


def median_ms(fn: Callable, shapes: list[tuple[int, ...]], iters: int) -> float:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*s, generator=gen).requires_grad_(True) for s in shapes)
    grad = torch.randn(shapes[0], generator=gen)
    times = []
    for i in range(iters + 3):
        t0 = time.perf_counter()
        fn(q, k, v).backward(grad)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--iters", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    grid = itertools.product([(2, 8), (8, 4)], [64, 256], ["self", 77], [8, 16])
    for (b, h), n, m, d in [*grid, ((8, 8), 256, "self", 8), ((2, 8), 1024, "self", 8)]:
        m = n if m == "self" else m
        shapes = [(b, h, n, d), (b, h, m, d), (b, h, m, d)]
        sdpa = median_ms(F.scaled_dot_product_attention, shapes, args.iters)
        narrow = median_ms(NarrowHeadAttention.apply, shapes, args.iters)
        rows.append({"shape": [b, h, n, m, d], "probabilities_mib": b * h * n * m * 4 / 2**20, "sdpa_ms": round(sdpa, 3),
                     "narrow_ms": round(narrow, 3), "narrow_over_sdpa": round(narrow / sdpa, 3),
                     "taken": uses_narrow_head_path(torch.empty(shapes[0]), torch.empty(shapes[1]))})
    print(json.dumps({"bench": "attention_paths", "threads": torch.get_num_threads(), "iters": args.iters,
                      "torch": torch.__version__, "rows": rows}))


if __name__ == "__main__":
    main()
