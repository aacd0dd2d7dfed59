"""Weights in the CompVis latent-diffusion layout: read a file once, split by prefix, load strictly, export.

A released LDM checkpoint is a Lightning ``.ckpt`` whose ``state_dict`` holds ``model.diffusion_model.*``
(UNet), ``cond_stage_model.*`` (text encoder), ``first_stage_model.*`` (autoencoder), ``model_ema.*`` (LitEma:
the UNet's parameter names with the dots removed, plus ``decay`` / ``num_updates``) and the diffusion
schedule buffers (``betas``, ``alphas_cumprod``, ..., ``scale_factor``). Our modules use the same names,
so loading is a prefix strip and a strict ``load_state_dict``. This module holds the only prefix table.

Safety: nothing here unpickles code. Torch files go through ``safe_load.load_weights_only``; a file that
needs more is refused with a message naming it. Every path may be local or an fsspec URL.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field

import fsspec
import torch
from torch import nn

from ldm_train.checkpoints.safe_load import load_weights_only

UNET_PREFIX = "model.diffusion_model."
TEXT_PREFIX = "cond_stage_model."
FIRST_STAGE_PREFIX = "first_stage_model."
EMA_PREFIX = "model_ema."
# group name -> key prefix, in the order keys are matched
PREFIXES = {"unet": UNET_PREFIX, "text_encoder": TEXT_PREFIX, "first_stage": FIRST_STAGE_PREFIX, "ema": EMA_PREFIX}
# parameters that exist for checkpoint parity but never get a gradient (the text encoder's LM head)
UNUSED_KEYS = ("transformer.to_logits.weight", "transformer.to_logits.bias")


@dataclass
class WeightsFile:
    """One weights file, read once: its tensors, safetensors header metadata ({} for torch files), sha256."""

    path: str
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    sha256: str


def read_weights(path: str, missing_hint: str = "check the configured checkpoint path") -> WeightsFile:
    """All tensors of a ``.safetensors`` or torch (``.ckpt``/``.pt``/``.bin``) file; a Lightning
    ``{"state_dict": ...}`` is unwrapped and non-tensor entries (``global_step``...) are dropped.

    The file is opened exactly once: the hash, the header metadata and the tensors come from the same bytes.
    """
    path = str(path)
    try:
        with fsspec.open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"weights file {path} does not exist: {missing_hint}") from None
    sha = hashlib.sha256(data).hexdigest()
    # safetensors: 8-byte little-endian header length, then the JSON header
    if path.endswith(".safetensors") or data[8:9] == b"{":
        from safetensors.torch import load

        from ldm_train.checkpoints.safe_load import check_safetensors_header

        n = check_safetensors_header(path, data[:8], len(data))
        metadata = json.loads(data[8 : 8 + n]).get("__metadata__") or {}
        return WeightsFile(path, load(data), dict(metadata), sha)
    buffer = io.BytesIO(data)
    buffer.name = path  # the name a refusal gives (the file and the global it asked for)
    obj = load_weights_only(buffer)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]  # Lightning checkpoint
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(f"{path} holds no tensors (keys: {list(obj)[:8]})")
    return WeightsFile(path, tensors, {}, sha)


def load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    """The tensors of ``read_weights(path)``."""
    return read_weights(path).tensors


def ema_key(unet_key: str) -> str:
    """LitEma's buffer name of a UNet parameter (``input_blocks.0.0.weight`` ->
    ``model_ema.diffusion_modelinput_blocks00weight``)."""
    return EMA_PREFIX + ("diffusion_model." + unet_key).replace(".", "")


def split_compvis(state_dict: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Group a CompVis LDM state dict: ``unet``, ``text_encoder``, ``first_stage`` (prefix removed),
    ``ema`` (LitEma's flattened names without ``model_ema.``), ``other`` (schedule buffers, scale_factor...)."""
    groups: dict[str, dict[str, torch.Tensor]] = {g: {} for g in (*PREFIXES, "other")}
    for key, value in state_dict.items():
        for group, prefix in PREFIXES.items():
            if key.startswith(prefix):
                groups[group][key[len(prefix):]] = value
                break
        else:
            groups["other"][key] = value
    return groups


