"""Frechet distance from streamed feature statistics, and a random-init extractor for plumbing tests.

Statistics are accumulated in float64 as ``sum x`` and ``sum x x^T`` and all-reduced across ranks, then one
Frechet step runs on rank 0 (edm's recipe): no gather of features or images. These are the pieces an
in-training FID needs (the trainer does not compute one yet); the published-protocol eval goes through
torch-fidelity (``eval/fidelity.py``) and agrees with this code on the same features (tests/eval).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

RANDOM_INIT_FLAG = "random-init-plumbing-only"


class FeatureStats:
    """Streaming float64 first and second moments of features (sum x, sum x x^T, count)."""

    def __init__(self, dim: int) -> None:
        self.dim = int(dim)
        self.count = 0
        self.sum = torch.zeros(self.dim, dtype=torch.float64)
        self.sum_outer = torch.zeros(self.dim, self.dim, dtype=torch.float64)

    def update(self, features: torch.Tensor) -> None:
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"features of shape {tuple(features.shape)} do not match [N, {self.dim}]")
        # accumulate where the features are (a GPU does the d x d float64 product far faster than the host)
        x = features.detach().to(torch.float64)
        if self.sum.device != x.device:
            self.sum, self.sum_outer = self.sum.to(x.device), self.sum_outer.to(x.device)
        self.count += x.shape[0]
        self.sum += x.sum(0)
        self.sum_outer += x.T @ x

    def all_reduce(self) -> FeatureStats:
        """Sum the statistics of every rank in place (no-op without an initialised process group)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return self
        if torch.distributed.get_world_size() == 1:
            return self
        # one flat float64 buffer: a single collective, exact for counts below 2**53
        flat = torch.cat([torch.tensor([float(self.count)], dtype=torch.float64), self.sum.cpu(),
                          self.sum_outer.cpu().flatten()])
        if torch.distributed.get_backend() == "nccl":
            flat = flat.cuda()
        torch.distributed.all_reduce(flat)
        flat = flat.cpu()
        self.count = int(round(flat[0].item()))
        self.sum = flat[1 : 1 + self.dim].clone()
        self.sum_outer = flat[1 + self.dim :].reshape(self.dim, self.dim).clone()
        return self

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and unbiased covariance (ddof=1, as numpy.cov and torch-fidelity use)."""
        if self.count < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, have {self.count}")
        n = self.count
        mu = self.sum.cpu() / n
        cov = (self.sum_outer.cpu() - n * torch.outer(mu, mu)) / (n - 1)
        return mu.numpy(), cov.numpy()

    def save(self, path: str) -> None:
        """Write ``path`` (.npz) atomically, so a concurrent reader never sees half a file."""
        from ldm_train.data.fsspec_io import atomic_write

        with atomic_write(path) as f:
            np.savez(f, count=self.count, sum=self.sum.cpu().numpy(), sum_outer=self.sum_outer.cpu().numpy())

    @classmethod
    def load(cls, path: str) -> FeatureStats:
        with np.load(path) as f:
            stats = cls(int(f["sum"].shape[0]))
            stats.count = int(f["count"])
            stats.sum = torch.from_numpy(f["sum"].astype(np.float64))
            stats.sum_outer = torch.from_numpy(f["sum_outer"].astype(np.float64))
        return stats


def low_rank_factor(a: np.ndarray) -> np.ndarray:
    """F [d, r] with F F^T = a for a symmetric PSD ``a`` of numerical rank r: LAPACK's pivoted Cholesky (?pstrf),
    O(d r^2), so a covariance of a few samples costs milliseconds where a d x d eigendecomposition costs seconds.
    Pivots below d * eps * max(diag) count as zero: the eigenvalues they would add are round-off."""
    from scipy.linalg import lapack

    a = np.ascontiguousarray((a + a.T) / 2, dtype=np.float64)
    factor, piv, rank, info = lapack.dpstrf(a, lower=1)
    if info < 0:
        raise ValueError(f"pivoted Cholesky rejected argument {-info} of a {a.shape} matrix")
    out = np.empty((a.shape[0], int(rank)))
    out[piv - 1] = np.tril(factor)[:, : int(rank)]
    return out


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) in float64.

    tr((S1 S2)^(1/2)) is the sum of square roots of the eigenvalues of a symmetric PSD matrix with the
    eigenvalues of S1 S2: L^T S2 L (S1 = L L^T, Cholesky; or the same with S1 and S2 swapped when S1 is singular),
    or F^T S2 F [r, r] when both are (small sample counts; S1 = F F^T of rank r, ``low_rank_factor``), so no complex
    parts and no sqrtm failures.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.shape[0], mu1.shape[0]):
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    diff = mu1 - mu2
    eig = None
    # S = L L^T: L^T S' L is symmetric with the eigenvalues of S S' (= those of S' S), and a Cholesky is ~20x cheaper
    # than the eigendecomposition a matrix square root needs (d=2048: ~1 s instead of ~15 s on 1 core). Either
    # covariance may be factored: the first that is positive definite (a small generated set's is singular).
    for a, b in ((s1, s2), (s2, s1)):
        try:
            chol = np.linalg.cholesky(a)
        except np.linalg.LinAlgError:
            continue
        eig = np.linalg.eigvalsh(chol.T @ b @ chol)
        break
    if eig is None:  # both singular (fewer samples than dimensions on both sides): S1's rank-r factor instead
        factor = low_rank_factor(s1)
        eig = np.linalg.eigvalsh(factor.T @ s2 @ factor)
    tr_covmean = float(np.sqrt(np.clip(eig, 0, None)).sum())
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def fid_from_stats(generated: FeatureStats, reference: FeatureStats) -> float:
    """Frechet distance between two accumulated feature sets."""
    return frechet_distance(*generated.mean_cov(), *reference.mean_cov())


def bootstrap_fid(features: np.ndarray, reference: FeatureStats, resamples: int, seed: int = 0) -> np.ndarray:
    """FIDs of ``resamples`` bootstrap resamples (rows drawn with replacement) of the generated ``features``
    [N, d] against ``reference``: their standard deviation is the FID's sampling noise at this N.

    The reference covariance is factored once, S_r = R R^T (Cholesky; with fewer images than dimensions, its rank-r
    factor R [d, r]). With the resample's centred rows X, R^T S_g R = B^T B / (N - 1) for B = X R [N, r],
    and B B^T [N, N] has the same non-zero eigenvalues: each resample costs one symmetric eigenvalue problem of size
    min(N, r) and no d x d covariance (N = 64, d = 2048: milliseconds instead of seconds).
    """
    x = np.asarray(features, np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"bootstrap_fid needs [N >= 2, d] features, got shape {x.shape}")
    mu_r, s_r = reference.mean_cov()
    try:
        root = np.linalg.cholesky(s_r)
    except np.linalg.LinAlgError:
        root = low_rank_factor(s_r)
    rng = np.random.default_rng(seed)
    n, out = x.shape[0], np.empty(int(resamples))
    for b in range(int(resamples)):
        xb = x[rng.integers(0, n, n)]
        mu = xb.mean(0)
        centred = xb - mu
        b_rows = centred @ root
        gram = b_rows @ b_rows.T if n < b_rows.shape[1] else b_rows.T @ b_rows
        eig = np.linalg.eigvalsh(gram / (n - 1))  # the non-zero eigenvalues of S_r S_g
        diff = mu - mu_r
        trace_g = float(np.einsum("ij,ij->", centred, centred)) / (n - 1)
        out[b] = diff @ diff + trace_g + np.trace(s_r) - 2.0 * np.sqrt(np.clip(eig, 0, None)).sum()
    return out


class RandomInitFeatures(nn.Module):
    """A small conv net with weights drawn from a fixed seed: metric PLUMBING only.

    Deterministic for a given ``seed`` (same weights on every rank and every run), a continuous function
    of the pixels, so identical sets give FID 0 and shifted sets a larger one; the numbers say nothing
    about image quality and are flagged ``random-init-plumbing-only`` wherever they are reported.
    """

    def __init__(self, feature_dim: int = 64, num_logits: int = 10, seed: int = 0, input_size: int = 32) -> None:
        super().__init__()
        self.feature_dim = feature_dim
        self.name = f"random-init-s{seed}-d{feature_dim}"
        self.input_size = input_size
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, feature_dim, 3, stride=1, padding=1),
            nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_logits)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                if p.ndim > 1:
                    fan_in = p[0].numel()
                    p.copy_(torch.randn(p.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        self.requires_grad_(False)
        self.eval()

    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images [B, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        x = images.float() / 127.5 - 1.0
        x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False,
                          antialias=True)
        feats = self.body(x).mean(dim=(2, 3))
        # x10: random logits are otherwise so flat that every image gets the same class distribution (IS = 1)
        return feats, 10.0 * self.head(feats)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(images)[0]


@torch.no_grad()
def accumulate_stats(extractor: nn.Module, images_uint8: torch.Tensor, stats: FeatureStats | None = None,
                     batch_size: int = 64) -> FeatureStats:
    """Add the features of ``images_uint8`` [N, 3, H, W] to ``stats`` (created on first use)."""
    device = next(extractor.parameters()).device
    for chunk in images_uint8.split(batch_size):
        feats = extractor(chunk.to(device))
        if stats is None:
            stats = FeatureStats(feats.shape[1])
        stats.update(feats)
    if stats is None:
        raise ValueError("no images given")
    return stats


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images -> uint8 0..255 with the same rounding as the PNGs eval writes."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
