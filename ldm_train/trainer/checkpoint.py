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
``ldm_train.checkpoints.export.load_export``. A checkpoint is written as ``.partial-step_NNNNNNN/`` and renamed
once every rank finished and its manifest is written; ``latest`` moves after that (rank 0, atomically), so a
crash or a full disk mid-save leaves the previous one usable and no half checkpoint under a checkpoint's name.

Resuming (``select_resume_tag``) checks the checkpoint ``latest`` names against its ``files.json`` (every file
present, same size, same sha256; the ranks share the hashing; without ``files.json`` it cannot be verified and
counts as damaged); a damaged one is moved aside to
``damaged-<tag>`` with a message naming the damaged file, and the newest older checkpoint that checks out is
used instead. Every torch file is loaded with ``weights_only=True`` (DeepSpeed's loads too, inside
``ldm_train.checkpoints.safe_load.weights_only_loads`` with the few DeepSpeed types its files hold): a file that
needs more is refused, naming it.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from ldm_train.checkpoints.safe_load import deepspeed_safe_globals, load_weights_only, weights_only_loads
from ldm_train.runtime.distributed import all_gather_objects, barrier, broadcast_object, get_rank

CHECKPOINTS = "checkpoints"
LATEST = "latest"
META = "meta.json"
MANIFEST = "files.json"
DAMAGED_PREFIX = "damaged-"
PARTIAL_PREFIX = ".partial-"  # a checkpoint being written; renamed to its tag when complete
_TAG = re.compile(r"^step_\d+$")
DEEPSPEED_HINT = ("A DeepSpeed checkpoint written by this trainer holds only tensors and a few allow-listed DeepSpeed "
                  "types: the file was replaced or altered. Resume from a checkpoint you trust (point `latest` at "
                  "it) or start a new run (run_name=...)")


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
    # written under a temporary name and renamed once complete: a save cut short (a full disk, a kill) never
    # leaves a folder under a checkpoint's name
    partial = PARTIAL_PREFIX + tag
    partial_dir = ckpt_dir / partial
    if get_rank() == 0:
        shutil.rmtree(partial_dir, ignore_errors=True)  # left by a save that was cut short
    barrier()
    # declares the checkpoint convertible by ds_to_universal (plain data parallel: no TP/PP layout to describe)
    client_state = {**client_state,
                    UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=partial, client_state=client_state, save_latest=False)
        torch.save(rank_state, partial_dir / rank_state_name(get_rank()))
        if write_exports is not None:
            write_exports(partial_dir)
        if get_rank() == 0:
            atomic_write_text(partial_dir / META, json.dumps(meta, indent=1) + "\n")
        barrier()  # every rank's files are on disk before the manifest lists them and `latest` may name them
        files = build_manifest(partial_dir)  # collective: the ranks share the hashing
        if get_rank() == 0:
            atomic_write_text(partial_dir / MANIFEST, json.dumps({"version": 1, "files": files}, indent=1) + "\n")
            _publish(partial_dir, ckpt_dir / tag)
            atomic_write_text(ckpt_dir / LATEST, tag)
            prune(ckpt_dir, keep_last)
    except (OSError, RuntimeError) as err:
        raise _save_failed(err, partial_dir, ckpt_dir, tag) from err
    barrier()
    return tag


