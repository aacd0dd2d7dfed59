"""First-stage models: CompVis key layout, parity with diffusers, presets' sizes, loading."""
from __future__ import annotations

import pytest
import torch

from ldm_train.app import compose
from ldm_train.config import DDConfig, FirstStageConfig
from ldm_train.first_stage.config import AutoencoderAppConfig
from ldm_train.models.autoencoder import AutoencoderKL, VQModel, build_first_stage


def small_kl(**dd) -> FirstStageConfig:
    ddc = DDConfig(z_channels=4, resolution=32, ch=32, ch_mult=[1, 2], num_res_blocks=1, **dd)
    return FirstStageConfig(name="small_kl", kind="kl", downsample_factor=2, embed_dim=4, ddconfig=ddc)


def preset(name: str) -> FirstStageConfig:
    # data.input is mandatory in the typed root; the preset is all this reads
    return compose("train_autoencoder", AutoencoderAppConfig, [f"first_stage={name}", "data.input=unused"]).first_stage


def test_kl_matches_diffusers_after_compvis_conversion():
    """Our CompVis-layout state dict converted by diffusers' own converter gives the same numbers."""
    from diffusers import AutoencoderKL as DiffusersKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    torch.manual_seed(0)
    ours = AutoencoderKL(small_kl()).eval()
    # perturb the zero-initialised-looking parts (GroupNorm affine) so a swapped weight cannot hide
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.02 * torch.randn_like(p))
    config = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                  up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[32, 64], layers_per_block=1,
                  latent_channels=4, norm_num_groups=32, sample_size=32)
    theirs = DiffusersKL(**config).eval()
    converted = convert_ldm_vae_checkpoint({"first_stage_model." + k: v for k, v in ours.state_dict().items()},
                                           config)
    missing, unexpected = theirs.load_state_dict(converted, strict=True), None
    assert missing is not None and unexpected is None
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        m_ours = ours.encode_moments(x)
        m_theirs = theirs.quant_conv(theirs.encoder(x))
        assert m_ours.shape == (2, 8, 16, 16)
        assert (m_ours - m_theirs).abs().max() < 1e-4
        z = torch.randn(2, 4, 16, 16)
        d_ours, d_theirs = ours.decode(z), theirs.decode(z).sample
        assert d_ours.shape == (2, 3, 32, 32)
        assert (d_ours - d_theirs).abs().max() < 1e-4


def test_compvis_key_names():
    keys = set(AutoencoderKL(small_kl(attn_resolutions=[16])).state_dict())
    for k in ["encoder.conv_in.weight", "encoder.down.0.block.0.conv1.weight", "encoder.down.0.downsample.conv.weight",
              "encoder.down.1.block.0.nin_shortcut.weight", "encoder.down.1.attn.0.q.weight",
              "encoder.mid.block_1.norm1.weight", "encoder.mid.attn_1.proj_out.weight", "encoder.norm_out.bias",
              "decoder.up.1.upsample.conv.weight", "decoder.up.0.block.1.conv2.weight",
              "decoder.up.0.block.0.nin_shortcut.weight", "decoder.up.1.attn.1.k.weight",
              "quant_conv.weight", "post_quant_conv.bias", "decoder.conv_out.weight"]:
        assert k in keys, k
    # level 1 has no downsample (last level) and level 0 of the decoder no upsample
    assert not any(k.startswith("encoder.down.1.downsample") for k in keys)
    assert not any(k.startswith("decoder.up.0.upsample") for k in keys)


@pytest.mark.parametrize("name,f,z", [("kl_f4", 4, 3), ("kl_f8", 8, 4), ("kl_f16", 16, 16), ("kl_f32", 32, 64),
                                      ("vq_f4", 4, 3), ("vq_f8", 8, 4), ("vq_f16", 16, 8)])
