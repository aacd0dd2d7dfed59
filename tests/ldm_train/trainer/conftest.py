"""Fixtures of the trainer tests: latent shards whose content follows the caption, and a runner for the trainer.

The shards follow DESIGN.md "Latent shards" (KL moments [2z, h, w] float16, txt, json, manifest.json). The
latent mean is a blob whose per-channel value encodes the caption's colour on a background value, so a
text-conditional model can learn something in a few steps and the loss must fall.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.ldm_train.trainer.helpers import (  # noqa: F401
    REPO,
    TORCH_EXTENSIONS_DIR,
    _caption_and_colour,
    only_run_dir,
    read_stats,
    run_trainer,
    tiny_overrides,
    trainer_env,
    write_latent_shards,
)


@pytest.fixture(scope="session")
def latents_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """<root>/tiny_kl_f4 (z 3, 16x16) and <root>/tiny_kl_f8 (z 4, 8x8): 512 samples each."""
    root = tmp_path_factory.mktemp("latents")
    write_latent_shards(root / "tiny_kl_f4", 512)
    write_latent_shards(root / "tiny_kl_f8", 512, name="tiny_kl_f8", z=4, f=8)
    return root


@pytest.fixture(scope="session")
def tokenizer_dir(latents_root: Path) -> Path:
    """One tokenizer for runs that must match each other exactly, trained once for all of them (a run that
    trains its own gets the same bytes: tests/ldm_train/trainer/test_hardening.py)."""
    from ldm_train.data.manifest import read_manifest, shard_list
    from ldm_train.data.shard_reader import shard_captions
    from ldm_train.data.tokenizer import train_tokenizer

    shards = shard_list(read_manifest(str(latents_root / "tiny_kl_f4")))
    out = latents_root / "tokenizer"
    train_tokenizer(shard_captions([u for u, _ in shards]), 512, str(out), max_len=32)
    return out

