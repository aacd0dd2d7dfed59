"""The released configs' UNet and first-stage options, checked against diffusers as an
independent implementation: ``use_scale_shift_norm`` + ``resblock_updown`` (LSUN-Churches, inpainting),
``num_head_channels``, and first stages with ``attn_type: none`` (vq-f4-noattn)."""
from __future__ import annotations

import pytest
import torch

from ldm_train.config import DDConfig, FirstStageConfig, UNetConfig
from ldm_train.models.autoencoder import VQModel
from ldm_train.models.unet import ResBlock, UNetModel
from ldm_train.released import ROWS, layout

pytest.importorskip("diffusers")


def _resblock_to_diffusers(prefix: str, sd: dict, out: dict, dst: str) -> None:
    names = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
             "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
    for ours, theirs in names.items():
        for p in ("weight", "bias"):
            key = f"{prefix}.{ours}.{p}"
            if key in sd:
                out[f"{dst}.{theirs}.{p}"] = sd[key]


def _attention_to_diffusers(prefix: str, sd: dict, out: dict, dst: str, heads: int) -> None:
    out[f"{dst}.group_norm.weight"] = sd[f"{prefix}.norm.weight"]
    out[f"{dst}.group_norm.bias"] = sd[f"{prefix}.norm.bias"]
    w, b = sd[f"{prefix}.qkv.weight"][:, :, 0], sd[f"{prefix}.qkv.bias"]
    c = w.shape[1]
    # legacy order: per head, q k v of dim d next to each other
    w = w.reshape(heads, 3, c // heads, c)
    b = b.reshape(heads, 3, c // heads)
    for i, name in enumerate(("to_q", "to_k", "to_v")):
        out[f"{dst}.{name}.weight"] = w[:, i].reshape(c, c)
        out[f"{dst}.{name}.bias"] = b[:, i].reshape(c)
    out[f"{dst}.to_out.0.weight"] = sd[f"{prefix}.proj_out.weight"][:, :, 0]
    out[f"{dst}.to_out.0.bias"] = sd[f"{prefix}.proj_out.bias"]


def _unet_to_diffusers(model: UNetModel) -> dict:
    """CompVis layout (ours) -> diffusers UNet2DModel keys, walking the same block order."""
    cfg, sd, out = model.cfg, model.state_dict(), {}
    for i, name in ((0, "linear_1"), (2, "linear_2")):
        for p in ("weight", "bias"):
            out[f"time_embedding.{name}.{p}"] = sd[f"time_embed.{i}.{p}"]
    for p in ("weight", "bias"):
        out[f"conv_in.{p}"] = sd[f"input_blocks.0.0.{p}"]
        out[f"conv_norm_out.{p}"] = sd[f"out.0.{p}"]
        out[f"conv_out.{p}"] = sd[f"out.2.{p}"]

    def heads(ch: int) -> int:
        return ch // cfg.num_head_channels if cfg.num_head_channels > 0 else cfg.num_heads

    idx, ds = 1, 1
    widths = [cfg.model_channels * m for m in cfg.channel_mult]
    for level, ch in enumerate(widths):
        for j in range(cfg.num_res_blocks):
            _resblock_to_diffusers(f"input_blocks.{idx}.0", sd, out, f"down_blocks.{level}.resnets.{j}")
            if ds in cfg.attention_resolutions:
                _attention_to_diffusers(f"input_blocks.{idx}.1", sd, out, f"down_blocks.{level}.attentions.{j}", heads(ch))
            idx += 1
        if level != len(widths) - 1:
            if cfg.resblock_updown:
                _resblock_to_diffusers(f"input_blocks.{idx}.0", sd, out, f"down_blocks.{level}.downsamplers.0")
            else:
                for p in ("weight", "bias"):
                    out[f"down_blocks.{level}.downsamplers.0.conv.{p}"] = sd[f"input_blocks.{idx}.0.op.{p}"]
            idx += 1
            ds *= 2
    ch = widths[-1]
    _resblock_to_diffusers("middle_block.0", sd, out, "mid_block.resnets.0")
    _attention_to_diffusers("middle_block.1", sd, out, "mid_block.attentions.0", heads(ch))
    _resblock_to_diffusers("middle_block.2", sd, out, "mid_block.resnets.1")
    idx = 0
    for up, level in enumerate(reversed(range(len(widths)))):
        ch = widths[level]
        for j in range(cfg.num_res_blocks + 1):
            has_attn = ds in cfg.attention_resolutions
            _resblock_to_diffusers(f"output_blocks.{idx}.0", sd, out, f"up_blocks.{up}.resnets.{j}")
            if has_attn:
                _attention_to_diffusers(f"output_blocks.{idx}.1", sd, out, f"up_blocks.{up}.attentions.{j}", heads(ch))
            if level and j == cfg.num_res_blocks:
                at = f"output_blocks.{idx}.{2 if has_attn else 1}"
                if cfg.resblock_updown:
                    _resblock_to_diffusers(at, sd, out, f"up_blocks.{up}.upsamplers.0")
                else:
                    for p in ("weight", "bias"):
                        out[f"up_blocks.{up}.upsamplers.0.conv.{p}"] = sd[f"{at}.conv.{p}"]
            idx += 1
        ds //= 2 if level else 1
    return out


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


@pytest.mark.parametrize("up,down", [(False, False), (False, True), (True, False)], ids=["plain", "down", "up"])
@pytest.mark.parametrize("scale_shift", [False, True], ids=["add", "scale_shift"])
def test_resblock_matches_diffusers_resnet(scale_shift: bool, up: bool, down: bool) -> None:
    from diffusers.models.resnet import ResnetBlock2D

    ours = _randomize(ResBlock(64, 128, 0.0, 64 if (up or down) else 96, use_scale_shift_norm=scale_shift,
                               up=up, down=down), 1).eval()
    theirs = ResnetBlock2D(in_channels=64, out_channels=64 if (up or down) else 96, temb_channels=128,
                           time_embedding_norm="scale_shift" if scale_shift else "default", eps=1e-5,
                           up=up, down=down).eval()
    mapped: dict = {}
    _resblock_to_diffusers("b", {f"b.{k}": v for k, v in ours.state_dict().items()}, mapped, "")
    missing, unexpected = theirs.load_state_dict({k[1:]: v for k, v in mapped.items()}, strict=True)
    assert not missing and not unexpected
    if scale_shift:
        assert ours.emb_layers[1].out_features == 2 * ours.out_layers[3].out_channels
    gen = torch.Generator().manual_seed(2)
    x, emb = torch.randn(2, 64, 8, 8, generator=gen), torch.randn(2, 128, generator=gen)
    with torch.no_grad():
        a, b = ours(x, emb), theirs(x, emb)
    side = 16 if up else 4 if down else 8
    assert a.shape == (2, ours.out_layers[3].out_channels, side, side)
    assert a.abs().max() > 1e-2
    assert (a - b).abs().max() < 1e-4


def test_churches_style_unet_matches_diffusers_unet2d() -> None:
    """Unconditional, scale-shift norm, ResBlock resampling, attention by head channels: the LSUN-Churches
    layout in miniature gives diffusers' UNet2DModel's output once its keys are renamed one to one."""
    from diffusers import UNet2DModel

    cfg = UNetConfig(image_size=16, in_channels=4, out_channels=4, model_channels=32, channel_mult=[1, 2, 2],
                     attention_resolutions=[1, 2], num_res_blocks=2, num_heads=-1, num_head_channels=16,
                     context_dim=None, use_scale_shift_norm=True, resblock_updown=True)
    ours = _randomize(UNetModel(cfg), 3).eval()
    theirs = UNet2DModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=2,
        down_block_types=("AttnDownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("ResnetUpsampleBlock2D", "AttnUpBlock2D", "AttnUpBlock2D"),
        downsample_type="resnet", upsample_type="resnet", resnet_time_scale_shift="scale_shift",
        attention_head_dim=16, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0,
        attn_norm_num_groups=32,  # diffusers drops the mid attention's GroupNorm under scale_shift unless told
    ).eval()
    missing, unexpected = theirs.load_state_dict(_unet_to_diffusers(ours), strict=True)
    assert not missing and not unexpected
    assert sum(p.numel() for p in theirs.parameters()) == sum(p.numel() for p in ours.parameters())
    gen = torch.Generator().manual_seed(4)
    x, t = torch.randn(2, 4, 16, 16, generator=gen), torch.tensor([3, 777])
    with torch.no_grad():
        a, b = ours(x, t), theirs(x, t).sample
    assert a.abs().max() > 1e-2
    assert (a - b).abs().max() < 1e-3


def test_vq_first_stage_without_attention_has_no_attention_weights() -> None:
    dd = DDConfig(double_z=False, z_channels=3, resolution=32, ch=32, ch_mult=[1, 2, 4], attn_resolutions=[],
                  norm_groups=8)
    with_attn = VQModel(FirstStageConfig(name="a", kind="vq", downsample_factor=4, embed_dim=3, n_embed=16,
                                         ddconfig=dd))
    dd_none = DDConfig(**{**vars(dd), "attn_type": "none"})
    none = VQModel(FirstStageConfig(name="b", kind="vq", downsample_factor=4, embed_dim=3, n_embed=16,
                                    ddconfig=dd_none))
    extra = set(with_attn.state_dict()) - set(none.state_dict())
    assert extra and all(".mid.attn_1." in k for k in extra)
    assert not set(none.state_dict()) - set(with_attn.state_dict())
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert none(x)[0].shape == x.shape


def test_unknown_attn_type_is_rejected_naming_the_choices() -> None:
    dd = DDConfig(double_z=False, z_channels=3, resolution=32, ch=32, ch_mult=[1, 2], norm_groups=8,
                  attn_type="linear")
    with pytest.raises(ValueError, match=r"attn_type='linear'.*vanilla.*none"):
        VQModel(FirstStageConfig(name="x", kind="vq", downsample_factor=2, embed_dim=3, n_embed=16, ddconfig=dd))


# The released UNet configs of CompVis/latent-diffusion configs/latent-diffusion/, as our presets in conf/unet/,
# with the latent size and channels each released config fixes (image_size, in/out channels).
RELEASED = {
    "celebahq/ffhq/lsun_bedrooms-ldm-vq-4": ("uncond_vq4", 64, 3),
    "lsun_churches-ldm-kl-8": ("lsun_churches_kl8", 32, 4),
    "cin-ldm-vq-f8": ("cin_vq_f8", 32, 4),
    "cin256-v2": ("cin256_v2", 64, 3),
    "txt2img-1p4B-eval": ("ldm_1p45b", 32, 4),
    # models/ldm/bsr_sr/config.yaml: the vq_f4 latent (3) + the low-resolution image (3) in, 3 out
    "bsr_sr": ("bsr_sr", 64, 3, 6),
}


def _preset(name: str, side: int, channels: int, in_channels: int | None = None) -> UNetConfig:
    from pathlib import Path

    from omegaconf import OmegaConf

    from ldm_train.config import to_dataclass

    raw = OmegaConf.load(Path(__file__).parents[3] / "conf" / "unet" / f"{name}.yaml")
    raw.pop("defaults")
    raw.image_size, raw.in_channels, raw.out_channels = side, in_channels or channels, channels
    if OmegaConf.is_interpolation(raw, "context_dim"):
        raw.context_dim = 1280  # ldm_1p45b: ${text_encoder.n_embed} of bert_1p45b
    raw.use_checkpoint = False
    return to_dataclass(raw, UNetConfig)


def _diffusers_twin(cfg: UNetConfig):
    """The same layout built by diffusers (unconditional: UNet2DModel; cross-attention: its CompVis converter's
    UNet2DConditionModel config), on the meta device."""
    from diffusers import UNet2DConditionModel, UNet2DModel

    levels = len(cfg.channel_mult)
    attn = [2 ** i in cfg.attention_resolutions for i in range(levels)]
    if cfg.context_dim is None:
        head_dim = cfg.num_head_channels if cfg.num_head_channels > 0 else cfg.model_channels // cfg.num_heads
        down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn)
        up = tuple(("AttnUpBlock2D" if a else ("ResnetUpsampleBlock2D" if cfg.resblock_updown else "UpBlock2D"))
                   for a in reversed(attn))
        if cfg.resblock_updown:
            down = tuple("ResnetDownsampleBlock2D" if d == "DownBlock2D" and i < levels - 1 else d
                         for i, d in enumerate(down))
        with torch.device("meta"):
            return UNet2DModel(
                sample_size=cfg.image_size, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
                block_out_channels=tuple(cfg.model_channels * m for m in cfg.channel_mult),
                layers_per_block=cfg.num_res_blocks, down_block_types=down, up_block_types=up,
                downsample_type="resnet" if cfg.resblock_updown else "conv",
                upsample_type="resnet" if cfg.resblock_updown else "conv",
                resnet_time_scale_shift="scale_shift" if cfg.use_scale_shift_norm else "default",
                attention_head_dim=head_dim, attn_norm_num_groups=32,
            )
    with torch.device("meta"):
        return UNet2DConditionModel(
            sample_size=cfg.image_size, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
            block_out_channels=tuple(cfg.model_channels * m for m in cfg.channel_mult),
            layers_per_block=cfg.num_res_blocks, cross_attention_dim=cfg.context_dim,
            down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
            up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
            attention_head_dim=8, transformer_layers_per_block=cfg.transformer_depth,
        )


@pytest.mark.parametrize("released", list(RELEASED), ids=list(RELEASED))
def test_released_unet_layouts_have_the_released_parameter_shapes(released: str) -> None:
    """Each released UNet config, built from our preset on the meta device (no weights), has the same parameter
    tensors as diffusers' independent implementation of that layout: key for key (renamed) where the keys map
    one to one (unconditional), and the same total in every case."""
    cfg = _preset(*RELEASED[released])
    with torch.device("meta"):
        ours = UNetModel(cfg)
    theirs = _diffusers_twin(cfg)
    n_ours = sum(p.numel() for p in ours.parameters())
    assert n_ours == sum(p.numel() for p in theirs.parameters())
    if cfg.context_dim is None:
        mapped = {k: tuple(v.shape) for k, v in _unet_to_diffusers(ours).items()}
        assert mapped == {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    print(f"{released}: {n_ours:,} parameters")


def _paper_rounding(n: int, stated: str) -> bool:
    """``n`` is the paper's stated count ("274M", "1.45B"), which the paper rounds loosely (294,966,916 is its
    "294M", 401,433,091 its "400M"): within 0.5%."""
    value = float(stated[:-1]) * {"M": 1e6, "B": 1e9}[stated[-1]]
    return abs(n / value - 1) < 0.005


@pytest.mark.parametrize("row", ROWS, ids=[r.config.split("/")[-1] if r.config.startswith("configs") else
                                            r.config.split("/")[-2] for r in ROWS])
def test_released_config_table_row(row) -> None:
    """Every row of ``python -m ldm_train.released`` builds (meta device) with the paper's parameter count where it
    states one, the released ClassEmbedder table, and, for the cross-attention UNets, exactly the keys and shapes
    diffusers' own CompVis converter expects (it maps every key of ours one to one onto its UNet2DConditionModel)."""
    import dataclasses

    from diffusers import UNet2DConditionModel
    from diffusers.loaders import single_file_utils

    from ldm_train.checkpoints.compvis import TEXT_PREFIX, UNET_PREFIX
    from ldm_train.summary import compose_config
    from tests.ldm_train.models.test_diffusers_parity import compvis_original_config

    sd = layout(row)
    unet_n = sum(s.numel() for k, s in sd.items() if k.startswith(UNET_PREFIX))
    cond = {k: tuple(s) for k, s in sd.items() if k.startswith(TEXT_PREFIX)}
    if row.paper_params:
        total = unet_n + sum(s.numel() for k, s in sd.items() if k.startswith(TEXT_PREFIX))
        assert _paper_rounding(total, row.paper_params), (total, row.paper_params)
    if "experiment=cin256_ldm4" in row.overrides:  # released: ClassEmbedder(embed_dim=512), 1000 (+1 null) rows
        rows = 1000 if "cond.null_class=false" in row.overrides else 1001
        assert cond == {TEXT_PREFIX + "embedding.weight": (rows, 512)}
    cfg = to_dataclass_unet(compose_config(list(row.overrides)))
    if cfg.context_dim is None:
        assert not cond or row.unet_only
        return
    with torch.device("meta"):
        ours = {UNET_PREFIX + k: v for k, v in UNetModel(dataclasses.replace(cfg, use_checkpoint=False))
                .state_dict().items()}
    original = compvis_original_config(dataclasses.replace(cfg, num_heads=cfg.num_heads if cfg.num_heads > 0 else 8))
    config = single_file_utils.create_unet_diffusers_config_from_ldm(original, ours, image_size=cfg.image_size * 8)
    converted = single_file_utils.convert_ldm_unet_checkpoint(ours, config)
    assert len(converted) == len(ours)  # no key of ours dropped or merged
    with torch.device("meta"):
        theirs = UNet2DConditionModel(**config).state_dict()
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in theirs.items()}


def to_dataclass_unet(cfg) -> UNetConfig:
    from ldm_train.config import to_dataclass

    return to_dataclass(cfg.unet, UNetConfig)


def test_cin256_v1_is_the_vq_f8_class_model_and_inpainting_big_has_the_noattn_first_stage() -> None:
    """models/ldm/cin256/config.yaml: cin-ldm-vq-f8's UNet on vq-f8 latents, ClassEmbedder(1000, 512) (not the v2
    UNet); models/ldm/inpainting_big/config.yaml: the vq-f4-noattn first stage (no attention weights)."""
    from ldm_train.checkpoints.compvis import FIRST_STAGE_PREFIX, TEXT_PREFIX, UNET_PREFIX

    rows = {r.config: r for r in ROWS}

    def count(sd: dict, prefix: str) -> int:
        return sum(s.numel() for k, s in sd.items() if k.startswith(prefix))

    v1 = layout(rows["models/ldm/cin256/config.yaml"])
    assert count(v1, UNET_PREFIX) == 394_984_196
    assert {k: tuple(s) for k, s in v1.items() if k.startswith(TEXT_PREFIX)} == {
        TEXT_PREFIX + "embedding.weight": (1000, 512)}
    assert v1[UNET_PREFIX + "input_blocks.0.0.weight"][1] == 4  # vq-f8 latents: 4 channels
    inpainting = layout(rows["models/ldm/inpainting_big/config.yaml"])
    assert count(inpainting, FIRST_STAGE_PREFIX) == 53_219_486
    assert not any(".attn" in k for k in inpainting if k.startswith(FIRST_STAGE_PREFIX))
