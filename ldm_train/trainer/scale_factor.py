"""The latent scale factor of a run: which rule gives it, and where the value came from (said in the log).

In order of precedence:

1. ``first_stage.scale_factor`` set: that number (the released VQ LDMs: 1.0; the txt2img model: 0.18215).
2. ``train.init_from`` a CompVis checkpoint with a ``scale_factor`` buffer: the checkpoint's value (the weights
   were trained on latents of that scale).
3. A resumed run: the value the run's first session recorded in its ``config.yaml``.
4. ``first_stage.scale_factor_from``: ``manifest`` (1/std of the latents in manifest.json, 1.0 without one) or
   ``first_batch`` (CompVis ``scale_by_std``: 1/std of every element of rank 0's first training batch, as
   LatentDiffusion sets it at global step 0; the other ranks take rank 0's, as DDP broadcasts that buffer).

A value from 2 or ``first_batch`` is written into ``first_stage.scale_factor`` (and ``data.scale_factor``), so the
run's config.yaml, its exports, a resume and eval all use that same number.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class ScaleFactor:
    value: float
    source: str  # for the start-up log
    record: bool  # write the value into the run's config (first_stage.scale_factor)


def recorded_scale_factor(run_dir: Path) -> float | None:
    """``first_stage.scale_factor`` of the run's config.yaml (written by an earlier session), if it has one."""
    from omegaconf import OmegaConf

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return None
    value = OmegaConf.select(OmegaConf.load(path), "first_stage.scale_factor", default=None)
    return None if value is None else float(value)


def first_batch_scale_factor(z: torch.Tensor) -> float:
    """1 / std of every element of ``z`` (unscaled latents), rank 0's value on every rank."""
    std = z.detach().float().flatten().std()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.broadcast(std, src=0)
    return float(1.0 / std)


def resolve_scale_factor(fixed: float | None, rule: str, manifest_value: float | None, init_value: float | None,
                         recorded: float | None, resuming: bool, measure: Callable[[], float]) -> ScaleFactor:
    """The scale factor by the precedence of the module docstring: ``fixed`` is ``data.scale_factor`` (which is
    ``first_stage.scale_factor`` unless set apart), ``rule`` ``first_stage.scale_factor_from`` (one of
    ``ldm_train.config.SCALE_FACTOR_RULES``: the schema refuses others), ``recorded``
    the resumed run's value; ``measure()`` reads the first batch (never on a resume)."""
    if fixed is not None:
        return ScaleFactor(float(fixed), "first_stage.scale_factor", False)
    if init_value is not None:
        return ScaleFactor(init_value, "the scale_factor buffer of train.init_from", True)
    if recorded is not None:
        return ScaleFactor(recorded, "recorded in the run's config.yaml", True)  # kept in the config: a resume pins it
    if rule == "first_batch":
        if resuming:
            raise ValueError("first_stage.scale_factor_from=first_batch, but the run being resumed recorded no "
                             "first_stage.scale_factor in its config.yaml: set first_stage.scale_factor to the value "
                             "it trained with (the 'scale factor' of its start-up log)")
        return ScaleFactor(measure(), "1/std of the first batch (first_stage.scale_factor_from=first_batch)", True)
    if manifest_value is None:
        return ScaleFactor(1.0, "no scale_factor in the manifest: 1.0", False)
    return ScaleFactor(float(manifest_value), "1/std in the latent manifest", False)
