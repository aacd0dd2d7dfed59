"""Export a trained LDM to diffusers' ``save_pretrained`` layout and to one CompVis-layout safetensors file.

``python -m ldm_train.checkpoints.diffusers_export CHECKPOINT OUT [--raw] [--first-stage PATH] [--scale-factor X]``

CHECKPOINT is a run dir, its ``checkpoints/`` dir or a ``step_*`` dir (the trainer's export). OUT receives:

- ``unet/``: ``UNet2DConditionModel`` (config + safetensors), converted by diffusers' own CompVis converter;
- ``vqvae/``: ``AutoencoderKL`` or ``VQModel`` of the run's first stage (its GroupNorm group count kept, so tiny
  presets with 8 groups decode as here), ``scaling_factor`` = the run's latent scale factor;
- ``scheduler/``: ``DDIMScheduler`` with the run's noise schedule (beta schedule, start/end, T, eps or v);
- ``bert/`` (our text encoder as diffusers' ``LDMBertModel``, :mod:`ldm_train.checkpoints.ldmbert`) and
  ``tokenizer/`` (the run's WordPiece vocabulary), and ``model_index.json``: text models with a latent first
  stage load whole with ``DiffusionPipeline.from_pretrained(OUT)`` (an ``LDMTextToImagePipeline``; it makes
  latents of side ``height // 8``, so pass ``height``/``width`` from ``ldm_train_export.json``);
  :func:`load_text_encoder` reads ``bert/`` back into our encoder;
- ``class_embedder/`` (class models, instead of the two above): the label table and its config
  (:func:`export_class_embedder`); unconditional and super-resolution UNets are refused for ``unet/`` (the
  CompVis file, the VAE and the scheduler are still written);
- ``compvis/model.safetensors``: every weight in the CompVis ``LatentDiffusion`` layout
  (``model.diffusion_model.*``, ``cond_stage_model.*``, ``first_stage_model.*``) for the CompVis scripts.

Everything loads with diffusers' ``from_pretrained(OUT, subfolder=...)``: no hand-written config. The EMA weights
are exported unless ``--raw``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ldm_train.config import FirstStageConfig, TextEncoderConfig, UNetConfig, cond_config, to_dataclass

if TYPE_CHECKING:  # the functions load torch (through the model modules) when called: --help stays fast
    import torch

SUBFOLDERS = ("unet", "vqvae", "scheduler", "bert", "tokenizer", "class_embedder", "compvis")


def _diffusers() -> Any:
    try:
        import diffusers
        from diffusers.loaders import single_file_utils
    except ImportError as exc:  # an extra: the trainer does not need it
        raise ImportError("the diffusers export and train.init_from=<diffusers folder> need diffusers: "
                          "pip install 'ldm-train[diffusers]'") from exc
    return diffusers, single_file_utils


def unet_original_config(cfg: UNetConfig, ch_mult_first_stage: list[int]) -> dict:
    """The part of a CompVis YAML that diffusers' UNet converter reads."""
    return {"model": {"params": {
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
            "image_size": cfg.image_size, "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
            "model_channels": cfg.model_channels, "attention_resolutions": list(cfg.attention_resolutions),
            "num_res_blocks": cfg.num_res_blocks, "channel_mult": list(cfg.channel_mult),
            "num_heads": cfg.num_heads, "num_head_channels": cfg.num_head_channels,
            "use_spatial_transformer": True, "transformer_depth": cfg.transformer_depth,
            "context_dim": cfg.context_dim, "use_checkpoint": False, "legacy": False,
            "use_linear_in_transformer": cfg.use_linear_in_transformer}},
        "first_stage_config": {"params": {"ddconfig": {"ch_mult": list(ch_mult_first_stage)}}},
    }}}


