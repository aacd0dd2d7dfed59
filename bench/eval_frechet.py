"""Benchmark of the eval Frechet step (prints JSON): ``python bench/eval_frechet.py [--dim 2048] [--n 10000]``.

Times the streaming statistics (sum x, sum x x^T in float64) per 1000 features and the Frechet step from
the statistics, Cholesky route (positive definite S1) vs the PSD square-root route, and checks both give the same
distance; then the same for ``--small`` features per set (both covariances singular: the rank-r factor route).
Thread count: whatever OMP/OPENBLAS_NUM_THREADS say.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from ldm_train.metrics.fid import FeatureStats, frechet_distance


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--small", type=int, default=64, help="features per set of the both-singular case")
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
    fid_chol, t_chol = _timed(frechet_distance, mu1, s1, mu2, s2)
    fid_sqrt, t_sqrt = _timed(_fid_psd_root, mu1, s1, mu2, s2)
    # both singular (fewer features than dimensions on each side): the rank-r factor route vs the PSD square root
    small = [m for x in (a, b) for m in _stats(x[: args.small]).mean_cov()]
    fid_small, t_small = _timed(frechet_distance, *small)
    fid_small_sqrt, t_small_sqrt = _timed(_fid_psd_root, *small)
    print(json.dumps({
        "dim": args.dim, "n_per_set": args.n, "torch_threads": torch.get_num_threads(),
        "stats_s_per_1000_features": round(t_stats / (2 * args.n / 1000), 4),
        "frechet_cholesky_s": round(t_chol, 3), "frechet_sqrtm_s": round(t_sqrt, 3),
        "fid": fid_chol, "rel_diff_between_routes": abs(fid_chol - fid_sqrt) / abs(fid_sqrt),
        "small_n_per_set": args.small, "frechet_both_singular_s": round(t_small, 3),
        "frechet_both_singular_sqrtm_s": round(t_small_sqrt, 3), "fid_small": fid_small,
        "rel_diff_both_singular": abs(fid_small - fid_small_sqrt) / abs(fid_small_sqrt),
    }))


def _timed(fn, *args) -> tuple[float, float]:
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def _stats(x: torch.Tensor) -> FeatureStats:
    stats = FeatureStats(x.shape[1])
    stats.update(x)
    return stats


def _fid_psd_root(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """The textbook route: S1^(1/2) from a d x d eigendecomposition, then the eigenvalues of S1^(1/2) S2 S1^(1/2)."""
    w, v = np.linalg.eigh(s1)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    eig = np.linalg.eigvalsh(root @ s2 @ root)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(eig, 0, None)).sum())


if __name__ == "__main__":
    main()
