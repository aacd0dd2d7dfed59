"""A run's checkpoint directory, the same for both trainers: written whole or not at all, checked on resume.

Layout (``<run_dir>/checkpoints/``)::

    latest                  text: the tag of the newest complete checkpoint (DeepSpeed's format)
    step_0000120/           one tag per checkpoint; the newest ``keep_last`` are kept (never the one ``latest`` names)
        ...                 what the trainer writes (``save``'s ``write``)
        meta.json           what the trainer describes the checkpoint with (step, world size, ...)
        files.json          every other file of the folder with its size and sha256 (written last)
    .partial-step_0000140/  a checkpoint being written (or cut short); renamed to its tag when complete
    damaged-step_0000100/   a checkpoint that failed its check on resume, kept aside untouched

``save`` writes ``.partial-<tag>/`` from every rank, lists it in ``files.json``, renames it to its tag and only
then moves ``latest`` (rank 0, atomically): a crash or a full disk mid-save leaves the previous checkpoint usable
and no half checkpoint under a checkpoint's name.

``select_resume_tag`` checks the checkpoint ``latest`` names against its ``files.json`` (every file present,
same size, same sha256; the ranks share the hashing; without ``files.json`` it cannot be verified and counts as
damaged); a damaged one is moved aside to ``damaged-<tag>`` with a message naming the damaged file, and the
newest older checkpoint that checks out is used instead.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ldm_train.data.fsspec_io import write_text
from ldm_train.runtime.distributed import all_gather_objects, barrier, broadcast_object, get_rank
from ldm_train.runtime.log import rank0_logger

CHECKPOINTS = "checkpoints"
LATEST = "latest"
META = "meta.json"
MANIFEST = "files.json"
DAMAGED_PREFIX = "damaged-"
PARTIAL_PREFIX = ".partial-"  # a checkpoint being written; renamed to its tag when complete
_TAG = re.compile(r"^step_\d+$")

log = rank0_logger("checkpoint")


def tag_for(step: int) -> str:
    return f"step_{step:07d}"


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


def save(ckpt_dir: Path, step: int, write: Callable[[Path], Any], meta: dict[str, Any], keep_last: int,
         keep_setting: str) -> str:
    """Write checkpoint ``step`` (collective) and return its tag.

    ``write(folder)`` runs on every rank and writes that rank's files into ``folder`` (the partial checkpoint);
    then rank 0 writes ``meta``, the ranks hash every file into ``files.json``, the folder takes its tag's name,
    ``latest`` names it and all but the newest ``keep_last`` are deleted. ``keep_setting`` is the config key
    of ``keep_last``, which a full disk's error names.
    """
    tag = tag_for(step)
    partial_dir = ckpt_dir / (PARTIAL_PREFIX + tag)
    if get_rank() == 0:
        shutil.rmtree(partial_dir, ignore_errors=True)  # left by a save that was cut short
        partial_dir.mkdir(parents=True)
    barrier()
    try:
        write(partial_dir)
        if get_rank() == 0:
            write_text(partial_dir / META, json.dumps(meta, indent=1) + "\n")
        barrier()  # every rank's files are on disk before the manifest lists them and `latest` may name them
        files = build_manifest(partial_dir)  # collective: the ranks share the hashing
        if get_rank() == 0:
            write_text(partial_dir / MANIFEST, json.dumps({"version": 1, "files": files}, indent=1) + "\n")
            _publish(partial_dir, ckpt_dir / tag)
            write_text(ckpt_dir / LATEST, tag)
            prune(ckpt_dir, keep_last)
    except (OSError, RuntimeError) as err:
        raise _save_failed(err, partial_dir, ckpt_dir, tag, keep_setting) from err
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


def _save_failed(err: BaseException, partial_dir: Path, ckpt_dir: Path, tag: str, keep_setting: str) -> BaseException:
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
                   f"{keep_setting}, then restart; the incomplete save stays under {partial_dir.name} and "
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
        if not (ckpt_dir / tag).is_dir():
            log(f"{LATEST} names {tag}, but {ckpt_dir / tag} does not exist (deleted, or never completed on this "
                "filesystem)", err=True)
        else:
            log(f"{ckpt_dir / tag} is damaged: {'; '.join(problems[:5])}"
                f"{f' (and {len(problems) - 5} more)' if len(problems) > 5 else ''}", err=True)
    if chosen is None:
        raise RuntimeError(f"no intact checkpoint in {ckpt_dir}: " + " | ".join(
            f"{tag}: {'; '.join(problems[:3])}" for tag, problems in rejected)
            + "; restore a checkpoint or start a new run (run_name=...)")
    if rejected and get_rank() == 0:
        missing = [tag for tag, _ in rejected if not (ckpt_dir / tag).is_dir()]
        moved = [str(_move_aside(ckpt_dir, tag)) for tag, _ in rejected if (ckpt_dir / tag).is_dir()]
        write_text(ckpt_dir / LATEST, chosen)
        what = ([f"{', '.join(missing)} does not exist"] if missing else []) + (
            [f"damaged checkpoint(s) moved to {', '.join(moved)}"] if moved else [])
        log(f"resuming from {ckpt_dir / chosen}, the newest intact checkpoint, instead of {rejected[0][0]}: "
            f"{'; '.join(what)}; {LATEST} now names {chosen}", err=True)
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
