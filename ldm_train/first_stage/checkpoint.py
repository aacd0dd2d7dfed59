"""Resumable first-stage checkpoints: ``<run>/checkpoints/step_NNNNNNN/``.

Rank 0 writes the shared state (``state.pt``: models, optimizers, step, config) and, when asked, the
first-stage weights; every rank writes its RNG streams (``rng_rank<R>.pt``). The directory is written
under a temporary name and renamed: a checkpoint appears whole or not at all.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ldm_train.checkpoints.safe_load import load_weights_only
from ldm_train.runtime.distributed import barrier, rng_state, set_rng_state

CKPT_PREFIX = "step_"


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint under ``ckpt_dir`` (None when there is none)."""
    if not ckpt_dir.is_dir():
        return None
    done = sorted(p for p in ckpt_dir.iterdir() if p.name.startswith(CKPT_PREFIX) and (p / "state.pt").is_file())
    return done[-1] if done else None


def save_checkpoint(ckpt_dir: Path, step: int, state: dict[str, Any], rank: int, keep: int,
                    export_fn: Callable[[Path], Any] | None = None) -> Path:
    """All ranks call: rank 0 writes the shared state, every rank its RNG; then one atomic rename."""
    final = ckpt_dir / f"{CKPT_PREFIX}{step:07d}"
    tmp = ckpt_dir / f".{final.name}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # leftover of a run killed mid-save
        tmp.mkdir(parents=True)
    barrier()
    torch.save(rng_state(), tmp / f"rng_rank{rank:05d}.pt")
    if rank == 0:
        torch.save(state, tmp / "state.pt")
        if export_fn is not None:
            export_fn(tmp / "first_stage.safetensors")
    barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)  # the checkpoint appears whole or not at all
        old = sorted(p for p in ckpt_dir.iterdir() if p.name.startswith(CKPT_PREFIX))
        for p in old[:-keep] if keep > 0 else []:
            shutil.rmtree(p, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(path: Path, rank: int, world_size: int) -> dict[str, Any]:
    """The shared state; restores this rank's RNG when the world size matches, else flags ``reseed``."""
    state = load_weights_only(path / "state.pt", "first-stage checkpoint")  # a pickle with code: refused, named
    rng_file = path / f"rng_rank{rank:05d}.pt"
    if state.get("world_size") == world_size and rng_file.is_file():
        set_rng_state(load_weights_only(rng_file, "first-stage checkpoint"))
    else:
        print(f"[train_autoencoder] resuming {path} at world size {world_size} (saved at "
              f"{state.get('world_size')}): RNG re-seeded and the data stream restarts at a new seed", flush=True)
        state["reseed"] = True
    return state
