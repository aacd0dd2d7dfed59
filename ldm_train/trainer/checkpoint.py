"""Checkpoints of a run: DeepSpeed state + trainer state + exported weights, and resuming from them.

Layout (``<run_dir>/checkpoints/``)::

    latest                          text: the tag of the newest complete checkpoint (DeepSpeed's format)
    step_0000120/                   one tag per checkpoint, the last ``checkpoint.keep_last`` are kept
        mp_rank_00_model_states.pt  DeepSpeed: module + client state (step, samples, guard, W&B id)
        *_optim_states.pt           DeepSpeed: ZeRO-partitioned fp32 master weights + AdamW moments
        trainer_rank00000.pt        per global rank: data-stream position, RNG states
        meta.json                   step, samples seen, world size, ZeRO stage, precision
        model.safetensors           raw weights, CompVis keys: model.diffusion_model.*, cond_stage_model.*
        model_ema.safetensors       EMA weights (fp32), the same CompVis keys; also how the EMA is resumed
        config.yaml                 the resolved config of the run
        tokenizer/                  the tokenizer the text encoder was trained with
    step_0000120_universal/         made on demand when resuming at another world size

The exported trio (safetensors + config.yaml + tokenizer/) loads without DeepSpeed: see
``ldm_train.checkpoints.export.load_export``. ``latest`` moves only after every rank finished writing
(barrier, then rank 0 replaces it atomically), so a crash mid-save leaves the previous one usable.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from ldm_train.runtime.distributed import barrier, get_rank

CHECKPOINTS = "checkpoints"
LATEST = "latest"
META = "meta.json"


def tag_for(step: int) -> str:
    return f"step_{step:07d}"


def rank_state_name(rank: int) -> str:
    return f"trainer_rank{rank:05d}.pt"


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)  # rename is atomic on POSIX filesystems: readers see old or new, never half


def latest_tag(ckpt_dir: Path) -> str | None:
    """The tag ``latest`` names, if it and its meta.json exist."""
    path = ckpt_dir / LATEST
    if not path.is_file():
        return None
    tag = path.read_text().strip()
    if not (ckpt_dir / tag / META).is_file():
        raise FileNotFoundError(
            f"{path} names {tag!r} but {ckpt_dir / tag / META} is missing: the checkpoint was deleted or is "
            f"incomplete; fix `latest` to name an older step_* folder or start a new run (run_name=...)"
        )
    return tag


def read_meta(ckpt_dir: Path, tag: str) -> dict[str, Any]:
    return json.loads((ckpt_dir / tag / META).read_text())


def save_checkpoint(
    engine: Any,
    ckpt_dir: Path,
    step: int,
    client_state: dict[str, Any],
    rank_state: dict[str, Any],
    meta: dict[str, Any],
    write_exports: Any = None,
    keep_last: int = 3,
) -> str:
    """Write one checkpoint from every rank; rank 0 moves ``latest`` after all ranks are done.

    ``write_exports(tag_dir)`` (collective: may gather ZeRO-3 shards) writes the safetensors, config and
    tokenizer; it runs on every rank, and only rank 0 writes files.
    """
    from deepspeed.checkpoint.constants import (
        UNIVERSAL_CHECKPOINT_INFO,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    tag = tag_for(step)
    tag_dir = ckpt_dir / tag
    # declares the checkpoint convertible by ds_to_universal (plain data parallel: no TP/PP layout to describe)
    client_state = {**client_state,
                    UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    torch.save(rank_state, tag_dir / rank_state_name(get_rank()))
    if write_exports is not None:
        write_exports(tag_dir)
    if get_rank() == 0:
        atomic_write_text(tag_dir / META, json.dumps(meta, indent=1) + "\n")
    barrier()  # every rank's files are on disk before `latest` may name them
    if get_rank() == 0:
        atomic_write_text(ckpt_dir / LATEST, tag)
        prune(ckpt_dir, keep_last)
    barrier()
    return tag


def prune(ckpt_dir: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints (never the one ``latest`` names)."""
    if keep_last <= 0:
        return
    keep = latest_tag(ckpt_dir)
    tags = sorted(p.name for p in ckpt_dir.glob("step_*") if p.is_dir() and not p.name.endswith("_universal"))
    for old in tags[:-keep_last]:
        if old != keep:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)
            shutil.rmtree(ckpt_dir / f"{old}_universal", ignore_errors=True)


def ensure_universal(ckpt_dir: Path, tag: str) -> str:
    """Convert ``tag`` to a DeepSpeed universal checkpoint (rank 0, once) and return the new tag.

    Needed when the world size changed: ZeRO partitions are per rank; the universal format stores each
    parameter (and its AdamW moments) whole, so any world size can re-partition it.
    """
    out_tag = f"{tag}_universal"
    out = ckpt_dir / out_tag
    if get_rank() == 0 and not (out / ".complete").is_file():
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
               "--input_folder", str(ckpt_dir / tag), "--output_folder", str(out), "--num_extract_workers", "1",
               "--num_merge_workers", "1"]
        print(f"[checkpoint] world size changed: converting {tag} to a universal checkpoint", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(
                f"ds_to_universal failed on {ckpt_dir / tag} (exit {proc.returncode}):\n{proc.stderr[-3000:]}\n"
                f"resume at the checkpoint's world size ({read_meta(ckpt_dir, tag).get('world_size')}) instead"
            )
        (out / ".complete").write_text("ok\n")
    barrier()
    return out_tag


def load_rank_state(ckpt_dir: Path, tag: str, rank: int, same_world: bool) -> dict[str, Any] | None:
    """This rank's trainer state; at another world size only rank 0's file is meaningful for all."""
    path = ckpt_dir / tag / rank_state_name(rank if same_world else 0)
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def load_checkpoint(engine: Any, ckpt_dir: Path, tag: str, universal: bool) -> dict[str, Any]:
    """Load DeepSpeed state (module, optimizer) and return the client state."""
    load_tag = ensure_universal(ckpt_dir, tag) if universal else tag
    path, client_state = engine.load_checkpoint(
        str(ckpt_dir), tag=load_tag, load_optimizer_states=True, load_lr_scheduler_states=False
    )
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load {ckpt_dir / load_tag}: see its log above")
    if universal or client_state is None:
        # the universal folder keeps no client state: read it from the original tag's module file
        client_state = _client_state_from_model_file(ckpt_dir / tag)
    return client_state


def _client_state_from_model_file(tag_dir: Path) -> dict[str, Any]:
    files = sorted(tag_dir.glob("*model_states.pt"))
    if not files:
        raise FileNotFoundError(f"no *model_states.pt in {tag_dir}: not a DeepSpeed checkpoint")
    state = torch.load(files[0], map_location="cpu", weights_only=False)  # DeepSpeed's own file
    return {k: v for k, v in state.items() if k in ("trainer", "wandb_run_id")}
