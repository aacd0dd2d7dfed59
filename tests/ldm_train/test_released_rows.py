"""Every row of ``python -m ldm_train.released`` against the released config it names (CompVis/latent-diffusion).

The expected layouts are written here from the released yamls' numbers, without our modules: the UNet's keys and
shapes as CompVis ``openaimodel.UNetModel`` names them, the cond stage's (the x-transformers ``BERTEmbedder``,
``ClassEmbedder``, ``SpatialRescaler``) and the autoencoder's (``Encoder`` / ``Decoder`` + quantizer). Each row's model
(meta device) must have exactly those tensors, a state dict of meta tensors in that layout must load strictly into
it (``load_compvis``), the UNet counts must equal diffusers' implementation of the same layout, and the row's
overrides must train the released objective (schedule end points, loss).
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from ldm_train.checkpoints.compvis import FIRST_STAGE_PREFIX, TEXT_PREFIX, UNET_PREFIX, load_compvis
from ldm_train.released import ROWS, build_row


@dataclass(frozen=True)
class U:
    """A released ``unet_config.params``: heads by count (``heads``) or by width (``head_ch``)."""

    in_ch: int
    out_ch: int
    mc: int
    attn: tuple[int, ...]
    mult: tuple[int, ...]
    heads: int = -1
    head_ch: int = -1
    context_dim: int | None = None
    depth: int = 1
    scale_shift: bool = False
    updown: bool = False


VQ4_UNCOND = U(3, 3, 224, (8, 4, 2), (1, 2, 3, 4), head_ch=32)
CHURCHES = U(4, 4, 192, (1, 2, 4, 8), (1, 2, 2, 4, 4), heads=8, scale_shift=True, updown=True)
CIN_F8 = U(4, 4, 256, (4, 2, 1), (1, 2, 4), head_ch=32, context_dim=512)
SEMANTIC = U(6, 3, 128, (32, 16, 8), (1, 4, 8), heads=8)
# first stages: (kind, embed_dim, n_embed, z_channels, ch_mult, attn_resolutions, mid attention)
VQ_F4 = ("vq", 3, 8192, 3, (1, 2, 4), (), True)
VQ_F4_NOATTN = ("vq", 3, 8192, 3, (1, 2, 4), (), False)
VQ_F8 = ("vq", 4, 16384, 4, (1, 2, 2, 4), (32,), True)
KL_F8 = ("kl", 4, 0, 4, (1, 2, 4, 4), (), True)
# cond stages: ("bert", vocab, max_seq_len, n_embed, n_layer) | ("class", rows, dim) | ("rescaler", in, out) |
# "first_stage" (CompVis __is_first_stage__: the same module, so its keys repeat under cond_stage_model.*) | None
# objective: (linear_start, linear_end, loss_type)
RELEASED = {
    "configs/latent-diffusion/celebahq-ldm-vq-4.yaml": (VQ4_UNCOND, None, VQ_F4, (0.0015, 0.0195, "l2")),
    "configs/latent-diffusion/ffhq-ldm-vq-4.yaml": (VQ4_UNCOND, None, VQ_F4, (0.0015, 0.0195, "l2")),
    "configs/latent-diffusion/lsun_bedrooms-ldm-vq-4.yaml": (VQ4_UNCOND, None, VQ_F4, (0.0015, 0.0195, "l2")),
    "configs/latent-diffusion/lsun_churches-ldm-kl-8.yaml": (CHURCHES, None, KL_F8, (0.0015, 0.0155, "l1")),
    "configs/latent-diffusion/cin256-v2.yaml": (
        U(3, 3, 192, (8, 4, 2), (1, 2, 3, 5), heads=1, context_dim=512), ("class", 1001, 512), VQ_F4,
        (0.0015, 0.0195, "l2")),
    "configs/latent-diffusion/cin-ldm-vq-f8.yaml": (CIN_F8, ("class", 1000, 512), VQ_F8, (0.0015, 0.0195, "l2")),
    "configs/latent-diffusion/txt2img-1p4B-eval.yaml": (
        U(4, 4, 320, (4, 2, 1), (1, 2, 4, 4), heads=8, context_dim=1280), ("bert", 30522, 77, 1280, 32), KL_F8,
        (0.00085, 0.012, "l2")),
    "models/ldm/bsr_sr/config.yaml": (
        U(6, 3, 160, (16, 8), (1, 2, 2, 4), head_ch=32), None, VQ_F4, (0.0015, 0.0155, "l2")),
    "models/ldm/celeba256/config.yaml": (VQ4_UNCOND, None, VQ_F4, (0.0015, 0.0195, "l2")),
    "models/ldm/cin256/config.yaml": (CIN_F8, ("class", 1000, 512), VQ_F8, (0.0015, 0.0195, "l2")),
    "models/ldm/ffhq256/config.yaml": (VQ4_UNCOND, None, VQ_F4, (0.0015, 0.0195, "l2")),
    "models/ldm/inpainting_big/config.yaml": (
        U(7, 3, 256, (8, 4, 2), (1, 2, 3, 4), heads=8, updown=True), "first_stage", VQ_F4_NOATTN,
        (0.0015, 0.0205, "l1")),
    "models/ldm/layout2img-openimages256/config.yaml": (
        U(3, 3, 128, (8, 4, 2), (1, 2, 3, 4), head_ch=32, context_dim=512, depth=3), ("bert", 8192, 92, 512, 16),
        VQ_F4, (0.0015, 0.0205, "l1")),
    "models/ldm/lsun_beds256/config.yaml": (VQ4_UNCOND, None, VQ_F4, (0.0015, 0.0195, "l2")),
    "models/ldm/lsun_churches256/config.yaml": (CHURCHES, None, KL_F8, (0.0015, 0.0155, "l1")),
    "models/ldm/semantic_synthesis256/config.yaml": (SEMANTIC, ("rescaler", 182, 3), VQ_F4, (0.0015, 0.0205, "l1")),
    "models/ldm/semantic_synthesis512/config.yaml": (SEMANTIC, ("rescaler", 182, 3), VQ_F4, (0.0015, 0.0205, "l1")),
    "models/ldm/text2img256/config.yaml": (
        U(3, 3, 192, (8, 4, 2), (1, 2, 3, 5), head_ch=32, context_dim=640), ("bert", 30522, 77, 640, 32), VQ_F4,
        (0.0015, 0.0195, "l2")),
}
# known totals of the released autoencoders (loss excluded), as ``tests/ldm_train/checkpoints`` checks them
FIRST_STAGE_PARAMS = {VQ_F4: 55_322_782, VQ_F4_NOATTN: 53_219_486, VQ_F8: 67_717_295, KL_F8: 83_653_863}
# UNet totals of the rows added with the models/ldm configs (diffusers' classes give the same, test below)
UNET_PARAMS = {SEMANTIC: 215_229_315}

Layout = dict[str, tuple[int, ...]]


def _norm(out: Layout, key: str, ch: int) -> None:
    out[f"{key}.weight"], out[f"{key}.bias"] = (ch,), (ch,)


def _lin(out: Layout, key: str, i: int, o: int, bias: bool = True, *k: int) -> None:
    out[f"{key}.weight"] = (o, i, *k)
    if bias:
        out[f"{key}.bias"] = (o,)


def _resblock(out: Layout, key: str, ch: int, o: int, emb: int, scale_shift: bool) -> None:
    _norm(out, f"{key}.in_layers.0", ch)
    _lin(out, f"{key}.in_layers.2", ch, o, True, 3, 3)
    _lin(out, f"{key}.emb_layers.1", emb, 2 * o if scale_shift else o)
    _norm(out, f"{key}.out_layers.0", o)
    _lin(out, f"{key}.out_layers.3", o, o, True, 3, 3)
    if o != ch:
        _lin(out, f"{key}.skip_connection", ch, o, True, 1, 1)


def _attention(out: Layout, key: str, ch: int, u: U) -> None:
    _norm(out, f"{key}.norm", ch)
    if u.context_dim is None:  # AttentionBlock: 1-d convs
        _lin(out, f"{key}.qkv", ch, 3 * ch, True, 1)
        _lin(out, f"{key}.proj_out", ch, ch, True, 1)
        return
    heads, dim_head = (ch // u.head_ch, u.head_ch) if u.head_ch > 0 else (u.heads, ch // u.heads)
    inner = heads * dim_head
    _lin(out, f"{key}.proj_in", ch, inner, True, 1, 1)
    for d in range(u.depth):
        b = f"{key}.transformer_blocks.{d}"
        for attn, ctx in (("attn1", inner), ("attn2", u.context_dim)):
            _lin(out, f"{b}.{attn}.to_q", inner, inner, False)
            _lin(out, f"{b}.{attn}.to_k", ctx, inner, False)
            _lin(out, f"{b}.{attn}.to_v", ctx, inner, False)
            _lin(out, f"{b}.{attn}.to_out.0", inner, inner)
        _lin(out, f"{b}.ff.net.0.proj", inner, 8 * inner)  # GEGLU: value and gate
        _lin(out, f"{b}.ff.net.2", 4 * inner, inner)
        for n in ("norm1", "norm2", "norm3"):
            _norm(out, f"{b}.{n}", inner)
    _lin(out, f"{key}.proj_out", inner, ch, True, 1, 1)


def unet_layout(u: U) -> Layout:
    """CompVis openaimodel.UNetModel's state dict (key -> shape) for a released unet_config."""
    out: Layout = {}
    emb = 4 * u.mc
    _lin(out, "time_embed.0", u.mc, emb)
    _lin(out, "time_embed.2", emb, emb)
    _lin(out, "input_blocks.0.0", u.in_ch, u.mc, True, 3, 3)
    chans, ch, ds, idx = [u.mc], u.mc, 1, 1
    for level, m in enumerate(u.mult):
        for _ in range(2):  # num_res_blocks: 2 in every release
            _resblock(out, f"input_blocks.{idx}.0", ch, m * u.mc, emb, u.scale_shift)
            ch = m * u.mc
            if ds in u.attn:
                _attention(out, f"input_blocks.{idx}.1", ch, u)
            chans.append(ch)
            idx += 1
        if level != len(u.mult) - 1:
            if u.updown:
                _resblock(out, f"input_blocks.{idx}.0", ch, ch, emb, u.scale_shift)
            else:
                _lin(out, f"input_blocks.{idx}.0.op", ch, ch, True, 3, 3)
            chans.append(ch)
            idx, ds = idx + 1, ds * 2
    _resblock(out, "middle_block.0", ch, ch, emb, u.scale_shift)
    _attention(out, "middle_block.1", ch, u)
    _resblock(out, "middle_block.2", ch, ch, emb, u.scale_shift)
    idx = 0
    for level, m in reversed(list(enumerate(u.mult))):
        for i in range(3):
            _resblock(out, f"output_blocks.{idx}.0", ch + chans.pop(), m * u.mc, emb, u.scale_shift)
            ch, sub = m * u.mc, 1
            if ds in u.attn:
                _attention(out, f"output_blocks.{idx}.1", ch, u)
                sub = 2
            if level and i == 2:
                if u.updown:
                    _resblock(out, f"output_blocks.{idx}.{sub}", ch, ch, emb, u.scale_shift)
                else:
                    _lin(out, f"output_blocks.{idx}.{sub}.conv", ch, ch, True, 3, 3)
                ds //= 2
            idx += 1
    _norm(out, "out.0", ch)
    _lin(out, "out.2", u.mc, u.out_ch, True, 3, 3)
    return out


