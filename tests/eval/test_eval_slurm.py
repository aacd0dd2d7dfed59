"""slurm/eval.sh on the local SLURM cluster with a tiny export: sampling as a 2-task srun step over 2 nodes,
metrics as a one-task step; the PNGs equal those of a plain one-process run (same seeds, same batches)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]


def _args(export: str, raw: Path, out: Path) -> list[str]:
    return [f"checkpoint={export}", f"prompts={raw}", "num_samples=4", "steps=2", "batch_size=2",
            "guidance_scale=2.0", f"output_dir={out}", "progress=false", f"reference.path={raw}",
            "reference.num_images=8", "metrics.extractor=random-init", "metrics.save_cpu_ram=true"]


def test_eval_sh_two_tasks_on_slurm_equals_one_process(slurm_cluster, tiny_export, tmp_path) -> None:
    from data_prep.synthetic import write_synthetic

    raw = tmp_path / "raw"
    write_synthetic(str(raw), 8, resolution=32, shard_size=4)
    env = {"WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "LDM_REPO": str(REPO), "HF_HUB_OFFLINE": "1"}
    log = tmp_path / "eval-%j.out"
    job = slurm_cluster.sbatch(REPO / "slurm" / "eval.sh", _args(tiny_export, raw, tmp_path / "slurm"), env=env,
                               sbatch_args=["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1",
                                            f"--output={log}", "--time=10"], cwd=REPO)
    state = slurm_cluster.wait(job, timeout=420)
    logs = "\n".join(p.read_text() for p in tmp_path.glob("eval-*.out"))
    assert state == "COMPLETED", logs
    assert "sampling on 2 task(s)" in logs and "on 2 process(es)" in logs
    metrics = json.loads((tmp_path / "slurm" / "metrics.json").read_text())
    assert metrics["sampling"]["world_size"] == 2
    assert metrics["feature_extractor"] == "random-init-plumbing-only" and metrics["per_scale"][0]["fid"] > 0

    local = tmp_path / "local"
    cmd = [sys.executable, "-m", "eval.run", *_args(tiny_export, raw, local), "stage=sample"]
    subprocess.run(cmd, cwd=REPO, env={**os.environ, **env}, check=True, timeout=300)

    def digests(d: Path) -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.glob("*.png"))}

    assert digests(tmp_path / "slurm" / "samples" / "gs2") == digests(local / "samples" / "gs2")
    assert len(digests(local / "samples" / "gs2")) == 4
