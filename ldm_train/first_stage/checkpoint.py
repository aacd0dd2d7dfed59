"""Resumable first-stage checkpoints: ``<run>/checkpoints/step_NNNNNNN/`` in the checkpoint directory both
trainers share (``ldm_train.runtime.checkpoint_dir``: written whole or not at all, ``files.json``, ``latest``,
``train.checkpoint.keep_last``; a damaged checkpoint is moved aside, naming the file, and the previous one is used).

Rank 0 writes the shared state (``state.pt``: models, optimizers, step, config) and, when asked, the
first-stage weights (``first_stage.safetensors``); every rank writes its RNG streams (``rng_rank<R>.pt``).
Checkpoints written before the directory had ``latest`` (no ``meta.json`` / ``files.json``) still resume: the
newest with a ``state.pt``, which cannot be verified.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ldm_train.checkpoints.safe_load import load_weights_only
from ldm_train.runtime import checkpoint_dir
from ldm_train.runtime.distributed import broadcast_object, get_rank, get_world_size, rng_state, set_rng_state
from ldm_train.runtime.log import rank0_logger

STATE = "state.pt"
log = rank0_logger("train_autoencoder")


def rng_name(rank: int) -> str:
    return f"rng_rank{rank:05d}.pt"


def save_checkpoint(ckpt_dir: Path, step: int, state: dict[str, Any], keep: int,
                    export_fn: Callable[[Path], Any] | None = None) -> Path:
    """All ranks call: rank 0 writes ``state`` (and ``export_fn(path)`` the weights), every rank its RNG."""
    rank = get_rank()

    def write(folder: Path) -> None:
        torch.save(rng_state(), folder / rng_name(rank))
        if rank == 0:
            torch.save(state, folder / STATE)
            if export_fn is not None:
                export_fn(folder / "first_stage.safetensors")

    meta = {"step": step, "world_size": get_world_size()}
    return ckpt_dir / checkpoint_dir.save(ckpt_dir, step, write, meta, keep, "train.checkpoint.keep_last")


def resume_path(ckpt_dir: Path) -> Path | None:
    """The checkpoint to resume from (collective; None: a fresh start): the one ``latest`` names when it checks
    out, else the newest intact one (``checkpoint_dir.select_resume_tag``); without ``latest``, the newest
    checkpoint of the earlier layout."""
    tag = checkpoint_dir.select_resume_tag(ckpt_dir)
    if tag is not None:
        return ckpt_dir / tag
    earlier = None
    if get_rank() == 0 and ckpt_dir.is_dir():
        done = sorted(p.name for p in ckpt_dir.glob("step_*") if (p / STATE).is_file())
        earlier = done[-1] if done else None
    earlier = broadcast_object(earlier)
    if earlier is None:
        return None
    log(f"{ckpt_dir / earlier} has no {checkpoint_dir.MANIFEST} (written before checkpoints carried one): "
        "resuming from it unverified")
    return ckpt_dir / earlier


def load_checkpoint(path: Path, rank: int, world_size: int) -> dict[str, Any]:
    """The shared state; restores this rank's RNG when the world size matches, else flags ``reseed``."""
    state = load_weights_only(path / STATE, "first-stage checkpoint")  # a pickle with code: refused, named
    rng_file = path / rng_name(rank)
    if state.get("world_size") == world_size and rng_file.is_file():
        set_rng_state(load_weights_only(rng_file, "first-stage checkpoint"))
    else:
        log(f"resuming {path} at world size {world_size} (saved at {state.get('world_size')}): RNG re-seeded "
            "and the data stream restarts at a new seed")
        state["reseed"] = True
    return state
