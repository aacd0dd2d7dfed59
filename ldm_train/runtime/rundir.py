"""The run directory: ``<runs_root>/<experiment>/<run-name>/`` (DESIGN.md "Run directory").

Names say what a run is, e.g. ``00012-tiny-tiny_kl_f4-gpus2-batch32``. The name must be stable so a
requeued or restarted job finds its checkpoints: it comes from ``run_name`` in the config, else from an
existing run of the same SLURM job id (a requeued job keeps its id), else a new index is allocated.
Only rank 0 decides; the trainer broadcasts the path to the other ranks.

Rank 0 holds ``run.lock`` in the run directory for as long as its process lives (``fcntl.flock``): a second
training on the same directory is refused at once, naming the process that holds it, instead of both writing the
same checkpoints. The kernel drops the lock when the holder exits however it ends, so a resume after it and a
requeued SLURM job (whose earlier process is gone) take it again.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path

_INDEX = re.compile(r"^(\d{5})-")
SLURM_MARKER = "slurm_job_id"
LOCK_FILE = "run.lock"
_HELD: dict[str, int] = {}  # run dir -> the open lock file of this process (a second open would not share it)


class RunDirInUse(RuntimeError):
    """Another live process holds the run directory's lock."""


def lock_run_dir(run_dir: str | Path) -> None:
    """Take ``run_dir``'s lock for this process's lifetime (again: a no-op), or raise ``RunDirInUse`` naming the
    holder. Nothing in the directory is touched when it is refused."""
    key = os.path.realpath(run_dir)
    if key in _HELD:
        return
    path = os.path.join(key, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = _read_holder(fd)
        os.close(fd)
        raise RunDirInUse(
            f"run dir {run_dir} is in use by another training: {holder} holds {path}. Wait for it to end (or stop "
            "it), or start this one in another directory (run_name=... or runs_root=...). A resume or a requeued "
            "SLURM job takes the lock once that process has exited") from None
    job = slurm_job_id()
    record = {"pid": os.getpid(), "host": socket.gethostname(), "slurm_job_id": job,
              "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    _HELD[key] = fd


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        info = {}
    if not info.get("pid"):
        return "a process that has not yet written its PID"
    job = f", SLURM job {info['slurm_job_id']}" if info.get("slurm_job_id") else ""
    return f"PID {info['pid']} on {info.get('host', '?')}{job} (since {info.get('since', '?')})"


def release_run_dir(run_dir: str | Path) -> None:
    """Drop this process's lock on ``run_dir`` (the end of a training; process exit does the same)."""
    fd = _HELD.pop(os.path.realpath(run_dir), None)
    if fd is not None:
        os.close(fd)


def shared_run_dir(make: Callable[[], Path]) -> Path:
    """``make()`` on rank 0 (it resolves, locks and may write to the run dir), its path on every rank; a refusal
    on rank 0 is raised on every rank instead of leaving the others waiting for the path."""
    from ldm_train.runtime.distributed import broadcast_object, get_rank

    path, error = None, None
    if get_rank() == 0:
        try:
            path = str(make())
        except RunDirInUse as e:
            error = str(e)
    path, error = broadcast_object((path, error))
    if error is not None:
        raise RunDirInUse(error)
    return Path(path)


def describe_run(experiment: str, first_stage: str, world_size: int, global_batch: int) -> str:
    return f"{experiment}-{first_stage}-gpus{world_size}-batch{global_batch}"


def resolve_run_dir(
    runs_root: str | Path,
    experiment: str,
    description: str,
    run_name: str | None = None,
    slurm_job_id: str | None = None,
) -> Path:
    """Find or create the run directory and take its lock (call on rank 0 only)."""
    run_dir = _find_or_create(runs_root, experiment, description, run_name, slurm_job_id)
    lock_run_dir(run_dir)
    return run_dir


def _find_or_create(runs_root: str | Path, experiment: str, description: str, run_name: str | None,
                    slurm_job_id: str | None) -> Path:
    parent = Path(runs_root) / experiment
    parent.mkdir(parents=True, exist_ok=True)
    if run_name:
        run_dir = parent / run_name
        run_dir.mkdir(parents=True, exist_ok=True)
        return run_dir
    if slurm_job_id:
        for child in sorted(parent.iterdir()):
            marker = child / SLURM_MARKER
            if marker.is_file() and marker.read_text().strip() == slurm_job_id:
                return child
    indices = [int(m.group(1)) for c in parent.iterdir() if (m := _INDEX.match(c.name))]
    index = max(indices, default=-1) + 1
    while True:  # another job may allocate the same index concurrently: mkdir is the lock
        run_dir = parent / f"{index:05d}-{description}"
        try:
            run_dir.mkdir()
            break
        except FileExistsError:
            index += 1
    if slurm_job_id:
        (run_dir / SLURM_MARKER).write_text(slurm_job_id + "\n")
    return run_dir


def slurm_job_id() -> str | None:
    """The id that survives a requeue (array tasks have their own)."""
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and array_task:
        return f"{array_job}_{array_task}"
    return os.environ.get("SLURM_JOB_ID")