def test_paper_presets_shapes(name, f, z):
    cfg = preset(name)
    with torch.device("meta"):
        model = build_first_stage(cfg)
        x = torch.empty(2, 3, 256, 256)
        h = model.encode_moments(x)
        expected_c = 2 * z if cfg.kind == "kl" else z
        assert tuple(h.shape) == (2, expected_c, 256 // f, 256 // f)
        out = model.decode(torch.empty(2, z, 256 // f, 256 // f), **({"force_not_quantize": True} if cfg.kind == "vq" else {}))
        assert tuple(out.shape) == (2, 3, 256, 256)
    if cfg.kind == "vq":
        assert tuple(model.quantize.embedding.weight.shape) == (cfg.n_embed, z)


def test_kl_f8_param_count_equals_released_vae():
    """kl-f8 is the autoencoder Stable Diffusion reuses: diffusers' AutoencoderKL of that shape is the reference."""
    from diffusers import AutoencoderKL as DiffusersKL

    with torch.device("meta"):
        ours = build_first_stage(preset("kl_f8"))
        theirs = DiffusersKL(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                             block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4)
    n_ours = sum(p.numel() for p in ours.parameters())
    assert n_ours == sum(p.numel() for p in theirs.parameters())
    assert n_ours == 83_653_863


def test_vq_quantize_and_decode():
    torch.manual_seed(0)
    cfg = FirstStageConfig(name="small_vq", kind="vq", downsample_factor=2, embed_dim=3, n_embed=16,
                           ddconfig=DDConfig(double_z=False, z_channels=3, resolution=32, ch=32, ch_mult=[1, 2],
                                             num_res_blocks=1))
    model = VQModel(cfg)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    h = model.encode_moments(x)
    assert h.shape == (2, 3, 16, 16)
    z_q, loss, info = model.quantize(h)
    codebook = model.quantize.embedding.weight
    # every quantized vector is the nearest codebook entry
    flat = h.detach().permute(0, 2, 3, 1).reshape(-1, 3)
    nearest = torch.cdist(flat, codebook).argmin(1)
    assert torch.equal(info["indices"].flatten(), nearest)
    assert torch.allclose(z_q.detach().permute(0, 2, 3, 1).reshape(-1, 3), codebook[nearest])
    assert loss.item() > 0 and 1.0 <= info["perplexity"].item() <= 16
    # decode quantizes first: decoding the pre-quant latent equals decoding its quantization
    with torch.no_grad():
        assert torch.allclose(model.decode(h), model.decode(z_q, force_not_quantize=True), atol=1e-6)
    # straight-through: the reconstruction's gradient reaches the encoder
    xrec, qloss, _ = model(x)
    (xrec.mean() + qloss).backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0



def test_pixel_first_stage_is_the_identity_and_needs_no_file():
    """LDM-1: ``first_stage=pixel`` builds, loads without a checkpoint, and encodes/decodes images unchanged."""
    from ldm_train.checkpoints.first_stage import is_loadable, load_first_stage

    cfg = preset("pixel")
    assert (cfg.kind, cfg.downsample_factor, cfg.embed_dim, cfg.checkpoint) == ("pixel", 1, 3, None)
    assert is_loadable(cfg) and not is_loadable(preset("tiny_kl_f4"))
    model = load_first_stage(cfg)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(model.decode(model.encode_moments(x)), x)
    assert not list(model.parameters())
    with pytest.raises(ValueError, match="kind=pixel needs downsample_factor=1"):
        build_first_stage(FirstStageConfig(name="px", kind="pixel", downsample_factor=2, embed_dim=3,
                                           ddconfig=DDConfig(ch_mult=[1, 2], in_channels=3)))


@pytest.mark.parametrize("name,f,z", [("fmnist_kl_f2", 2, 2), ("fmnist_kl_f4", 4, 3), ("fmnist_kl_f8", 8, 4),
                                      ("fmnist_kl_f16", 16, 8)])
def test_fmnist_family_latent_shapes(name, f, z):
    """The f-sweep's first stages on 32 px Fashion-MNIST: f = 2..16, z channels growing with f."""
    model = build_first_stage(preset(name)).eval()
    with torch.no_grad():
        moments = model.encode_moments(torch.zeros(1, 3, 32, 32))
        assert moments.shape == (1, 2 * z, 32 // f, 32 // f)
        assert model.decode(moments[:, :z]).shape == (1, 3, 32, 32)