def cond_layout(cond) -> Layout:
    out: Layout = {}
    if cond is None or cond == "first_stage":
        return out
    if cond[0] == "class":
        out["embedding.weight"] = (cond[1], cond[2])
    elif cond[0] == "rescaler":
        out["channel_mapper.weight"] = (cond[2], cond[1], 1, 1)  # bias=False (SpatialRescaler's default)
    else:  # x-transformers Encoder defaults: 8 heads of 64, feed-forward x4
        _, vocab, seq, dim, layers = cond
        t = "transformer"
        out[f"{t}.token_emb.weight"], out[f"{t}.pos_emb.emb.weight"] = (vocab, dim), (seq, dim)
        for i in range(layers):
            a, f = f"{t}.attn_layers.layers.{2 * i}", f"{t}.attn_layers.layers.{2 * i + 1}"
            _norm(out, f"{a}.0", dim)
            for n in ("to_q", "to_k", "to_v"):
                _lin(out, f"{a}.1.{n}", dim, 512, False)
            _lin(out, f"{a}.1.to_out", 512, dim)
            _norm(out, f"{f}.0", dim)
            _lin(out, f"{f}.1.net.0.0", dim, 4 * dim)
            _lin(out, f"{f}.1.net.2", 4 * dim, dim)
        _norm(out, f"{t}.norm", dim)
        _lin(out, f"{t}.to_logits", dim, vocab)
    return out


