"""DeepSpeed's just-in-time compiled C++ ops on the training path: none is built that training does not use.

On the CPU accelerator, DeepSpeed's communication backend compiles its shared-memory op (``deepspeed_shm_comm``)
at the first ``deepspeed.initialize``: minutes of compiler work, without a message, into ``TORCH_EXTENSIONS_DIR``
(default ``~/.cache/torch_extensions``, shared by every venv and job of the user). Only DeepSpeed-Inference's
all-reduce uses it; training communicates through ``torch.distributed``. ``skip_unused_ops()`` marks it unavailable
(DeepSpeed keeps the one ``deepspeed.ops.__compatible_ops__`` dict it probed, so the edit holds), and nothing is
compiled.

An op a configuration does need (e.g. the CPU Adam of ZeRO-Offload) is still compiled by DeepSpeed. torch guards the
build with a ``lock`` file and waits while it exists, forever when a killed build left it (a job cancelled mid-build
on a cluster with a shared $HOME). ``clear_stale_locks()`` removes build locks older than ``STALE_S``, naming them:
a build takes minutes, a lock that old belongs to no live build.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

UNUSED_OPS = ("deepspeed_shm_comm",)
STALE_S = 30 * 60


def extensions_dir() -> Path:
    """Where torch builds C++ extensions: ``$TORCH_EXTENSIONS_DIR/<op>``, else ``<default root>/<py tag>/<op>``."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root)
    from torch.utils.cpp_extension import get_default_build_root

    return Path(get_default_build_root())


def clear_stale_locks(root: Path | None = None, stale_s: float = STALE_S) -> list[Path]:
    """Remove ``<root>/*/lock`` (and ``<root>/<python-tag>/*/lock``) older than ``stale_s``; returns them."""
    root = extensions_dir() if root is None else root
    removed = []
    now = time.time()
    for lock in [*root.glob("*/lock"), *root.glob("*/*/lock")]:
        try:
            age = now - lock.stat().st_mtime
            if age > stale_s:
                lock.unlink()
                removed.append(lock)
                print(f"[deepspeed] removed the build lock {lock}, {age / 60:.0f} minutes old (a killed build left "
                      f"it; torch would wait on it forever)", file=sys.stderr, flush=True)
        except FileNotFoundError:
            continue  # a build finished meanwhile
    return removed


def skip_unused_ops() -> None:
    """Before ``deepspeed.initialize``: mark the ops training never calls unavailable, so none is compiled, and
    clear stale build locks for the ops a configuration does compile."""
    import deepspeed.ops

    compatible = deepspeed.ops.__compatible_ops__
    for name in UNUSED_OPS:
        compatible[name] = False
    clear_stale_locks()
