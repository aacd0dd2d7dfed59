"""A grid of samples during training (rank 0; DDIM, few steps, classifier-free guidance), following ``cond.kind``:
one image per ``train.sampling.prompts`` entry (text), one row of ``samples_per_class`` images per class of
``train.sampling.classes`` (class; empty: the first classes, at most 16 rows), ``num_samples`` plain samples (none),
the super-resolved images of the first ``num_samples`` training samples' low-resolution images (concat).

The weights come in as a full CompVis-layout state dict (EMA by default), loaded into a plain model built
once by ``build_ldm`` and kept on the ranks that sample (rank 0 for the grid, every rank for the in-training
FID, which draws its images through ``images``), so sampling never touches the DeepSpeed engine (ZeRO-3
partitions included). Images come from ``ldm_train.sampling.sample_images``, the function eval uses;
sample i (row-major) uses seed ``train.sampling.seed + i``. Latents are decoded by the first stage when
``first_stage.checkpoint`` is set (or the first stage is the identity, ``kind: pixel``), else the grid shows
the first latent channels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ldm_train.config import cond_config
from ldm_train.trainer.config import SamplingConfig

MAX_GRID_CLASSES = 16  # rows of a class grid when train.sampling.classes is empty


@dataclass
class GridLayout:
    conds: list[Any]  # one condition per image (prompt, class index or None), row-major
    captions: list[str]  # one per image
    cols: int | None  # images per row (None: the tracker's square-ish grid)


def grid_layout(cfg: Any, sampling: SamplingConfig) -> GridLayout:
    """What the grid shows for the config's ``cond.kind``."""
    cond = cond_config(cfg)
    if cond.kind == "class":
        classes = [int(c) for c in sampling.classes] or list(range(min(cond.num_classes, MAX_GRID_CLASSES)))
        per = max(1, int(sampling.samples_per_class))
        conds = [c for c in classes for _ in range(per)]
        return GridLayout(conds, [cond.class_name(c) for c in conds], per)
    if cond.kind in ("inpaint", "semantic", "layout"):  # scored by eval.kinds on held-out inputs, no grid
        return GridLayout([], [], None)
    if cond.kind in ("none", "concat"):  # concat: the low-resolution inputs come from the data (use_lowres)
        n = max(1, int(sampling.num_samples))
        return GridLayout([None] * n, [""] * n, None)
    prompts = list(sampling.prompts)
    return GridLayout(prompts, prompts, None)


class SampleGrid:
    def __init__(self, cfg: Any, sampling: SamplingConfig, tokenizer: Any, scale_factor: float,
                 device: torch.device) -> None:
        self.cfg, self.sampling, self.tokenizer = cfg, sampling, tokenizer
        self.scale_factor, self.device = scale_factor, device
        self.model: torch.nn.Module | None = None
        self.first_stage: torch.nn.Module | None = None
        self.layout = grid_layout(cfg, sampling)

    def use_lowres(self, shards: list[tuple[str, int]], member: str) -> None:
        """concat: the grid super-resolves the low-resolution images of the first training samples."""
        from ldm_train.data.latent_conds import first_lowres

        images, keys = first_lowres(shards, member, len(self.layout.conds))
        self.layout = GridLayout(list(images), [f"SR of {k}" for k in keys], self.layout.cols)

    def _build(self) -> None:
        from ldm_train.build import build_ldm

        self.model = build_ldm(self.cfg).to(self.device).eval()
        from ldm_train.checkpoints.first_stage import is_loadable, load_first_stage

        fs_cfg = self.cfg.first_stage
        if is_loadable(fs_cfg):
            self.first_stage = load_first_stage(fs_cfg, map_location=self.device)

    def load(self, state_dict: dict[str, torch.Tensor]) -> None:
        if self.model is None:
            self._build()
        self.model.load_state_dict(state_dict, strict=True)

    @torch.no_grad()
    def images(self, conds: list[Any], seeds: list[int], settings: Any) -> torch.Tensor:
        """Images [N, 3, H, W] in [-1, 1] (CPU) of the loaded weights, one per (condition, seed)."""
        from ldm_train.sampling import sample_images

        unet = self.cfg.unet
        shape = (int(unet.out_channels), int(unet.image_size), int(unet.image_size))
        images = sample_images(self.model, self.first_stage, self.tokenizer, conds, seeds, settings, shape,
                               self.scale_factor, self.device)
        return images.clamp(-1, 1).float().cpu()

    def render(self, state_dict: dict[str, torch.Tensor]) -> torch.Tensor:
        """One image per entry of ``self.layout`` -> images [N, 3, H, W] in [-1, 1], on the CPU."""
        from ldm_train.sampling import SamplerSettings

        self.load(state_dict)
        s = self.sampling
        conds = self.layout.conds
        settings = SamplerSettings("ddim", int(s.steps), float(s.eta), float(s.guidance_scale), int(s.seed),
                                   spacing=str(s.timestep_spacing))
        return self.images(conds, [settings.seed + i for i in range(len(conds))], settings)
