"""The one image transform every stage shares (encode, autoencoder training, eval reference sets).

The paper's protocol: resize the shorter side to the target resolution, then centre-crop a square.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def resize_center_crop(image: Image.Image, resolution: int) -> Image.Image:
    """Resize so the shorter side equals ``resolution`` (bicubic, antialiased), then centre-crop a square.

    The resize is torch's antialiased bicubic on uint8 (``F.interpolate(..., antialias=True)``): the same filter
    family as PIL's BICUBIC (bench/prep_decode.py measures both).
    """
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}")
    image = image.convert("RGB")
    w, h = image.size
    scale = resolution / min(w, h)
    # round, but never below the target (a 1-px shortfall would break the crop)
    new_w, new_h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
    if (new_w, new_h) == (w, h):
        return image.crop((left, top, left + resolution, top + resolution))
    x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)[None]
    y = F.interpolate(x, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
    y = y[0, :, top:top + resolution, left:left + resolution]
    return Image.fromarray(y.permute(1, 2, 0).contiguous().numpy(), "RGB")


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 tensor [3, H, W] in [-1, 1] (the first stages' input range)."""
    arr = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def to_pil(x: torch.Tensor) -> Image.Image:
    """Float tensor [3, H, W] in [-1, 1] -> RGB PIL image (clamped)."""
    arr = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)