def unet_diffusers_config(cfg: UNetConfig, fs: FirstStageConfig, checkpoint: dict[str, torch.Tensor]) -> dict:
    """The ``UNet2DConditionModel`` config of our UNet (``checkpoint``: its CompVis-prefixed tensors)."""
    _, sfu = _diffusers()
    original = unet_original_config(cfg, fs.ddconfig.ch_mult if fs.kind != "pixel" else [1])
    return sfu.create_unet_diffusers_config_from_ldm(original, checkpoint, image_size=cfg.image_size * fs.downsample_factor)


def export_unet(unet_sd: dict[str, torch.Tensor], cfg: UNetConfig, fs: FirstStageConfig, out: Path) -> Any:
    diffusers, sfu = _diffusers()
    unsupported = [name for name, bad in (
        ("unconditional or class-label UNets (context_dim null / num_classes)", cfg.context_dim is None
         or cfg.num_classes is not None),
        ("concat conditioning", cfg.concat_channels > 0),
        ("use_scale_shift_norm / resblock_updown", cfg.use_scale_shift_norm or cfg.resblock_updown),
    ) if bad]
    if unsupported:
        raise ValueError(f"the diffusers export covers text-conditional UNets; this run has {unsupported[0]}: "
                         "use the CompVis-layout file (compvis/model.safetensors) instead")
    checkpoint = {"model.diffusion_model." + k: v for k, v in unet_sd.items()}
    config = unet_diffusers_config(cfg, fs, checkpoint)
    converted = sfu.convert_ldm_unet_checkpoint(checkpoint, config)
    model = diffusers.UNet2DConditionModel(**config)
    model.load_state_dict(converted, strict=True)
    model.save_pretrained(str(out / "unet"))
    return model


