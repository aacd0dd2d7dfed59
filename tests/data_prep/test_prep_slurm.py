"""slurm/prep_latents.sh: a 3-task SLURM array over 6 input shards == one process outside SLURM."""
from __future__ import annotations

import json
import os
import subprocess

import pytest
from conftest import REPO, read_all_shards

from data_prep.synthetic import write_synthetic

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def test_array_of_3_equals_one_process(slurm_cluster, tmp_path):
    raw = tmp_path / "raw"
    write_synthetic(str(raw), num_samples=48, resolution=32, shard_size=8)  # 6 input shards
    common = [f"input={raw}", "resolution=32", "allow_random_first_stage=true", "num_workers=0",
              "batch_size=8", "progress=false"]
    env = {"OMP_NUM_THREADS": "1", "LDM_REPO": str(REPO), "PYTHONUNBUFFERED": "1"}

    logs = tmp_path / "logs"
    logs.mkdir()
    job = slurm_cluster.sbatch("slurm/prep_latents.sh", args=[*common, f"output={tmp_path / 'array'}"], env=env,
                               sbatch_args=["--array=0-2", f"--output={logs}/prep-%A_%a.out"], cwd=REPO)
    state = slurm_cluster.wait(job, timeout=420)
    log_text = "\n".join(p.read_text() for p in sorted(logs.glob("*.out")))
    assert state == "COMPLETED", f"array {job} ended {state}\n{log_text[-6000:]}"
    assert slurm_cluster.job_states(job) == {f"{job}_{i}": "COMPLETED" for i in range(3)}
    reports = [json.loads(line) for line in log_text.splitlines() if line.startswith('{"output"')]
    assert sorted(r["task"] for r in reports) == ["0/3", "1/3", "2/3"]
    assert all(r["encoded_shards"] == 2 and r["samples"] == 16 for r in reports)

    clean_env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(["bash", "slurm/prep_latents.sh", *common, f"output={tmp_path / 'one'}"], cwd=REPO,
                          env={**clean_env, **env}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "no SLURM: 1 process" in proc.stdout

    a = json.loads((tmp_path / "array" / "tiny_kl_f4" / "manifest.json").read_text())
    b = json.loads((tmp_path / "one" / "tiny_kl_f4" / "manifest.json").read_text())
    for key in ("num_samples", "num_shards", "shards", "skipped", "latent_shape", "stored", "first_stage"):
        assert a[key] == b[key], key
    assert a["num_samples"] == 48
    assert a["scale_factor"] == pytest.approx(b["scale_factor"], rel=1e-3)
    ka = sorted(s["key"] for s in read_all_shards(tmp_path / "array" / "tiny_kl_f4"))
    kb = sorted(s["key"] for s in read_all_shards(tmp_path / "one" / "tiny_kl_f4"))
    assert ka == kb == [f"{i:09d}" for i in range(48)]
