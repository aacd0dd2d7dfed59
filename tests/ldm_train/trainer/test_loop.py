"""The training loop in this process (no launcher, no subprocess): the tiny model on tiny latent shards, the real
DeepSpeed engine on CPU. The loop runs the steps it promises, its logged loss is ``training_loss`` of the batches it
drew and falls, and it writes the checkpoints and the summary it promises."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from tests.ldm_train.trainer.helpers import (
    LAUNCH_VARS,
    TORCH_EXTENSIONS_DIR,
    only_run_dir,
    read_stats,
    tiny_overrides,
    write_latent_shards,
)

pytestmark = pytest.mark.integration  # starts processes or servers

STEPS = 10
BATCH = 4  # global batch: 2 micro-batches of 2


@pytest.fixture
def in_process(monkeypatch: pytest.MonkeyPatch):
    """What ``trainer_env`` gives a trainer subprocess, for this one; one intra-op thread (a shared CI core). The
    launch variables the trainer's 1-process group sets (MASTER_ADDR, MASTER_PORT) are taken out again after."""
    launch = {var: os.environ.pop(var) for var in LAUNCH_VARS if var in os.environ}
    for var, value in {"DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": TORCH_EXTENSIONS_DIR,
                       "TOKENIZERS_PARALLELISM": "false", "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1"}.items():
        monkeypatch.setenv(var, value)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    for var in LAUNCH_VARS:
        os.environ.pop(var, None)
    os.environ.update(launch)


def _first_step_loss(cfg, trainer) -> float:
    """Step 1's loss recomputed outside the loop: the model as the trainer builds it, the loader's first
    ``accumulation`` micro-batches, the trainer's generator from its seed, ``training_loss`` of each."""
    from ldm_train.build import build_ldm
    from ldm_train.data.latents import build_latent_loader, sample_latents
    from ldm_train.data.tokenizer import BatchTokenizer
    from ldm_train.diffusion.step import draw_t_and_noise, training_loss
    from ldm_train.trainer.build import label_spec

    torch.manual_seed(cfg.train.seed)
    model = build_ldm(cfg).train()
    loader = build_latent_loader(cfg.data, cfg.first_stage, cfg.unet,
                                 BatchTokenizer(trainer.tokenizer, int(cfg.text_encoder.max_seq_len)), 0, 1,
                                 labels=label_spec(trainer.cond))
    gen = torch.Generator().manual_seed(cfg.train.seed * 1000)
    batches = iter(loader)
    losses = []
    with torch.no_grad():
        for _ in range(trainer.d.accumulation):
            batch = next(batches)
            z0 = sample_latents(batch["moments"], trainer.scale_factor, gen)
            t, noise = draw_t_and_noise(z0, cfg.train.diffusion.timesteps, cfg.train.diffusion.offset_noise, gen)
            losses.append(training_loss(model, z0, batch["tokens"], t, noise))
    return float(sum(losses)) / len(losses)


def test_the_loop_runs_its_steps_logs_the_step_loss_that_falls_and_writes_checkpoints(tmp_path: Path,
                                                                                         in_process) -> None:
    from ldm_train.app import compose
    from ldm_train.trainer.config import TrainAppConfig
    from ldm_train.trainer.loop import Trainer

    latents, runs = tmp_path / "latents", tmp_path / "runs"
    write_latent_shards(latents / "tiny_kl_f4", 128)
    overrides = tiny_overrides(latents, runs, **{
        "train.global_batch": BATCH, "train.micro_batch": BATCH // 2, "train.log_every_samples": BATCH,
        "train.total_samples": BATCH * STEPS, "train.checkpoint.every_samples": BATCH * STEPS // 2, "run_name": "loop"})
    cfg = compose("train", TrainAppConfig, overrides)
    trainer = Trainer(cfg)
    try:
        assert trainer.step == 0 and trainer.d.accumulation == 2 and trainer.d.total_steps == STEPS
        assert trainer.run() == 0
    finally:
        trainer.close()
    assert trainer.step == STEPS and trainer.samples_seen == BATCH * STEPS

    run_dir = only_run_dir(runs)
    losses = {row["step"]: row["loss"] for row in read_stats(run_dir) if "loss" in row}
    assert sorted(losses) == list(range(1, STEPS + 1))  # one row per step (log_every_samples = global_batch)
    assert all(math.isfinite(v) for v in losses.values())
    assert losses[1] == pytest.approx(_first_step_loss(cfg, trainer), rel=1e-5)
    first, last = sum(losses[s] for s in (1, 2, 3)) / 3, sum(losses[s] for s in range(STEPS - 2, STEPS + 1)) / 3
    assert last < 0.9 * first, losses

    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*")) == [f"step_{STEPS // 2:07d}", f"step_{STEPS:07d}"]
    assert (ckpts / "latest").read_text().strip() == f"step_{STEPS:07d}"
    meta = json.loads((ckpts / f"step_{STEPS:07d}" / "meta.json").read_text())
    assert meta["step"] == STEPS and meta["samples_seen"] == BATCH * STEPS and meta["world_size"] == 1
    assert (ckpts / f"step_{STEPS:07d}" / "model_ema.safetensors").is_file()
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["samples_seen"] == summary["samples_this_session"] == BATCH * STEPS
