"""Shared helpers of the model tests: small configs and non-trivial random weights."""
from __future__ import annotations

import pytest
import torch

from ldm_train.config import TextEncoderConfig, UNetConfig


def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Overwrite every parameter with N(0, std) (LayerNorm/GroupNorm scales near 1) so zero-initialised
    output convs do not hide a wrong wiring behind an all-zero output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * std
            if "norm" in name and name.endswith("weight") and p.ndim == 1:
                p.copy_(1.0 + noise)
            else:
                p.copy_(noise)
    return module


@pytest.fixture
def randomize():  # noqa: ANN201 - the helper itself, as a fixture (test dirs are not packages)
    return randomize_


@pytest.fixture
def small_unet_cfg() -> UNetConfig:
    return UNetConfig(
        image_size=16, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[1, 2],
        num_res_blocks=1, channel_mult=[1, 2], num_heads=4, context_dim=48, transformer_depth=1,
    )


@pytest.fixture
def small_text_cfg() -> TextEncoderConfig:
    return TextEncoderConfig(
        name="test", vocab_size=200, max_seq_len=16, n_embed=48, n_layer=2, heads=4, dim_head=12, ff_mult=4,
    )
