"""slurm/eval.sh on the local cluster: sampling from the 2-node training run's export, then metrics.json."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.slurm_cluster import LocalSlurmCluster

from .conftest import Latents, TrainRun
from .helpers import REPO, require, submit_and_wait

pytestmark = [pytest.mark.integration, pytest.mark.slurm, pytest.mark.slow]

NUM_SAMPLES = 4


def eval_args(run_dir: Path, latents: Latents, out: Path) -> list[str]:
    """A tiny eval: 4 samples, 2 DDIM steps, random-init feature extractors (plumbing only, flagged)."""
    return [f"checkpoint={run_dir}", f"prompts={latents.raw}", f"num_samples={NUM_SAMPLES}", "steps=2",
            "batch_size=2", "guidance_scale=2.0", f"output_dir={out}", "progress=false",
            f"reference.path={latents.raw}", "reference.num_images=8", "metrics.extractor=random-init",
            "metrics.save_cpu_ram=true"]


def test_eval_sh_samples_on_two_tasks_and_writes_metrics(
        slurm_cluster: LocalSlurmCluster, slurm_train_run: TrainRun, slurm_latents: Latents, tmp_path: Path) -> None:
    require("slurm/eval.sh", "eval/run.py")
    out = tmp_path / "eval"
    submit_and_wait(slurm_cluster, "slurm/eval.sh", eval_args(slurm_train_run.run_dir, slurm_latents, out),
                    tmp_path, sbatch_args=["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=1",
                                           "--cpus-per-task=1", "--time=10"], timeout=420)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["feature_extractor"] == "random-init-plumbing-only"
    (row,) = metrics["per_scale"]
    assert row["guidance_scale"] == 2.0 and row["num_samples"] == NUM_SAMPLES
    assert row["fid"] > 0
    pngs = sorted((out / "samples" / "gs2").glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(NUM_SAMPLES)]
    # It evaluated the checkpoint the SLURM training wrote (its EMA export), not some other file.
    weights = Path(metrics["checkpoint"]["path"])
    assert weights.is_relative_to(slurm_train_run.run_dir)
    assert metrics["checkpoint"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert metrics["sampling"]["world_size"] == 2
    logs = "\n".join(p.read_text(errors="replace") for p in sorted((tmp_path / "logs").glob("*")))
    assert "sampling on 2 task(s)" in logs and "on 2 process(es)" in logs

    # The same samples from one plain process (same seeds, same global batches): byte-identical PNGs.
    local = tmp_path / "local"
    cmd = [sys.executable, "-m", "eval.run", *eval_args(slurm_train_run.run_dir, slurm_latents, local), "stage=sample"]
    env = {"WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    subprocess.run(cmd, cwd=REPO, env={**os.environ, **env}, check=True, timeout=300)

    def digests(d: Path) -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.glob("*.png"))}

    assert digests(out / "samples" / "gs2") == digests(local / "samples" / "gs2")
