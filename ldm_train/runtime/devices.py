"""Peak dense bf16/fp16 tensor-core FLOP/s of the accelerators our users train on, for MFU.

MFU = achieved model FLOP/s / the device's peak. A constant in a preset overstates MFU on faster cards (312 TFLOP/s,
an A100's, is a third of an H100's), so the peak comes from the device present (``torch.cuda.get_device_name``) or a
named ``gpu=`` preset. Values are the vendors' dense (no sparsity) bf16 tensor-core peaks.
"""
from __future__ import annotations

import torch

# (substring of the device name, lower case) -> (preset name, dense bf16 TFLOP/s); first match wins, so the
# specific variants come before the generic names
PEAKS: tuple[tuple[str, str, float], ...] = (
    ("gb200", "gb200", 2500.0),
    ("b200", "b200", 2250.0),  # HGX / DGX B200
    ("h100 pcie", "h100-pcie", 756.0),
    ("h100 nvl", "h100-nvl", 835.0),
    ("h100", "h100-80g", 989.0),  # SXM5
    ("h200", "h200", 989.0),
    ("gh200", "gh200", 989.0),
    ("a100", "a100-80g", 312.0),  # SXM and PCIe, 40 and 80 GB
    ("l40s", "l40s", 362.0),
    ("a10", "a10", 125.0),
)
BY_PRESET = {preset: tflops for _, preset, tflops in PEAKS} | {"a100-40g": 312.0, "h100-sxm": 989.0}


def peak_tflops_for_name(name: str) -> float | None:
    """The peak of a device name (``torch.cuda.get_device_name``) or preset (``h100-80g``); None if unknown."""
    key = name.strip().lower()
    if key in BY_PRESET:
        return BY_PRESET[key]
    for pattern, _, tflops in PEAKS:
        if pattern in key:
            return tflops
    return None


def device_peak_tflops(device: torch.device | str | None = None, override: float | None = None) -> float | None:
    """The peak to report MFU against: ``override`` when given, else the CUDA device's from :data:`PEAKS`; None
    on CPU or an unknown GPU (MFU is then not reported rather than made up)."""
    if override is not None:
        return float(override)
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type != "cuda":
        return None
    if not torch.cuda.is_available():
        return None
    return peak_tflops_for_name(torch.cuda.get_device_name(dev))