def ema_unet_state_dict(state_dict: Mapping[str, torch.Tensor], unet_keys: list[str]) -> dict[str, torch.Tensor]:
    """The UNet's EMA weights under the UNet's own names, from LitEma's flattened ``model_ema.*`` keys."""
    missing = [k for k in unet_keys if ema_key(k) not in state_dict]
    if missing:
        raise KeyError(f"checkpoint has no EMA weights for {len(missing)} UNet tensors (e.g. {ema_key(missing[0])})")
    return {k: state_dict[ema_key(k)] for k in unet_keys}


@dataclass
class LoadReport:
    """What ``load_compvis`` did: tensors loaded per module, keys deliberately left alone."""

    loaded: dict[str, int] = field(default_factory=dict)
    unused_missing: list[str] = field(default_factory=list)  # to_logits absent from the file: kept as initialised
    ignored: list[str] = field(default_factory=list)  # groups present in the file but not asked for
    ema: bool = False

    def __str__(self) -> str:
        parts = [f"{name}: {n} tensors" for name, n in self.loaded.items()]
        if self.ema:
            parts.append("UNet from EMA weights")
        if self.unused_missing:
            parts.append(f"not in file, unused by the LDM (kept as initialised): {', '.join(self.unused_missing)}")
        if self.ignored:
            parts.append(f"ignored groups: {', '.join(self.ignored)}")
        return "; ".join(parts)


def checked_dtypes(own: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor], what: str, source: str,
                   setting: str | None = None) -> dict[str, torch.Tensor]:
    """``sd`` ready for ``load_state_dict`` into floating-point ``own``: float16 / bfloat16 / float32 pass,
    float64 is cast here to the model's dtype (said once on stdout), integer and bool tensors are refused.

    ``load_state_dict`` would cast an int8 or bool tensor silently: a quantized or damaged file would load as
    garbage weights that only show up as a diverging loss or black samples much later.
    """
    where = f"{setting}={source}" if setting else source
    out, cast = dict(sd), []
    for key, value in sd.items():
        mine = own.get(key)
        if mine is None or not (mine.is_floating_point() or mine.is_complex()):
            continue  # integer buffers (position ids, counters) keep their own rules
        if not (value.is_floating_point() or value.is_complex()):
            raise ValueError(
                f"{where}: {what} tensor {key} is {str(value.dtype).replace('torch.', '')} but the model's is "
                f"{str(mine.dtype).replace('torch.', '')}; loading would cast it into meaningless weights. This is "
                "not a float checkpoint of these weights (quantized or damaged?): export the float16 / bfloat16 / "
                f"float32 weights and point {setting or 'the config'} at that file")
        if value.dtype == torch.float64 and mine.dtype != torch.float64:
            out[key] = value.to(mine.dtype)
            cast.append(key)
    from ldm_train.runtime.log import rank0_logger

    if cast:
        rank0_logger("weights")(f"{where}: {len(cast)} {what} tensors are float64 (e.g. {cast[0]}); cast to "
                                f"{str(own[cast[0]].dtype).replace('torch.', '')}")
    return out


