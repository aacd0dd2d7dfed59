"""Checkpoints of a run: DeepSpeed state + trainer state + exported weights, and resuming from them.

Layout (``<run_dir>/checkpoints/``)::

    latest                          text: the tag of the newest complete checkpoint (DeepSpeed's format)
    step_0000120/                   one tag per checkpoint, the last ``checkpoint.keep_last`` are kept
        mp_rank_00_model_states.pt  DeepSpeed: module + client state (step, samples, guard, W&B id)
        *_optim_states.pt           DeepSpeed: ZeRO-partitioned fp32 master weights + AdamW moments
        trainer_rank00000.pt        per global rank: data-stream position, RNG states
        meta.json                   step, samples seen, world size, ZeRO stage, precision
        files.json                  every other file of the folder with its size and sha256 (written last)
        model.safetensors           raw weights, CompVis keys: model.diffusion_model.*, cond_stage_model.*
        model_ema.safetensors       EMA weights (fp32), the same CompVis keys; also how the EMA is resumed
        config.yaml                 the resolved config of the run
        tokenizer/                  the tokenizer the text encoder was trained with
    step_0000120_universal/         made on demand when resuming at another world size

The exported trio (safetensors + config.yaml + tokenizer/) loads without DeepSpeed: see
``ldm_train.checkpoints.export.load_export``. Writing a tag whole or not at all, ``files.json``, ``latest``,
``keep_last`` and falling back to the previous intact checkpoint on resume are the checkpoint directory's
(``ldm_train.runtime.checkpoint_dir``, which the first-stage trainer uses too). Every torch file is loaded with
``weights_only=True`` (DeepSpeed's loads too, inside ``ldm_train.checkpoints.safe_load.weights_only_loads`` with
the few DeepSpeed types its files hold): a file that needs more is refused, naming it.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from ldm_train.checkpoints.safe_load import deepspeed_safe_globals, load_weights_only, weights_only_loads
from ldm_train.runtime import checkpoint_dir
from ldm_train.runtime.checkpoint_dir import CHECKPOINTS, LATEST, read_meta, select_resume_tag
from ldm_train.runtime.distributed import barrier, get_rank
from ldm_train.runtime.log import rank0_logger

# what the trainer's loop reads from here, with the DeepSpeed parts below
__all__ = ["CHECKPOINTS", "LATEST", "load_checkpoint", "load_rank_state", "read_meta", "save_checkpoint",
           "select_resume_tag"]

DEEPSPEED_HINT = ("A DeepSpeed checkpoint written by this trainer holds only tensors and a few allow-listed DeepSpeed "
                  "types: the file was replaced or altered. Resume from a checkpoint you trust (point `latest` at "
                  "it) or start a new run (run_name=...)")
log = rank0_logger("checkpoint")


def rank_state_name(rank: int) -> str:
    return f"trainer_rank{rank:05d}.pt"


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
    """Write one checkpoint from every rank (``checkpoint_dir.save``); returns its tag.

    ``write_exports(tag_dir)`` (collective: may gather ZeRO-3 shards) writes the safetensors, config and
    tokenizer; it runs on every rank, and only rank 0 writes files.
    """
    from deepspeed.checkpoint.constants import (
        UNIVERSAL_CHECKPOINT_INFO,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    # declares the checkpoint convertible by ds_to_universal (plain data parallel: no TP/PP layout to describe)
    client_state = {**client_state,
                    UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}

    def write(folder: Path) -> None:
        engine.save_checkpoint(str(ckpt_dir), tag=folder.name, client_state=client_state, save_latest=False)
        torch.save(rank_state, folder / rank_state_name(get_rank()))
        if write_exports is not None:
            write_exports(folder)

    return checkpoint_dir.save(ckpt_dir, step, write, meta, keep_last, "train.checkpoint.keep_last")


def ensure_universal(ckpt_dir: Path, tag: str) -> str:
    """Convert ``tag`` to a DeepSpeed universal checkpoint (rank 0, once) and return the new tag.

    Needed when the world size changed: ZeRO partitions are per rank; the universal format stores each
    parameter (and its AdamW moments) whole, so any world size can re-partition it.
    """
    out_tag = f"{tag}_universal"
    out = ckpt_dir / out_tag
    if get_rank() == 0 and not (out / ".complete").is_file():
        shutil.rmtree(out, ignore_errors=True)
        # DeepSpeed's converter, its torch.load calls weights-only (see `_ds_to_universal` below)
        cmd = [sys.executable, "-m", "ldm_train.trainer.checkpoint", "ds_to_universal",
               "--input_folder", str(ckpt_dir / tag), "--output_folder", str(out), "--num_extract_workers", "1",
               "--num_merge_workers", "1"]
        log(f"world size changed: converting {tag} to a universal checkpoint")
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
    return load_weights_only(path, "trainer rank state")


def load_checkpoint(engine: Any, ckpt_dir: Path, tag: str, universal: bool) -> dict[str, Any]:
    """Load DeepSpeed state (module, optimizer) and return the client state."""
    load_tag = ensure_universal(ckpt_dir, tag) if universal else tag
    with weights_only_loads(deepspeed_safe_globals(), hint=DEEPSPEED_HINT):  # DeepSpeed's own loads included
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
    state = load_weights_only(files[0], "DeepSpeed model states", allow=deepspeed_safe_globals())
    return {k: v for k, v in state.items() if k in ("trainer", "wandb_run_id")}


def _ds_to_universal(argv: list[str]) -> None:
    """``deepspeed.checkpoint.ds_to_universal`` with every torch.load weights-only (it passes weights_only=False)."""
    from deepspeed.checkpoint import ds_to_universal

    sys.argv = ["ds_to_universal", *argv]
    args = ds_to_universal.parse_arguments()
    with weights_only_loads(deepspeed_safe_globals(), hint=DEEPSPEED_HINT):
        ds_to_universal.main(args)


if __name__ == "__main__":
    if sys.argv[1:2] != ["ds_to_universal"]:
        raise SystemExit("usage: python -m ldm_train.trainer.checkpoint ds_to_universal --input_folder ... "
                         "--output_folder ...")
    _ds_to_universal(sys.argv[2:])
