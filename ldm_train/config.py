"""Typed configs of the model components (the single schema; YAML under conf/ holds presets only).

Every stage composes these groups: ``first_stage``, ``unet``, ``text_encoder`` (and the ``cond`` node: what the
model is conditioned on). The dataclasses are
registered in Hydra's ConfigStore as ``schema/<group>`` so a preset starts with
``defaults: [/schema/unet@_here_, _self_]`` and gets type checking of its fields.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import OmegaConf

from ldm_train.config_checks import bounded, one_of

# the allowed values of the string settings below (``one_of``: refused at composition; the model code imports them)
ATTN_TYPES = ("vanilla", "none")  # ddconfig.attn_type
FIRST_STAGE_KINDS = ("kl", "vq", "pixel")
SCALE_FACTOR_RULES = ("manifest", "first_batch")  # first_stage.scale_factor_from (ldm_train/trainer/scale_factor.py)
# the allowed values of the training and sampling settings (``one_of`` in ldm_train.trainer.config, the first-stage
# trainer and eval: refused at composition); the diffusion and sampling code imports them from here, torch-free
LR_DECAYS = ("constant", "cosine")
# none: lr = base_lr; compvis: lr = base_lr x the global batch (CompVis main.py scale_lr), both trainers
LR_SCALINGS = ("none", "compvis")
BETA_SCHEDULES = ("scaled_linear", "sqrt_linear", "sqrt", "cosine")  # ldm_train/diffusion/schedule.py
AMBIGUOUS_LINEAR = (
    "beta schedule 'linear' is ambiguous: CompVis configs (every released LDM) mean "
    "linspace(sqrt(start), sqrt(end), T) ** 2, write scaled_linear; diffusers and DDPM mean linspace(start, end, T), "
    "write sqrt_linear (CompVis' name; an older ldm-train config.yaml with 'linear' meant this one)"
)
PARAMETERIZATIONS = ("eps", "v")
LOSS_TYPES = ("l2", "l1")  # CompVis get_loss: mse, or (target - pred).abs(); both averaged over C, H, W
SAMPLERS = ("ddim", "plms", "ddpm")  # ldm_train.sampling
TIMESTEP_SPACINGS = ("leading", "trailing", "uniform_compvis")  # ldm_train/diffusion/samplers.py make_timesteps


@dataclass
class DDConfig:
    """CompVis ``ddconfig``: the Encoder/Decoder of a first stage (field names as in the released yaml)."""

    double_z: bool = True
    z_channels: int = 4
    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 2
    attn_resolutions: list[int] = field(default_factory=list)
    dropout: float = bounded(0.0, ge=0, lt=1)
    # GroupNorm groups (not in CompVis' yaml: they always use 32). Tiny presets use fewer: with ch=32, 32 groups
    # normalise each channel alone and wipe out per-image colour, which slows early training a lot.
    norm_groups: int = 32
    # "vanilla": self-attention in the mid block (and at attn_resolutions); "none": no attention anywhere (an
    # identity, as CompVis vq-f4-noattn: no mid.attn_1 weights)
    attn_type: str = one_of("vanilla", ATTN_TYPES)


@dataclass
class FirstStageLossConfig:
    """LPIPS + patch discriminator objective (CompVis LPIPSWithDiscriminator / VQLPIPSWithDiscriminator)."""

    disc_start: int = bounded(50001, ge=0)
    kl_weight: float = bounded(1.0e-6, ge=0)
    codebook_weight: float = bounded(1.0, ge=0)
    pixelloss_weight: float = bounded(1.0, ge=0)
    perceptual_weight: float = bounded(1.0, ge=0)
    disc_weight: float = bounded(0.5, ge=0)
    disc_factor: float = bounded(1.0, ge=0)
    disc_num_layers: int = 3
    disc_in_channels: int = 3
    disc_ndf: int = 64


@dataclass
class FirstStageConfig:
    """An autoencoder of the paper: ``kind`` kl (AutoencoderKL), vq (VQModel) or pixel (the identity, f=1: LDM-1)."""

    name: str = "kl_f8"
    kind: str = one_of("kl", FIRST_STAGE_KINDS)  # "kl", "vq" or "pixel" (identity: no weights, the diffusion model runs on pixels)
    downsample_factor: int = 8  # f; must equal 2 ** (len(ddconfig.ch_mult) - 1)
    embed_dim: int = 4  # latent channels the diffusion model sees
    n_embed: int = 0  # VQ codebook size (0 for KL)
    ddconfig: DDConfig = field(default_factory=DDConfig)
    lossconfig: FirstStageLossConfig = field(default_factory=FirstStageLossConfig)
    checkpoint: str | None = None  # local path or fsspec URL of trained weights (CompVis layout); none for pixel
    # z = scale_factor * latent. A number: fixed (released VQ LDMs 1.0, the txt2img model 0.18215). None: by
    # scale_factor_from: "manifest" (1/std in the latent manifest) or "first_batch" (CompVis scale_by_std: 1/std of
    # the first training batch, then recorded here in the run's config). ldm_train/trainer/scale_factor.py
    scale_factor: float | None = bounded(None, gt=0)
    scale_factor_from: str = one_of("manifest", SCALE_FACTOR_RULES)


@dataclass
class UNetConfig:
    """CompVis ``openaimodel.UNetModel`` with SpatialTransformer (parameter names as released)."""

    image_size: int = 32  # latent side; derived from data resolution / f in the presets
    in_channels: int = 4  # latent channels (+ concat_channels for concat conditioning)
    out_channels: int = 4
    model_channels: int = 320
    attention_resolutions: list[int] = field(default_factory=lambda: [4, 2, 1])  # downsample rates
    num_res_blocks: int = 2
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    num_heads: int = 8
    num_head_channels: int = -1  # -1: channels // num_heads
    transformer_depth: int = 1
    context_dim: int | None = 1280  # None: no cross-attention (unconditional / class-conditional)
    num_classes: int | None = None  # class-conditional (ImageNet) through a label embedding
    concat_channels: int = 0  # extra input channels concatenated to z (super-resolution, inpainting)
    dropout: float = bounded(0.0, ge=0, lt=1)
    use_checkpoint: bool = False  # activation (gradient) checkpointing
    use_linear_in_transformer: bool = False  # paper: 1x1-conv proj_in/proj_out
    use_scale_shift_norm: bool = False  # timestep embedding as scale and shift of the second GroupNorm (LSUN-Churches)
    resblock_updown: bool = False  # resample with ResBlocks (up/down) instead of a conv (Up/Downsample)


@dataclass
class TextEncoderConfig:
    """The paper's BERT-style transformer (CompVis ``BERTEmbedder``), trained jointly with the UNet."""

    name: str = "bert_1p45b"
    vocab_size: int = 30522
    max_seq_len: int = 77
    n_embed: int = 1280
    n_layer: int = 32
    heads: int = 8
    dim_head: int = 64
    ff_mult: int = 4
    use_checkpoint: bool = False
    # Directory of a BERT WordPiece tokenizer (vocab.txt or tokenizer.json), local path or fsspec URL.
    # None: the trainer trains a WordPiece tokenizer on the caption corpus and saves it beside the run.
    tokenizer: str | None = None


