"""The run directory: ``<runs_root>/<experiment>/<run-name>/`` (DESIGN.md "Run directory").

Names say what a run is, e.g. ``00012-tiny-tiny_kl_f4-gpus2-batch32``. The name must be stable so a
requeued or restarted job finds its checkpoints: it comes from ``run_name`` in the config, else from an
existing run of the same SLURM job id (a requeued job keeps its id), else a new index is allocated.
Only rank 0 decides; the trainer broadcasts the path to the other ranks.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

_INDEX = re.compile(r"^(\d{5})-")
SLURM_MARKER = "slurm_job_id"


def describe_run(experiment: str, first_stage: str, world_size: int, global_batch: int) -> str:
    return f"{experiment}-{first_stage}-gpus{world_size}-batch{global_batch}"


def resolve_run_dir(
    runs_root: str | Path,
    experiment: str,
    description: str,
    run_name: str | None = None,
    slurm_job_id: str | None = None,
) -> Path:
    """Find or create the run directory (call on rank 0 only)."""
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
