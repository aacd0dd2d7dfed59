"""Peak FLOP/s for MFU come from the device (a constant 312 TFLOP/s overstated H100 MFU 3.2x)."""
from __future__ import annotations

import pytest

from ldm_train.runtime.devices import device_peak_tflops, peak_tflops_for_name


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100-PCIE-40GB", 312.0), ("NVIDIA H100 80GB HBM3", 989.0),
    ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0), ("NVIDIA H200", 989.0), ("h100-80g", 989.0),
    ("a100-80g", 312.0), ("NVIDIA L40S", 362.0),
])
def test_known_devices(name: str, peak: float) -> None:
    assert peak_tflops_for_name(name) == peak


def test_unknown_device_and_cpu_give_no_peak() -> None:
    assert peak_tflops_for_name("Some Future GPU") is None
    assert device_peak_tflops("cpu") is None
    assert device_peak_tflops("cpu", override=1.5) == 1.5
