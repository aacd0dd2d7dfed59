"""Benchmark of the FID Inception feature pass on CPU (prints JSON): ``python bench/fid_features.py [--batch 32]
[--threads 2] [--rounds 3] [--size 32] [--tar data/fmnist/raw/t10k/000000.tar] [--compile]``.

Old path: the wheel's TorchScript graph as shipped (contiguous NCHW). New path: ``FIDInception`` (the same tensors
in an eager copy, batch norm folded, channels_last). Both get the same TF1 bilinear resize to 299 and scaling, and
are timed batch by batch in alternation, so both see the same machine load; the figure per core is images/s over
the thread count. Input: random uint8 images of ``--size``, or the PNG/JPEG images of a tar shard (RGB, own size).
"""
from __future__ import annotations

import argparse
import io
import json
import subprocess
import tarfile
import time

import numpy as np
import torch
from PIL import Image

from ldm_train.metrics.inception import INPUT_SIZE, FIDInception, load_reference


def tar_images(path: str, count: int) -> torch.Tensor:
    out = []
    with tarfile.open(path) as tar:
        for member in tar:
            if member.isfile() and member.name.lower().endswith((".png", ".jpg", ".jpeg")):
                with Image.open(io.BytesIO(tar.extractfile(member).read())) as im:
                    out.append(np.asarray(im.convert("RGB")))
                if len(out) == count:
                    break
    if len(out) < count:
        raise ValueError(f"{path} holds {len(out)} images, --batch asks for {count}")
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def old_path(reference: torch.jit.ScriptModule, images: torch.Tensor) -> torch.Tensor:
    """What ``FIDInception`` ran before: the TorchScript graph on the resized, scaled batch."""
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    x = interpolate_bilinear_2d_like_tensorflow1x(images.float(), size=(INPUT_SIZE, INPUT_SIZE), align_corners=False)
    return reference((x - 128) / 128)


def commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="timed batches per path, after one warm-up batch each")
    ap.add_argument("--size", type=int, default=32, help="side of the random images (ignored with --tar)")
    ap.add_argument("--tar", default=None, help="a tar shard of PNG/JPEG images to use instead of random ones")
    ap.add_argument("--compile", action="store_true", help="new path through torch.compile (warm-up reported)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.tar:
        images = tar_images(args.tar, args.batch)
    else:
        gen = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (args.batch, 3, args.size, args.size), dtype=torch.uint8, generator=gen)
    reference, new = load_reference(), FIDInception(compile=args.compile)
    t0 = time.perf_counter()
    with torch.no_grad():
        want, got = old_path(reference, images), new(images)  # warm-up (and the compile, if any)
        warmup_s = time.perf_counter() - t0
        old_s, new_s = [], []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            old_path(reference, images)
            old_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            new(images)
            new_s.append(time.perf_counter() - t0)
    old_rate, new_rate = args.batch / float(np.median(old_s)), args.batch / float(np.median(new_s))
    print(json.dumps({
        "batch": args.batch, "threads": args.threads, "rounds": args.rounds, "input": args.tar or "random uint8",
        "input_shape": list(images.shape), "compile": args.compile,
        "old_images_per_s_per_core": round(old_rate / args.threads, 3),
        "new_images_per_s_per_core": round(new_rate / args.threads, 3),
        "speedup": round(new_rate / old_rate, 2),
        "speedup_per_round": [round(o / n, 2) for o, n in zip(old_s, new_s, strict=True)],
        "warmup_s_both": round(warmup_s, 1),
        "max_abs_feature_diff": (got - want).abs().max().item(), "feature_scale": want.abs().max().item(),
        "torch": torch.__version__, "commit": commit(),
    }))


if __name__ == "__main__":
    main()
