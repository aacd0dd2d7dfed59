"""Reconstruction quality of a first stage (the paper's Tab. 8 columns): PSNR, SSIM, LPIPS, rFID.

The work of ``python -m eval.reconstruction first_stage=kl_f8 first_stage.checkpoint=PATH images=HELD_OUT num_images=N``
(root config ``conf/eval_reconstruction.yaml``). Held-out images are read by ``ldm_train.data.readers`` and
resized / centre-cropped like the training data; each is encoded (KL: posterior mode; VQ: quantised) and
decoded. Per-image PSNR / SSIM are computed on the 8-bit images in [0, 1] (what a saved PNG holds) and
averaged; LPIPS (VGG) reads its backbone from a configured local file (a random backbone only when asked
explicitly, and then printed and flagged); rFID is torch-fidelity's FID between the originals and the
reconstructions, written as PNG folders under ``output_dir``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from typing import Any

import torch
import torch.nn.functional as F

from eval.config import ReconLPIPSConfig, ReconstructionConfig
from eval.sampling import sample_path, save_png
from ldm_train.app import config_dict


def _quantise(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1] on the 8-bit grid (as the PNGs the other metrics read)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round() / 255.0


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [0, 1] ([B, C, H, W]); identical images give +inf."""
    mse = ((x.double() - y.double()) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - (size - 1) / 2) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, data range 1),
    per channel on the valid region, averaged over channels and positions ([B] float64)."""
    c = x.shape[1]
    w = _gaussian_window(window, sigma).to(x.device)[None, None].repeat(c, 1, 1, 1)
    x, y = x.double(), y.double()

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, w, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1)


@torch.no_grad()
def reconstruct(first_stage: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Encode (KL: posterior mode; VQ: pre-quant latent, quantised by decode) and decode [-1, 1] images."""
    moments = first_stage.encode_moments(images)
    if getattr(first_stage.cfg, "kind", "kl") == "kl":
        z = moments.chunk(2, dim=1)[0]
        return first_stage.decode(z)
    return first_stage.decode(moments)


def reconstruction_metrics(first_stage: torch.nn.Module, batches: Any, output_dir: str, lpips_model: Any | None,
                           device: torch.device | str = "cpu", limit: int = 0) -> dict[str, Any]:
    """PSNR / SSIM / LPIPS means over ``batches`` (iterable of [-1, 1] image tensors); writes the originals
    and reconstructions as PNGs under ``output_dir/{originals,reconstructions}`` for rFID."""
    orig_dir, rec_dir = os.path.join(output_dir, "originals"), os.path.join(output_dir, "reconstructions")
    os.makedirs(orig_dir, exist_ok=True)
    os.makedirs(rec_dir, exist_ok=True)
    sums = {"psnr": 0.0, "ssim": 0.0, "lpips": 0.0}
    n, n_inf = 0, 0
    for images in batches:
        if limit and n >= limit:
            break
        images = images[: limit - n] if limit else images
        images = images.to(device)
        rec = reconstruct(first_stage, images)
        a, b = _quantise(images), _quantise(rec)
        p = psnr(a, b)
        n_inf += int(torch.isinf(p).sum())
        sums["psnr"] += float(p[torch.isfinite(p)].sum())
        sums["ssim"] += float(ssim(a, b).sum())
        if lpips_model is not None:
            sums["lpips"] += float(lpips_model(a * 2 - 1, b * 2 - 1).sum())
        for k in range(images.shape[0]):
            save_png(images[k], sample_path(orig_dir, n + k))
            save_png(rec[k], sample_path(rec_dir, n + k))
        n += images.shape[0]
    if n == 0:
        raise ValueError("no held-out images were read: check images=PATH")
    # PNGs of an earlier run into the same output_dir with more images would enter the rFID: drop them
    keep = {os.path.basename(sample_path(orig_dir, i)) for i in range(n)}
    for folder in (orig_dir, rec_dir):
        stale = [f for f in os.listdir(folder) if f.endswith(".png") and f not in keep]
        for f in stale:
            os.remove(os.path.join(folder, f))
        if stale:
            print(f"[eval.reconstruction] removed {len(stale)} PNGs of an earlier run from {folder}", flush=True)
    finite = n - n_inf
    return {
        "num_images": n,
        "psnr": sums["psnr"] / finite if finite else math.inf,
        "ssim": sums["ssim"] / n,
        "lpips": sums["lpips"] / n if lpips_model is not None else None,
        "originals": orig_dir,
        "reconstructions": rec_dir,
    }


def _lpips_model(cfg: ReconLPIPSConfig, device: torch.device) -> Any | None:
    from ldm_train.first_stage.losses import build_lpips

    if not cfg.enabled:
        return None
    if cfg.random_backbone:
        print("[eval.reconstruction] LPIPS with a RANDOM VGG16 backbone (lpips.random_backbone=true): "
              "plumbing only, not comparable with published LPIPS", flush=True)
    return build_lpips(cfg.backbone, random_backbone=cfg.random_backbone, setting="lpips.backbone").to(device)


def run(cfg: ReconstructionConfig) -> dict[str, Any]:
    """The whole reconstruction eval from the typed ``conf/eval_reconstruction.yaml``."""
    from eval.fidelity import check_weights, compute_fidelity
    from eval.report import write_metrics_json
    from ldm_train.checkpoints.first_stage import load_first_stage, read_first_stage_file
    from ldm_train.data.readers import image_dataset
    from ldm_train.runtime.distributed import device_for_rank

    fid_cfg = dataclasses.replace(cfg.metrics, isc=False, prc=False)  # rFID only
    check_weights(fid_cfg)  # before any work
    device = device_for_rank(cfg.device)
    lpips_model = _lpips_model(cfg.lpips, device)
    weights = read_first_stage_file(cfg.first_stage)  # the one read of the file: weights and sha256
    first_stage = load_first_stage(cfg.first_stage, map_location=device, weights=weights)
    resolution = int(cfg.resolution or first_stage.cfg.ddconfig.resolution)
    loader = torch.utils.data.DataLoader(image_dataset(cfg.images, resolution), batch_size=cfg.batch_size,
                                         num_workers=0)
    out = reconstruction_metrics(first_stage, (b["image"] for b in loader), cfg.output_dir, lpips_model, device,
                                 cfg.num_images)
    if fid_cfg.fid:
        if fid_cfg.cache_dir is None:
            # the originals are rewritten by every run: statistics cached by an earlier run (maybe of other or
            # more images, under a name that does not say which) must not be reused
            fid_cfg.cache_dir = os.path.join(cfg.output_dir, "fidelity_cache")
            shutil.rmtree(fid_cfg.cache_dir, ignore_errors=True)
        fid = compute_fidelity(fid_cfg, out["reconstructions"], out["originals"], None)
        out["rfid"] = fid["fid"]
        out["feature_extractor"] = fid["feature_extractor"]
    out["lpips_backbone"] = "random-init-plumbing-only" if cfg.lpips.random_backbone else cfg.lpips.backbone
    out["first_stage"] = {"name": first_stage.cfg.name, "checkpoint": first_stage.cfg.checkpoint,
                          "sha256": weights.sha256}
    out["images"] = str(cfg.images)
    out["resolution"] = resolution
    out["config"] = config_dict(cfg)
    write_metrics_json(os.path.join(cfg.output_dir, "metrics.json"), out)
    print(f"[eval.reconstruction] {json.dumps({k: out.get(k) for k in ('num_images', 'psnr', 'ssim', 'lpips', 'rfid')})}",
          flush=True)
    return out
