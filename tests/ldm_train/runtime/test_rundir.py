"""The run directory's lock: a second training on a run dir in use is refused at once, naming the dir and the
holder's PID, with nothing written; the same SLURM job after its earlier process died, and a resume after the first
training ended, take the lock again."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ldm_train.runtime.rundir import LOCK_FILE, RunDirInUse, release_run_dir, resolve_run_dir, shared_run_dir

pytestmark = pytest.mark.integration  # starts processes or servers

REPO = Path(__file__).resolve().parents[3]
HOLD = """
import sys, time
from ldm_train.runtime.rundir import resolve_run_dir
run_dir = resolve_run_dir(sys.argv[1], "tiny", "tiny-x-gpus1-batch8", sys.argv[2] or None, sys.argv[3] or None)
print(run_dir, flush=True)
time.sleep(600)
"""


def _holder(runs: Path, run_name: str = "", job: str = "") -> tuple[subprocess.Popen, Path]:
    """Another process that resolves and locks a run dir, then stays alive; returns it and the dir it holds."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    if job:
        env["SLURM_JOB_ID"] = job
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(runs), run_name, job], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()
    assert line, "the holding process did not start"
    return proc, Path(line)


def _stop(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)  # as a preempted or crashed job dies: no clean-up runs
    proc.wait(timeout=60)


def test_a_second_training_on_a_run_dir_in_use_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runs = tmp_path / "runs"
    proc, held = _holder(runs, run_name="shared")
    try:
        (held / "checkpoints").mkdir()
        before = sorted(p.name for p in held.rglob("*"))
        with monkeypatch.context() as m:  # refused at once: waiting for the lock would sleep
            m.setattr(time, "sleep", lambda s: pytest.fail(f"waited {s} s for a run dir in use"))
            with pytest.raises(RunDirInUse) as err:
                shared_run_dir(lambda: resolve_run_dir(runs, "tiny", "tiny-x-gpus1-batch8", "shared"))
        msg = str(err.value)
        assert f"run dir {held} is in use by another training: PID {proc.pid} on " in msg
        assert f"{held / LOCK_FILE}" in msg and "run_name=" in msg
        assert sorted(p.name for p in held.rglob("*")) == before  # nothing written
    finally:
        _stop(proc)
    # the first training ended (however): a resume takes the lock, and takes it again in the same process
    assert resolve_run_dir(runs, "tiny", "tiny-x-gpus1-batch8", "shared") == held
    assert resolve_run_dir(runs, "tiny", "tiny-x-gpus1-batch8", "shared") == held
    release_run_dir(held)


def test_a_requeued_slurm_job_takes_its_run_dir_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runs = tmp_path / "runs"
    proc, held = _holder(runs, job="4242")
    assert held.name.startswith("00000-")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    try:
        with pytest.raises(RunDirInUse, match=rf"PID {proc.pid} on .*, SLURM job 4242"):
            resolve_run_dir(runs, "tiny", "tiny-x-gpus1-batch8", slurm_job_id="4242")
    finally:
        _stop(proc)
    # the requeue: the job's earlier process is gone, its run dir (found by the job id) is taken over
    assert resolve_run_dir(runs, "tiny", "tiny-x-gpus1-batch8", slurm_job_id="4242") == held
    release_run_dir(held)
