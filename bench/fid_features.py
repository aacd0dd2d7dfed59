"""Benchmark of the FID Inception feature pass on CPU (prints JSON): ``python bench/fid_features.py [--batch 32]
[--threads 2] [--rounds 5] [--input fmnist|random|TAR] [--size 32] [--compile]``.

Three paths over the same images, timed batch by batch in alternation (the order rotates every round), so all see
the same machine load; medians over the rounds:

- ``torchscript``: the wheel's TorchScript graph as shipped (contiguous NCHW), after torch-fidelity's TF1 resize;
  the reference the features of the other two are compared with (max abs difference).
- ``one_batch``: ``FIDInception(cpu_workers=1)``, the eager copy (batch norm folded, channels_last) running the
  whole batch with ``--threads`` intra-op threads (``eval.fid``'s path before the workers).
- ``workers``: ``FIDInception()``, the default: the batch split across ``--threads`` single-threaded workers.

Per path: images/s (wall), the same per core (over ``--threads``), CPU seconds per image (this process's CPU
time, spin-waiting included) and GFLOPS per core against the machine's limit: ``gflop_per_image`` is counted by
``torch.utils.flop_counter`` on one image (convolutions and matmuls), ``sgemm_gflops_per_core`` is the rate of a
1024 x 1024 fp32 matmul on one thread (best of 3, once per round between the paths, median over the rounds: this
virtual machine's clock varies), and ``ceiling_images_per_s_per_core`` their quotient: the rate if every
convolution ran as fast as a large matmul. ``load_avg`` is the 1-minute load before and after: the machine may be shared.
Input: the first ``--batch`` Fashion-MNIST test images (28x28, grey as RGB), random uint8 images of ``--size``, or
the PNG/JPEG images of a tar shard (RGB, own size).
"""
from __future__ import annotations

import argparse
import io
import json
import os
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


def input_images(source: str, count: int, size: int) -> torch.Tensor:
    if source == "fmnist":
        from data_prep.fashion_mnist import DEFAULT_ROOT, read_idx

        grey = torch.from_numpy(read_idx(f"{DEFAULT_ROOT}/t10k-images-idx3-ubyte.gz")[:count].copy())
        return grey[:, None].expand(-1, 3, -1, -1).contiguous()
    if source == "random":
        gen = torch.Generator().manual_seed(0)
        return torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=gen)
    return tar_images(source, count)


def torchscript_path(reference: torch.jit.ScriptModule, images: torch.Tensor) -> torch.Tensor:
    """The reference: the TorchScript graph on torch-fidelity's resize of the batch, scaled as TF FID does."""
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    x = images.float()
    if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
        x = interpolate_bilinear_2d_like_tensorflow1x(x, size=(INPUT_SIZE, INPUT_SIZE), align_corners=False)
    with torch.no_grad():
        return reference((x - 128) / 128)


def gflop_per_image(images: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        FIDInception(cpu_workers=1)(images[:1])
    return counter.get_total_flops() / 1e9


def sgemm_gflops_per_core(threads: int, rounds: int = 3) -> float:
    """Best rate of a 1024^3 fp32 matmul on one thread (the intra-op threads restored after)."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    torch.set_num_threads(1)
    best = float("inf")
    for _ in range(rounds + 1):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    torch.set_num_threads(threads)
    return 2 * 1024**3 / best / 1e9


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
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads, and workers of the default path")
    ap.add_argument("--rounds", type=int, default=5, help="timed batches per path, after one warm-up batch each")
    ap.add_argument("--input", default="fmnist", help="fmnist, random (of --size) or a tar shard of PNG/JPEG images")
    ap.add_argument("--size", type=int, default=32, help="side of the random images")
    ap.add_argument("--compile", action="store_true", help="one_batch through torch.compile (warm-up reported)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    images = input_images(args.input, args.batch, args.size)
    reference = load_reference()
    paths = {"torchscript": lambda x: torchscript_path(reference, x),
             "one_batch": FIDInception(cpu_workers=1, compile=args.compile),
             "workers": FIDInception(cpu_workers=args.threads)}
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    first = {name: run(images) for name, run in paths.items()}  # warm-up (and the compile, if any)
    warmup_s = time.perf_counter() - t0
    wall: dict[str, list[float]] = {name: [] for name in paths}
    cpu: dict[str, list[float]] = {name: [] for name in paths}
    names = list(paths)
    sgemm_rates = []
    for r in range(args.rounds):
        sgemm_rates.append(sgemm_gflops_per_core(args.threads))
        for name in names[r % len(names):] + names[: r % len(names)]:
            t0, c0 = time.perf_counter(), time.process_time()
            paths[name](images)
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    want = first["torchscript"]
    gflop, sgemm = gflop_per_image(images), float(np.median(sgemm_rates))
    out: dict = {"input": args.input, "input_shape": list(images.shape), "batch": args.batch, "threads": args.threads,
                 "cpus": os.cpu_count(), "rounds": args.rounds, "compile": args.compile,
                 "load_avg": [round(load_before, 2), round(os.getloadavg()[0], 2)],
                 "gflop_per_image": round(gflop, 3), "sgemm_gflops_per_core": round(sgemm, 1),
                 "sgemm_gflops_per_round": [round(g, 1) for g in sgemm_rates],
                 "ceiling_images_per_s_per_core": round(sgemm / gflop, 3)}
    for name in paths:
        rate = args.batch / float(np.median(wall[name]))
        out[name] = {"images_per_s": round(rate, 3), "images_per_s_per_core": round(rate / args.threads, 3),
                     "cpu_s_per_image": round(float(np.median(cpu[name])) / args.batch, 4),
                     "gflops_per_core": round(rate / args.threads * gflop, 1),
                     "fraction_of_sgemm": round(rate / args.threads * gflop / sgemm, 3),
                     "max_abs_feature_diff": (first[name] - want).abs().max().item()}
    out["speedup_workers_over_one_batch"] = round(float(np.median(wall["one_batch"]) / np.median(wall["workers"])), 2)
    out["speedup_workers_over_torchscript"] = round(float(np.median(wall["torchscript"]) / np.median(wall["workers"])),
                                                    2)
    out["speedup_per_round_over_one_batch"] = [round(o / n, 2) for o, n in zip(wall["one_batch"], wall["workers"],
                                                                                strict=True)]
    out.update(feature_scale=want.abs().max().item(), warmup_s_all=round(warmup_s, 1), torch=torch.__version__,
               commit=commit())
    print(json.dumps(out))


if __name__ == "__main__":
    main()
