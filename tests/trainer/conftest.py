"""Fixtures of the trainer tests: latent shards whose content follows the caption, and a runner for the trainer.

The shards follow DESIGN.md "Latent shards" (KL moments [2z, h, w] float16, txt, json, manifest.json). The
latent mean is a blob whose per-channel value encodes the caption's colour on a background value, so a
text-conditional model can learn something in a few steps and the loss must fall.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import webdataset as wds

REPO = Path(__file__).resolve().parents[2]
TORCH_EXTENSIONS_DIR = os.path.expanduser("~/.cache/torch_extensions")

try:
    from data_prep.synthetic import COLOURS, sample_scene
except ImportError:  # data prep not installed: a fixed palette and caption form of the same shape
    COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 70, 220), "yellow": (240, 220, 40)}
    sample_scene = None


def _caption_and_colour(i: int, rng: np.random.Generator) -> tuple[str, tuple[int, int, int], str]:
    if sample_scene is not None:
        scene, _ = sample_scene(0, "train", i)
        return scene.caption, COLOURS[scene.colour], scene.position
    names = sorted(COLOURS)
    colour = names[i % len(names)]
    return f"a large {colour} circle in the center on a white background", COLOURS[colour], "center"


def write_latent_shards(out_dir: Path, num_samples: int, shard_size: int = 64, name: str = "tiny_kl_f4",
                        z: int = 3, resolution: int = 64, f: int = 4, seed: int = 0) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    side = resolution // f
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side] / side
    centres = {"center": (0.5, 0.5), "top left": (0.3, 0.3), "top right": (0.3, 0.7),
               "bottom left": (0.7, 0.3), "bottom right": (0.7, 0.7)}
    shards, index = [], 0
    for s in range((num_samples + shard_size - 1) // shard_size):
        shard = f"shard-{s:06d}.tar"
        n = min(shard_size, num_samples - index)
        with wds.TarWriter(str(out_dir / shard)) as sink:
            for _ in range(n):
                caption, rgb, position = _caption_and_colour(index, rng)
                cy, cx = centres.get(position, (0.5, 0.5))
                blob = ((yy - cy) ** 2 + (xx - cx) ** 2 < 0.06).astype(np.float32)
                value = (np.array(rgb[:z] if z <= 3 else list(rgb) * z, dtype=np.float32)[:z] / 127.5 - 1) * 2
                mean = blob[None] * value[:, None, None] + 0.05 * rng.standard_normal((z, side, side))
                logvar = np.full((z, side, side), -6.0)
                buf = io.BytesIO()
                np.save(buf, np.concatenate([mean, logvar]).astype(np.float16))
                sink.write({"__key__": f"{index:09d}", "latent.npy": buf.getvalue(), "txt": caption,
                            "json": json.dumps({"source_key": f"{index:09d}", "original_size": [resolution] * 2})})
                index += 1
        shards.append({"name": shard, "num_samples": n})
    manifest = {
        "schema_version": 1,
        "first_stage": {"name": name, "kind": "kl", "downsample_factor": f, "z_channels": z,
                        "checkpoint": None, "sha256": None},
        "resolution": resolution, "latent_shape": [2 * z, side, side], "stored": "moments",
        "num_samples": index, "num_shards": len(shards), "shards": shards,
        "mean": [0.0] * z, "std": [1.0] * z, "scale_factor": 1.0, "skipped": {},
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


@pytest.fixture(scope="session")
def latents_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """<root>/tiny_kl_f4 (z 3, 16x16) and <root>/tiny_kl_f8 (z 4, 8x8): 512 samples each."""
    root = tmp_path_factory.mktemp("latents")
    write_latent_shards(root / "tiny_kl_f4", 512)
    write_latent_shards(root / "tiny_kl_f8", 512, name="tiny_kl_f8", z=4, f=8)
    return root


@pytest.fixture(scope="session")
def tokenizer_dir(latents_root: Path) -> Path:
    """One tokenizer for runs that must match each other exactly: WordPiece training orders ties by a
    per-process hash seed, so two runs that each train their own can get different ids for rare pieces."""
    from ldm_train.data.manifest import read_manifest, shard_list
    from ldm_train.data.tokenizer import train_tokenizer
    from ldm_train.trainer.build import read_captions

    shards = shard_list(read_manifest(str(latents_root / "tiny_kl_f4")))
    out = latents_root / "tokenizer"
    train_tokenizer(read_captions(shards), 512, str(out), max_len=32)
    return out


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


def trainer_env() -> dict[str, str]:
    env = dict(os.environ)
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