def _publish(partial_dir: Path, tag_dir: Path) -> None:
    """Rename the complete checkpoint to its name (an older folder of that name is replaced)."""
    if tag_dir.exists():
        old = tag_dir.with_name(f"{PARTIAL_PREFIX}old-{tag_dir.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(tag_dir, old)
        os.replace(partial_dir, tag_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(partial_dir, tag_dir)


def _save_failed(err: BaseException, partial_dir: Path, ckpt_dir: Path, tag: str) -> BaseException:
    """A full disk named as such, with the file being written (torch's writer names neither); others as they are."""
    text = str(err)
    full = (isinstance(err, OSError) and err.errno == errno.ENOSPC) or "No space left" in text \
        or ("file write failed" in text and shutil.disk_usage(ckpt_dir).free < 64 * 2**20)
    if not full:
        return err
    name = getattr(err, "filename", None)
    if not name:  # the file cut short: the newest one in the partial checkpoint
        files = [p for p in partial_dir.rglob("*") if p.is_file()] if partial_dir.is_dir() else []
        name = str(max(files, key=lambda p: p.stat().st_mtime)) if files else str(partial_dir)
    latest = (ckpt_dir / LATEST).read_text().strip() if (ckpt_dir / LATEST).is_file() else None
    return OSError(errno.ENOSPC, f"no space left on device writing {name} (checkpoint {tag} of {ckpt_dir}, "
                   f"{shutil.disk_usage(ckpt_dir).free // 2**20} MiB free): free space there or lower "
                   f"train.checkpoint.keep_last, then restart; the incomplete save stays under {partial_dir.name} and "
                   + (f"`latest` still names {latest}" if latest else "there is no earlier checkpoint"))


# ---- the file manifest: what resuming checks ------------------------------------------------------------
def _sha256(path: Path) -> str:
    from ldm_train.data.fsspec_io import sha256

    return sha256(str(path))


def _share(items: list[str]) -> list[str]:
    """This rank's share of ``items`` (round robin over the world)."""
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    return items[get_rank()::world]


def build_manifest(tag_dir: Path) -> dict[str, dict[str, Any]]:
    """``{relative path: {size, sha256}}`` of every file under ``tag_dir`` (collective: each rank hashes a share)."""
    names = None
    if get_rank() == 0:
        names = sorted(str(p.relative_to(tag_dir)) for p in tag_dir.rglob("*")
                       if p.is_file() and p.name != MANIFEST and ".tmp" not in p.name)
    names = broadcast_object(names)
    mine = {n: {"size": (tag_dir / n).stat().st_size, "sha256": _sha256(tag_dir / n)} for n in _share(names)}
    return {n: entry for part in all_gather_objects(mine) for n, entry in part.items()}


def verify_checkpoint(ckpt_dir: Path, tag: str) -> list[str]:
    """What is wrong with ``tag`` (empty: nothing) against its ``files.json`` (collective)."""
    tag_dir = ckpt_dir / tag
    problems: list[str] = []
    manifest = None
    if get_rank() == 0:
        if not tag_dir.is_dir():
            problems.append(f"{tag_dir} does not exist")
        elif not (tag_dir / META).is_file():
            problems.append(f"{tag_dir / META} is missing")
        elif (tag_dir / MANIFEST).is_file():
            try:
                manifest = json.loads((tag_dir / MANIFEST).read_text())["files"]
            except (ValueError, KeyError, TypeError) as err:
                problems.append(f"{tag_dir / MANIFEST} is unreadable ({err})")
        else:
            problems.append(f"{tag_dir / MANIFEST} is missing: the checkpoint cannot be verified")
    problems = broadcast_object(problems)
    manifest = broadcast_object(manifest)
    if problems or manifest is None:
        return problems
    mine = []
    for name in _share(sorted(manifest)):
        path, want = tag_dir / name, manifest[name]
        if not path.is_file():
            mine.append(f"{path} is missing")
        elif (size := path.stat().st_size) != want["size"]:
            mine.append(f"{path} has {size} bytes, {want['size']} when it was saved")
        elif _sha256(path) != want["sha256"]:
            mine.append(f"{path} has changed since it was saved (sha256 {want['sha256'][:12]}... expected)")
    return [p for part in all_gather_objects(mine) for p in part]


def _older_tags(ckpt_dir: Path, tag: str) -> list[str]:
    return sorted((p.name for p in ckpt_dir.iterdir() if p.is_dir() and _TAG.match(p.name) and p.name < tag),
                  reverse=True)


def _move_aside(ckpt_dir: Path, tag: str) -> Path:
    dest = ckpt_dir / f"{DAMAGED_PREFIX}{tag}"
    n = 1
    while dest.exists():
        dest, n = ckpt_dir / f"{DAMAGED_PREFIX}{tag}.{n}", n + 1
    os.replace(ckpt_dir / tag, dest)
    shutil.rmtree(ckpt_dir / f"{tag}_universal", ignore_errors=True)
    return dest


def select_resume_tag(ckpt_dir: Path) -> str | None:
    """The checkpoint to resume from (collective), or None for a fresh start (no ``latest``).

    The one ``latest`` names when it checks out against its manifest; else the newest older one that does,
    with a message naming what is damaged; the damaged ones are moved to ``damaged-<tag>`` and ``latest`` is
    pointed at the one chosen. No intact checkpoint at all is an error listing what is wrong with each.
    """
    candidates = None
    if get_rank() == 0 and (ckpt_dir / LATEST).is_file():
        named = (ckpt_dir / LATEST).read_text().strip()
        candidates = [named, *_older_tags(ckpt_dir, named)]
    candidates = broadcast_object(candidates)
    if not candidates:
        return None
    rejected: list[tuple[str, list[str]]] = []
    chosen = None
    for tag in candidates:
        problems = verify_checkpoint(ckpt_dir, tag)
        if not problems:
            chosen = tag
            break
        rejected.append((tag, problems))
        if get_rank() == 0 and not (ckpt_dir / tag).is_dir():
            print(f"[checkpoint] {LATEST} names {tag}, but {ckpt_dir / tag} does not exist (deleted, or never "
                  "completed on this filesystem)", file=sys.stderr, flush=True)
        elif get_rank() == 0:
            print(f"[checkpoint] {ckpt_dir / tag} is damaged: {'; '.join(problems[:5])}"
                  f"{f' (and {len(problems) - 5} more)' if len(problems) > 5 else ''}", file=sys.stderr, flush=True)
    if chosen is None:
        raise RuntimeError(f"no intact checkpoint in {ckpt_dir}: " + " | ".join(
            f"{tag}: {'; '.join(problems[:3])}" for tag, problems in rejected)
            + "; restore a checkpoint or start a new run (run_name=...)")
    if rejected and get_rank() == 0:
        missing = [tag for tag, _ in rejected if not (ckpt_dir / tag).is_dir()]
        moved = [str(_move_aside(ckpt_dir, tag)) for tag, _ in rejected if (ckpt_dir / tag).is_dir()]
        atomic_write_text(ckpt_dir / LATEST, chosen)
        what = ([f"{', '.join(missing)} does not exist"] if missing else []) + (
            [f"damaged checkpoint(s) moved to {', '.join(moved)}"] if moved else [])
        print(f"[checkpoint] resuming from {ckpt_dir / chosen}, the newest intact checkpoint, instead of "
              f"{rejected[0][0]}: {'; '.join(what)}; {LATEST} now names {chosen}", file=sys.stderr, flush=True)
    barrier()
    return chosen


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
        # DeepSpeed's converter, its torch.load calls weights-only (see `_ds_to_universal` below)
        cmd = [sys.executable, "-m", "ldm_train.trainer.checkpoint", "ds_to_universal",
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