COND_KINDS = ("text", "class", "none", "concat", "inpaint", "semantic", "layout")
SPATIAL_KINDS = ("concat", "inpaint", "semantic")  # an image-like input concatenated to the noisy latent


@dataclass
class CondConfig:
    """What the diffusion model is conditioned on (the ``cond`` node of ``conf/train.yaml``).

    - ``text`` (default): captions -> the BERT text encoder (``text_encoder``) -> cross-attention context.
    - ``class``: the shards' json ``label_key`` -> ``ClassEmbedder`` (CompVis: ``cond_stage_model.embedding``,
      ``nn.Embedding(num_classes + 1, unet.context_dim)``) -> a [B, 1, context_dim] context; row ``num_classes``
      is the null class, the unconditional input of classifier-free guidance (CompVis cin256-v2: n_classes 1001).
    - ``none``: unconditional (``unet.context_dim: null``, no ``cond_stage_model``, no guidance).
    - ``concat``: an image-like input concatenated to the noisy latent along the channels (CompVis
      ``conditioning_key: concat``, super-resolution as in bsr_sr): the low-resolution image that
      ``data_prep.encode lowres_factor=N`` stored with each sample (``lowres_key``), in [-1, 1], resized to the
      latent grid when its size differs (bicubic). ``unet.concat_channels: 3``, ``unet.context_dim: null``; no
      ``cond_stage_model`` (CompVis: ``torch.nn.Identity``), no guidance.
    - ``inpaint`` (the paper's Sec. 4.5, CompVis inpainting_big): the masked image's latent and the mask on the latent
      grid (``data_prep.encode inpaint_masks=true`` stores both) concatenated to the noisy latent:
      ``unet.concat_channels: z + 1``, ``unet.in_channels: 2z + 1``; no cond stage, no guidance.
    - ``semantic`` (Sec. 4.3, CompVis semantic_synthesis): a one-hot segmentation map of ``num_classes`` classes (the
      shards' ``seg.png``) through the ``SpatialRescaler`` (``cond_stage_model.channel_mapper``) to the latent grid,
      concatenated: ``unet.concat_channels`` = the rescaler's output channels (3 as released); no guidance.
    - ``layout`` (Sec. 4.3, CompVis layout2img): the boxes of each sample's json ``objects`` as tokens (a class token
      and two quantised corner tokens per box, ``ldm_train.data.layout``) through the BERT encoder without tokenizer
      (``text_encoder.vocab_size`` >= ``layout_vocab_size``), cross-attention; the empty layout is the uncond input.

    ``train.caption_dropout`` is the share of unconditional training samples for every kind that has one
    (empty caption, or the null class).
    """

    kind: str = one_of("text", COND_KINDS)  # text | class | none | concat | inpaint | semantic | layout
    num_classes: int = 1000  # class: labels 0..num_classes-1 (the null class is one more embedding row)
    null_class: bool = True  # class: the extra null-class row (needed for label dropout and guidance)
    label_key: str = "label"  # class: the key of the label in each sample's json
    class_names: list[str] = field(default_factory=list)  # class: display names (grid captions, eval)
    lowres_key: str = "lowres.png"  # concat: the member of each sample holding its low-resolution image
    lowres_factor: int = 0  # concat: data_prep.encode's lowres_factor (0: the first stage's f); eval makes its inputs so
    layout_bins: int = 16  # layout: box corners quantised on a layout_bins x layout_bins grid (one token per corner)
    layout_max_objects: int = 8  # layout: boxes kept per image (the token sequence is 1 + 3 * this long)

    def embedding_rows(self) -> int:
        return self.num_classes + (1 if self.null_class else 0)

    def null_label(self) -> int | None:
        return self.num_classes if self.null_class else None

    def class_name(self, label: int) -> str:
        return self.class_names[label] if 0 <= label < len(self.class_names) else f"class {label}"


