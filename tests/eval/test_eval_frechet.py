"""Frechet distance: closed-form test vectors, streaming across ranks, agreement with torch-fidelity."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

from ldm_train.metrics.fid import FeatureStats, fid_from_stats, frechet_distance

pytestmark = pytest.mark.integration  # starts processes or servers


def fid_from_features(features1: np.ndarray, features2: np.ndarray, chunk: int = 4096) -> float:
    """FID between two feature matrices [N, D], streamed through FeatureStats in chunks."""
    stats = []
    for feats in (features1, features2):
        t = torch.as_tensor(np.asarray(feats))
        s = FeatureStats(t.shape[1])
        for part in t.split(chunk):
            s.update(part)
        stats.append(s)
    return fid_from_stats(stats[0], stats[1])


def test_identity_covariances_d2048() -> None:
    # in a 1-thread BLAS subprocess: on the shared 2-core machines a 2-thread 2048^3 LAPACK call is often
    # several times slower than a 1-thread one (and the thread count of a running numpy can't be changed)
    import os
    import subprocess
    import sys

    code = ("import numpy as np; from ldm_train.metrics.fid import frechet_distance; d = 2048; "
            "print(repr(frechet_distance(np.zeros(d), np.eye(d), np.ones(d), np.eye(d))))")
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         timeout=300).stdout
    assert float(out) == pytest.approx(2048.0, rel=1e-12)


def test_one_dimensional_gaussians() -> None:
    # (0-1)^2 + 1 + 4 - 2*sqrt(1*4)
    assert frechet_distance(np.zeros(1), np.ones((1, 1)), np.ones(1), np.full((1, 1), 4.0)) == pytest.approx(2.0)


def test_correlated_two_dimensional() -> None:
    got = frechet_distance(np.array([0.0, 0.0]), np.array([[2.0, 1.0], [1.0, 2.0]]),
                           np.array([1.0, 2.0]), np.diag([1.0, 3.0]))
    assert got == pytest.approx(5.5166852265, abs=1e-9)


def test_streaming_equals_numpy_cov_and_chunking_is_invariant() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 7)) @ rng.normal(size=(7, 7)) + 3.0
    s = FeatureStats(7)
    for part in torch.from_numpy(x).split(37):
        s.update(part)
    mu, cov = s.mean_cov()
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(cov, np.cov(x, rowvar=False), rtol=1e-10)


def test_agrees_with_torch_fidelity_on_shared_features() -> None:
    rng = np.random.default_rng(3)
    a = torch.from_numpy(rng.normal(size=(500, 64)).astype(np.float32))
    b = torch.from_numpy((rng.normal(size=(400, 64)) * 1.3 + 0.2).astype(np.float32))
    theirs = fid_statistics_to_metric(fid_features_to_statistics(a), fid_features_to_statistics(b), False)
    ours = fid_from_features(a, b)
    assert ours == pytest.approx(theirs["frechet_inception_distance"], rel=1e-6)


def test_save_load_roundtrip(tmp_path) -> None:
    s = FeatureStats(3)
    s.update(torch.arange(12, dtype=torch.float32).reshape(4, 3) ** 1.5)
    s.save(str(tmp_path / "ref.npz"))
    t = FeatureStats.load(str(tmp_path / "ref.npz"))
    assert t.count == 4
    assert torch.equal(t.sum_outer, s.sum_outer)
    # a rank-deficient covariance: sqrt of ~1e-13 eigenvalues leaves ~1e-7, far below any real FID
    assert fid_from_stats(s, t) == pytest.approx(0.0, abs=1e-5)


@pytest.mark.slow
def test_all_reduce_across_two_ranks_equals_one_pass(tmp_path) -> None:
    import os
    import subprocess
    import sys
    from pathlib import Path

    worker = Path(__file__).with_name("dist_stats_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29733",
                    str(worker), str(tmp_path / "s.npz")], check=True, timeout=180, env=env)
    got = FeatureStats.load(str(tmp_path / "s.npz"))
    x = np.random.default_rng(0).normal(size=(101, 5))
    assert got.count == 101
    mu, cov = got.mean_cov()
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(cov, np.cov(x, rowvar=False), rtol=1e-10)


def test_singular_covariance_fallback_matches_torch_fidelity() -> None:
    # 6 samples in 10-D: a rank-deficient covariance, so the Cholesky of the other side's is used (either order);
    # 6 against 8 samples: both singular, so the PSD square root is
    rng = np.random.default_rng(5)
    a = torch.from_numpy(rng.normal(size=(6, 10)))
    b = torch.from_numpy(rng.normal(size=(40, 10)) * 0.7 + 0.3)
    c = torch.from_numpy(rng.normal(size=(8, 10)) * 1.2 - 0.1)
    for x, y in ((a, b), (a, c)):
        theirs = fid_statistics_to_metric(fid_features_to_statistics(x), fid_features_to_statistics(y), False)
        assert fid_from_features(x, y) == pytest.approx(theirs["frechet_inception_distance"], rel=1e-6)
        assert fid_from_features(y, x) == pytest.approx(theirs["frechet_inception_distance"], rel=1e-6)
