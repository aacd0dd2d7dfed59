"""Helpers of the first-stage trainer tests: composed configs and reading stats.jsonl."""
from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def ae_cfg(run_root: Path, data: dict[str, str], *overrides: str, resolution: int = 16):
    """conf/train_autoencoder.yaml composed (typed) for a small CPU run (no W&B unless asked, LPIPS off)."""
    from ldm_train.app import compose
    from ldm_train.first_stage.config import AutoencoderAppConfig

    base = [f"data.input={data['train']}", f"data.heldout={data['heldout']}", f"runs_root={run_root}",
            "run_name=run", "logger=disabled", f"first_stage.ddconfig.resolution={resolution}",
            f"data.resolution={resolution}", "first_stage.lossconfig.perceptual_weight=0", "data.num_workers=1",
            "data.shuffle_buffer=16", "first_stage.lossconfig.disc_num_layers=2", "train.micro_batch=4",
            "train.optim.base_lr=2.5e-4", "train.log_every=1", "train.image_every=1000", "train.eval_every=1000",
            "train.eval_images=8", "train.checkpoint.every_steps=1000"]
    return compose("train_autoencoder", AutoencoderAppConfig, base + list(overrides))


def stats(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