def _ae_block(out: Layout, key: str, i: int, o: int) -> None:
    _norm(out, f"{key}.norm1", i)
    _lin(out, f"{key}.conv1", i, o, True, 3, 3)
    _norm(out, f"{key}.norm2", o)
    _lin(out, f"{key}.conv2", o, o, True, 3, 3)
    if i != o:
        _lin(out, f"{key}.nin_shortcut", i, o, True, 1, 1)


def _ae_attn(out: Layout, key: str, ch: int) -> None:
    _norm(out, f"{key}.norm", ch)
    for n in ("q", "k", "v", "proj_out"):
        _lin(out, f"{key}.{n}", ch, ch, True, 1, 1)


def first_stage_layout(fs) -> Layout:
    """CompVis VQModel / AutoencoderKL (ch 128, 2 res blocks, 256 px) for a released first_stage_config."""
    kind, embed, n_embed, z, mult, attn_res, mid_attn = fs
    out: Layout = {}
    ch, res = 128, 256
    _lin(out, "encoder.conv_in", 3, ch, True, 3, 3)
    block_in = ch
    for i, m in enumerate(mult):
        for j in range(2):
            _ae_block(out, f"encoder.down.{i}.block.{j}", block_in, ch * m)
            block_in = ch * m
            if res in attn_res:
                _ae_attn(out, f"encoder.down.{i}.attn.{j}", block_in)
        if i != len(mult) - 1:
            _lin(out, f"encoder.down.{i}.downsample.conv", block_in, block_in, True, 3, 3)
            res //= 2
    for part in ("encoder", "decoder"):
        _ae_block(out, f"{part}.mid.block_1", block_in, block_in)
        if mid_attn:
            _ae_attn(out, f"{part}.mid.attn_1", block_in)
        _ae_block(out, f"{part}.mid.block_2", block_in, block_in)
    _norm(out, "encoder.norm_out", block_in)
    _lin(out, "encoder.conv_out", block_in, 2 * z if kind == "kl" else z, True, 3, 3)
    _lin(out, "decoder.conv_in", z, block_in, True, 3, 3)
    for i in reversed(range(len(mult))):
        for j in range(3):
            _ae_block(out, f"decoder.up.{i}.block.{j}", block_in, ch * mult[i])
            block_in = ch * mult[i]
            if res in attn_res:
                _ae_attn(out, f"decoder.up.{i}.attn.{j}", block_in)
        if i:
            _lin(out, f"decoder.up.{i}.upsample.conv", block_in, block_in, True, 3, 3)
            res *= 2
    _norm(out, "decoder.norm_out", block_in)
    _lin(out, "decoder.conv_out", block_in, 3, True, 3, 3)
    if kind == "kl":
        _lin(out, "quant_conv", 2 * z, 2 * embed, True, 1, 1)
    else:
        out["quantize.embedding.weight"] = (n_embed, embed)
        _lin(out, "quant_conv", z, embed, True, 1, 1)
    _lin(out, "post_quant_conv", embed, z, True, 1, 1)
    return out