def _attention_levels(dd: Any) -> list[bool]:
    """Which resolution levels hold attention blocks (CompVis: the level's feature side at ddconfig.resolution
    is in attn_resolutions; level i has side resolution / 2**i in the encoder and the decoder alike)."""
    return [dd.resolution // 2 ** i in dd.attn_resolutions and dd.attn_type != "none" for i in range(len(dd.ch_mult))]


def _vae_config(fs: FirstStageConfig, scale_factor: float) -> dict:
    dd = fs.ddconfig
    attn = _attention_levels(dd)
    config = dict(in_channels=dd.in_channels, out_channels=dd.out_ch,
                  down_block_types=["AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in attn],
                  up_block_types=["AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in reversed(attn)],
                  block_out_channels=[dd.ch * m for m in dd.ch_mult], layers_per_block=dd.num_res_blocks,
                  norm_num_groups=dd.norm_groups, sample_size=dd.resolution, scaling_factor=float(scale_factor),
                  mid_block_add_attention=dd.attn_type != "none")
    if fs.kind == "kl":
        config["latent_channels"] = fs.embed_dim if fs.embed_dim == dd.z_channels else dd.z_channels
    else:
        config.update(latent_channels=dd.z_channels, num_vq_embeddings=fs.n_embed, vq_embed_dim=fs.embed_dim)
    return config


# CompVis AttnBlock -> diffusers Attention (the 1x1 convolutions become linear layers)
_ATTN_NAMES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _level_attention(fs_sd: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """The attention blocks outside the mid block, which diffusers' converter leaves out: CompVis
    ``encoder.down.{i}.attn.{j}`` -> ``encoder.down_blocks.{i}.attentions.{j}``, ``decoder.up.{i}.attn.{j}`` ->
    ``decoder.up_blocks.{levels-1-i}.attentions.{j}`` (diffusers counts decoder levels from the bottom)."""
    out = {}
    for key, value in fs_sd.items():
        part = key.split(".")
        if len(part) != 7 or part[3] != "attn" or (part[0], part[1]) not in (("encoder", "down"), ("decoder", "up")):
            continue
        level = int(part[2]) if part[0] == "encoder" else levels - 1 - int(part[2])
        blocks = "down_blocks" if part[0] == "encoder" else "up_blocks"
        name = _ATTN_NAMES[part[5]]
        tensor = value[:, :, 0, 0] if name != "group_norm" and value.dim() == 4 else value
        out[f"{part[0]}.{blocks}.{level}.attentions.{part[4]}.{name}.{part[6]}"] = tensor
    return out


def vae_state_dict(fs_sd: dict[str, torch.Tensor], fs: FirstStageConfig, config: dict) -> dict[str, torch.Tensor]:
    """Our first stage's state dict in diffusers' ``AutoencoderKL`` / ``VQModel`` names (``config``: the
    diffusers config, ``_vae_config``)."""
    _, sfu = _diffusers()
    checkpoint = {"first_stage_model." + k: v for k, v in fs_sd.items()}
    converted = sfu.convert_ldm_vae_checkpoint(checkpoint, config)
    # the converter passes the level attentions through under their CompVis names: rename them
    converted = {k: v for k, v in converted.items() if not k.startswith(("encoder.down.", "decoder.up."))}
    converted.update(_level_attention(fs_sd, len(fs.ddconfig.ch_mult)))
    if fs.kind == "vq":
        converted["quantize.embedding.weight"] = fs_sd["quantize.embedding.weight"]
    return converted


def export_vae(fs_sd: dict[str, torch.Tensor], fs: FirstStageConfig, scale_factor: float, out: Path) -> Any:
    diffusers, sfu = _diffusers()
    if fs.kind == "kl" and fs.embed_dim != fs.ddconfig.z_channels:
        raise ValueError(f"first stage {fs.name}: embed_dim {fs.embed_dim} != z_channels {fs.ddconfig.z_channels}; "
                         "diffusers' AutoencoderKL has one latent width")
    config = _vae_config(fs, scale_factor)
    converted = vae_state_dict(fs_sd, fs, config)
    cls = diffusers.AutoencoderKL if fs.kind == "kl" else diffusers.VQModel
    model = cls(**config)
    model.load_state_dict(converted, strict=True)
    model.save_pretrained(str(out / "vqvae"))
    return model


def export_scheduler(cfg: Any, out: Path) -> Any:
    diffusers, _ = _diffusers()
    from ldm_train.build import diffusion_config

    d = diffusion_config(cfg)
    kinds = {"scaled_linear": "scaled_linear", "sqrt_linear": "linear", "cosine": "squaredcos_cap_v2"}
    if d.beta_schedule not in kinds:
        raise ValueError(f"diffusion.beta_schedule={d.beta_schedule!r} has no diffusers equivalent")
    scheduler = diffusers.DDIMScheduler(
        num_train_timesteps=d.timesteps, beta_start=d.linear_start, beta_end=d.linear_end,
        beta_schedule=kinds[d.beta_schedule], clip_sample=False, set_alpha_to_one=False, steps_offset=1,
        prediction_type="v_prediction" if d.parameterization == "v" else "epsilon")
    scheduler.save_pretrained(str(out / "scheduler"))
    return scheduler


def export_text_encoder(text_sd: dict[str, torch.Tensor], cfg: TextEncoderConfig, tokenizer_dir: Path,
                        out: Path) -> tuple[Any, Any]:
    """``bert/`` (diffusers' ``LDMBertModel``) and ``tokenizer/`` (saved by transformers, so the pipeline's
    ``BertTokenizer`` reads it); returns both."""
    _diffusers()
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel

    from ldm_train.checkpoints.ldmbert import ldmbert_config, to_ldmbert
    from ldm_train.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(tokenizer_dir), cfg.max_seq_len)
    bert = LDMBertModel(LDMBertConfig(**ldmbert_config(cfg, tokenizer.pad_token_id))).eval()
    bert.load_state_dict(to_ldmbert(text_sd, cfg), strict=True)
    bert.save_pretrained(str(out / "bert"))
    tokenizer.save_pretrained(str(out / "tokenizer"))
    return bert, tokenizer


def export_class_embedder(stage_sd: dict[str, torch.Tensor], cond: Any, out: Path) -> None:
    """A class model's cond stage: ``class_embedder/`` with the label table (row ``null_label`` is the null class
    of classifier-free guidance) and its config; the context of label y is ``table[y][None, None]``
    ([1, 1, context_dim]), the ``encoder_hidden_states`` of the exported UNet."""
    from safetensors.torch import save_file

    folder = out / "class_embedder"
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in stage_sd.items()}, str(folder / "model.safetensors"),
              metadata={"format": "ldm-train-class-embedder"})
    table = stage_sd["embedding.weight"]
    config = {"num_classes": cond.num_classes, "null_label": cond.null_label(), "embed_dim": int(table.shape[1]),
              "class_names": list(cond.class_names), "_class": "ldm_train.models.class_embedder.ClassEmbedder"}
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def load_text_encoder(folder: str | Path) -> tuple[torch.nn.Module, Any]:
    """(our text encoder in eval mode, tokenizer) from an export's OUT folder (or its ``bert/``); exports made
    before ``bert/`` have ``text_encoder/`` with our keys."""
    from ldm_train.checkpoints.compvis import load_state_dict_file, load_strict
    from ldm_train.checkpoints.ldmbert import from_ldmbert, text_encoder_config
    from ldm_train.data.tokenizer import load_tokenizer
    from ldm_train.models.text_encoder import BERTEmbedder

    root = Path(folder)
    root = root.parent if root.name in ("bert", "text_encoder") else root
    if (root / "bert" / "config.json").is_file():
        cfg = text_encoder_config(json.loads((root / "bert" / "config.json").read_text()))
        file = str(root / "bert" / "model.safetensors")
        sd = from_ldmbert(load_state_dict_file(file), cfg.n_layer, cfg.max_seq_len)
    else:
        raw = json.loads((root / "text_encoder" / "config.json").read_text())
        cfg = TextEncoderConfig(**{k: v for k, v in raw.items() if not k.startswith("_")})
        file = str(root / "text_encoder" / "model.safetensors")
        sd = load_state_dict_file(file)
    model = BERTEmbedder(cfg)
    load_strict(model, sd, "text encoder", file)
    return model.eval(), load_tokenizer(str(root / "tokenizer"), cfg.max_seq_len)


def write_model_index(parts: dict[str, Any], out: Path) -> None:
    """``model_index.json`` of an ``LDMTextToImagePipeline`` over the saved parts (diffusers writes it)."""
    from diffusers import LDMTextToImagePipeline

    LDMTextToImagePipeline(**parts).save_config(str(out))


def pipeline_note(unet_cfg: UNetConfig, text_cfg: TextEncoderConfig) -> dict[str, Any]:
    """How to call the exported pipeline so that it samples as our sampler does."""
    from ldm_train.checkpoints.ldmbert import PIPELINE_TOKENS

    side = 8 * unet_cfg.image_size  # the pipeline's latents are height // 8 whatever the first stage's f
    note = {"class": "LDMTextToImagePipeline", "height": side, "width": side,
            "matches_ldm_train_sampler": text_cfg.max_seq_len == PIPELINE_TOKENS}
    if text_cfg.max_seq_len != PIPELINE_TOKENS:
        note["why_not"] = (f"the pipeline pads prompts to {PIPELINE_TOKENS} tokens, this model was trained on "
                           f"{text_cfg.max_seq_len} and attends to its [PAD] positions (no mask): encode prompts "
                           f"padded to {text_cfg.max_seq_len} with bert/ and call unet/ + scheduler/ yourself to "
                           "get our samples")
    return note


def export(checkpoint: str, out: str | Path, *, use_ema: bool = True, first_stage_checkpoint: str | None = None,
           scale_factor: float | None = None) -> dict[str, Any]:
    """Write OUT (see the module doc); returns a summary dict (also written as ``OUT/ldm_train_export.json``)."""
    from safetensors.torch import save_file

    from ldm_train.checkpoints.compvis import compvis_state_dict
    from ldm_train.checkpoints.export import latent_scale_factor, load_export
    from ldm_train.checkpoints.first_stage import first_stage_state_dict, read_first_stage_file

    _diffusers()  # before any work: without it nothing but the CompVis file could be written
    exp = load_export(checkpoint, ema=use_ema)
    cfg = exp.config
    unet_cfg = to_dataclass(cfg.unet, UNetConfig)
    fs_cfg = to_dataclass(cfg.first_stage, FirstStageConfig)
    cond = cond_config(cfg)
    text_cfg = to_dataclass(cfg.text_encoder, TextEncoderConfig) if cond.kind == "text" else None
    if first_stage_checkpoint:
        fs_cfg.checkpoint = first_stage_checkpoint
    if fs_cfg.kind != "pixel" and not fs_cfg.checkpoint:
        raise ValueError(f"the config at {exp.step_dir} names no first_stage.checkpoint: pass --first-stage PATH "
                         "(the autoencoder the latents were encoded with)")
    scale_factor = latent_scale_factor(cfg, scale_factor, fix=f"{exp.step_dir}: pass --scale-factor X")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fs_sd: dict[str, torch.Tensor] = {}
    if fs_cfg.kind != "pixel":
        fs_sd = first_stage_state_dict(read_first_stage_file(fs_cfg))
    # the CompVis file first: it holds every kind of model, and stays when a diffusers part is refused below
    (out / "compvis").mkdir(exist_ok=True)
    full = compvis_state_dict(exp.unet, exp.text_encoder)
    full.update({"first_stage_model." + k: v for k, v in fs_sd.items()})
    save_file({k: v.contiguous() for k, v in full.items()}, str(out / "compvis" / "model.safetensors"),
              metadata={"format": "compvis-ldm", "scale_factor": str(scale_factor)})
    vae = export_vae(fs_sd, fs_cfg, scale_factor, out) if fs_sd else None
    scheduler = export_scheduler(cfg, out)
    try:
        unet = export_unet(exp.unet, unet_cfg, fs_cfg, out)
    except ValueError as err:
        raise ValueError(f"{err}; written to {out}: compvis/model.safetensors, "
                         f"{'vqvae/, ' if fs_sd else ''}scheduler/") from None
    pipeline = None
    if cond.kind == "text":
        bert, tokenizer = export_text_encoder(exp.text_encoder, text_cfg, exp.tokenizer_dir, out)
        if vae is not None:
            write_model_index(dict(vqvae=vae, bert=bert, tokenizer=tokenizer, unet=unet, scheduler=scheduler), out)
            pipeline = pipeline_note(unet_cfg, text_cfg)
    elif cond.kind == "class":
        export_class_embedder(exp.text_encoder, cond, out)
    summary = {"source": str(exp.weights_file), "sha256": exp.sha256, "ema": exp.ema,
               "first_stage": fs_cfg.checkpoint, "scale_factor": scale_factor,
               "folders": [s for s in SUBFOLDERS if (out / s).exists()], "pipeline": pipeline}
    (out / "ldm_train_export.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m ldm_train.checkpoints.diffusers_export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="run dir, checkpoints dir or step_* dir of a training run")
    p.add_argument("out", help="output folder (diffusers save_pretrained layout + compvis/)")
    p.add_argument("--raw", action="store_true", help="export the raw weights instead of the EMA")
    p.add_argument("--first-stage", help="first-stage checkpoint when the run's config names none")
    p.add_argument("--scale-factor", type=float, help="latent scale factor when the run's config sets none")
    a = p.parse_args(argv)
    summary = export(a.checkpoint, a.out, use_ema=not a.raw, first_stage_checkpoint=a.first_stage,
                     scale_factor=a.scale_factor)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
