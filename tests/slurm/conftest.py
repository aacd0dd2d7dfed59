"""Session fixtures of the cluster-path tests, built once and shared, each stage on the local SLURM cluster:

    slurm_latents      synthetic shards -> slurm/prep_latents.sh array -> finalize job -> manifest.json
    slurm_train_run    slurm/train_txt2img.sh, experiment=tiny on 2 nodes x 1 task -> a checkpoint

A fixture whose stage script has not landed skips, naming the missing file. The first stage everywhere is a
random-init tiny preset exported as safetensors (export_random_first_stage): plumbing weights, a real file.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.slurm_cluster import LocalSlurmCluster

from .helpers import REPO, job_logs, require, submit, submit_and_wait

SYNTH_SAMPLES, SYNTH_SHARD = 64, 16  # 4 input shards of 64 px images
PREP_TASKS = 2


@pytest.fixture(autouse=True)
def _no_jobs_left_behind(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test that fails mid-way must not leave jobs queued on the shared session cluster for the next one."""
    yield
    if "slurm_cluster" in request.fixturenames:
        request.getfixturevalue("slurm_cluster").cancel_all()


@dataclass
class Latents:
    work: Path
    raw: Path  # synthetic input shards 000000.tar ...
    root: Path  # latents root: <root>/<first_stage>/shard-*.tar + manifest.json
    first_stage: str
    checkpoint: Path
    prep_job: str
    finalize_job: str

    @property
    def shards(self) -> Path:
        return self.root / self.first_stage


def export_random_first_stage(name: str, path: Path) -> Path:
    """A random-init first stage of preset `name` saved like ldm_train.train_autoencoder's export (plumbing only:
    a real file lets every stage take the same first_stage.checkpoint as in production)."""
    code = f"""
import torch
from data_prep.config import EncodeConfig
from ldm_train.app import compose
from ldm_train.models.autoencoder import build_first_stage
from ldm_train.checkpoints.first_stage import export_first_stage
torch.manual_seed(0)
cfg = compose("encode", EncodeConfig, ["first_stage={name}", "input=unused"])
export_first_stage(build_first_stage(cfg.first_stage), {str(path)!r})
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=300)
    return path


def write_synthetic(raw: Path, num_samples: int = SYNTH_SAMPLES, shard_size: int = SYNTH_SHARD) -> None:
    subprocess.run([sys.executable, "-m", "data_prep.synthetic", f"output={raw}", f"num_samples={num_samples}",
                    "resolution=64", f"shard_size={shard_size}"], check=True, cwd=REPO, timeout=300,
                   capture_output=True)


def prep_latents(cluster: LocalSlurmCluster, work: Path, raw: Path, root: Path, first_stage: str,
                 checkpoint: Path, tasks: int = PREP_TASKS) -> tuple[str, str]:
    """slurm/prep_latents.sh as an array of `tasks`, then `data_prep.finalize` as a dependent job; writes
    <root>/<first_stage>/; job logs go to <work>/logs."""
    prep = submit(cluster, "slurm/prep_latents.sh",
                  [f"input={raw}", f"output={root}", f"first_stage={first_stage}",
                   f"first_stage.checkpoint={checkpoint}", "resolution=64", "finalize=false", "num_workers=0",
                   "batch_size=16", "progress=false"],
                  work, [f"--array=0-{tasks - 1}", "--job-name=prep", "--cpus-per-task=1", "--time=10"])
    fin = submit(cluster, None, [], work,
                 [f"--dependency=afterok:{prep}", "--kill-on-invalid-dep=yes", "--job-name=finalize",
                  f"--wrap=python -m data_prep.finalize output={root} first_stage={first_stage}"])
    for job in (prep, fin):
        state = cluster.wait(job, timeout=300)
        assert state == "COMPLETED", f"job {job} ended {state}\n{job_logs(work)}"
    return prep, fin


@pytest.fixture(scope="session")
def slurm_latents(slurm_cluster: LocalSlurmCluster, tmp_path_factory: pytest.TempPathFactory) -> Latents:
    require("slurm/prep_latents.sh", "data_prep/encode.py", "data_prep/finalize.py")
    work = tmp_path_factory.mktemp("prep")
    raw = work / "raw"
    write_synthetic(raw)
    ckpt = export_random_first_stage("tiny_kl_f4", work / "first_stage" / "tiny_kl_f4.safetensors")
    lat = Latents(work, raw, work / "latents", "tiny_kl_f4", ckpt, "", "")
    lat.prep_job, lat.finalize_job = prep_latents(slurm_cluster, work, raw, lat.root, "tiny_kl_f4", ckpt)
    return lat


# A few optimizer steps of the tiny experiment: global batch 8 = micro 4 x 2 ranks, no sample grids.
TINY_TRAIN_ARGS = [
    "experiment=tiny", "train.global_batch=8", "train.micro_batch=4", "train.log_every_samples=8",
    "train.sampling.every_samples=0", "data.num_workers=0", "data.shuffle_buffer=16",
]


@dataclass
class TrainRun:
    run_dir: Path
    job: str
    work: Path


@pytest.fixture(scope="session")
def slurm_train_run(slurm_cluster: LocalSlurmCluster, slurm_latents: Latents,
                    tmp_path_factory: pytest.TempPathFactory) -> TrainRun:
    require("slurm/train_txt2img.sh", "ldm_train/train.py")
    work = tmp_path_factory.mktemp("train")
    args = [*TINY_TRAIN_ARGS, f"data.latents_root={slurm_latents.root}", f"runs_root={work / 'runs'}",
            "run_name=two-nodes", "train.total_samples=32", f"first_stage.checkpoint={slurm_latents.checkpoint}"]
    job = submit_and_wait(slurm_cluster, "slurm/train_txt2img.sh", args, work, timeout=420,
                          sbatch_args=["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=1",
                                       "--cpus-per-task=1", "--time=10"])
    return TrainRun(work / "runs" / "tiny" / "two-nodes", job, work)
