"""The semantic-synthesis cond stage: CompVis ``ldm.modules.encoders.modules.SpatialRescaler``.

A one-hot segmentation map [B, in_channels, H, W] (182 COCO-Stuff classes in the released semantic_synthesis
configs) is resized ``n_stages`` times by ``multiplier`` (bilinear by default) to the latent grid, then mapped to
``out_channels`` by a bias-free 1x1 conv (key ``cond_stage_model.channel_mapper.weight``, [3, 182, 1, 1] as
released: 546 trainable parameters). Its output is concatenated to the noisy latent (CompVis ``concat_mode``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SpatialRescaler(nn.Module):
    def __init__(self, n_stages: int, in_channels: int, out_channels: int | None = None, method: str = "bilinear",
                 multiplier: float = 0.5, bias: bool = False) -> None:
        super().__init__()
        if n_stages < 0 or in_channels < 1:
            raise ValueError(f"SpatialRescaler: n_stages={n_stages} must be >= 0 and in_channels={in_channels} >= 1")
        self.n_stages, self.method, self.multiplier = n_stages, method, multiplier
        # no mapper when out_channels is None: the map is only resized (no parameters)
        self.channel_mapper = None if out_channels is None else nn.Conv2d(in_channels, out_channels, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.n_stages):
            x = F.interpolate(x, scale_factor=self.multiplier, mode=self.method)
        return x if self.channel_mapper is None else self.channel_mapper(x)
