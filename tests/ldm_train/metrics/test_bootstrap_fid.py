"""``bootstrap_fid``: each resample's FID equals the Frechet distance of those rows computed the direct way (with
more rows than dimensions, fewer, and a singular reference covariance), and
the spread shrinks as the generated set grows (the FID's own sampling noise at K)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm_train.metrics.fid import FeatureStats, bootstrap_fid, frechet_distance


def _reference(d: int, n: int, seed: int) -> FeatureStats:
    stats = FeatureStats(d)
    stats.update(torch.from_numpy(np.random.default_rng(seed).standard_normal((n, d))))
    return stats


@pytest.mark.parametrize("d,n,n_ref", [(16, 60, 500), (64, 20, 500), (64, 20, 40)],
                         ids=["more-rows-than-dims", "fewer-rows-than-dims", "singular-reference"])
def test_each_resample_is_the_frechet_distance_of_its_rows(d: int, n: int, n_ref: int) -> None:
    ref = _reference(d, n_ref, seed=0)
    x = np.random.default_rng(1).standard_normal((n, d)) * 1.3 + 0.2
    fids = bootstrap_fid(x, ref, resamples=3, seed=7)
    rng = np.random.default_rng(7)
    for b in range(3):
        rows = x[rng.integers(0, n, n)]
        if n > d:
            direct = frechet_distance(rows.mean(0), np.cov(rows, rowvar=False), *ref.mean_cov())
        else:  # S_r S_g has rank <= distinct rows - 1: the d x d eigenvalues past it are round-off, whose square
            # roots (~1e-7 each) would move the sum by ~1e-6, so the direct way keeps only the non-zero ones
            direct = _frechet_low_rank(rows, *ref.mean_cov(), rank=len(np.unique(rows, axis=0)) - 1)
        assert abs(fids[b] - direct) < 1e-8 * max(1.0, abs(direct)), (b, fids[b], direct)


def _frechet_low_rank(rows: np.ndarray, mu_r: np.ndarray, s_r: np.ndarray, rank: int) -> float:
    mu_g, s_g = rows.mean(0), np.cov(rows, rowvar=False)
    w, v = np.linalg.eigh(s_r)  # the PSD square root, independent of the module's factorisations
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    eig = np.sort(np.linalg.eigvalsh(root @ s_g @ root))[-rank:]
    diff = mu_g - mu_r
    return float(diff @ diff + np.trace(s_r) + np.trace(s_g) - 2.0 * np.sqrt(np.clip(eig, 0, None)).sum())


def test_the_spread_shrinks_with_more_samples() -> None:
    d = 8
    ref = _reference(d, 2000, seed=0)
    gen = np.random.default_rng(3).standard_normal((4000, d)) + 0.5
    small = bootstrap_fid(gen[:100], ref, resamples=30, seed=0).std(ddof=1)
    large = bootstrap_fid(gen, ref, resamples=30, seed=0).std(ddof=1)
    assert 0 < large < small / 3, (small, large)  # std ~ 1/sqrt(N): 40x the samples, ~6x less spread
