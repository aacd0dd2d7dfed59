"""Compose the DeepSpeed config from conf/deepspeed/<zeroN>.yaml and the trainer config.

One source of truth: batch sizes, precision and clipping come only from ``train:`` (via ``Derived``);
the deepspeed group holds ZeRO knobs only. A batch key in the group is refused rather than silently
overridden, so nobody tunes a number that has no effect.
"""
from __future__ import annotations

import copy
from typing import Any

from ldm_train.trainer.config import TrainConfig
from ldm_train.trainer.derived import Derived

_OWNED_BY_TRAIN = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "bf16",
    "fp16",
    "optimizer",
    "scheduler",
)


def compose_ds_config(group: dict[str, Any], cfg: TrainConfig, d: Derived, load_universal: bool = False) -> dict:
    """The DeepSpeed JSON for ``deepspeed.initialize(config=...)``."""
    clash = sorted(k for k in _OWNED_BY_TRAIN if k in group)
    if clash:
        raise ValueError(
            f"conf/deepspeed sets {clash}: these come from `train:` (train.global_batch, train.micro_batch, "
            f"train.precision, train.optim.grad_clip); remove them from the deepspeed group"
        )
    ds = copy.deepcopy(dict(group))
    ds.update(
        train_batch_size=d.global_batch,
        train_micro_batch_size_per_gpu=d.micro_batch,
        gradient_accumulation_steps=d.accumulation,
        gradient_clipping=float(cfg.optim.grad_clip),
        # the loop prints its own progress line; DeepSpeed's would duplicate it every step
        steps_per_print=2**31 - 1,
        wall_clock_breakdown=False,
    )
    if cfg.precision == "bf16":
        # check_grad_overflow: a non-finite gradient skips the step (the numerical guard counts it)
        ds["bf16"] = {"enabled": True, "check_grad_overflow": True}
    elif cfg.precision == "fp16":
        # dynamic loss scaling; DeepSpeed skips overflowing steps and halves the scale
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                      "hysteresis": 2, "min_loss_scale": 1}
    if load_universal:
        ds.setdefault("checkpoint", {})["load_universal"] = True
    return ds