def released_layout(config: str) -> Layout:
    """The state dict (key -> shape) a checkpoint of the released config holds, CompVis prefixes included
    (the LitEma copy and the schedule buffers aside)."""
    u, cond, fs, _ = RELEASED[config]
    first = first_stage_layout(fs)
    out = {UNET_PREFIX + k: s for k, s in unet_layout(u).items()}
    out |= {TEXT_PREFIX + k: s for k, s in (first if cond == "first_stage" else cond_layout(cond)).items()}
    return out | {FIRST_STAGE_PREFIX + k: s for k, s in first.items()}


def _n(layout: Layout, prefix: str = "") -> int:
    return sum(torch.Size(s).numel() for k, s in layout.items() if k.startswith(prefix))


def _id(row) -> str:
    return row.config.split("/")[-1].removesuffix(".yaml") if row.config.startswith("configs") else \
        row.config.split("/")[-2]


def test_every_released_config_has_one_row() -> None:
    """7 configs/latent-diffusion/*.yaml + 11 models/ldm/*/config.yaml in CompVis/latent-diffusion."""
    assert sorted(r.config for r in ROWS) == sorted(RELEASED)
    assert len(ROWS) == 18


@pytest.mark.parametrize("fs", list(FIRST_STAGE_PARAMS), ids=["vq_f4", "vq_f4_noattn", "vq_f8", "kl_f8"])
def test_reference_first_stage_layouts_have_the_released_counts(fs) -> None:
    assert _n(first_stage_layout(fs)) == FIRST_STAGE_PARAMS[fs]


