"""The one reading of a ``precision`` setting (``fp32`` | ``bf16`` | ``fp16``): its torch dtype and its autocast.

Imports torch only when a dtype is asked for, so config checks can use ``check_precision`` without it.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def check_precision(precision: str, key: str = "precision") -> str:
    """``precision`` when it is one of ``PRECISIONS``; else a ValueError naming the setting ``key``."""
    if precision not in _DTYPE_NAMES:
        raise ValueError(f"{key}={precision!r}: use {', '.join(PRECISIONS[:-1])} or {PRECISIONS[-1]}")
    return precision


def precision_dtype(precision: str, key: str = "precision") -> torch.dtype:
    """fp32 -> torch.float32, bf16 -> torch.bfloat16, fp16 -> torch.float16 (others: a ValueError naming ``key``)."""
    import torch

    return getattr(torch, _DTYPE_NAMES[check_precision(precision, key)])


def autocast(device: torch.device, precision: str, key: str = "precision") -> contextlib.AbstractContextManager:
    """``torch.autocast`` to the dtype of ``precision`` on ``device``'s type; nothing for fp32."""
    import torch

    dtype = precision_dtype(precision, key)
    return contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)
