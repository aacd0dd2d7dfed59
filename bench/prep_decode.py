"""Decode + resize throughput of the encode job's input path, before and after DCT-domain JPEG decoding; one JSON.

    OMP_NUM_THREADS=1 python bench/prep_decode.py [--resolution 256] [--seconds 3]

Real photographs (scikit-image's skimage/data colour photos) are saved as JPEG (quality 90) at 512x384, 1024x768
and 2048x1536 (resized with PIL's Lanczos; the larger sizes are upsampled from photos of at most ~1000 px, so
they carry less fine detail than a camera image of that size). For each size it times, on one thread:
- ``pil``: full decode + PIL bicubic resize (reducing_gap 3) + centre crop, the path before this change;
- ``project``: ``ldm_train.data.image_decode.decode_for_side`` (PIL ``draft`` to >= 2x the target side when the image is
  at least 4x larger) + ``resize_center_crop`` (torch antialiased bicubic on uint8), the path the encode job uses;
and the PSNR of ``project``'s output against ``pil``'s (same crop).
"""
from __future__ import annotations

import argparse
import io
import json
import time

import numpy as np
import torch
from PIL import Image

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina")
SIZES = ((512, 384), (1024, 768), (2048, 1536))


def _photos() -> list[Image.Image]:
    from skimage import data

    return [Image.fromarray(getattr(data, name)()).convert("RGB") for name in PHOTOS]


def _jpeg(img: Image.Image, size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    img.resize(size, Image.LANCZOS).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def pil_path(data: bytes, resolution: int) -> np.ndarray:
    img = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = img.size
    s = resolution / min(w, h)
    nw, nh = max(resolution, round(w * s)), max(resolution, round(h * s))
    img = img.resize((nw, nh), resample=Image.BICUBIC, reducing_gap=3.0)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    return np.asarray(img.crop((left, top, left + resolution, top + resolution)))


def project_path(data: bytes, resolution: int) -> np.ndarray:
    from ldm_train.data.image_decode import decode_for_side
    from ldm_train.data.transforms import resize_center_crop

    img, _, _ = decode_for_side(data, resolution)
    return np.asarray(resize_center_crop(img, resolution))


def _rate(fn, blobs: list[bytes], resolution: int, seconds: float) -> float:
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn(blobs[n % len(blobs)], resolution)
        n += 1
    return n / (time.perf_counter() - t0)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--seconds", type=float, default=3.0)
    a = p.parse_args()
    torch.set_num_threads(1)
    photos = _photos()
    rows = []
    for size in SIZES:
        blobs = [_jpeg(img, size) for img in photos]
        for fn in (pil_path, project_path):  # warm-up
            fn(blobs[0], a.resolution)
        old = _rate(pil_path, blobs, a.resolution, a.seconds)
        new = _rate(project_path, blobs, a.resolution, a.seconds)
        psnrs = [_psnr(pil_path(b, a.resolution), project_path(b, a.resolution)) for b in blobs]
        rows.append({"size": f"{size[0]}x{size[1]}", "pil_images_per_s": round(old, 1),
                     "project_images_per_s": round(new, 1), "speedup": round(new / old, 2),
                     "psnr_db_min": round(min(psnrs), 1), "psnr_db_mean": round(float(np.mean(psnrs)), 1)})
    print(json.dumps({"bench": "prep_decode", "resolution": a.resolution, "threads": 1, "photos": list(PHOTOS),
                      "rows": rows}))


if __name__ == "__main__":
    main()
