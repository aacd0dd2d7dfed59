"""The one reading of a precision setting."""
from __future__ import annotations

import pytest
import torch

from ldm_train.runtime.precision import autocast, precision_dtype


def test_each_precision_has_its_dtype_and_autocast() -> None:
    assert [precision_dtype(p) for p in ("fp32", "bf16", "fp16")] == [torch.float32, torch.bfloat16, torch.float16]
    x = torch.ones(2, 2)
    with autocast(torch.device("cpu"), "bf16"):
        assert (x @ x).dtype == torch.bfloat16
    with autocast(torch.device("cpu"), "fp32"):
        assert (x @ x).dtype == torch.float32


def test_an_unknown_precision_names_the_setting() -> None:
    with pytest.raises(ValueError, match=r"train.precision='fp64': use fp32, bf16 or fp16"):
        precision_dtype("fp64", "train.precision")
