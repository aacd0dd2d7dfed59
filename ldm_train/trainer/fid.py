"""In-training FID (``train.fid``): K samples from fixed seeds with the EMA weights against cached reference statistics.

The reference side is computed once per (reference files, image count, resolution, FID network weights) and
cached as ``<cache_dir>/<key>.npz`` with the captions beside it (``<key>.json``), so every point of a sweep
and every resumed run reuses it. Both sides use the standard FID Inception (``ldm_train.metrics.inception``)
and ``FeatureStats`` (float64 sums, all-reduced once): the work of both is split across ranks, rank 0 takes
the one Frechet step. Sample i uses prompt ``captions[i % len(captions)]`` and seed ``fid.seed + i`` on any
world size, so a measurement depends on the weights only. With ``cond.kind`` class sample i takes the label of
reference image i (its json's ``cond.label_key``; cached beside the captions), or class ``i % num_classes`` when
the reference carries no labels; with none it is a plain sample.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any

import torch

from ldm_train.config import CondConfig
from ldm_train.runtime.log import rank0_logger
from ldm_train.trainer.config import FIDConfig

log = rank0_logger("train")

PROGRESS_EVERY = 500  # reference images between progress lines: the first pass over them can take minutes


def fid_key(cfg: FIDConfig) -> str:
    """The name a measurement is logged under: ``fid<K>`` (a K-sample FID)."""
    return f"fid{int(cfg.num_samples)}"


class InTrainingFID:
    def __init__(self, cfg: FIDConfig, grid: Any, resolution: int, runs_root: str, rank: int, world_size: int,
                 device: torch.device, cond: CondConfig | None = None) -> None:
        if not cfg.reference:
            raise ValueError("train.fid.every_samples is set but train.fid.reference is not: point it at held-out "
                             "images (a folder or img2dataset tars, e.g. 'data/raw/heldout/{000000..000001}.tar'), "
                             "or set train.fid.every_samples=0")
        if cfg.num_samples < 2:
            raise ValueError(f"train.fid.num_samples={cfg.num_samples}: a covariance needs at least 2 samples")
        if cond is not None and cond.kind in ("concat", "inpaint", "semantic", "layout"):
            raise ValueError(f"train.fid does not measure cond.kind={cond.kind} yet: set train.fid.every_samples=0 and "
                             "score the checkpoints with eval.run (concat) or eval.kinds (inpaint, semantic, layout)")
        self.cfg, self.grid, self.resolution = cfg, grid, int(resolution)
        self.rank, self.world_size, self.device = rank, world_size, device
        self.cache_dir = cfg.cache_dir or os.path.join(runs_root, "_fid_reference")
        self.key = fid_key(cfg)
        self._net: torch.nn.Module | None = None
        self.reference = None
        self.captions: list[str] = []
        self.cond = cond or CondConfig()
        self.labels: list[int] = []  # the reference images' class labels (-1: none), for cond.kind=class
        self._said_cycling = False

    # ---- the network and the reference ------------------------------------------------------------------
    def _network(self) -> torch.nn.Module:
        if self._net is None:
            from ldm_train.metrics.inception import FIDInception

            self._net = FIDInception(self.cfg.weights).to(self.device)
        return self._net

    def _cache_key(self) -> str:
        from ldm_train.data.input_shards import fingerprint
        from ldm_train.metrics.inception import weights_sha256

        net = self._network()
        parts = [str(self.cfg.reference), str(self.cfg.reference_images), str(self.resolution),
                 fingerprint(str(self.cfg.reference)), weights_sha256(net.weights_path)]
        return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:20]

    def prepare(self) -> None:
        """Load the cached reference statistics, or compute them (split across ranks) and cache them."""
        from ldm_train.data.fsspec_io import write_text
        from ldm_train.metrics.fid import FeatureStats
        from ldm_train.runtime.distributed import barrier

        key = self._cache_key()
        stats_path = os.path.join(self.cache_dir, f"{key}.npz")
        captions_path = os.path.join(self.cache_dir, f"{key}.json")
        cached = None
        if os.path.isfile(stats_path) and os.path.isfile(captions_path):
            with open(captions_path) as f:
                cached = json.load(f)
            if self.cond.kind == "class" and cached.get("label_key") != self.cond.label_key:
                cached = None  # written before labels were cached, or under another key: recompute
        if cached is not None:
            self.reference = FeatureStats.load(stats_path)
            self.captions, self.labels = cached["captions"], list(cached.get("labels") or [])
            log(f"in-training FID: reusing reference statistics {stats_path} "
                f"({self.reference.count} images of {self.cfg.reference})")
            return
        t0 = time.perf_counter()
        stats, captions, labels = self._reference_stats()
        if self.rank == 0:
            write_text(captions_path, json.dumps({
                "reference": self.cfg.reference, "count": stats.count, "resolution": self.resolution,
                "captions": captions, "label_key": self.cond.label_key, "labels": labels}))
            stats.save(stats_path)  # atomic; written after the captions, so its presence means both exist
            log(f"in-training FID: reference statistics of {stats.count} images of {self.cfg.reference} "
                f"in {time.perf_counter() - t0:.0f} s -> {stats_path}")
        barrier()
        self.reference, self.captions, self.labels = stats, captions, labels

    def _reference_stats(self) -> tuple[Any, list[str], list[int]]:
        from ldm_train.data.readers import image_dataset
        from ldm_train.metrics.fid import FeatureStats, to_uint8

        limit = int(self.cfg.reference_images)
        stats = FeatureStats(2048)
        captions: list[str] = []
        labels: list[int] = []
        mine: list[torch.Tensor] = []
        t0, total = time.perf_counter(), f"/{limit}" if limit else ""
        log(f"in-training FID: computing reference statistics of {limit or 'all'} images of "
            f"{self.cfg.reference} (once: cached in {self.cache_dir})")
        for i, rec in enumerate(image_dataset(self.cfg.reference, self.resolution)):
            if limit and i >= limit:
                break
            if i and i % PROGRESS_EVERY == 0:
                seconds = time.perf_counter() - t0
                log(f"in-training FID reference: {i}{total} images ({seconds:.0f} s, {i / seconds:.1f} images/s)")
            captions.append(rec["caption"] or "")
            label = (rec.get("meta") or {}).get(self.cond.label_key)
            labels.append(int(label) if isinstance(label, int) and not isinstance(label, bool) else -1)
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
        return stats.all_reduce(), captions, labels

    def conditions(self, indices: list[int]) -> list[Any]:
        """Sample i's condition: reference caption i (text), reference label i (class), None (none)."""
        kind = self.cond.kind
        if kind == "none":
            return [None] * len(indices)
        if kind == "class":
            n = int(self.cond.num_classes)
            labelled = bool(self.labels) and all(0 <= lab < n for lab in self.labels)
            if not labelled and not self._said_cycling:
                self._said_cycling = True
                log(f"in-training FID: the reference images carry no '{self.cond.label_key}' in 0..{n - 1}: "
                    f"sample i takes class i % {n}")
            return [self.labels[i % len(self.labels)] if labelled else i % n for i in indices]
        return [self.captions[i % len(self.captions)] for i in indices]

    # ---- one measurement --------------------------------------------------------------------------------
    @torch.no_grad()
    def measure(self, state_dict: dict[str, torch.Tensor], final: bool = False) -> dict[str, float]:
        """FID of K samples of ``state_dict`` (the full weights, on every rank); the numbers on rank 0, {} elsewhere.

        ``final`` with ``final_num_samples`` > K draws that many instead and logs both ``fid<K>`` (its first K
        samples: the same seeds as every other measurement) and ``fid<final K>``.
        """
        from ldm_train.metrics.fid import FeatureStats, bootstrap_fid, fid_from_stats, to_uint8
        from ldm_train.sampling import SamplerSettings

        if self.reference is None:
            self.prepare()
        t0 = time.perf_counter()
        c = self.cfg
        k = int(c.num_samples)
        total = max(k, int(c.final_num_samples)) if final else k
        self.grid.load(state_dict)
        settings = SamplerSettings("ddim", int(c.steps), float(c.eta), float(c.guidance_scale), int(c.seed),
                                   batch_size=int(c.batch_size), spacing=str(c.timestep_spacing))
        kept: list[torch.Tensor] = []
        mine = list(range(self.rank, total, self.world_size))
        for start in range(0, len(mine), int(c.batch_size)):
            idx = mine[start:start + int(c.batch_size)]
            images = self.grid.images(self.conditions(idx), [int(c.seed) + i for i in idx], settings)
            kept.append(self._network()(to_uint8(images).to(self.device)).detach().double().cpu())
        features = self._gather(torch.cat(kept) if kept else torch.zeros(0, 2048, dtype=torch.float64), total)
        if self.rank != 0:
            return {}
        values: dict[str, float] = {}
        for n in sorted({k, total}):
            stats = FeatureStats(2048)
            stats.update(features[:n])
            key = f"fid{n}"
            values[key] = fid_from_stats(stats, self.reference)
            if c.bootstrap:
                fids = bootstrap_fid(features[:n].numpy(), self.reference, int(c.bootstrap), seed=int(c.seed))
                values[f"{key}_std"] = float(fids.std(ddof=1)) if len(fids) > 1 else 0.0
        values["fid_seconds"] = time.perf_counter() - t0
        return values

    def _gather(self, mine: torch.Tensor, total: int) -> torch.Tensor:
        """Every rank's features on rank 0 in sample order (rank r drew samples r, r + world, ...)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()) or self.world_size == 1:
            return mine
        gathered: list | None = [None] * self.world_size if self.rank == 0 else None
        torch.distributed.gather_object(mine, gathered, dst=0)
        if self.rank != 0:
            return mine
        out = torch.empty(total, mine.shape[1], dtype=mine.dtype)
        for r, part in enumerate(gathered):
            out[r::self.world_size] = part
        return out
