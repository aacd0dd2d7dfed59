"""A diffusers model folder -> our weights in the CompVis layout (``train.init_from=<folder>``).

The folder is a ``UNet2DConditionModel`` (``config.json`` + weights) or a pipeline with ``unet/``, the first stage
in ``vqvae/`` or ``vae/`` and the text encoder in ``bert/`` (``LDMBertModel``, our export) or ``text_encoder/``
(an LDMBert, or our own keys from exports made before ``bert/``). The key maps are the inverses of the ones
``diffusers_export`` uses, built by running diffusers' CompVis->diffusers converters once over marker tensors of
our model's shapes (each marker holds its key's index and takes no memory): whatever the converter renames or
reshapes, the marker says which of our keys a diffusers key came from.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ldm_train.checkpoints.compvis import FIRST_STAGE_PREFIX, TEXT_PREFIX, UNET_PREFIX, read_weights
from ldm_train.config import FirstStageConfig, TextEncoderConfig, UNetConfig

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.bin",
                "pytorch_model.bin")


def _class_name(folder: Path) -> str | None:
    config = folder / "config.json"
    return json.loads(config.read_text()).get("_class_name") if config.is_file() else None


def is_diffusers_folder(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and ((p / "model_index.json").is_file() or (p / "unet" / "config.json").is_file()
                           or _class_name(p) == "UNet2DConditionModel")


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return read_weights(str(folder / name)).tensors
    raise FileNotFoundError(f"{folder} holds none of {', '.join(WEIGHT_FILES)} (sharded weights: save them "
                            "unsharded with save_pretrained(..., max_shard_size='100GB'))")


def _inverse(convert: Callable[[dict], dict], shapes: Mapping[str, torch.Size], prefix: str) -> dict[str, str]:
    """diffusers key -> our key, from ``convert`` applied to markers (a 0-d index expanded to each shape)."""
    keys = list(shapes)
    markers = {prefix + k: torch.tensor(float(i)).expand(shapes[k]) for i, k in enumerate(keys)}
    return {theirs: keys[int(m[(0,) * m.dim()])] for theirs, m in convert(markers).items()}


def _convert(theirs: Mapping[str, torch.Tensor], inverse: Mapping[str, str], shapes: Mapping[str, torch.Size],
             what: str, source: Path) -> dict[str, torch.Tensor]:
    missing = [k for k in inverse if k not in theirs]
    unexpected = [k for k in theirs if k not in inverse]
    bad = [f"{k} {tuple(theirs[k].shape)} vs ours {tuple(shapes[inverse[k]])}" for k in inverse
           if k in theirs and theirs[k].numel() != shapes[inverse[k]].numel()]
    if missing or unexpected or bad:
        raise ValueError(f"{source}: the diffusers {what} does not fit the configured model: {len(missing)} missing "
                         f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}), {len(bad)} "
                         f"shape mismatches (e.g. {bad[:2]}): set the {what} config to the folder's")
    return {inverse[k]: theirs[k].reshape(shapes[inverse[k]]) for k in inverse}


def _check_config(theirs: Mapping[str, Any], ours: Mapping[str, Any], keys: tuple[str, ...], what: str,
                  source: Path) -> None:
    """Settings that change what the weights compute without changing a shape (heads, groups)."""
    diffs = [f"{k}: folder {theirs.get(k)!r} vs config {ours.get(k)!r}" for k in keys
             if k in ours and _norm(theirs.get(k)) != _norm(ours.get(k))]
    if diffs:
        raise ValueError(f"{source}/config.json: the diffusers {what} was built with other settings than the "
                         f"configured one: {'; '.join(diffs)}")


def _norm(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def unet_to_compvis(folder: Path, cfg: UNetConfig, fs: FirstStageConfig) -> dict[str, torch.Tensor]:
    """A ``UNet2DConditionModel`` folder -> our UNet's state dict (bare keys)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from ldm_train.checkpoints.diffusers_export import unet_diffusers_config
    from ldm_train.models.unet import UNetModel

    config = json.loads((folder / "config.json").read_text())
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in UNetModel(cfg).state_dict().items()}
    expected = unet_diffusers_config(cfg, fs, {UNET_PREFIX + k: torch.empty(s, device="meta")
                                              for k, s in shapes.items()})
    _check_config(config, expected, ("attention_head_dim", "cross_attention_dim", "use_linear_projection",
                                     "transformer_layers_per_block", "norm_num_groups", "layers_per_block",
                                     "block_out_channels", "down_block_types", "up_block_types"), "unet", folder)
    inverse = _inverse(lambda ck: convert_ldm_unet_checkpoint(ck, config), shapes, UNET_PREFIX)
    return _convert(_weights(folder), inverse, shapes, "unet", folder)


