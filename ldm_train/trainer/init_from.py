"""``train.init_from``: start a new run from released or earlier weights (fine-tuning).

The source is a CompVis checkpoint (``.ckpt`` read weights-only, or safetensors in that layout) or one of our
exports (a run dir, its ``checkpoints/`` dir or a ``step_*`` dir: ``model_ema.safetensors`` / ``model.safetensors``
with ``tokenizer/`` beside them) or a diffusers folder (a ``UNet2DConditionModel``, or a pipeline with ``unet/``,
``vqvae/`` or ``vae/``, ``bert/`` or ``text_encoder/``, ``tokenizer/``): rank 0 converts it once to the CompVis layout
(``<run dir>/init_from_diffusers.safetensors``, :mod:`ldm_train.checkpoints.diffusers_import`), read as any other file.
The UNet and the cond stage load strictly (the text encoder's unused ``to_logits`` may be absent; a source without a
cond stage, such as a bare UNet, leaves it as initialised); the first stage and the tokenizer are taken from the same
source when it has them and the config names none, and so is a CompVis checkpoint's ``scale_factor`` buffer when
``first_stage.scale_factor`` is unset (``ldm_train/trainer/scale_factor.py``). The optimizer starts fresh at step 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn


@dataclass
class InitSource:
    weights: str  # the file the weights come from
    tokenizer_dir: str | None  # our export's tokenizer/, when there is one
    has_first_stage: bool  # first_stage_model.* keys in the file
    ema_file: bool  # our model_ema.safetensors (EMA weights under the plain keys)
    has_cond_stage: bool = True  # cond_stage_model.* keys in the file
    converted_from: str | None = None  # the diffusers folder ``weights`` was converted from
    scale_factor: float | None = None  # a CompVis checkpoint's scale_factor buffer
    betas: Any = None  # a CompVis checkpoint's betas buffer (float tensor [T]): the schedule it was trained with


def convert_diffusers(path: str, cfg: Any, run_dir: Path) -> str:
    """Rank 0 writes the CompVis-layout file of diffusers folder ``path`` under ``run_dir``; every rank gets its path."""
    from ldm_train.checkpoints.compvis import export_safetensors
    from ldm_train.checkpoints.diffusers_import import compvis_from_diffusers
    from ldm_train.config import FirstStageConfig, TextEncoderConfig, UNetConfig, cond_config, to_dataclass
    from ldm_train.runtime.distributed import barrier, get_rank

    target = Path(run_dir) / "init_from_diffusers.safetensors"
    if get_rank() == 0:
        text = to_dataclass(cfg.text_encoder, TextEncoderConfig) if cond_config(cfg).kind == "text" else None
        tensors = compvis_from_diffusers(path, to_dataclass(cfg.unet, UNetConfig),
                                         to_dataclass(cfg.first_stage, FirstStageConfig), text)
        export_safetensors(str(target), {"": tensors}, {"converted_from": path})  # atomic
    barrier()
    return str(target)


def resolve(path: str, use_ema: bool = True, cfg: Any = None, run_dir: Path | None = None) -> InitSource:
    """The weights file (and tokenizer) of ``path``; a clear error when it is neither an export nor a file.
    A diffusers folder needs the run's ``cfg`` (the shapes to convert to) and ``run_dir`` (where to write)."""
    from ldm_train.checkpoints.compvis import FIRST_STAGE_PREFIX, TEXT_PREFIX, read_weights
    from ldm_train.checkpoints.diffusers_import import is_diffusers_folder
    from ldm_train.checkpoints.export import EMA_FILE, TOKENIZER_DIR, weights_file

    p = Path(path)
    tokenizer, converted_from = None, None
    if is_diffusers_folder(p):
        if cfg is None or run_dir is None:
            raise ValueError(f"train.init_from={path} is a diffusers folder: resolve(path, cfg=..., run_dir=...)")
        weights, converted_from = convert_diffusers(path, cfg, run_dir), path
        tokenizer = str(p / TOKENIZER_DIR) if (p / TOKENIZER_DIR).is_dir() else None
    elif p.is_dir():
        try:
            file = weights_file(p, ema=use_ema)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"train.init_from={path}: {e}") from e
        tok = file.parent / TOKENIZER_DIR
        tokenizer = str(tok) if tok.is_dir() else None
        weights = str(file)
    elif p.is_file() or "://" in path:
        weights, file = path, p
    else:
        raise FileNotFoundError(f"train.init_from={path} does not exist: give a CompVis .ckpt / safetensors file, a "
                                "run / step directory of ours or a diffusers model folder")
    tensors = read_weights(weights).tensors
    scale = tensors.get("scale_factor")
    return InitSource(weights, tokenizer, any(k.startswith(FIRST_STAGE_PREFIX) for k in tensors),
                      Path(weights).name == EMA_FILE, any(k.startswith(TEXT_PREFIX) for k in tensors), converted_from,
                      float(scale) if scale is not None and scale.numel() == 1 else None, tensors.get("betas"))


def schedule_mismatch(source: InitSource, betas: torch.Tensor) -> str | None:
    """What differs between the checkpoint's ``betas`` buffer and ours (``train.diffusion``), or None."""
    theirs = source.betas
    if theirs is None:
        return None
    theirs = theirs.double().flatten()
    if theirs.shape != betas.shape:
        return f"its betas have {theirs.numel()} timesteps, train.diffusion.timesteps={betas.numel()}"
    gap = (torch.cumprod(1 - theirs, 0) - torch.cumprod(1 - betas.double(), 0)).abs()
    if float(gap.max()) < 1e-4:
        return None
    start, end = float(theirs[0]), float(theirs[-1])
    return (f"its alphas_cumprod differs from train.diffusion's by up to {float(gap.max()):.3g} (t={int(gap.argmax())});"
            f" its betas run {start:.6g}..{end:.6g} (CompVis 'linear' = our scaled_linear with linear_start={start:.6g}"
            f" linear_end={end:.6g})")


def load_into(model: nn.Module, source: InitSource, use_ema: bool) -> str:
    """Load the UNet and the cond stage of ``model`` (a LatentDiffusion) strictly; returns the report line."""
    from ldm_train.checkpoints.compvis import load_compvis

    stage = getattr(model, "cond_stage_model", None) if source.has_cond_stage else None
    kind = getattr(model, "cond_kind", "text")
    report = load_compvis(source.weights, unet=model.unet, text_encoder=stage if kind == "text" else None,
                          use_ema=use_ema and not source.ema_file, setting="train.init_from")
    line = str(report)
    if source.converted_from:
        line = f"converted from the diffusers folder {source.converted_from}; {line}"
    if not source.has_cond_stage and getattr(model, "cond_stage_model", None) is not None:
        line += "; cond stage: not in the source, kept as initialised"
    if stage is not None and kind != "text":  # a class embedder: plain strict load of its keys
        from ldm_train.checkpoints.compvis import load_strict, read_weights, split_compvis

        groups = split_compvis(read_weights(source.weights).tensors)
        load_strict(stage, groups["text_encoder"], "class embedder", source.weights, setting="train.init_from")
        line += f"; class embedder: {len(groups['text_encoder'])} tensors"
    return line

