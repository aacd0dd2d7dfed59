"""``bootstrap_fid``: each resample's FID equals the Frechet distance of those rows computed the direct way, and
the spread shrinks as the generated set grows (the FID's own sampling noise at K)."""
from __future__ import annotations

import numpy as np
import torch

from ldm_train.metrics.fid import FeatureStats, bootstrap_fid, frechet_distance


def _reference(d: int, n: int, seed: int) -> FeatureStats:
    stats = FeatureStats(d)
    stats.update(torch.from_numpy(np.random.default_rng(seed).standard_normal((n, d))))
    return stats


def test_each_resample_is_the_frechet_distance_of_its_rows() -> None:
    d, n = 16, 60
    ref = _reference(d, 500, seed=0)
    x = np.random.default_rng(1).standard_normal((n, d)) * 1.3 + 0.2
    fids = bootstrap_fid(x, ref, resamples=3, seed=7)
    rng = np.random.default_rng(7)
    for b in range(3):
        rows = x[rng.integers(0, n, n)]
        direct = frechet_distance(rows.mean(0), np.cov(rows, rowvar=False), *ref.mean_cov())
        assert abs(fids[b] - direct) < 1e-8 * max(1.0, abs(direct)), (b, fids[b], direct)


def test_the_spread_shrinks_with_more_samples() -> None:
    d = 8
    ref = _reference(d, 2000, seed=0)
    gen = np.random.default_rng(3).standard_normal((4000, d)) + 0.5
    small = bootstrap_fid(gen[:100], ref, resamples=30, seed=0).std(ddof=1)
    large = bootstrap_fid(gen, ref, resamples=30, seed=0).std(ddof=1)
    assert 0 < large < small / 3, (small, large)  # std ~ 1/sqrt(N): 40x the samples, ~6x less spread
