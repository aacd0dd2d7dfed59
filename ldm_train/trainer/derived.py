"""Quantities derived once from the config and the world size, checked, and printed at start-up.

Progress is counted in samples seen; every interval in samples is turned into optimizer steps here, once,
so the loop only compares integers. The global batch is fixed by the config: a change of world size
changes the gradient accumulation, not the optimisation.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

from ldm_train.trainer.config import TrainConfig


@dataclass(frozen=True)
class Derived:
    world_size: int
    micro_batch: int
    accumulation: int
    global_batch: int  # samples per optimizer step
    lr: float
    warmup_steps: int
    total_steps: int
    log_every_steps: int
    checkpoint_every_steps: int  # 0: only at exit
    sample_every_steps: int  # 0: never
    fid_every_steps: int  # in-training FID; 0: never
    flops_per_sample: float | None  # forward + backward of everything trained (UNet + text encoder)
    flops_per_step: float | None
    lr_decay: str = "constant"  # after warm-up: "constant" (CompVis) or "cosine" (to lr * min_lr_ratio at the end)
    min_lr_ratio: float = 0.0
    time_budget_s: float = 0.0  # > 0: the cosine also ends where train.time_budget_s does, whichever end comes first

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def _steps(samples: int, global_batch: int) -> int:
    """Samples -> optimizer steps, rounded up so an interval never becomes 0 when samples > 0."""
    return 0 if samples <= 0 else max(1, math.ceil(samples / global_batch))


def derive(cfg: TrainConfig, world_size: int, flops_per_sample: float | None = None,
           grid: bool | None = None) -> Derived:
    """Compute accumulation, learning rate and intervals in steps; refuse batch sizes that do not divide.

    ``grid``: whether the sample grid has anything to draw (None: prompts are set, the text kind's rule; class and
    unconditional grids always have rows, see ``ldm_train.trainer.samples.grid_layout``).
    """
    if grid is None:
        grid = bool(cfg.sampling.prompts)
    per_step = cfg.micro_batch * world_size
    if cfg.micro_batch < 1 or cfg.global_batch < 1:
        raise ValueError(f"train.micro_batch={cfg.micro_batch} and train.global_batch={cfg.global_batch} must be >= 1")
    if cfg.global_batch % per_step:
        raise ValueError(
            f"train.global_batch={cfg.global_batch} is not divisible by micro_batch x world_size = "
            f"{cfg.micro_batch} x {world_size} = {per_step}: pick a global batch that is a multiple of {per_step} "
            f"or change train.micro_batch"
        )
    accumulation = cfg.global_batch // per_step
    # lr_scaling, lr_decay and precision are one of their choices: the schema refuses others at composition
    lr = cfg.optim.base_lr * cfg.global_batch if cfg.optim.lr_scaling == "compvis" else cfg.optim.base_lr
    return Derived(
        world_size=world_size,
        micro_batch=cfg.micro_batch,
        accumulation=accumulation,
        global_batch=cfg.global_batch,
        lr=lr,
        warmup_steps=_steps(cfg.optim.warmup_samples, cfg.global_batch),
        total_steps=_steps(cfg.total_samples, cfg.global_batch),
        log_every_steps=_steps(cfg.log_every_samples, cfg.global_batch) or 1,
        checkpoint_every_steps=_steps(cfg.checkpoint.every_samples, cfg.global_batch),
        sample_every_steps=_steps(cfg.sampling.every_samples, cfg.global_batch) if grid else 0,
        fid_every_steps=_steps(cfg.fid.every_samples, cfg.global_batch),
        flops_per_sample=flops_per_sample,
        lr_decay=cfg.optim.lr_decay,
        min_lr_ratio=cfg.optim.min_lr_ratio,
        time_budget_s=float(cfg.time_budget_s),
        flops_per_step=None if flops_per_sample is None else flops_per_sample * cfg.global_batch,
    )


def lr_at(step: int, d: Derived, train_wall_s: float = 0.0) -> float:
    """Linear warm-up over ``warmup_steps`` optimizer steps (the CompVis LambdaLR warm-up), then constant, or a
    cosine decay from ``lr`` to ``lr * min_lr_ratio`` (``train.optim.lr_decay=cosine``) that ends at ``total_steps``
    or, with ``train.time_budget_s`` set, when ``train_wall_s`` (training time so far, the same on every rank) reaches
    the budget, whichever comes first: a time-bounded run decays to its floor by its last step."""
    if d.warmup_steps and step < d.warmup_steps:
        return d.lr * (step + 1) / d.warmup_steps
    if d.lr_decay == "cosine" and d.total_steps > d.warmup_steps:
        progress = min(1.0, (step - d.warmup_steps) / (d.total_steps - d.warmup_steps))
        if d.time_budget_s > 0:
            progress = max(progress, min(1.0, train_wall_s / d.time_budget_s))
        floor = d.lr * d.min_lr_ratio
        return floor + (d.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return d.lr


def describe(d: Derived) -> str:
    """The start-up banner: one line per quantity, read by humans and grepped by tests."""
    flops = "n/a" if d.flops_per_step is None else f"{d.flops_per_step / 1e12:.3f} TFLOP"
    return "\n".join(
        [
            f"world size {d.world_size}, micro batch {d.micro_batch}, accumulation {d.accumulation}, "
            f"global batch {d.global_batch} samples/step",
            f"lr {d.lr:.3g} (warm-up {d.warmup_steps} steps, then {d.lr_decay}"
            + (f" to {d.lr * d.min_lr_ratio:.3g}" if d.lr_decay == "cosine" else "")
            + (f" by the end of {d.time_budget_s:g} s of training" if d.lr_decay == "cosine" and d.time_budget_s else "")
            + f"), total {d.total_steps} steps",
            f"log every {d.log_every_steps} steps, checkpoint every {d.checkpoint_every_steps or 'exit-only'} steps, "
            f"samples every {d.sample_every_steps or 'never'} steps, FID every {d.fid_every_steps or 'never'} steps",
            f"FLOPs per step {flops}",
        ]
    )
