"""The trainer end to end with the real DeepSpeed engine on CPU (gloo) under torchrun --nproc_per_node 2.

Default suite: one ZeRO-2 run that must learn, export CompVis-layout weights (EMA != raw), log to an
offline W&B run that agrees with stats.jsonl, and draw a sample grid. The rest is marked slow (each
torchrun start costs ~30-60 s on a shared 2-core machine).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.ldm_train import wandb_reader
from tests.ldm_train.trainer.helpers import only_run_dir, read_stats, run_trainer, tiny_overrides

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


def _losses(run_dir: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in read_stats(run_dir)}


def _initial_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from omegaconf import OmegaConf

    from ldm_train.build import build_ldm

    cfg = OmegaConf.load(run_dir / "config.yaml")
    torch.manual_seed(cfg.train.seed)  # the trainer builds the model right after seeding with train.seed
    return build_ldm(cfg).state_dict()


def _check_learned_and_exported(run_dir: Path, steps: int) -> None:
    losses = _losses(run_dir)
    assert sorted(losses) == list(range(1, steps + 1))
    first, last = [losses[s] for s in (1, 2, 3)], [losses[s] for s in (steps - 2, steps - 1, steps)]
    assert sum(last) / 3 < 0.9 * sum(first) / 3, losses  # the loss falls

    step_dir = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    raw, ema = load_file(str(step_dir / "model.safetensors")), load_file(str(step_dir / "model_ema.safetensors"))
    assert raw.keys() == ema.keys()
    assert all(k.startswith(("model.diffusion_model.", "cond_stage_model.")) for k in raw)
    assert "cond_stage_model.transformer.to_logits.weight" in raw
    init = _initial_weights(run_dir)
    assert init.keys() == raw.keys()
    # the EMA lags the weights: it differs from them, and sits between the start and the current weights
    trained = [k for k in raw if not torch.equal(raw[k], init[k])]
    assert len(trained) > len(raw) // 2
    diff_raw = sum((ema[k] - raw[k]).abs().sum().item() for k in trained)
    diff_init = sum((init[k] - raw[k]).abs().sum().item() for k in trained)
    assert 0 < diff_raw < diff_init
    meta = json.loads((step_dir / "meta.json").read_text())
    assert meta["step"] == steps and meta["world_size"] == 2
    assert (step_dir / "config.yaml").is_file() and (step_dir / "tokenizer").is_dir()


def test_zero2_two_processes_learn_export_and_log(latents_root: Path, tmp_path: Path):
    steps = 16
    runs = tmp_path / "runs"
    proc = run_trainer(tiny_overrides(latents_root, runs, **{
        "deepspeed": "zero2", "train.total_samples": 8 * steps, "logger.mode": "offline",
        "train.sampling.every_samples": 8 * 8, "train.sampling.steps": 4, "train.checkpoint.every_samples": 8 * 8,
    }), port=29631)
    run_dir = only_run_dir(runs)
    assert run_dir.name == "00000-tiny-tiny_kl_f4-gpus2-batch8"
    _check_learned_and_exported(run_dir, steps)
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_0000008", "step_0000016"]

    stats = read_stats(run_dir)
    for key in ("loss", "lr", "grad_norm", "samples_per_s", "tflops_per_gpu", "mfu", "data_wait_share",
                "samples_seen", "skipped_steps"):
        assert key in stats[-1], key
    assert stats[-1]["samples_seen"] == 8 * steps and stats[-1]["skipped_steps"] == 0
    # the console's rate is stats.jsonl's, from the first interval on (no "nan samples/s | ETA ?")
    line = re.compile(r"^step (\d+) \|.* \| (\S+) samples/s \| ETA (\S+)$", re.M)
    console = {int(step): (rate, eta) for step, rate, eta in line.findall(proc.stdout)}
    logged = [row for row in stats if "samples_per_s" in row]
    assert sorted(console) == [row["step"] for row in logged], proc.stdout[-3000:]
    for row in logged:
        rate, eta = console[row["step"]]
        assert rate == f"{row['samples_per_s']:.1f}" and row["samples_per_s"] > 0 and eta != "?", (row, rate, eta)
    reader = wandb_reader
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    (wandb_log,) = (run_dir / "wandb").glob(f"offline-run-*/run-{run_id}.wandb")
    history = reader.history(wandb_log)
    for row in stats:
        for key in ("loss", "lr", "grad_norm"):
            assert history[row["step"]][key] == pytest.approx(row[key], rel=1e-6)
    grid = history[8]  # the sample grid drawn at step 8 (before the step, with the EMA weights)
    assert grid["samples/count"] == 4
    for name in grid["samples/filenames"]:
        assert (wandb_log.parent / "files" / name).is_file()
    # the same 4 samples as one grid image of 2 x 2 tiles
    assert (grid["samples_grid/width"], grid["samples_grid/height"]) == (2 * grid["samples/width"],
                                                                        2 * grid["samples/height"])
    assert (wandb_log.parent / "files" / grid["samples_grid/path"]).is_file()
    assert (run_dir / "samples" / "samples-000000008.png").is_file()
    assert (run_dir / "samples" / "samples-000000016.png").is_file()  # the final weights' grid


@pytest.mark.slow
def test_zero3_two_processes_learn_and_export(latents_root: Path, tmp_path: Path):
    steps = 16
    runs = tmp_path / "runs"
    run_trainer(tiny_overrides(latents_root, runs, deepspeed="zero3", **{"train.total_samples": 8 * steps}),
                port=29632)
    _check_learned_and_exported(only_run_dir(runs), steps)


@pytest.mark.slow
def test_stop_and_resume_equals_uninterrupted_run(latents_root: Path, tokenizer_dir: Path, tmp_path: Path):
    steps = 8
    args = {"train.total_samples": 8 * steps, "train.optim.warmup_samples": 32,  # warm-up spans the stop
            "text_encoder.tokenizer": str(tokenizer_dir)}
    run_trainer(tiny_overrides(latents_root, tmp_path / "a", run_name="a", **args), port=29633)
    run_trainer(tiny_overrides(latents_root, tmp_path / "b", run_name="b", **args, **{"train.max_steps": 3}),
                port=29634)
    run_b = tmp_path / "b" / "tiny" / "b"
    assert max(_losses(run_b)) == 3
    proc = run_trainer(tiny_overrides(latents_root, tmp_path / "b", run_name="b", **args), port=29635)
    assert "resumed" in proc.stdout and "at step 3" in proc.stdout
    a, b = _losses(tmp_path / "a" / "tiny" / "a"), _losses(run_b)
    assert sorted(b) == list(range(1, steps + 1))
    assert [b[s] for s in sorted(b)] == [a[s] for s in sorted(a)]  # bit-identical (fp32, ZeRO-2, gloo)
    ema_a = load_file(str(tmp_path / "a" / "tiny" / "a" / "checkpoints" / "step_0000008" / "model_ema.safetensors"))
    ema_b = load_file(str(run_b / "checkpoints" / "step_0000008" / "model_ema.safetensors"))
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)


@pytest.mark.slow
def test_world_size_two_checkpoint_resumes_at_world_size_one(latents_root: Path, tmp_path: Path):
    runs = tmp_path / "runs"
    args = {"run_name": "ws", "train.total_samples": 8 * 6}
    run_trainer(tiny_overrides(latents_root, runs, **args, **{"train.max_steps": 4}), port=29636)
    proc = run_trainer(tiny_overrides(latents_root, runs, **args), nproc=1)
    assert "via a universal checkpoint" in proc.stdout and "at step 4" in proc.stdout
    run_dir = runs / "tiny" / "ws"
    assert (run_dir / "checkpoints" / "step_0000004_universal" / "zero").is_dir()  # optimizer state, per parameter
    norm = float(proc.stdout.split("AdamW exp_avg norm ")[1].split()[0])
    assert norm > 0  # the optimizer state came back through the universal checkpoint
    losses = _losses(run_dir)
    assert sorted(losses) == list(range(1, 7))
    meta = json.loads((run_dir / "checkpoints" / "step_0000006" / "meta.json").read_text())
    assert meta["world_size"] == 1 and meta["step"] == 6