def load_strict(module: nn.Module, sd: Mapping[str, torch.Tensor], what: str, source: str,
                allowed_missing: tuple[str, ...] = (), setting: str | None = None) -> list[str]:
    """``module.load_state_dict(sd)`` with one error naming every missing, unexpected and misshapen key, and
    dtypes checked (``checked_dtypes``; ``setting`` names where the file came from); returns the
    ``allowed_missing`` keys that were absent (kept as initialised)."""
    own = module.state_dict()
    missing = [k for k in own if k not in sd and k not in allowed_missing]
    unexpected = [k for k in sd if k not in own]
    shape = [f"{k} {tuple(sd[k].shape)} vs ours {tuple(own[k].shape)}" for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shape:
        raise ValueError(
            f"{source}: {what} weights do not match the configured model: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}), "
            f"{len(shape)} shape mismatches (e.g. {shape[:2]}). Check that the unet / text_encoder / first_stage "
            "config matches the checkpoint's"
        )
    module.load_state_dict(checked_dtypes(own, sd, what, source, setting), strict=False)
    return [k for k in allowed_missing if k in own and k not in sd]


def load_compvis(
    source: str | Mapping[str, torch.Tensor],
    unet: nn.Module | None = None,
    text_encoder: nn.Module | None = None,
    first_stage: nn.Module | None = None,
    use_ema: bool = False,
    setting: str | None = None,
) -> LoadReport:
    """Load a CompVis-layout checkpoint (path, URL or state dict) into the given modules, strictly.

    ``use_ema`` takes the UNet from LitEma's ``model_ema.*`` (or, for our ``model_ema.safetensors``
    exports, the plain keys of that file). The text encoder's unused ``to_logits`` may be absent. ``setting``
    (e.g. ``train.init_from``) is named in a dtype refusal.
    """
    name = source if isinstance(source, str) else "state dict"
    sd = read_weights(source).tensors if isinstance(source, str) else source
    groups = split_compvis(sd)
    report = LoadReport()
    if unet is not None:
        unet_sd = groups["unet"]
        if use_ema and groups["ema"]:
            unet_sd = ema_unet_state_dict(sd, list(unet.state_dict()))
            report.ema = True
        if not unet_sd:
            raise ValueError(f"{name} has no {UNET_PREFIX}* keys: not a CompVis LDM checkpoint")
        load_strict(unet, unet_sd, "UNet", name, setting=setting)
        report.loaded["unet"] = len(unet_sd)
    if text_encoder is not None:
        if not groups["text_encoder"]:
            raise ValueError(f"{name} has no {TEXT_PREFIX}* keys: no text encoder in this checkpoint")
        report.unused_missing = load_strict(text_encoder, groups["text_encoder"], "text encoder", name, UNUSED_KEYS,
                                            setting)
        report.loaded["text_encoder"] = len(groups["text_encoder"])
    if first_stage is not None:
        fs_sd = {k: v for k, v in groups["first_stage"].items() if not k.startswith("loss.")}
        if not fs_sd:
            raise ValueError(f"{name} has no {FIRST_STAGE_PREFIX}* keys: load the first stage from its own file")
        load_strict(first_stage, fs_sd, "first stage", name, setting=setting)
        report.loaded["first_stage"] = len(fs_sd)
    asked = {"unet": unet, "text_encoder": text_encoder, "first_stage": first_stage, "ema": unet if use_ema else None}
    report.ignored = [g for g, v in groups.items() if v and g != "other" and asked.get(g) is None]
    return report


def compvis_state_dict(unet: Mapping[str, torch.Tensor] | None = None,
                       text_encoder: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Bare UNet / text encoder state dicts -> one dict with the CompVis prefixes."""
    out = {UNET_PREFIX + k: v for k, v in (unet or {}).items()}
    out.update({TEXT_PREFIX + k: v for k, v in (text_encoder or {}).items()})
    return out


def export_safetensors(
    path: str,
    modules: Mapping[str, nn.Module | Mapping[str, torch.Tensor]],
    metadata: Mapping[str, str] | None = None,
) -> dict[str, torch.Tensor]:
    """Write ``{group or prefix: module or state dict}`` as one safetensors file (local path or fsspec URL).

    ``export_safetensors(p, {"unet": unet, "text_encoder": text_encoder})`` gives the CompVis layout (a group
    name of ``PREFIXES`` stands for its prefix; any other key is used as the prefix itself). Returns the tensors.
    """
    from safetensors.torch import save

    from ldm_train.data.fsspec_io import write_bytes

    out: dict[str, torch.Tensor] = {}
    for prefix, part in modules.items():
        sd = part.state_dict() if isinstance(part, nn.Module) else part
        pre = PREFIXES.get(prefix, prefix)
        pre = pre if not pre or pre.endswith(".") else pre + "."
        for key, value in sd.items():
            out[pre + key] = value.detach().to("cpu").contiguous()
    meta = {"format": "compvis-ldm", **{str(k): str(v) for k, v in (metadata or {}).items()}}
    write_bytes(path, save(out, metadata=meta))  # atomic: a reader never sees half a weights file
    return out


def main(argv: list[str] | None = None) -> None:
    """``python -m ldm_train.checkpoints PATH``: groups, tensor and parameter counts of a checkpoint."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m ldm_train.checkpoints PATH_OR_URL")
    path = args[0]
    if os.path.isdir(path):  # a run dir, its checkpoints/ dir or a step dir: the export's EMA weights
        from ldm_train.checkpoints.export import weights_file

        try:
            path = str(weights_file(path))
        except (FileNotFoundError, ValueError) as err:
            raise SystemExit(f"{args[0]} is a folder without an exported checkpoint ({err}); give a .ckpt or "
                             ".safetensors file, a run dir, its checkpoints/ dir or a checkpoints/step_* dir") from None
    groups = split_compvis(read_weights(path).tensors)
    print(json.dumps({g: {"tensors": len(sd), "elements": sum(v.numel() for v in sd.values())}
                      for g, sd in groups.items() if sd}, indent=1))
