"""Hydra multirun over two tiny first stages with the SLURM launcher (hydra-submitit-launcher's submitit_slurm):
one real SLURM job per first stage, submitted through sbatch by submitit; every point joins the sweep's W&B
group and links its run dir from the sweep folder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.slurm_cluster import LocalSlurmCluster

from .conftest import TINY_TRAIN_ARGS, Latents, export_random_first_stage, prep_latents
from .helpers import REPO, job_env, require

pytestmark = [pytest.mark.integration, pytest.mark.slurm, pytest.mark.slow]

FIRST_STAGES = ("tiny_kl_f4", "tiny_kl_f8")


def test_multirun_submits_one_slurm_job_per_first_stage(
        slurm_cluster: LocalSlurmCluster, slurm_latents: Latents, tmp_path: Path) -> None:
    require("conf/hydra/launcher/slurm.yaml", "slurm/prep_latents.sh")
    # tiny_kl_f4 latents exist; encode the same images with tiny_kl_f8 beside them (another prep array).
    ckpt_f8 = export_random_first_stage("tiny_kl_f8", tmp_path / "first_stage" / "tiny_kl_f8.safetensors")
    prep_latents(slurm_cluster, tmp_path, slurm_latents.raw, slurm_latents.root, "tiny_kl_f8", ckpt_f8)

    sweep_dir, runs = tmp_path / "sweep", tmp_path / "runs"
    cmd = [sys.executable, "-m", "ldm_train.train", "-m", "hydra/launcher=slurm",
           f"first_stage={','.join(FIRST_STAGES)}", *TINY_TRAIN_ARGS, "train.total_samples=16",
           f"data.latents_root={slurm_latents.root}", f"runs_root={runs}", f"hydra.sweep.dir={sweep_dir}",
           # the local cluster: its partition, 1 node x 1 task, little memory, a short limit
           "hydra.launcher.partition=debug", "hydra.launcher.nodes=1", "hydra.launcher.tasks_per_node=1",
           "hydra.launcher.gpus_per_node=1", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1",
           "hydra.launcher.timeout_min=10"]
    # submitit calls sbatch: the cluster's SLURM_CONF and PATH must be in the launcher's environment.
    res = subprocess.run(cmd, cwd=REPO, env={**slurm_cluster.env, **job_env(tmp_path)}, capture_output=True,
                         text=True, timeout=900)
    job_ids = sorted(p.name for p in (sweep_dir / ".submitit").glob("[0-9]*"))
    logs = "\n".join(p.read_text(errors="replace")[-3000:] for p in (sweep_dir / ".submitit").rglob("*.err"))
    assert res.returncode == 0, f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}\n{logs}"

    # submitit submits the sweep as one array job: one element per first stage
    elements = [j for j in job_ids if "_" in j]
    assert len(elements) == len(FIRST_STAGES), job_ids
    array_id = elements[0].split("_")[0]
    assert slurm_cluster.wait(array_id, timeout=60) == "COMPLETED"
    assert sorted(slurm_cluster.job_states(array_id)) == sorted(elements)
    trained = {}
    for latest in runs.glob("tiny/*/checkpoints/latest"):
        step_dir = latest.parent / latest.read_text().strip()
        config = yaml.safe_load((step_dir / "config.yaml").read_text())
        trained[config["first_stage"]["name"]] = step_dir
    assert sorted(trained) == sorted(FIRST_STAGES), trained

    # the sweep folder lists every point (the folder studies.sweep_report reads), all in one W&B group
    points = [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/point.json"))]
    assert sorted(p["first_stage"] for p in points) == sorted(FIRST_STAGES), points
    assert len({p["wandb_group"] for p in points}) == 1 and points[0]["wandb_group"].endswith(sweep_dir.name)
    assert sorted(p["downsample_factor"] for p in points) == [4, 8]
    for p in points:
        assert Path(p["run_dir"]).is_dir() and (sweep_dir / f"{p['job_num']}-{p['first_stage']}" / "run").is_dir()
