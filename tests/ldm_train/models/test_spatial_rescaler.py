"""The semantic-synthesis cond stage: two bilinear halvings to the f4 latent grid, then a bias-free 1x1 conv."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ldm_train.models.spatial_rescaler import SpatialRescaler


def test_released_rescaler_maps_a_segmentation_to_the_latent_grid() -> None:
    stage = SpatialRescaler(2, 182, 3)
    assert {k: tuple(v.shape) for k, v in stage.state_dict().items()} == {"channel_mapper.weight": (3, 182, 1, 1)}
    seg = F.one_hot(torch.randint(0, 182, (2, 32, 32)), 182).permute(0, 3, 1, 2).float()
    out = stage(seg)
    assert out.shape == (2, 3, 8, 8)
    quarter = F.interpolate(F.interpolate(seg, scale_factor=0.5, mode="bilinear"), scale_factor=0.5, mode="bilinear")
    torch.testing.assert_close(out, F.conv2d(quarter, stage.channel_mapper.weight))


def test_rescaler_without_mapper_only_resizes() -> None:
    stage = SpatialRescaler(1, 3)
    assert not list(stage.parameters())
    assert stage(torch.rand(1, 3, 8, 8)).shape == (1, 3, 4, 4)
