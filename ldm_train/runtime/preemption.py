"""Preemption: SIGUSR1 / SIGUSR2 / SIGTERM -> finish the step, checkpoint, exit; under SLURM requeue the job.

The handler only records the signal. The loop asks ``should_stop()`` once per optimizer step; with
several ranks the flag is all-reduced (MAX) so every rank stops after the same step even when the
signal reached only some of them (torchrun does not forward SIGUSR1; srun forwards to all tasks).
That is one tiny collective per step, next to DeepSpeed's own per-step overflow check.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import torch
import torch.distributed as dist

# SIGUSR2: submitit's pre-timeout signal (hydra/launcher=slurm); we checkpoint and requeue ourselves
SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)


class Preemption:
    def __init__(self, device: torch.device) -> None:
        self.received: int | None = None
        self._device = device
        self._previous = {}
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is None:
            print(f"[preemption] got {signal.Signals(signum).name}: checkpoint after this step, then exit",
                  file=sys.stderr, flush=True)
        self.received = signum

    def should_stop(self) -> bool:
        """True on every rank once any rank got a signal (collective when distributed)."""
        local = self.received is not None
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return local
        flag = torch.tensor([1 if local else 0], dtype=torch.int32, device=self._device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


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
