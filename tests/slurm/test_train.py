"""slurm/train_txt2img.sh on the local cluster: 2 nodes x 1 task over gloo, preemption -> requeue -> resume, and
a submission from outside the checkout."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.slurm_cluster import LocalSlurmCluster

from .conftest import TINY_TRAIN_ARGS, Latents, TrainRun
from .helpers import REPO, job_logs, require, submit, submit_and_wait

pytestmark = [pytest.mark.integration, pytest.mark.slurm, pytest.mark.slow]


def _stats_steps(run_dir: Path) -> list[int]:
    stats = run_dir / "stats.jsonl"
    if not stats.exists():
        return []
    return [json.loads(line)["step"] for line in stats.read_text().splitlines() if line.strip()]


def test_two_nodes_reach_a_checkpoint(slurm_cluster: LocalSlurmCluster, slurm_train_run: TrainRun) -> None:
    ckpts = slurm_train_run.run_dir / "checkpoints"
    tag = (ckpts / "latest").read_text().strip()
    step_dir = ckpts / tag
    meta = json.loads((step_dir / "meta.json").read_text())
    assert meta["world_size"] == 2  # one rank per simulated node, joined over gloo
    # 32 samples at a global batch of 8 -> 4 optimizer steps
    assert meta["step"] == 4
    for name in ("model.safetensors", "model_ema.safetensors", "config.yaml", "trainer_rank00000.pt",
                 "trainer_rank00001.pt"):
        assert (step_dir / name).exists(), f"{name} missing in {step_dir}"
    nodes = slurm_cluster.show_job(slurm_train_run.job)[0]["NodeList"]
    assert nodes == "node[1-2]"


def test_usr1_checkpoints_requeues_and_resumes_same_wandb_run(
        slurm_cluster: LocalSlurmCluster, slurm_latents: Latents, tmp_path: Path) -> None:
    require("slurm/train_txt2img.sh", "ldm_train/train.py")
    run_dir = tmp_path / "runs" / "tiny" / "preempt"
    total = 160  # 20 steps (~0.8 s each on 2 shared cores): the signal lands mid-run
    args = [*TINY_TRAIN_ARGS, f"data.latents_root={slurm_latents.root}", f"runs_root={tmp_path / 'runs'}",
            "run_name=preempt", f"train.total_samples={total}", "train.checkpoint.every_samples=0",
            f"first_stage.checkpoint={slurm_latents.checkpoint}"]
    job = submit(slurm_cluster, "slurm/train_txt2img.sh", args, tmp_path,
                 ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=1", "--cpus-per-task=1", "--time=10"])

    # Preempt once training is under way (a logged step), as SLURM's --signal=USR1@T would before the limit.
    deadline = time.monotonic() + 300
    while not _stats_steps(run_dir):
        assert slurm_cluster.job_states(job)[job] in ("PENDING", "RUNNING"), job_logs(tmp_path)
        assert time.monotonic() < deadline, f"no training step logged\n{job_logs(tmp_path)}"
        time.sleep(0.5)
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    slurm_cluster.scancel(job, signal="USR1")

    state = slurm_cluster.wait(job, timeout=420)  # the requeued job restarts on its own
    assert state == "COMPLETED", f"{state}\n{job_logs(tmp_path)}"
    assert slurm_cluster.show_job(job)[0]["Restarts"] == "1"

    log = job_logs(tmp_path, tail=10_000)
    assert "SIGUSR1" in log and "requeued SLURM job" in log, log[-3000:]
    # Resumed, not restarted: the step counter continues past the preemption checkpoint to the end.
    steps = _stats_steps(run_dir)
    assert steps == sorted(set(steps)), f"steps repeat after the requeue: {steps}"
    assert steps[-1] == total // 8
    tag = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert json.loads((run_dir / "checkpoints" / tag / "meta.json").read_text())["step"] == total // 8
    # The same W&B run continues: one run id, two offline sessions of it.
    assert (run_dir / "wandb_run_id").read_text().strip() == run_id
    sessions = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(sessions) >= 2 and all(s.name.endswith(f"-{run_id}") for s in sessions), sessions


def test_submitted_from_an_empty_directory_writes_the_run_there(
        slurm_cluster: LocalSlurmCluster, slurm_latents: Latents, tmp_path: Path) -> None:
    require("slurm/train_txt2img.sh", "ldm_train/train.py")
    submit_dir = tmp_path / "elsewhere"  # empty; the job log goes beside it, not into it
    submit_dir.mkdir()
    args = [*TINY_TRAIN_ARGS, f"data.latents_root={slurm_latents.root}", "runs_root=runs", "run_name=elsewhere",
            "train.total_samples=8", f"first_stage.checkpoint={slurm_latents.checkpoint}"]
    submit_and_wait(slurm_cluster, REPO / "slurm" / "train_txt2img.sh", args, tmp_path, cwd=submit_dir,
                    timeout=420, sbatch_args=["--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=1",
                                              "--cpus-per-task=1", "--time=10"])
    run_dir = submit_dir / "runs" / "tiny" / "elsewhere"
    tag = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert json.loads((run_dir / "checkpoints" / tag / "meta.json").read_text())["step"] == 1
    assert sorted(p.name for p in submit_dir.iterdir()) == ["runs"]
    assert not (REPO / "runs" / "tiny" / "elsewhere").exists()
