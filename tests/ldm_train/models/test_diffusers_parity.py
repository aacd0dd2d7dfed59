"""Our UNet, exported in the CompVis layout and converted by diffusers' own original-checkpoint converter,
gives the same output in diffusers' UNet2DConditionModel (an independent implementation)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ldm_train.checkpoints.compvis import export_safetensors, load_state_dict_file
from ldm_train.config import UNetConfig
from ldm_train.models.unet import UNetModel

single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")


def compvis_original_config(cfg: UNetConfig) -> dict:
    """The parts of a CompVis txt2img YAML that diffusers' converter reads (model.params.unet_config.params;
    first_stage_config only for the VAE scale factor, which sets sample_size)."""
    return {
        "model": {
            "params": {
                "unet_config": {
                    "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                    "params": {
                        "image_size": cfg.image_size, "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
                        "model_channels": cfg.model_channels, "attention_resolutions": list(cfg.attention_resolutions),
                        "num_res_blocks": cfg.num_res_blocks, "channel_mult": list(cfg.channel_mult),
                        "num_heads": cfg.num_heads, "use_spatial_transformer": True,
                        "transformer_depth": cfg.transformer_depth, "context_dim": cfg.context_dim,
                        "use_checkpoint": False, "legacy": False,
                        "use_linear_in_transformer": cfg.use_linear_in_transformer,
                    },
                },
                "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}},
            }
        }
    }


@pytest.fixture(params=[(False, 1), (True, 2)], ids=["conv-proj-depth1", "linear-proj-depth2"])
def parity_cfg(request: pytest.FixtureRequest) -> UNetConfig:
    # the 1.45B layout in miniature (attention on all but the deepest level, 2 res blocks, 3 levels); the
    # second case covers the linear proj_in/proj_out variant and stacked transformer blocks
    use_linear, depth = request.param
    return UNetConfig(
        image_size=16, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[1, 2],
        num_res_blocks=2, channel_mult=[1, 2, 2], num_heads=4, context_dim=40, transformer_depth=depth,
        use_linear_in_transformer=use_linear,
    )


@pytest.mark.filterwarnings("ignore:`image_size` is deprecated:FutureWarning")
def test_unet_matches_diffusers_after_conversion(parity_cfg: UNetConfig, randomize, tmp_path: Path) -> None:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    ours = randomize(UNetModel(parity_cfg), seed=3, std=0.1).eval()
    path = tmp_path / "ldm.safetensors"
    export_safetensors(str(path), {"model.diffusion_model": ours})
    checkpoint = load_state_dict_file(str(path))

    original = compvis_original_config(parity_cfg)
    config = single_file_utils.create_unet_diffusers_config_from_ldm(original, checkpoint, image_size=16 * 8)
    assert config["down_block_types"] == ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
    converted = single_file_utils.convert_ldm_unet_checkpoint(checkpoint, config)
    theirs = UNet2DConditionModel(**config).eval()
    missing, unexpected = theirs.load_state_dict(converted, strict=True)
    assert not missing and not unexpected
    assert sum(p.numel() for p in theirs.parameters()) == sum(p.numel() for p in ours.parameters())

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 16, 16, generator=gen)
    t = torch.tensor([17, 901])
    ctx = torch.randn(2, 9, 40, generator=gen)
    with torch.no_grad():
        a = ours(x, t, ctx)
        b = theirs(x, t, encoder_hidden_states=ctx).sample
    assert a.abs().max() > 1e-2  # a real signal, not two zero outputs
    assert (a - b).abs().max() < 1e-4
