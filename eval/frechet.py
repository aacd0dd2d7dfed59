"""Frechet distance over any features, in float64 (the eval-side face of ``ldm_train.metrics.fid``).

The streaming statistics and the Frechet step live in ``ldm_train.metrics.fid`` so the trainer's
cheap FID and this eval compute the same number; this module adds the whole-array helpers eval uses
(FID from two feature matrices, rFID from in-memory image batches).
"""
from __future__ import annotations

import numpy as np
import torch

from ldm_train.metrics.fid import FeatureStats, fid_from_stats, frechet_distance

__all__ = ["FeatureStats", "fid_from_stats", "frechet_distance", "fid_from_features"]


def fid_from_features(features1: torch.Tensor | np.ndarray, features2: torch.Tensor | np.ndarray,
                      chunk: int = 4096) -> float:
    """FID between two feature matrices [N, D] (streamed through :class:`FeatureStats` in chunks)."""
    stats = []
    for feats in (features1, features2):
        t = torch.as_tensor(np.asarray(feats) if not torch.is_tensor(feats) else feats)
        s = FeatureStats(t.shape[1])
        for part in t.split(chunk):
            s.update(part)
        stats.append(s)
    return fid_from_stats(stats[0], stats[1])
