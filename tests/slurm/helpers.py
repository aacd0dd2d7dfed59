"""Helpers for the cluster-path tests: stage scripts submitted to the local SLURM cluster (see test_*.py).

Each stage test skips, naming the missing file, until its owner's script has landed. Jobs inherit the test's
environment (sbatch --export=ALL): `job_env` adds offline W&B, the user's DeepSpeed extension cache (training compiles no
op: ldm_train.runtime.ds_ops) and one thread per task (2 shared cores). No LDM_REPO: the scripts
find their folder and this checkout's code themselves (through SLURM's record of the submitted script).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.slurm_cluster import LocalSlurmCluster

REPO = Path(__file__).resolve().parents[2]


def require(*relpaths: str) -> None:
    """Skip the test unless every file exists in the checkout (stage scripts land at different times)."""
    missing = [p for p in relpaths if not (REPO / p).exists()]
    if missing:
        pytest.skip(f"not in the checkout yet: {', '.join(missing)}")


def job_env(tmp: Path) -> dict[str, str]:
    """Environment for stage jobs: offline W&B under `tmp`, cached DeepSpeed ops, no network, 1 thread."""
    return {
        "WANDB_MODE": "offline",
        "WANDB_CACHE_DIR": str(tmp / "wandb-cache"),
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR",
                                               str(Path.home() / ".cache" / "torch_extensions")),
        "DS_ACCELERATOR": "cpu",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }


def submit_and_wait(cluster: LocalSlurmCluster, script: str | Path, args: list[str], tmp: Path,
                    sbatch_args: list[str] = (), timeout: float = 300, expect: str = "COMPLETED",
                    env: dict[str, str] | None = None, cwd: Path = REPO) -> str:
    """Submit from `cwd` (the repo root by default), wait, and fail with the job's log if it ends otherwise."""
    job = submit(cluster, script, args, tmp, sbatch_args, env, cwd)
    state = cluster.wait(job, timeout=timeout)
    assert state == expect, f"job {job} ({script}) ended {state}, expected {expect}\n{job_logs(tmp)}"
    return job


def submit(cluster: LocalSlurmCluster, script: str | Path | None, args: list[str], tmp: Path,
           sbatch_args: list[str] = (), env: dict[str, str] | None = None, cwd: Path = REPO) -> str:
    """Submit from `cwd` (the repo root by default) with the job log under tmp/logs (not the script's default
    logs/ in the submit directory)."""
    name = Path(script).stem if script is not None else "wrap"
    log = tmp / "logs" / f"{name}-%A_%a.out"
    log.parent.mkdir(parents=True, exist_ok=True)
    return cluster.sbatch(script, args=args, env={**job_env(tmp), **(env or {})},
                          sbatch_args=[f"--output={log}", f"--error={log}", *sbatch_args], cwd=cwd)


def job_logs(tmp: Path, tail: int = 60) -> str:
    """The last lines of every job log under tmp/logs, for assertion messages."""
    out = []
    for log in sorted((tmp / "logs").glob("*")):
        lines = log.read_text(errors="replace").splitlines()[-tail:]
        out.append(f"==> {log.name} <==\n" + "\n".join(lines))
    return "\n".join(out)
