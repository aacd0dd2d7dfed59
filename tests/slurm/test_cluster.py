"""Smoke tests of the local SLURM cluster fixture itself: multi-node steps, arrays, failures, signals."""

from __future__ import annotations

import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.slurm_cluster import LocalSlurmCluster, SlurmError, parse_scontrol_record

pytestmark = [pytest.mark.integration, pytest.mark.slurm]


def _script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/bash\nset -euo pipefail\n" + textwrap.dedent(body))
    return path


def _wait_for_file(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} not created within {timeout}s"
        time.sleep(0.1)


def test_parse_scontrol_record_keeps_values_with_spaces() -> None:
    rec = parse_scontrol_record("JobId=7 JobName=a b JobState=FAILED Reason=NonZeroExitCode ExitCode=3:0")
    assert rec == {"JobId": "7", "JobName": "a b", "JobState": "FAILED", "Reason": "NonZeroExitCode",
                   "ExitCode": "3:0"}


def test_two_nodes_one_task_each(slurm_cluster: LocalSlurmCluster, tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    script = _script(tmp_path / "job.sh", """\
        srun bash -c 'echo "$SLURM_PROCID $SLURM_NODEID $SLURMD_NODENAME $SLURM_NTASKS"' | sort
        """)
    job = slurm_cluster.sbatch(script, sbatch_args=["--nodes=2", "--ntasks-per-node=1", f"--output={out}"])
    assert slurm_cluster.wait(job, timeout=60) == "COMPLETED"
    assert out.read_text().split("\n")[:2] == ["0 0 node1 2", "1 1 node2 2"]


def test_node_names_map_to_loopback(slurm_cluster: LocalSlurmCluster) -> None:
    # What a job does to turn the first name of SLURM_JOB_NODELIST into MASTER_ADDR.
    for node in slurm_cluster.nodes:
        rec = parse_scontrol_record(slurm_cluster.run(["scontrol", "-o", "show", "node", node]).stdout)
        assert rec["NodeAddr"] == "127.0.0.1" == slurm_cluster.node_addrs[node]
        assert rec["State"] == "IDLE"


def test_job_sees_cluster_and_this_python(slurm_cluster: LocalSlurmCluster, tmp_path: Path) -> None:
    out = tmp_path / "env.txt"
    script = _script(tmp_path / "env.sh", """\
        echo "$SLURM_CONF"
        command -v python
        scontrol show hostnames "$SLURM_JOB_NODELIST"
        """)
    job = slurm_cluster.sbatch(script, sbatch_args=["--nodes=2", f"--output={out}"])
    assert slurm_cluster.wait(job, timeout=60) == "COMPLETED"
    conf, python, *hosts = out.read_text().split()
    assert conf == str(slurm_cluster.conf_path)
    assert Path(python).parent == Path(sys.executable).parent
    assert hosts == ["node1", "node2"]


def test_array_job_runs_every_element(slurm_cluster: LocalSlurmCluster, tmp_path: Path) -> None:
    script = _script(tmp_path / "array.sh", f"""\
        echo "$SLURM_ARRAY_TASK_ID of $SLURM_ARRAY_TASK_COUNT" > {tmp_path}/task-$SLURM_ARRAY_TASK_ID.txt
        """)
    job = slurm_cluster.sbatch(script, sbatch_args=["--array=0-3", f"--output={tmp_path}/%A_%a.out"])
    assert slurm_cluster.wait(job, timeout=90) == "COMPLETED"
    assert sorted(slurm_cluster.job_states(job)) == [f"{job}_{i}" for i in range(4)]
    assert [(tmp_path / f"task-{i}.txt").read_text().strip() for i in range(4)] == [f"{i} of 4" for i in range(4)]


def test_failing_job_is_reported_failed(slurm_cluster: LocalSlurmCluster, tmp_path: Path) -> None:
    script = _script(tmp_path / "fail.sh", "exit 3\n")
    job = slurm_cluster.sbatch(script, sbatch_args=[f"--output={tmp_path}/fail.out"])
    assert slurm_cluster.wait(job, timeout=60) == "FAILED"
    assert slurm_cluster.show_job(job)[0]["ExitCode"] == "3:0"


def test_failing_array_element_fails_the_array(slurm_cluster: LocalSlurmCluster, tmp_path: Path) -> None:
    script = _script(tmp_path / "fail_one.sh", '[ "$SLURM_ARRAY_TASK_ID" != 1 ]\n')
    job = slurm_cluster.sbatch(script, sbatch_args=["--array=0-2", f"--output={tmp_path}/%A_%a.out"])
    assert slurm_cluster.wait(job, timeout=60) == "FAILED"
    states = slurm_cluster.job_states(job)
    assert states == {f"{job}_0": "COMPLETED", f"{job}_1": "FAILED", f"{job}_2": "COMPLETED"}


def test_usr1_reaches_batch_script(slurm_cluster: LocalSlurmCluster, tmp_path: Path) -> None:
    # The preemption path: `scancel --signal=USR1 --batch` is delivered to the batch shell's trap.
    ready, got = tmp_path / "ready", tmp_path / "got"
    script = _script(tmp_path / "sig.sh", f"""\
        trap 'echo usr1 > {got}; exit 0' USR1
        touch {ready}
        for _ in $(seq 600); do sleep 0.1; done
        exit 9
        """)
    job = slurm_cluster.sbatch(script, sbatch_args=[f"--output={tmp_path}/sig.out"])
    slurm_cluster.wait_state(job, {"RUNNING"}, timeout=60)
    _wait_for_file(ready, timeout=30)
    slurm_cluster.scancel(job, signal="USR1", batch=True)
    assert slurm_cluster.wait(job, timeout=60) == "COMPLETED"
    assert got.read_text().strip() == "usr1"


def test_gpu_requests_are_schedulable(slurm_cluster: LocalSlurmCluster, tmp_path: Path) -> None:
    # Stage scripts ask for GPUs (#SBATCH --gpus-per-node); the pretend GRES lets them run here on CPU.
    out = tmp_path / "gpu.txt"
    script = _script(tmp_path / "gpu.sh", """\
        srun bash -c 'echo "$SLURM_PROCID $CUDA_VISIBLE_DEVICES"' | sort
        """)
    job = slurm_cluster.sbatch(script, sbatch_args=["--nodes=2", "--gpus-per-node=2", f"--output={out}"])
    assert slurm_cluster.wait(job, timeout=60) == "COMPLETED"
    assert out.read_text().split("\n")[:2] == ["0 0,1", "1 0,1"]


def test_requeued_job_runs_again(slurm_cluster: LocalSlurmCluster, tmp_path: Path) -> None:
    # What the trainer does on preemption: `scontrol requeue` itself; the job restarts with a restart count.
    out = tmp_path / "requeue.txt"
    script = _script(tmp_path / "requeue.sh", """\
        echo "run ${SLURM_RESTART_COUNT:-0}"
        if [ "${SLURM_RESTART_COUNT:-0}" = 0 ]; then scontrol requeue "$SLURM_JOB_ID"; sleep 60; exit 7; fi
        """)
    job = slurm_cluster.sbatch(script, sbatch_args=["--requeue", "--open-mode=append", f"--output={out}"])
    # slurmctld holds a requeued job for cred_expire (10 s here) before it runs again
    state = slurm_cluster.wait(job, timeout=120)
    log = out.read_text() if out.exists() else "(no job output)"
    assert state == "COMPLETED", f"{slurm_cluster.show_job(job)}\n{log}\n{slurm_cluster.logs()}"
    runs = [line for line in log.splitlines() if line.startswith("run")]
    assert runs == ["run 0", "run 1"]


def test_wait_fails_fast_on_a_job_that_cannot_fit(slurm_cluster: LocalSlurmCluster, tmp_path: Path) -> None:
    # e.g. a stage script's `#SBATCH --cpus-per-task=8` on 2-CPU nodes: an error naming the fix, not a hang.
    script = _script(tmp_path / "big.sh", "true\n")
    job = slurm_cluster.sbatch(script, sbatch_args=["--cpus-per-task=8", f"--output={tmp_path}/big.out"])
    try:
        with pytest.raises(SlurmError, match="--cpus-per-task=1"):
            slurm_cluster.wait(job, timeout=60)
    finally:
        slurm_cluster.scancel(job)