@pytest.mark.parametrize("name", ["inpainting_big", "layout2img-openimages256", "semantic_synthesis256", "text2img256"])
def test_reference_unet_counts_equal_diffusers(name: str) -> None:
    """The written-out UNet layouts of the models/ldm configs whose UNet no earlier preset has (those are checked
    against diffusers in ``tests/ldm_train/models/test_released_options.py``) count what diffusers' classes count
    for the same fields."""
    pytest.importorskip("diffusers")
    from ldm_train.config import UNetConfig
    from tests.ldm_train.models.test_released_options import _diffusers_twin

    u = RELEASED[f"models/ldm/{name}/config.yaml"][0]
    cfg = UNetConfig(image_size=64, in_channels=u.in_ch, out_channels=u.out_ch, model_channels=u.mc,
                     attention_resolutions=list(u.attn), channel_mult=list(u.mult), num_heads=u.heads,
                     num_head_channels=u.head_ch, context_dim=u.context_dim, transformer_depth=u.depth,
                     use_scale_shift_norm=u.scale_shift, resblock_updown=u.updown)
    n = sum(p.numel() for p in _diffusers_twin(cfg).parameters())
    assert n == _n(unet_layout(u))
    if u in UNET_PARAMS:
        assert n == UNET_PARAMS[u]


@pytest.fixture(scope="module", params=ROWS, ids=_id)
def built(request):
    return request.param, build_row(request.param)


def test_row_has_the_released_tensors_and_counts(built) -> None:
    """Our model for the row holds exactly the released checkpoint's tensors (names and shapes), so its UNet,
    cond-stage and first-stage counts are the released ones."""
    from ldm_train.released import shapes

    row, modules = built
    expected = released_layout(row.config)
    if RELEASED[row.config][1] == "first_stage":  # the repeated first stage is no module of ours
        expected = {k: s for k, s in expected.items() if not k.startswith(TEXT_PREFIX)}
    got = {k: tuple(s) for k, s in shapes(*modules).items()}
    assert sorted(set(got) ^ set(expected))[:5] == []
    assert {k: s for k, s in got.items() if s != expected[k]} == {}
    for prefix in (UNET_PREFIX, TEXT_PREFIX, FIRST_STAGE_PREFIX):
        assert _n(got, prefix) == _n(expected, prefix)


def test_row_loads_a_checkpoint_of_the_released_layout(built) -> None:
    """A state dict written in the released layout (meta tensors: names and shapes, no memory) loads strictly."""
    row, (unet, stage, first) = built
    sd = {k: torch.empty(s, device="meta") for k, s in released_layout(row.config).items()}
    report = load_compvis(sd, unet=unet, text_encoder=stage, first_stage=first)
    assert row.loadable and row.why_not == ""
    groups = {"unet": UNET_PREFIX, "text_encoder": TEXT_PREFIX, "first_stage": FIRST_STAGE_PREFIX}
    assert report.loaded == {g: sum(k.startswith(p) for k in sd) for g, p in groups.items()
                             if g != "text_encoder" or stage is not None}
    assert report.ignored == (["text_encoder"] if RELEASED[row.config][1] == "first_stage" else [])


@pytest.mark.parametrize("row", ROWS, ids=_id)
def test_row_trains_the_released_objective(row) -> None:
    from ldm_train.build import diffusion_config
    from ldm_train.summary import compose_config

    start, end, loss = RELEASED[row.config][3]
    d = diffusion_config(compose_config(list(row.overrides)))
    assert (d.beta_schedule, d.linear_start, d.linear_end, d.timesteps, d.loss_type, d.parameterization) == \
        ("scaled_linear", start, end, 1000, loss, "eps")
