"""First-stage (autoencoder) weights: load into a built model, export with the recorded architecture.

A first-stage file may be our export (``first_stage.safetensors``, keys ``encoder.*``..., the
FirstStageConfig in its header), a released CompVis ``model.ckpt`` (a ``state_dict`` with the training
loss's ``loss.*`` keys), or a whole LDM checkpoint (``first_stage_model.*`` beside the UNet): all load the
same way. ``load_first_stage`` reads the file once (``read_weights``); pass the ``WeightsFile`` when the
caller also needs its sha256 (the encode job records it in the manifest).
"""
from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from ldm_train.checkpoints.compvis import FIRST_STAGE_PREFIX, WeightsFile, checked_dtypes, read_weights
from ldm_train.config import FirstStageConfig
from ldm_train.data.fsspec_io import write_bytes, write_text

# fields that change what the weights compute without changing any tensor shape
# header key of a decoder fine-tune's export: the sha256 of the file its frozen encoder came from
ENCODER_SHA256 = "encoder_sha256"
_ARCH_FIELDS = ("kind", "embed_dim", "n_embed", "downsample_factor")
_DD_FIELDS = ("z_channels", "ch", "ch_mult", "num_res_blocks", "attn_resolutions", "double_z", "norm_groups")


def missing_hint(name: str) -> str:
    return (f"train one with `python -m ldm_train.train_autoencoder first_stage={name} data.input=...` (it writes "
            "<run>/export/first_stage.safetensors), or put a released CompVis first stage (e.g. kl-f8 model.ckpt) "
            "at that path, then set first_stage.checkpoint")


def is_loadable(cfg: FirstStageConfig | Any) -> bool:
    """True when ``load_first_stage`` can build ``cfg`` with real weights: a checkpoint is set, or the
    first stage is the weightless identity (``kind: pixel``)."""
    return cfg.kind == "pixel" or bool(cfg.checkpoint)


def read_first_stage_file(cfg: FirstStageConfig) -> WeightsFile:
    if not cfg.checkpoint:
        raise ValueError(
            f"first_stage {cfg.name} has no checkpoint: set first_stage.checkpoint=PATH to a file trained with "
            f"`python -m ldm_train.train_autoencoder first_stage={cfg.name} ...` (its export "
            f"first_stage.safetensors) or to a released CompVis model.ckpt of that preset")
    return read_weights(cfg.checkpoint, missing_hint(cfg.name))


def first_stage_state_dict(weights: WeightsFile) -> dict[str, torch.Tensor]:
    """The first-stage tensors with bare CompVis keys (``encoder.conv_in.weight``...)."""
    state = weights.tensors
    if any(k.startswith(FIRST_STAGE_PREFIX) for k in state):  # a whole LDM: keep only its first stage
        state = {k[len(FIRST_STAGE_PREFIX):]: v for k, v in state.items() if k.startswith(FIRST_STAGE_PREFIX)}
    # the training objective (LPIPS, discriminator, logvar) ships in released files but is not the model
    return {k: v for k, v in state.items() if not k.startswith("loss.")}


def encoder_sha256(weights: WeightsFile) -> str:
    """sha256 of the file whose encoder this one carries unchanged: the header's ``encoder_sha256`` when the file is
    a decoder fine-tune (``train.trainable=decoder``), else the file's own; latents encoded with that file decode
    with this one."""
    return weights.metadata.get(ENCODER_SHA256) or weights.sha256


def stored_config(weights: WeightsFile) -> dict[str, Any] | None:
    """The FirstStageConfig (as a dict) our export wrote into the safetensors header, else None."""
    meta = weights.metadata
    return json.loads(meta["first_stage"]) if "first_stage" in meta else None


def check_architecture(weights: WeightsFile, cfg: FirstStageConfig) -> None:
    """Refuse a checkpoint whose recorded architecture differs from ``cfg`` (e.g. GroupNorm groups)."""
    stored = stored_config(weights)
    if stored is None:
        return
    mine = asdict(cfg)
    diffs = [f"{k}: file {stored.get(k)!r} vs config {mine[k]!r}" for k in _ARCH_FIELDS
             if k in stored and stored[k] != mine[k]]
    sdd, mdd = stored.get("ddconfig", {}), mine["ddconfig"]
    diffs += [f"ddconfig.{k}: file {sdd.get(k, 32 if k == 'norm_groups' else None)!r} vs config {mdd[k]!r}"
              for k in _DD_FIELDS if sdd.get(k, 32 if k == "norm_groups" else None) != mdd[k]]
    if diffs:
        raise ValueError(f"first_stage checkpoint {weights.path} was trained as {stored.get('name')!r} with another "
                         f"architecture than first_stage {cfg.name}: {'; '.join(diffs)}. Use the preset it was "
                         f"trained with (its config is in the .json beside it) or override those fields")


def load_first_stage(cfg: FirstStageConfig | Any, map_location: str | torch.device = "cpu",
                     weights: WeightsFile | None = None) -> nn.Module:
    """Build the first stage and load ``cfg.checkpoint`` (or the already read ``weights``), in eval mode, frozen.

    The identity first stage (``kind: pixel``) has no file: it is built and returned as it is.
    """
    from ldm_train.models.autoencoder import build_first_stage

    model = build_first_stage(cfg)
    cfg = model.cfg
    if cfg.kind == "pixel":
        return model.to(map_location)
    weights = weights if weights is not None else read_first_stage_file(cfg)
    state = first_stage_state_dict(weights)
    check_architecture(weights, cfg)
    ours = model.state_dict()
    missing = sorted(set(ours) - set(state))
    unexpected = sorted(set(state) - set(ours))
    if missing or unexpected:
        raise ValueError(
            f"first_stage checkpoint {weights.path} does not match preset {cfg.name}: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''}: pick the first_stage preset the file was trained with")
    bad = [k for k in ours if ours[k].shape != state[k].shape]
    if bad:
        k = bad[0]
        raise ValueError(f"first_stage checkpoint {weights.path}: {k} has shape {tuple(state[k].shape)} but "
                         f"preset {cfg.name} expects {tuple(ours[k].shape)}: pick the matching first_stage preset")
    model.load_state_dict(checked_dtypes(ours, state, "first stage", weights.path, "first_stage.checkpoint"),
                          strict=True)
    return model.to(map_location).eval().requires_grad_(False)


def export_first_stage(model: nn.Module, path: str, extra: dict[str, Any] | None = None) -> str:
    """Write ``model`` as safetensors (bare CompVis keys) and its FirstStageConfig as JSON beside it.

    Returns the JSON path (``<path without .safetensors>.json``). The JSON carries the config the file
    was trained with plus ``extra`` (e.g. the latent statistics and suggested ``scale_factor``).
    """
    from safetensors.torch import save

    cfg = model.cfg  # type: ignore[attr-defined]
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    info = {"first_stage": asdict(cfg), **(extra or {})}
    info["first_stage"]["checkpoint"] = str(path)
    metadata = {"format": "pt", "first_stage": json.dumps(info["first_stage"])}
    if info.get(ENCODER_SHA256):  # a decoder fine-tune: the file its (unchanged) encoder came from
        metadata[ENCODER_SHA256] = str(info[ENCODER_SHA256])
    data = save(tensors, metadata=metadata)
    write_bytes(path, data)  # atomic, as the JSON: the next stage may be waiting for the file
    json_path = str(path)[: -len(".safetensors")] if str(path).endswith(".safetensors") else str(path)
    json_path += ".json"
    write_text(json_path, json.dumps(info, indent=2))
    return json_path
