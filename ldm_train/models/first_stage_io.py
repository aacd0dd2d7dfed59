"""Reading and writing first-stage weights in the CompVis layout (local paths or fsspec URLs).

A first-stage file may be our export (``first_stage.safetensors``, keys ``encoder.*``...), a released
CompVis ``model.ckpt`` (a ``state_dict`` with the training loss's ``loss.*`` keys), or a whole LDM
checkpoint (keys ``first_stage_model.*`` beside ``model.diffusion_model.*``): all give the same dict.
"""
from __future__ import annotations

import io
import json
from dataclasses import asdict
from typing import Any

import fsspec
import torch
from torch import nn

PREFIX = "first_stage_model."


def _read_file(path: str) -> dict[str, torch.Tensor]:
    try:  # the shared loader (ldm_train/weights.py) when present: one refusal policy for every stage
        from ldm_train.weights import load_state_dict_file
    except ImportError:
        load_state_dict_file = None
    if load_state_dict_file is not None:
        return load_state_dict_file(path)
    with fsspec.open(path, "rb") as f:
        data = f.read()
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load

        return load(data)
    # weights_only refuses pickled code: a checkpoint is data, never something to execute
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    return state


def first_stage_state_dict(path: str, name: str = "first_stage") -> dict[str, torch.Tensor]:
    """The first-stage tensors of ``path`` with bare CompVis keys (``encoder.conv_in.weight``...)."""
    fs, fpath = fsspec.core.url_to_fs(str(path))
    if not fs.exists(fpath):
        raise FileNotFoundError(
            f"first_stage checkpoint {path} not found: train one with `python -m ldm_train.train_autoencoder "
            f"first_stage={name} data.input=...` (it writes <run>/export/first_stage.safetensors), or put a "
            f"released CompVis first stage (e.g. kl-f8 model.ckpt) at that path, then set first_stage.checkpoint")
    state: Any = _read_file(str(path))
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]  # Lightning checkpoint layout of the released files
    if any(k.startswith(PREFIX) for k in state):  # a whole LDM: keep only its first stage
        state = {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
    # the training objective (LPIPS, discriminator, logvar) ships in released files but is not the model
    return {k: v for k, v in state.items() if not k.startswith("loss.")}


def stored_config(path: str) -> dict[str, Any] | None:
    """The FirstStageConfig (as a dict) our export wrote into a safetensors header, else None."""
    if not str(path).endswith(".safetensors"):
        return None
    with fsspec.open(str(path), "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    meta = header.get("__metadata__") or {}
    return json.loads(meta["first_stage"]) if "first_stage" in meta else None


# fields that change what the weights compute without changing any tensor shape
_ARCH_FIELDS = ("kind", "embed_dim", "n_embed", "downsample_factor")
_DD_FIELDS = ("z_channels", "ch", "ch_mult", "num_res_blocks", "attn_resolutions", "double_z", "norm_groups")


def check_architecture(path: str, cfg: Any) -> None:
    """Refuse a checkpoint whose recorded architecture differs from ``cfg`` (e.g. GroupNorm groups)."""
    stored = stored_config(path)
    if stored is None:
        return
    mine = asdict(cfg)
    diffs = [f"{k}: file {stored.get(k)!r} vs config {mine[k]!r}" for k in _ARCH_FIELDS
             if k in stored and stored[k] != mine[k]]
    sdd, mdd = stored.get("ddconfig", {}), mine["ddconfig"]
    diffs += [f"ddconfig.{k}: file {sdd.get(k, 32 if k == 'norm_groups' else None)!r} vs config {mdd[k]!r}"
              for k in _DD_FIELDS if sdd.get(k, 32 if k == "norm_groups" else None) != mdd[k]]
    if diffs:
        raise ValueError(f"first_stage checkpoint {path} was trained as {stored.get('name')!r} with another "
                         f"architecture than first_stage {cfg.name}: {'; '.join(diffs)}. Use the preset it was "
                         f"trained with (its config is in the .json beside it) or override those fields")


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
    data = save(tensors, metadata={"format": "pt", "first_stage": json.dumps(info["first_stage"])})
    with fsspec.open(str(path), "wb") as f:
        f.write(data)
    json_path = str(path)[: -len(".safetensors")] if str(path).endswith(".safetensors") else str(path)
    json_path += ".json"
    with fsspec.open(json_path, "w") as f:
        json.dump(info, f, indent=2)
    return json_path
