"""slurm/pipeline.sh: every stage submitted at once as dependent jobs, run in order on the local cluster."""

from __future__ import annotations

import json
import subprocess
from datetime import datetime
from pathlib import Path

import pytest

from tests.slurm_cluster import LocalSlurmCluster

from .conftest import TINY_TRAIN_ARGS
from .helpers import REPO, job_env, job_logs, require

pytestmark = [pytest.mark.integration, pytest.mark.slurm]

STAGE_SCRIPTS = ("slurm/prep_latents.sh", "slurm/train_txt2img.sh", "slurm/eval.sh")
# The stage scripts' #SBATCH defaults are sized for GPU nodes; these fit the 2-CPU local nodes.
ONE_CPU = "--gpus-per-node=1 --cpus-per-task=1 --time=10"
SMALL_SBATCH = {
    "FIRST_STAGE_SBATCH_ARGS": f"--nodes=1 --ntasks-per-node=1 {ONE_CPU}", "PREP_LATENTS_SBATCH_ARGS": "--cpus-per-task=1 --time=10",
    "TRAIN_SBATCH_ARGS": f"--ntasks-per-node=1 {ONE_CPU}", "EVAL_SBATCH_ARGS": f"--nodes=1 --ntasks-per-node=1 {ONE_CPU}",
}


def run_pipeline(cluster: LocalSlurmCluster, work: Path, **settings: str) -> dict[str, str]:
    """`bash slurm/pipeline.sh` with `settings` as its environment; returns {stage: job id} from its output."""
    env = {**cluster.env, **job_env(work), "WORK": str(work), **settings}
    res = subprocess.run(["bash", "slurm/pipeline.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    lines = [line.split() for line in res.stdout.splitlines()]
    assert lines[-1] == ["pipeline", str(work)], res.stdout
    return {stage: job for stage, job in lines[:-1]}


def _time(rec: dict[str, str], key: str) -> datetime:
    return datetime.fromisoformat(rec[key])


@pytest.mark.slow
def test_pipeline_runs_every_stage_after_the_one_it_needs(slurm_cluster: LocalSlurmCluster, tmp_path: Path) -> None:
    require(*STAGE_SCRIPTS, "slurm/train_autoencoder.sh")
    work = tmp_path / "work"
    jobs = run_pipeline(
        slurm_cluster, work, SYNTH_SAMPLES="32", SYNTH_SHARD_SIZE="16", PREP_TASKS="2",
        TRAIN_FIRST_STAGE="1", **SMALL_SBATCH,
        AE_ARGS="train.max_steps=2 train.micro_batch=4 data.num_workers=0 loss.lpips_random_backbone=true",
        PREP_ARGS="num_workers=0 batch_size=16 progress=false", TRAIN_NODES="2",
        TRAIN_ARGS=" ".join([a for a in TINY_TRAIN_ARGS if not a.startswith("experiment=")]
                            + ["train.total_samples=16"]),
        EVAL_SAMPLES="4",
        EVAL_ARGS="steps=2 batch_size=2 guidance_scale=2.0 progress=false reference.num_images=8 "
                  "metrics.extractor=random-init metrics.save_cpu_ram=true")
    order = ["synthetic", "first_stage", "prep_latents", "finalize", "train", "eval"]
    assert list(jobs) == order
    for stage in order:
        state = slurm_cluster.wait(jobs[stage], timeout=600)
        assert state == "COMPLETED", f"{stage} ({jobs[stage]}) ended {state}\n{job_logs(work)}"

    # Each stage started only after the stage it depends on had ended (afterok chaining).
    recs = {stage: slurm_cluster.show_job(job) for stage, job in jobs.items()}
    for before, after in zip(order, order[1:], strict=False):
        ended = max(_time(r, "EndTime") for r in recs[before])
        started = min(_time(r, "StartTime") for r in recs[after])
        assert started >= ended, f"{after} started {started} before {before} ended {ended}"

    first_stage = work / "runs" / "autoencoder" / "tiny_kl_f4" / "export" / "first_stage.safetensors"
    manifest = json.loads((work / "latents" / "tiny_kl_f4" / "manifest.json").read_text())
    assert manifest["num_samples"] == 32
    assert manifest["first_stage"]["checkpoint"] == str(first_stage)
    run_dir = work / "runs" / "tiny" / "pipeline"
    assert (run_dir / "checkpoints" / "latest").exists()
    metrics = json.loads((work / "eval" / "metrics.json").read_text())
    assert metrics["per_scale"][0]["num_samples"] == 4
    assert Path(metrics["checkpoint"]["path"]).is_relative_to(run_dir)


def test_failed_stage_cancels_the_stages_after_it(slurm_cluster: LocalSlurmCluster, tmp_path: Path) -> None:
    require(*STAGE_SCRIPTS)
    work = tmp_path / "work"
    jobs = run_pipeline(slurm_cluster, work, INPUT=str(tmp_path / "no-such-images"),
                        ALLOW_RANDOM_FIRST_STAGE="1", PREP_ARGS="num_workers=0 progress=false", **SMALL_SBATCH)
    assert list(jobs) == ["prep_latents", "finalize", "train", "eval"]
    assert slurm_cluster.wait(jobs["prep_latents"], timeout=300) == "FAILED"
    for stage in ("finalize", "train", "eval"):
        # --kill-on-invalid-dep: a dependent of a failed job is cancelled instead of pending forever
        assert slurm_cluster.wait(jobs[stage], timeout=60) == "CANCELLED", stage
        assert slurm_cluster.show_job(jobs[stage])[0]["RunTime"] == "00:00:00", stage
