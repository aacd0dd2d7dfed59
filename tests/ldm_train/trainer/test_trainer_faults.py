"""Preemption, the numerical guard, and the multirun sweep over first stages (all slow: real DeepSpeed starts)."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from tests.ldm_train.trainer.helpers import REPO, read_stats, run_trainer, tiny_overrides, trainer_env

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]


def _wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"trainer exited ({proc.returncode}) before {what}:\n{proc.stdout.read()[-4000:]}")
        time.sleep(0.5)
    tail = ""
    if proc is not None:
        proc.kill()
        tail = ":\n" + proc.communicate(timeout=60)[0][-4000:]
    raise AssertionError(f"timed out after {timeout} s waiting for {what}{tail}")


def test_sigusr1_checkpoints_exits_cleanly_and_the_next_start_resumes(latents_root: Path, tmp_path: Path):
    runs = tmp_path / "runs"
    args = tiny_overrides(latents_root, runs, run_name="pre", **{"train.total_samples": 8 * 1000})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29641",
           "-m", "ldm_train.train", *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=trainer_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    run_dir = runs / "tiny" / "pre"
    try:
        _wait_for(lambda: (run_dir / "stats.jsonl").is_file() and len(read_stats(run_dir)) >= 3, 400,
                  "three logged steps", proc)
        workers = psutil.Process(proc.pid).children()
        assert len(workers) == 2
        workers[1].send_signal(signal.SIGUSR1)  # one rank only: the stop flag is all-reduced
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-4000:]
    assert "got SIGUSR1" in out
    stopped = int((run_dir / "checkpoints" / "latest").read_text().strip().removeprefix("step_"))
    assert 3 <= stopped < 1000
    assert max(row["step"] for row in read_stats(run_dir)) == stopped  # the interrupted step was finished
    # a shorter run than the one interrupted: the length is pinned, so the test accepts its change explicitly
    resumed = run_trainer(tiny_overrides(latents_root, runs, run_name="pre",
                                         **{"train.total_samples": 8 * (stopped + 2)})
                          + ["train.allow_changed=[train.total_samples]"], port=29642)
    assert f"at step {stopped}" in resumed.stdout
    assert [row["step"] for row in read_stats(run_dir)][-2:] == [stopped + 1, stopped + 2]


def test_sigterm_to_every_process_of_the_job_checkpoints_and_resumes_the_same_curve(
        latents_root: Path, tokenizer_dir: Path, tmp_path: Path):
    """scancel and SLURM preemption: SIGTERM to every process of the step, DataLoader workers included.

    Each rank and its loader worker get the signal, as srun's tasks would (torchrun itself is spared: under
    SLURM srun starts the ranks, and torchrun's own SIGTERM path forwards the signal and exits 1 whatever the
    ranks do). The job finishes its step, checkpoints and exits 0 like SIGUSR1; the resumed losses equal an
    uninterrupted run's."""
    steps = 20
    args = {"data.num_workers": 1, "train.total_samples": 8 * steps, "text_encoder.tokenizer": str(tokenizer_dir)}
    run_trainer(tiny_overrides(latents_root, tmp_path / "a", run_name="a", **args), port=29643)
    runs = tmp_path / "b"
    overrides = tiny_overrides(latents_root, runs, run_name="b", **args)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29644",
           "-m", "ldm_train.train", *overrides]
    proc = subprocess.Popen(cmd, cwd=REPO, env=trainer_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    run_dir = runs / "tiny" / "b"
    try:
        _wait_for(lambda: (run_dir / "stats.jsonl").is_file() and len(read_stats(run_dir)) >= 2, 400,
                  "two logged steps", proc)
        job = psutil.Process(proc.pid).children(recursive=True)
        assert len(job) >= 4, job  # two ranks, a loader worker each
        for p in job:
            p.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-4000:]
    assert "got SIGTERM" in out and "killed by signal" not in out, out[-4000:]
    stopped = int((run_dir / "checkpoints" / "latest").read_text().strip().removeprefix("step_"))
    assert 2 <= stopped < steps
    resumed = run_trainer(overrides, port=29645)
    assert f"at step {stopped}" in resumed.stdout
    a = {row["step"]: row["loss"] for row in read_stats(tmp_path / "a" / "tiny" / "a")}
    b = {row["step"]: row["loss"] for row in read_stats(run_dir)}
    assert sorted(b) == sorted(a) == list(range(1, steps + 1))
    assert [b[s] for s in sorted(b)] == [a[s] for s in sorted(a)]  # bit-identical across the stop


def test_nonfinite_steps_are_skipped_counted_and_k_in_a_row_abort(latents_root: Path, tmp_path: Path):
    runs = tmp_path / "runs"
    overrides = tiny_overrides(latents_root, runs, run_name="nan", **{
        "train.total_samples": 8 * 20, "train.checkpoint.every_samples": 8, "train.checkpoint.keep_last": 50,
        "train.guard.max_consecutive_skips": 3, "train.guard.inject_nan_at_steps": "[1,5,6,7]",
    })
    proc = run_trainer(overrides, nproc=1, check=False)
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "3 optimizer steps in a row were skipped" in proc.stderr
    ck = runs / "tiny" / "nan" / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step_0000008"  # the abort checkpoint

    def weights(step: int) -> dict[str, torch.Tensor]:
        return load_file(str(ck / f"step_{step:07d}" / "model.safetensors"))

    def same(a: dict, b: dict) -> bool:
        return all(torch.equal(a[k], b[k]) for k in a)

    assert same(weights(1), weights(2))  # step 2 (index 1) was skipped: nothing moved
    assert not same(weights(2), weights(3))
    assert same(weights(5), weights(8))  # the abort checkpoint holds the last good state
    stats = {row["step"]: row for row in read_stats(runs / "tiny" / "nan")}
    assert stats[2]["skipped_steps"] == 1 and stats[2]["nonfinite_losses"] >= 1 and stats[3]["skipped_steps"] == 1
    assert json.loads((ck / "step_0000008" / "meta.json").read_text())["step"] == 8


def test_multirun_sweeps_first_stage_one_job_each(latents_root: Path, tmp_path: Path):
    runs = tmp_path / "runs"
    overrides = tiny_overrides(latents_root, runs, **{"train.total_samples": 8 * 2})
    overrides = [o for o in overrides if not o.startswith("experiment=")]
    cmd = [sys.executable, "-m", "ldm_train.train", "-m", "experiment=tiny", "first_stage=tiny_kl_f4,tiny_kl_f8",
           "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=15", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=trainer_env(), capture_output=True, text=True, timeout=800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    dirs = sorted(p.name for p in (runs / "tiny").iterdir() if not p.name.startswith("_"))
    # the jobs run in parallel: which one takes index 00000 is a race, the names after it are not
    assert sorted(d.split("-", 1)[1] for d in dirs) == ["tiny-tiny_kl_f4-gpus1-batch8", "tiny-tiny_kl_f8-gpus1-batch8"]
    for name, z, side in (("tiny_kl_f4", 3, 16), ("tiny_kl_f8", 4, 8)):
        (run_dir,) = [runs / "tiny" / d for d in dirs if name in d]
        ema = load_file(str(run_dir / "checkpoints" / "step_0000002" / "model_ema.safetensors"))
        assert ema["model.diffusion_model.input_blocks.0.0.weight"].shape[1] == z  # in_channels follow f
        assert f"shards: {latents_root}/{name}" in (run_dir / "config.yaml").read_text()
        assert f"image_size: {side}" in (run_dir / "config.yaml").read_text()
    assert list((runs / "_sweeps" / "tiny").glob("*/.submitit"))  # one submitit job folder per point
