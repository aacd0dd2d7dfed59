"""Latent-shard manifest and the per-shard stats parts it is merged from.

Layout of one encode output (``<output>/<first_stage.name>/``)::

    shard-000000.tar ...        one output shard per input shard j (shard-{j:06d}.tar)
    _stats/job.json             what was encoded (input, first stage, resolution): written by every task; a
                                job of other settings is refused while any part exists
    _stats/part-000000.json     per output shard: sample count, size and sha256 of the shard, skipped and
                                converted by reason, latent sums; written atomically AFTER its shard, so
                                "part exists" == "shard complete" (a re-run checks the size, verify=true the hash)
    manifest.json               the merge of all parts (``data_prep.finalize``), read by the trainer

Reading is ``ldm_train.data.manifest.read_manifest`` (re-exported here) so the trainer and data_prep agree.
Only json + fsspec + numpy: the trainer may import this module without the encode job's dependencies.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ldm_train.data import fsspec_io
from ldm_train.data.manifest import MANIFEST_NAME, ManifestError, read_manifest

__all__ = [
    "MANIFEST_NAME",
    "ManifestError",
    "SCHEMA_VERSION",
    "LatentStats",
    "read_manifest",
    "write_manifest",
    "shard_name",
    "part_url",
    "job_url",
    "read_json",
    "write_json",
    "build_manifest",
]

SCHEMA_VERSION = 1
STATS_DIR = "_stats"


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def part_url(output: str, index: int) -> str:
    return fsspec_io.join(output, STATS_DIR, f"part-{index:06d}.json")


def job_url(output: str) -> str:
    return fsspec_io.join(output, STATS_DIR, "job.json")


def read_json(url: str) -> dict[str, Any]:
    return json.loads(fsspec_io.read_bytes(url))


def write_json(url: str, obj: dict[str, Any]) -> None:
    """Atomic (temp + rename locally; a single PUT on object stores)."""
    fsspec_io.write_bytes(url, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def write_manifest(output: str, manifest: dict[str, Any]) -> str:
    """Write ``<output>/manifest.json`` atomically; returns its URL."""
    url = fsspec_io.join(output, MANIFEST_NAME)
    write_json(url, {k: v for k, v in manifest.items() if not k.startswith("_")})
    return url


@dataclass
class LatentStats:
    """Per-channel float64 sums of latent values, mergeable across shards and tasks."""

    channels: int
    count: int = 0  # values per channel
    sum: list[float] = field(default_factory=list)
    sumsq: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.sum = self.sum or [0.0] * self.channels
        self.sumsq = self.sumsq or [0.0] * self.channels

    def update(self, z: Any) -> None:
        """Add a batch ``z`` [B, C, h, w] (torch tensor or numpy array)."""
        arr = z.detach().double().cpu().numpy() if hasattr(z, "detach") else np.asarray(z, dtype=np.float64)
        if arr.shape[1] != self.channels:
            raise ValueError(f"latent stats expect {self.channels} channels, got shape {arr.shape}")
        self.count += arr.shape[0] * arr.shape[2] * arr.shape[3]
        self.sum = [a + b for a, b in zip(self.sum, arr.sum(axis=(0, 2, 3)).tolist(), strict=True)]
        self.sumsq = [a + b for a, b in zip(self.sumsq, (arr**2).sum(axis=(0, 2, 3)).tolist(), strict=True)]

    def merge(self, other: LatentStats) -> None:
        self.count += other.count
        self.sum = [a + b for a, b in zip(self.sum, other.sum, strict=True)]
        self.sumsq = [a + b for a, b in zip(self.sumsq, other.sumsq, strict=True)]

    def to_dict(self) -> dict[str, Any]:
        return {"channels": self.channels, "count": self.count, "sum": self.sum, "sumsq": self.sumsq}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LatentStats:
        return cls(int(d["channels"]), int(d["count"]), list(d["sum"]), list(d["sumsq"]))

    def summary(self) -> dict[str, Any]:
        """Per-channel mean/std, overall std over all values, and scale_factor = 1/overall std."""
        if self.count == 0:
            return {"mean": None, "std": None, "overall_mean": None, "overall_std": None, "scale_factor": None}
        mean = [s / self.count for s in self.sum]
        std = [math.sqrt(max(q / self.count - m * m, 0.0)) for q, m in zip(self.sumsq, mean, strict=True)]
        n = self.count * self.channels
        overall_mean = sum(self.sum) / n
        overall_std = math.sqrt(max(sum(self.sumsq) / n - overall_mean**2, 0.0))
        return {
            "mean": mean,
            "std": std,
            "overall_mean": overall_mean,
            "overall_std": overall_std,
            "scale_factor": 1.0 / overall_std if overall_std > 0 else None,
        }


def build_manifest(job: dict[str, Any], parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Merge the parts (one per input shard, any order) with the job description into the manifest."""
    parts = sorted(parts, key=lambda p: p["index"])
    stats = LatentStats(int(job["stats_channels"]))
    skipped: dict[str, int] = {}
    converted: dict[str, int] = {}
    errors: list[str] = []
    for p in parts:
        stats.merge(LatentStats.from_dict(p["stats"]))
        for reason, n in p["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + int(n)
        for kind, n in p.get("converted", {}).items():
            converted[kind] = converted.get(kind, 0) + int(n)
        errors += p.get("input_errors", [])
    summary = stats.summary()
    return {
        "schema_version": SCHEMA_VERSION,
        "first_stage": job["first_stage"],
        "resolution": job["resolution"],
        "latent_shape": job["latent_shape"],
        "lowres": job.get("lowres"),
        "inpaint": job.get("inpaint"),  # inpainting masks: mask.png + masked.npy per sample
        "stored": job["stored"],
        "dtype": "float16",
        "num_samples": sum(int(p["num_samples"]) for p in parts),
        "num_shards": len(parts),
        "shards": [{"name": p["name"], "num_samples": int(p["num_samples"]), "input": p["input"]} for p in parts],
        # KL: statistics of sampled z = mean + exp(logvar/2) * eps (what the diffusion model sees, as the paper's
        # 0.18215); VQ: of the pre-quantization latent
        "stats_of": job["stats_of"],
        "mean": summary["mean"],
        "std": summary["std"],
        "overall_std": summary["overall_std"],
        "scale_factor": summary["scale_factor"],
        "stats_count": stats.count,
        "skipped": dict(sorted(skipped.items())),
        # kept samples that needed a conversion: exif_transposed, scaled_16bit, caption_fallback, ...
        "converted": dict(sorted(converted.items())),
        "input_errors": errors,
        "input": job["input"],
        "encode": job.get("encode", {}),
    }
