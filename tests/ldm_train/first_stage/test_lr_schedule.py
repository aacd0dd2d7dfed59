"""The first-stage trainer's learning rate: linear warm-up, then constant (CompVis) or cosine to a floor."""
from __future__ import annotations

import math
from types import SimpleNamespace

from ldm_train.first_stage.config import AEOptimConfig, AETrainConfig
from ldm_train.first_stage.trainer import Trainer


def _lr(step: int, **optim) -> float:
    fake = SimpleNamespace(optim=AEOptimConfig(**optim), tcfg=AETrainConfig(max_steps=1100), lr=1e-3)
    return Trainer.lr_at(fake, step)


def test_constant_is_the_compvis_default() -> None:
    assert [_lr(s) for s in (0, 500, 1099)] == [1e-3] * 3


def test_warmup_then_cosine_to_the_floor() -> None:
    kw = {"warmup_steps": 100, "lr_decay": "cosine", "min_lr_ratio": 0.1}
    assert math.isclose(_lr(0, **kw), 1e-5) and math.isclose(_lr(99, **kw), 1e-3)
    assert math.isclose(_lr(100, **kw), 1e-3)
    assert math.isclose(_lr(600, **kw), 1e-3 * (0.1 + 0.9 * 0.5))  # half-way: the mean of lr and floor
    assert math.isclose(_lr(1100, **kw), 1e-4)
    values = [_lr(s, **kw) for s in range(100, 1101)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))
