"""Preemption: SIGUSR1 / SIGUSR2 / SIGTERM -> finish the step, checkpoint, exit 0; under SLURM requeue the job.

The handler only records the signal. The loop asks ``should_stop()`` once per optimizer step; with
several ranks the flag is all-reduced (MAX) so every rank stops after the same step even when the
signal reached only some of them (torchrun does not forward SIGUSR1; srun forwards to all tasks).
That is one tiny collective per step, next to DeepSpeed's own per-step overflow check.

The entry points ``install()`` the handlers before anything slow (imports, Hydra, process groups, DeepSpeed),
so a signal during start-up is recorded, not fatal; the trainers take the same object over.

scancel and SLURM preemption send SIGTERM to every process of the step, DataLoader workers included. torch's
own SIGTERM handler in a worker exits the worker, and the main process then fails on its next batch ("DataLoader
worker ... is killed by signal: Terminated") before it can checkpoint. So every loader here is built with
``worker_init_fn=ignore_in_worker`` and its workers started inside ``held()``: a worker ignores these signals
from its first instruction and stops when the main process shuts the loader down.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

# SIGUSR2: submitit's pre-timeout signal (hydra/launcher=slurm); we checkpoint and requeue ourselves
SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)

_active: Preemption | None = None


class Preemption:
    def __init__(self) -> None:
        self.received: int | None = None
        self._previous = {}
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is None:
            print(f"[preemption] got {signal.Signals(signum).name}: checkpoint after this step, then exit",
                  file=sys.stderr, flush=True)
        self.received = signum

    def should_stop(self, device: Any = None) -> bool:
        """True on every rank once any rank got a signal (collective when distributed; ``device`` holds the flag)."""
        import torch
        import torch.distributed as dist

        local = self.received is not None
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return local
        flag = torch.tensor([1 if local else 0], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        global _active
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if _active is self:
            _active = None


class Preempted(Exception):
    """Raised by a job's own loop when a preemption signal arrived: stop after the work in hand."""

    def __init__(self, signum: int) -> None:
        self.name = signal.Signals(signum).name
        super().__init__(f"stopped by {self.name}")


def install() -> Preemption:
    """The process's handlers: installed on the first call, the same object after (until ``restore()``)."""
    global _active
    if _active is None:
        _active = Preemption()
    return _active


@contextlib.contextmanager
def installed() -> Iterator[Preemption]:
    """``install()`` for a block: handlers this call installed are restored at its end (an in-process caller,
    e.g. a test, keeps its own); ones an entry point installed earlier stay."""
    owner = _active is None
    handlers = install()
    try:
        yield handlers
    finally:
        if owner:
            handlers.restore()


def ignore_in_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: the preemption signals are for the main process, which stops the workers."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)


@contextlib.contextmanager
def held() -> Iterator[None]:
    """Hold the preemption signals while DataLoader workers start (``iter(loader)``): a forked worker inherits
    the mask, so a signal sent before its ``ignore_in_worker`` ran is dropped instead of killing it. One that
    reaches the main process meanwhile is handled when this exits."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def requeue_slurm_job() -> bool:
    """``scontrol requeue $SLURM_JOB_ID`` (call from rank 0 after the checkpoint). False outside SLURM."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return False
    # an array task is requeued by its own id (<array job>_<task>)
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    try:
        subprocess.run(["scontrol", "requeue", job], check=True, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as err:
        detail = getattr(err, "stderr", "") or err
        print(f"[preemption] scontrol requeue {job} failed ({detail}); resubmit the job by hand to resume",
              file=sys.stderr, flush=True)
        return False
    print(f"[preemption] requeued SLURM job {job}", file=sys.stderr, flush=True)
    return True
