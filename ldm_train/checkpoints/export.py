"""The LDM trainer's export: safetensors in the CompVis layout + resolved config + tokenizer, loadable without DeepSpeed.

Per checkpoint ``<run_dir>/checkpoints/step_NNNNNNN/``:

- ``model.safetensors``: the raw (trained) weights, keys ``model.diffusion_model.*`` (UNet) and
  ``cond_stage_model.*`` (the text encoder, ``transformer.to_logits`` included; the class embedder's
  ``embedding.weight`` for ``cond.kind`` class; none when unconditional), float32.
- ``model_ema.safetensors``: the EMA weights, the same keys, float32 (what eval should sample from).
- ``config.yaml``: the resolved Hydra config (``unet``, ``text_encoder``, ``first_stage``, ``data``, ``train``...).
- ``tokenizer/``: the tokenizer directory (``ldm_train.data.tokenizer.load_tokenizer`` reads it; text only).

Both safetensors files carry metadata ``{"format": "compvis-ldm", "step": ..., "samples_seen": ..., "ema": ...}``.
The same keys load into CompVis ``LatentDiffusion`` (``first_stage_model.*`` is not included: the first
stage is the configured ``first_stage.checkpoint``). ``load_export(path)`` resolves a run dir, its
``checkpoints/`` dir or a step dir to these files.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ldm_train.checkpoints.compvis import TEXT_PREFIX, UNET_PREFIX, read_weights, split_compvis
from ldm_train.runtime.distributed import get_rank

RAW_FILE = "model.safetensors"
EMA_FILE = "model_ema.safetensors"
CONFIG_FILE = "config.yaml"
TOKENIZER_DIR = "tokenizer"
_GATHER_CHUNK = 50_000_000  # elements gathered at once under ZeRO-3 (bounded peak memory on every rank)


def full_state_dict(module: nn.Module, zero_stage: int) -> dict[str, torch.Tensor]:
    """The module's full parameters and buffers as float32 CPU tensors on rank 0 ({} elsewhere).

    Collective under ZeRO-3 (every rank must call it): partitioned parameters are gathered chunk by chunk.
    """
    out: dict[str, torch.Tensor] = {}
    rank0 = get_rank() == 0
    named = list(module.named_parameters())
    if zero_stage == 3:
        import deepspeed

        chunk: list[tuple[str, nn.Parameter]] = []
        size = 0

        def flush() -> None:
            with deepspeed.zero.GatheredParameters([p for _, p in chunk], modifier_rank=None):
                if rank0:
                    for name, p in chunk:
                        out[name] = p.detach().float().cpu().clone()

        for name, p in named:
            chunk.append((name, p))
            size += getattr(p, "ds_numel", p.numel())
            if size >= _GATHER_CHUNK:
                flush()
                chunk, size = [], 0
        if chunk:
            flush()
    elif rank0:
        out = {name: p.detach().float().cpu().clone() for name, p in named}
    if rank0:
        for name, b in module.named_buffers():
            out[name] = b.detach().cpu().clone()
    return out


def write_export(
    tag_dir: Path,
    raw: dict[str, torch.Tensor] | None,
    ema: dict[str, torch.Tensor] | None,
    config_yaml: str,
    tokenizer_dir: Path | None,
    metadata: dict[str, Any],
) -> None:
    """Rank 0 only: write the safetensors pair, config.yaml and a copy of the tokenizer."""
    meta = {k: str(v) for k, v in metadata.items()}
    if raw is not None:
        _check_layout(raw)
        save_file({k: v.contiguous() for k, v in raw.items()}, str(tag_dir / RAW_FILE), metadata={**meta, "ema": "false"})
    if ema is not None:
        _check_layout(ema)
        save_file({k: v.float().contiguous() for k, v in ema.items()}, str(tag_dir / EMA_FILE),
                  metadata={**meta, "ema": "true"})
    (tag_dir / CONFIG_FILE).write_text(config_yaml)
    if tokenizer_dir is not None and Path(tokenizer_dir).is_dir():
        shutil.copytree(tokenizer_dir, tag_dir / TOKENIZER_DIR, dirs_exist_ok=True)


def _check_layout(sd: dict[str, torch.Tensor]) -> None:
    stray = [k for k in sd if not k.startswith((UNET_PREFIX, TEXT_PREFIX))]
    if stray:
        raise ValueError(f"export keys outside the CompVis layout: {stray[:5]}")


def resolve_step_dir(path: str | Path) -> Path:
    """A step dir, a ``checkpoints`` dir or a run dir -> the step dir ``latest`` names."""
    p = Path(path)
    if (p / RAW_FILE).is_file() or (p / EMA_FILE).is_file():
        return p
    for ck in (p, p / "checkpoints"):
        latest = ck / "latest"
        if latest.is_file():
            return ck / latest.read_text().strip()
    raise FileNotFoundError(
        f"{p} holds no {RAW_FILE} and no checkpoints/latest: pass a run directory or a checkpoints/step_* folder"
    )


@dataclass
class Export:
    """One export, read once: bare UNet / text encoder state dicts, the training config, where it lives."""

    unet: dict[str, torch.Tensor]
    text_encoder: dict[str, torch.Tensor]
    config: Any  # DictConfig of config.yaml
    tokenizer_dir: Path
    step_dir: Path
    weights_file: Path
    sha256: str

    @property
    def ema(self) -> bool:
        return self.weights_file.name == EMA_FILE


def weights_file(path: str | Path, ema: bool = True) -> Path:
    """The export's weights file: ``model_ema.safetensors`` when ``ema`` and it exists (or no raw export), else
    ``model.safetensors``."""
    step_dir = resolve_step_dir(path)
    has_ema, has_raw = (step_dir / EMA_FILE).is_file(), (step_dir / RAW_FILE).is_file()
    return step_dir / EMA_FILE if (ema and has_ema) or not has_raw else step_dir / RAW_FILE


def load_export(path: str | Path, ema: bool = True) -> Export:
    """Load an export without DeepSpeed (opens the weights file once); ``ema=True`` falls back to the raw
    weights when no EMA was exported."""
    from omegaconf import OmegaConf

    file = weights_file(path, ema)
    step_dir = file.parent
    weights = read_weights(str(file))
    groups = split_compvis(weights.tensors)
    return Export(unet=groups["unet"], text_encoder=groups["text_encoder"],
                  config=OmegaConf.load(step_dir / CONFIG_FILE), tokenizer_dir=step_dir / TOKENIZER_DIR,
                  step_dir=step_dir, weights_file=file, sha256=weights.sha256)


class LazySafetensors(Mapping):
    """{name: tensor} read one tensor at a time, so no rank holds a whole 1.45B-parameter EMA file at once."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        from ldm_train.checkpoints.safe_load import check_safetensors_header

        with open(path, "rb") as f:
            check_safetensors_header(str(path), f.read(8), os.fstat(f.fileno()).st_size)
        self._file = safe_open(str(path), framework="pt")
        self._keys = list(self._file.keys())

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._file.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def latent_scale_factor(cfg: Any, override: float | None = None, fix: str = "pass scale_factor=VALUE") -> float:
    """The run's latent scale factor: ``override``, else the config's (``first_stage.scale_factor``,
    ``data.scale_factor``), else the latent manifest the run trained on (``data.manifest`` / ``data.shards``)."""
    from omegaconf import OmegaConf

    if override is not None:
        return float(override)
    for key in ("first_stage.scale_factor", "data.scale_factor"):
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None:
            return float(value)
    url = OmegaConf.select(cfg, "data.manifest", default=None) or OmegaConf.select(cfg, "data.shards", default=None)
    if url:
        from ldm_train.data.manifest import ManifestError, read_manifest

        try:
            value = read_manifest(str(url)).get("scale_factor")
        except ManifestError:
            value = None
        if value is not None:
            return float(value)
    raise ValueError(
        f"no latent scale factor: the checkpoint config sets neither first_stage.scale_factor nor data.scale_factor "
        f"and the manifest at {url!r} is not readable: {fix} (the manifest's scale_factor, "
        "0.18215 for the paper's kl-f8)"
    )