def cond_config(cfg: Any) -> CondConfig:
    """The ``cond`` node of a composed config or an export's ``config.yaml`` (absent: text, as every older run)."""
    node = OmegaConf.select(cfg, "cond", default=None) if OmegaConf.is_config(cfg) else getattr(cfg, "cond", None)
    cond = to_dataclass(node, CondConfig)
    if cond.kind not in COND_KINDS:
        raise ValueError(f"cond.kind={cond.kind!r}: use one of {COND_KINDS}")
    if cond.kind in ("class", "semantic", "layout") and cond.num_classes < 1:
        raise ValueError(f"cond.num_classes={cond.num_classes}: cond.kind={cond.kind} needs at least one class")
    return cond


def _div(a: Any, b: Any) -> int:
    a, b = int(a), int(b)
    if a % b:
        raise ValueError(f"resolution {a} is not divisible by the downsample factor {b}")
    return a // b


def register_resolvers() -> None:
    """OmegaConf resolvers the presets use (``${div:${data.resolution},${first_stage.downsample_factor}}``,
    ``${add:${first_stage.embed_dim},3}``)."""
    if not OmegaConf.has_resolver("div"):
        OmegaConf.register_new_resolver("div", _div)
    if not OmegaConf.has_resolver("add"):  # unet.in_channels of concat conditioning: latent + image channels
        OmegaConf.register_new_resolver("add", lambda a, b: int(a) + int(b))


def register_configs() -> None:
    """Register the typed schemas with Hydra's ConfigStore (call before ``@hydra.main`` runs)."""
    from hydra.core.config_store import ConfigStore

    register_resolvers()
    cs = ConfigStore.instance()
    cs.store(group="schema", name="first_stage", node=FirstStageConfig)
    cs.store(group="schema", name="unet", node=UNetConfig)
    cs.store(group="schema", name="text_encoder", node=TextEncoderConfig)
    cs.store(group="schema", name="cond", node=CondConfig)


def to_dataclass(cfg: Any, cls: type) -> Any:
    """Turn a DictConfig node (or dict) into the typed dataclass, rejecting unknown keys."""
    if OmegaConf.is_config(cfg):
        # resolve against the whole composed config (a group node interpolates ${data.resolution} etc.)
        cfg = OmegaConf.to_container(cfg, resolve=True)
    base = OmegaConf.structured(cls)
    merged = OmegaConf.merge(base, cfg if cfg is not None else {})
    return OmegaConf.to_object(merged)


register_resolvers()