def vae_to_compvis(folder: Path, fs: FirstStageConfig) -> dict[str, torch.Tensor]:
    """An ``AutoencoderKL`` / ``VQModel`` folder -> our first stage's state dict (bare keys)."""
    from ldm_train.checkpoints.diffusers_export import _vae_config, vae_state_dict
    from ldm_train.models.autoencoder import build_first_stage

    config = json.loads((folder / "config.json").read_text())
    expected = _vae_config(fs, 1.0)
    _check_config(config, expected, ("norm_num_groups", "block_out_channels", "layers_per_block", "latent_channels",
                                     "down_block_types", "up_block_types", "mid_block_add_attention"),
                  "first stage", folder)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in build_first_stage(fs).state_dict().items() if not k.startswith("loss.")}
    inverse = _inverse(lambda ck: vae_state_dict({k[len(FIRST_STAGE_PREFIX):]: v for k, v in ck.items()}, fs,
                                                 expected), shapes, FIRST_STAGE_PREFIX)
    return _convert(_weights(folder), inverse, shapes, "first stage", folder)


def text_encoder_to_compvis(folder: Path, cfg: TextEncoderConfig) -> dict[str, torch.Tensor]:
    """An ``LDMBertModel`` folder (or our own keys, ``format: ldm-train-bert``) -> our text encoder's state dict."""
    from ldm_train.checkpoints.ldmbert import from_ldmbert, text_encoder_config

    sd = _weights(folder)
    if any(k.startswith("transformer.") for k in sd):  # exports made before bert/: our keys already
        return sd
    theirs = text_encoder_config(json.loads((folder / "config.json").read_text()))
    _check_config(vars(theirs), vars(cfg), ("n_embed", "n_layer", "heads", "dim_head"), "text encoder", folder)
    return from_ldmbert(sd, theirs.n_layer, cfg.max_seq_len)


def compvis_from_diffusers(path: str | Path, unet: UNetConfig, first_stage: FirstStageConfig,
                           text_encoder: TextEncoderConfig | None) -> dict[str, torch.Tensor]:
    """Every part the folder has, CompVis-prefixed (``model.diffusion_model.``, ``cond_stage_model.``,
    ``first_stage_model.``); ``text_encoder`` None: the cond stage is not read."""
    root = Path(path)
    unet_dir = root if _class_name(root) == "UNet2DConditionModel" else root / "unet"
    out = {UNET_PREFIX + k: v for k, v in unet_to_compvis(unet_dir, unet, first_stage).items()}
    vae_dir = next((root / n for n in ("vqvae", "vae") if (root / n / "config.json").is_file()), None)
    if vae_dir is not None and first_stage.kind != "pixel":
        out.update({FIRST_STAGE_PREFIX + k: v for k, v in vae_to_compvis(vae_dir, first_stage).items()})
    text_dir = next((root / n for n in ("bert", "text_encoder") if (root / n / "config.json").is_file()), None)
    if text_dir is not None and text_encoder is not None:
        out.update({TEXT_PREFIX + k: v for k, v in text_encoder_to_compvis(text_dir, text_encoder).items()})
    return out
