"""In-training FID (``train.fid``): K samples from fixed seeds with the EMA weights against cached reference statistics.

The reference side is computed once per (reference files, image count, resolution, FID network weights) and
cached as ``<cache_dir>/<key>.npz`` with the captions beside it (``<key>.json``), so every point of a sweep
and every resumed run reuses it. Both sides use the standard FID Inception (``ldm_train.metrics.inception``)
and ``FeatureStats`` (float64 sums, all-reduced once): the work of both is split across ranks, rank 0 takes
the one Frechet step. Sample i uses prompt ``captions[i % len(captions)]`` and seed ``fid.seed + i`` on any
world size, so a measurement depends on the weights only.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any

import torch

from ldm_train.trainer.config import FIDConfig


def fid_key(cfg: FIDConfig) -> str:
    """The name a measurement is logged under: ``fid<K>`` (a K-sample FID)."""
    return f"fid{int(cfg.num_samples)}"


class InTrainingFID:
    def __init__(self, cfg: FIDConfig, grid: Any, resolution: int, runs_root: str, rank: int, world_size: int,
                 device: torch.device) -> None:
        if not cfg.reference:
            raise ValueError("train.fid.every_samples is set but train.fid.reference is not: point it at held-out "
                             "images (a folder or img2dataset tars, e.g. 'data/raw/heldout/{000000..000001}.tar'), "
                             "or set train.fid.every_samples=0")
        if cfg.num_samples < 2:
            raise ValueError(f"train.fid.num_samples={cfg.num_samples}: a covariance needs at least 2 samples")
        self.cfg, self.grid, self.resolution = cfg, grid, int(resolution)
        self.rank, self.world_size, self.device = rank, world_size, device
        self.cache_dir = cfg.cache_dir or os.path.join(runs_root, "_fid_reference")
        self.key = fid_key(cfg)
        self._net: torch.nn.Module | None = None
        self.reference = None
        self.captions: list[str] = []

    # ---- the network and the reference ------------------------------------------------------------------
    def _network(self) -> torch.nn.Module:
        if self._net is None:
            from ldm_train.metrics.inception import FIDInception

            self._net = FIDInception(self.cfg.weights).to(self.device)
        return self._net

    def _cache_key(self) -> str:
        from ldm_train.data.readers import fingerprint
        from ldm_train.metrics.inception import weights_sha256

        net = self._network()
        parts = [str(self.cfg.reference), str(self.cfg.reference_images), str(self.resolution),
                 fingerprint(str(self.cfg.reference)), weights_sha256(net.weights_path)]
        return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:20]

    def prepare(self) -> None:
        """Load the cached reference statistics, or compute them (split across ranks) and cache them."""
        from ldm_train.metrics.fid import FeatureStats
        from ldm_train.runtime.distributed import barrier

        key = self._cache_key()
        stats_path = os.path.join(self.cache_dir, f"{key}.npz")
        captions_path = os.path.join(self.cache_dir, f"{key}.json")
        if os.path.isfile(stats_path) and os.path.isfile(captions_path):
            self.reference = FeatureStats.load(stats_path)
            with open(captions_path) as f:
                self.captions = json.load(f)["captions"]
            if self.rank == 0:
                print(f"[train] in-training FID: reusing reference statistics {stats_path} "
                      f"({self.reference.count} images of {self.cfg.reference})", flush=True)
            return
        t0 = time.perf_counter()
        stats, captions = self._reference_stats()
        if self.rank == 0:
            os.makedirs(self.cache_dir, exist_ok=True)
            tmp = f"{captions_path}.tmp{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump({"reference": self.cfg.reference, "count": stats.count, "resolution": self.resolution,
                           "captions": captions}, f)
            os.replace(tmp, captions_path)
            stats.save(stats_path)  # atomic; written after the captions, so its presence means both exist
            print(f"[train] in-training FID: reference statistics of {stats.count} images of {self.cfg.reference} "
                  f"in {time.perf_counter() - t0:.0f} s -> {stats_path}", flush=True)
        barrier()
        self.reference, self.captions = stats, captions

    def _reference_stats(self) -> tuple[Any, list[str]]:
        from ldm_train.data.readers import image_dataset
        from ldm_train.metrics.fid import FeatureStats, to_uint8

        limit = int(self.cfg.reference_images)
        stats = FeatureStats(2048)
        captions: list[str] = []
        mine: list[torch.Tensor] = []
        for i, rec in enumerate(image_dataset(self.cfg.reference, self.resolution)):
            if limit and i >= limit:
                break
            captions.append(rec["caption"] or "")
            if i % self.world_size == self.rank:  # every rank reads the captions, each embeds its share
                mine.append(rec["image"])
            if len(mine) == self.cfg.batch_size:
                stats.update(self._network()(to_uint8(torch.stack(mine)).to(self.device)))
                mine = []
        if mine:
            stats.update(self._network()(to_uint8(torch.stack(mine)).to(self.device)))
        if len(captions) < 2:
            raise ValueError(f"train.fid.reference={self.cfg.reference} holds {len(captions)} readable images: "
                             "the in-training FID needs a held-out set of at least 2 (a few hundred for a stable number)")
        return stats.all_reduce(), captions

    # ---- one measurement --------------------------------------------------------------------------------
    @torch.no_grad()
    def measure(self, state_dict: dict[str, torch.Tensor]) -> dict[str, float]:
        """FID of K samples of ``state_dict`` (the full weights, on every rank); the numbers on rank 0, {} elsewhere."""
        from ldm_train.metrics.fid import FeatureStats, fid_from_stats, to_uint8
        from ldm_train.sampling import SamplerSettings

        if self.reference is None:
            self.prepare()
        t0 = time.perf_counter()
        c = self.cfg
        self.grid.load(state_dict)
        settings = SamplerSettings("ddim", int(c.steps), float(c.eta), float(c.guidance_scale), int(c.seed),
                                   batch_size=int(c.batch_size))
        stats = FeatureStats(2048)
        mine = list(range(self.rank, int(c.num_samples), self.world_size))
        for start in range(0, len(mine), int(c.batch_size)):
            idx = mine[start:start + int(c.batch_size)]
            prompts = [self.captions[i % len(self.captions)] for i in idx]
            images = self.grid.images(prompts, [int(c.seed) + i for i in idx], settings)
            stats.update(self._network()(to_uint8(images).to(self.device)))
        stats.all_reduce()
        if self.rank != 0:
            return {}
        return {self.key: fid_from_stats(stats, self.reference), "fid_seconds": time.perf_counter() - t0}
