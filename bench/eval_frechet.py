"""Benchmark of the eval Frechet step (prints JSON): ``python bench/eval_frechet.py [--dim 2048] [--n 10000]``.

Times the streaming statistics (sum x, sum x x^T in float64) per 1000 features and the Frechet step from
the statistics, Cholesky route (positive definite S1) vs the PSD square-root route (singular S1), and
checks both give the same distance. Thread count: whatever OMP/OPENBLAS_NUM_THREADS say.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from ldm_train.metrics.fid import FeatureStats, _sqrtm_psd, frechet_distance


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--n", type=int, default=10000)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    a = torch.from_numpy(rng.normal(size=(args.n, args.dim)).astype(np.float32))
    b = torch.from_numpy((rng.normal(size=(args.n, args.dim)) * 1.1 + 0.05).astype(np.float32))
    t0 = time.perf_counter()
    sa, sb = FeatureStats(args.dim), FeatureStats(args.dim)
    for part in a.split(1000):
        sa.update(part)
    for part in b.split(1000):
        sb.update(part)
    t_stats = time.perf_counter() - t0
    (mu1, s1), (mu2, s2) = sa.mean_cov(), sb.mean_cov()
    t0 = time.perf_counter()
    fid_chol = frechet_distance(mu1, s1, mu2, s2)
    t_chol = time.perf_counter() - t0
    t0 = time.perf_counter()
    root = _sqrtm_psd(s1)
    eig = np.linalg.eigvalsh(root @ s2 @ root)
    fid_sqrt = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(eig, 0, None)).sum())
    t_sqrt = time.perf_counter() - t0
    print(json.dumps({
        "dim": args.dim, "n_per_set": args.n, "torch_threads": torch.get_num_threads(),
        "stats_s_per_1000_features": round(t_stats / (2 * args.n / 1000), 4),
        "frechet_cholesky_s": round(t_chol, 3), "frechet_sqrtm_s": round(t_sqrt, 3),
        "fid": fid_chol, "rel_diff_between_routes": abs(fid_chol - fid_sqrt) / abs(fid_sqrt),
    }))


if __name__ == "__main__":
    main()
