"""UNet: the paper's parameter count, the three conditioning routes, checkpointing, channels-last, bf16."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from ldm_train.config import UNetConfig
from ldm_train.models.unet import UNetModel


def test_1p45b_parameter_count_on_meta() -> None:
    with torch.device("meta"):
        unet = UNetModel(UNetConfig())  # defaults are the paper's LDM-KL-8-G UNet
    assert sum(p.numel() for p in unet.parameters()) == 872_300_484
    keys = set(unet.state_dict())
    # CompVis openaimodel names (a few probes over the whole tree)
    for key in [
        "time_embed.0.weight", "input_blocks.0.0.weight", "input_blocks.1.1.proj_in.weight",
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", "input_blocks.3.0.op.weight",
        "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight", "middle_block.1.norm.weight",
        "output_blocks.2.1.conv.weight", "output_blocks.5.2.conv.weight", "out.2.weight",
        "input_blocks.4.0.skip_connection.weight",
    ]:
        assert key in keys, key
    assert unet.state_dict()["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape == (320, 1280)


def _inputs(cfg: UNetConfig, batch: int = 2) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, cfg.in_channels - cfg.concat_channels, cfg.image_size, cfg.image_size, generator=gen)
    t = torch.tensor([3, 700])[:batch]
    ctx = torch.randn(batch, 7, cfg.context_dim or 1, generator=gen)
    return x, t, ctx


def test_cross_attention_uses_the_context(small_unet_cfg: UNetConfig, randomize) -> None:
    unet = randomize(UNetModel(small_unet_cfg)).eval()
    x, t, ctx = _inputs(small_unet_cfg)
    out = unet(x, t, ctx)
    assert out.shape == x.shape
    assert not torch.allclose(out, unet(x, t, ctx + 1.0), atol=1e-4)
    assert not torch.allclose(out, unet(x, t + 100, ctx), atol=1e-4)
    # samples of a batch are independent: the first sample alone gives the same output
    torch.testing.assert_close(unet(x[:1], t[:1], ctx[:1]), out[:1], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="context"):
        unet(x, t)


def test_class_and_concat_conditioning(small_unet_cfg: UNetConfig, randomize) -> None:
    cfg = dataclasses.replace(small_unet_cfg, context_dim=None, num_classes=10, concat_channels=3, num_heads=2,
                              in_channels=4 + 3)  # CompVis convention: in_channels counts the concat channels
    unet = randomize(UNetModel(cfg)).eval()
    assert unet.input_blocks[0][0].weight.shape[1] == 4 + 3
    assert "input_blocks.1.1.qkv.weight" in unet.state_dict()  # no context: CompVis AttentionBlock
    x, t, _ = _inputs(cfg)
    y = torch.tensor([1, 2])
    concat = torch.randn(2, 3, 16, 16)
    out = unet(x, t, y=y, concat=concat)
    assert out.shape == x.shape
    assert not torch.allclose(out, unet(x, t, y=y.flip(0), concat=concat), atol=1e-4)
    assert not torch.allclose(out, unet(x, t, y=y, concat=concat * 2), atol=1e-4)
    with pytest.raises(ValueError, match="concat"):
        unet(x, t, y=y)
    with pytest.raises(ValueError, match="in_channels"):
        UNetModel(dataclasses.replace(cfg, in_channels=3))
    with pytest.raises(ValueError, match="multiples of 32"):
        UNetModel(dataclasses.replace(cfg, model_channels=48))


def test_checkpointing_gives_the_same_gradients(small_unet_cfg: UNetConfig, randomize) -> None:
    x, t, ctx = _inputs(small_unet_cfg)
    grads = []
    for use_ckpt in (False, True):
        unet = randomize(UNetModel(dataclasses.replace(small_unet_cfg, use_checkpoint=use_ckpt))).train()
        unet(x, t, ctx).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in unet.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)


def test_channels_last_and_bf16_autocast(small_unet_cfg: UNetConfig, randomize) -> None:
    unet = randomize(UNetModel(small_unet_cfg)).eval()
    x, t, ctx = _inputs(small_unet_cfg)
    ref = unet(x, t, ctx)
    unet_cl = unet.to(memory_format=torch.channels_last)
    torch.testing.assert_close(unet_cl(x.to(memory_format=torch.channels_last), t, ctx), ref, atol=1e-5, rtol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = unet(x, t, ctx)
    assert out.dtype == torch.float32  # returned in the input's dtype
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()
