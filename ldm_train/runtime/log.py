"""The rank-0 logger (EDM's ``print0``): one line per event from the job, not one per rank.

    log = rank0_logger("train_autoencoder")
    log("resumed from ... at step 40")             # stdout of global rank 0: "[train_autoencoder] resumed ..."
    log("checkpoint ... is damaged", err=True)     # stderr, for what went wrong

Lines are flushed at once, so a killed job's log still ends with its last event. What every rank must say (an
error on one rank) is printed by that rank directly.
"""
from __future__ import annotations

import sys
from collections.abc import Callable

from ldm_train.runtime.distributed import get_rank


def rank0_logger(prefix: str) -> Callable[..., None]:
    """``log(msg, err=False)``: print ``[prefix] msg`` on global rank 0 (stderr when ``err``), flushed."""

    def log(msg: str, *, err: bool = False) -> None:
        if get_rank() == 0:
            print(f"[{prefix}] {msg}", file=sys.stderr if err else sys.stdout, flush=True)

    return log
