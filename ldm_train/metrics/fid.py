"""Frechet distance from streamed feature statistics, and the feature-extractor interface.

The cheap in-training FID (a few thousand samples against cached reference statistics) and the
published-protocol eval (``eval/``) share this code, so both compute the same number from the same
features. Statistics are accumulated in float64 as ``sum x`` and ``sum x x^T`` and all-reduced across
ranks, then one Frechet step runs on rank 0 (edm's recipe): no gather of features or images.

Label in-training numbers ``fid_cheap_<n>`` (:func:`cheap_fid_label`): they use fewer samples and
possibly a random-init extractor, and are not comparable with the paper's FID.
"""
from __future__ import annotations

import os
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

RANDOM_INIT_FLAG = "random-init-plumbing-only"


@runtime_checkable
class FeatureExtractor(Protocol):
    """Maps uint8 images ``[B, 3, H, W]`` (0..255) to float features ``[B, feature_dim]``."""

    feature_dim: int
    name: str

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


def cheap_fid_label(num_samples: int) -> str:
    """Metric name of an in-training FID over ``num_samples`` generated images."""
    return f"fid_cheap_{int(num_samples)}"


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
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}.npz"
        np.savez(tmp, count=self.count, sum=self.sum.cpu().numpy(), sum_outer=self.sum_outer.cpu().numpy())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> FeatureStats:
        with np.load(path) as f:
            stats = cls(int(f["sum"].shape[0]))
            stats.count = int(f["count"])
            stats.sum = torch.from_numpy(f["sum"].astype(np.float64))
            stats.sum_outer = torch.from_numpy(f["sum_outer"].astype(np.float64))
        return stats


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) in float64.

    tr((S1 S2)^(1/2)) is the sum of square roots of the eigenvalues of a symmetric PSD matrix with the
    eigenvalues of S1 S2: L^T S2 L (S1 = L L^T, Cholesky) or S1^(1/2) S2 S1^(1/2) when S1 is singular (small
    sample counts), so no complex parts and no sqrtm failures.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.shape[0], mu1.shape[0]):
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    diff = mu1 - mu2
    try:
        # S1 = L L^T: L^T S2 L is symmetric with the eigenvalues of S1 S2, and a Cholesky is ~20x cheaper
        # than the eigendecomposition a matrix square root needs (d=2048: ~1 s instead of ~15 s on 1 core)
        chol = np.linalg.cholesky(s1)
        eig = np.linalg.eigvalsh(chol.T @ s2 @ chol)
    except np.linalg.LinAlgError:  # singular S1 (fewer samples than dimensions): PSD square root instead
        root1 = _sqrtm_psd(s1)
        eig = np.linalg.eigvalsh(root1 @ s2 @ root1)
    tr_covmean = float(np.sqrt(np.clip(eig, 0, None)).sum())
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def fid_from_stats(generated: FeatureStats, reference: FeatureStats) -> float:
    """Frechet distance between two accumulated feature sets."""
    return frechet_distance(*generated.mean_cov(), *reference.mean_cov())


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


class InceptionFeatures(nn.Module):
    """torch-fidelity's InceptionV3 pool features (2048-d) from a local weights file."""

    feature_dim = 2048

    def __init__(self, weights_path: str) -> None:
        super().__init__()
        if not os.path.isfile(weights_path):
            raise FileNotFoundError(
                f"Inception weights not found at {weights_path}: download "
                "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                "weights-inception-2015-12-05-6726825d.pth on a machine with internet and copy it there "
                "(or set the fid extractor to random-init for plumbing runs)"
            )
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        self.name = "inception-v3-compat"
        self.model = FeatureExtractorInceptionV3(self.name, ["2048"], feature_extractor_weights_path=weights_path)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)[0]


def build_feature_extractor(kind: str, weights_path: str | None = None, seed: int = 0) -> nn.Module:
    """``kind`` "inception" (needs ``weights_path``) or "random-init" (plumbing only, flagged)."""
    if kind == "inception":
        if not weights_path:
            raise ValueError("feature extractor 'inception' needs a weights path (inception_weights=...)")
        return InceptionFeatures(weights_path)
    if kind == "random-init":
        return RandomInitFeatures(seed=seed)
    raise ValueError(f"unknown feature extractor {kind!r}: use 'inception' or 'random-init'")


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


class CheapFID:
    """In-training FID against cached reference statistics (label the result ``fid_cheap_<n>``).

    Every rank calls :meth:`update` with its own generated images in [-1, 1]; :meth:`compute`
    all-reduces the float64 sums (a collective: call it on every rank) and returns the same value
    everywhere.
    """

    def __init__(self, extractor: nn.Module, reference: FeatureStats) -> None:
        self.extractor = extractor
        self.reference = reference
        self.stats = FeatureStats(reference.dim)

    def update(self, images: torch.Tensor) -> None:
        accumulate_stats(self.extractor, to_uint8(images), self.stats)

    def compute(self) -> tuple[str, float]:
        self.stats.all_reduce()
        return cheap_fid_label(self.stats.count), fid_from_stats(self.stats, self.reference)


def reference_stats_cached(cache_dir: str, key: str, extractor: nn.Module, batches_uint8) -> FeatureStats:
    """Reference statistics from ``<cache_dir>/<key>-<extractor name>.npz``, computed from ``batches_uint8``
    (an iterable of uint8 [B, 3, H, W]; called only on a cache miss) and saved there otherwise.

    Put the reference's name, image count and resolution in ``key``; the extractor's name is appended here,
    so statistics of different extractors never mix. Rank 0 should fill the cache before others read it.
    """
    path = os.path.join(cache_dir, f"{key}-{getattr(extractor, 'name', type(extractor).__name__)}.npz")
    if os.path.isfile(path):
        return FeatureStats.load(path)
    stats = None
    for batch in batches_uint8:
        stats = accumulate_stats(extractor, batch, stats)
    if stats is None:
        raise ValueError(f"no reference images for {key}: the reference set is empty")
    stats.save(path)
    return stats
