"""slurm/prep_latents.sh as a SLURM array over synthetic shards, then data_prep.finalize as a dependent job."""

from __future__ import annotations

import json
import tarfile

import pytest

from tests.slurm_cluster import LocalSlurmCluster

from .conftest import PREP_TASKS, SYNTH_SAMPLES, SYNTH_SHARD, Latents

pytestmark = [pytest.mark.integration, pytest.mark.slurm, pytest.mark.slow]


def test_array_tasks_encode_every_shard_and_finalize_writes_manifest(
        slurm_cluster: LocalSlurmCluster, slurm_latents: Latents) -> None:
    job = slurm_latents.prep_job
    assert slurm_cluster.job_states(job) == {f"{job}_{i}": "COMPLETED" for i in range(PREP_TASKS)}
    n_shards = SYNTH_SAMPLES // SYNTH_SHARD
    shards = sorted(p.name for p in slurm_latents.shards.glob("shard-*.tar"))
    assert shards == [f"shard-{j:06d}.tar" for j in range(n_shards)]

    manifest = json.loads((slurm_latents.shards / "manifest.json").read_text())
    assert manifest["num_samples"] == SYNTH_SAMPLES
    assert manifest["num_shards"] == n_shards
    assert manifest["first_stage"]["name"] == "tiny_kl_f4"
    assert manifest["stored"] == "moments"

    # Every synthetic image is in exactly one latent shard, under its source key.
    keys = []
    for name in shards:
        with tarfile.open(slurm_latents.shards / name) as tar:
            keys += sorted({m.name.split(".", 1)[0] for m in tar.getmembers()})
    raw_keys = []
    for j in range(n_shards):
        with tarfile.open(slurm_latents.raw / f"{j:06d}.tar") as tar:
            raw_keys += sorted({m.name.split(".", 1)[0] for m in tar.getmembers() if m.name.endswith(".jpg")})
    assert sorted(keys) == sorted(raw_keys) and len(set(keys)) == SYNTH_SAMPLES


def test_each_task_took_its_own_shards(slurm_latents: Latents) -> None:
    # Task i of n encodes input shards j with j % n == i: each array task's log ends with its JSON report.
    n_shards = SYNTH_SAMPLES // SYNTH_SHARD
    for i in range(PREP_TASKS):
        log = slurm_latents.work / "logs" / f"prep_latents-{slurm_latents.prep_job}_{i}.out"
        reports = [json.loads(line) for line in log.read_text().splitlines() if line.startswith('{"output"')]
        assert reports, log.read_text()[-2000:]
        assert reports[-1]["task"] == f"{i}/{PREP_TASKS}"
        assert reports[-1]["encoded_shards"] == len(range(i, n_shards, PREP_TASKS))
        assert reports[-1]["samples"] == SYNTH_SHARD * len(range(i, n_shards, PREP_TASKS))


def test_plain_bash_one_process_equals_the_array(slurm_latents: Latents, tmp_path) -> None:
    # The same script outside SLURM runs one process over every shard and writes the same shards and manifest.
    import os
    import subprocess

    from .helpers import REPO

    out = tmp_path / "one"
    args = [f"input={slurm_latents.raw}", f"output={out}", f"first_stage={slurm_latents.first_stage}",
            f"first_stage.checkpoint={slurm_latents.checkpoint}", "resolution=64", "num_workers=0",
            "batch_size=16", "progress=false"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(["bash", "slurm/prep_latents.sh", *args], cwd=REPO, capture_output=True, text=True,
                          env={**env, "OMP_NUM_THREADS": "1", "LDM_REPO": str(REPO), "PYTHONUNBUFFERED": "1"},
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "no SLURM: 1 process" in proc.stdout
    a = json.loads((slurm_latents.shards / "manifest.json").read_text())
    b = json.loads((out / slurm_latents.first_stage / "manifest.json").read_text())
    for key in ("num_samples", "num_shards", "shards", "skipped", "latent_shape", "stored", "first_stage"):
        assert a[key] == b[key], key
    assert a["scale_factor"] == pytest.approx(b["scale_factor"], rel=1e-3)

    def keys(folder) -> list[str]:
        found = []
        for shard in sorted(folder.glob("shard-*.tar")):
            with tarfile.open(shard) as tar:
                found += sorted({m.name.split(".", 1)[0] for m in tar.getmembers()})
        return sorted(found)

    assert keys(slurm_latents.shards) == keys(out / slurm_latents.first_stage)
    assert len(keys(out / slurm_latents.first_stage)) == SYNTH_SAMPLES
