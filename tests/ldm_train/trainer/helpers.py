"""Helpers of the trainer tests: tiny latent shards, trainer command lines, reading what a run wrote."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.synthetic import COLOURS, sample_scene
from tests.latent_shards import write_latent_shards as write_shards

REPO = Path(__file__).resolve().parents[3]
TORCH_EXTENSIONS_DIR = os.path.expanduser("~/.cache/torch_extensions")


def _caption_and_colour(i: int, rng: np.random.Generator) -> tuple[str, tuple[int, int, int], str]:
    scene, _ = sample_scene(0, "train", i)
    return scene.caption, COLOURS[scene.colour], scene.position


def write_latent_shards(out_dir: Path, num_samples: int, shard_size: int = 64, name: str = "tiny_kl_f4",
                        z: int = 3, resolution: int = 64, f: int = 4, seed: int = 0) -> dict[str, Any]:
    """KL moments of a coloured blob placed and coloured as the synthetic caption says: learnable in a few steps."""
    side = resolution // f
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side] / side
    centres = {"center": (0.5, 0.5), "top left": (0.3, 0.3), "top right": (0.3, 0.7),
               "bottom left": (0.7, 0.3), "bottom right": (0.7, 0.7)}

    def make(i: int) -> tuple[str, np.ndarray, str, dict[str, Any]]:
        caption, rgb, position = _caption_and_colour(i, rng)
        cy, cx = centres.get(position, (0.5, 0.5))
        blob = ((yy - cy) ** 2 + (xx - cx) ** 2 < 0.06).astype(np.float32)
        value = (np.array(rgb[:z] if z <= 3 else list(rgb) * z, dtype=np.float32)[:z] / 127.5 - 1) * 2
        mean = blob[None] * value[:, None, None] + 0.05 * rng.standard_normal((z, side, side))
        logvar = np.full((z, side, side), -6.0)
        meta = {"source_key": f"{i:09d}", "original_size": [resolution] * 2}
        return f"{i:09d}", np.concatenate([mean, logvar]), caption, meta

    sizes = [min(shard_size, num_samples - start) for start in range(0, num_samples, shard_size)]
    return write_shards(out_dir, sizes, make, name=name, downsample_factor=f, z_channels=z, resolution=resolution)


def tiny_overrides(latents: Path, runs: Path, **extra: Any) -> list[str]:
    """A fast tiny run: small batches, frequent logs, checkpoints only when asked."""
    args = {
        "experiment": "tiny",
        "runs_root": str(runs),
        "data.latents_root": str(latents),
        "data.num_workers": 0,
        "train.global_batch": 8,
        "train.micro_batch": 4,
        "train.total_samples": 8 * 12,
        "train.log_every_samples": 8,
        "train.optim.warmup_samples": 0,
        "train.optim.base_lr": 1e-3,
        "train.checkpoint.every_samples": 0,
        "train.sampling.every_samples": 0,
        "logger.mode": "disabled",
    }
    args.update(extra)
    return [f"{k}={v}" for k, v in args.items()]


LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")


def trainer_env() -> dict[str, str]:
    # a launch variable left in this process (by an in-process test) would make the child look launched by torchrun
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(
        TORCH_EXTENSIONS_DIR=TORCH_EXTENSIONS_DIR, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false", WANDB_SILENT="true", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
    )
    return env


def run_trainer(overrides: list[str], nproc: int = 2, timeout: float = 300, port: int = 29611,
                check: bool = True) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node N -m ldm_train.train ...`` (1 process: plain python)."""
    if nproc == 1:
        cmd = [sys.executable, "-m", "ldm_train.train", *overrides]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(port), "-m", "ldm_train.train", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=trainer_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"trainer failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def read_stats(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines() if line.strip()]


def only_run_dir(runs: Path, experiment: str = "tiny") -> Path:
    dirs = [p for p in (runs / experiment).iterdir() if p.is_dir() and not p.name.startswith("_")]
    assert len(dirs) == 1, dirs
    return dirs[0]
