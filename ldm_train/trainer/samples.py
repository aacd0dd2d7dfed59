"""A grid of samples for fixed prompts during training (rank 0; DDIM, few steps, classifier-free guidance).

The weights come in as a full CompVis-layout state dict (EMA by default), loaded into a plain model built
once by ``build_ldm`` and kept on the ranks that sample (rank 0 for the grid, every rank for the in-training
FID, which draws its images through ``images``), so sampling never touches the DeepSpeed engine (ZeRO-3
partitions included). Images come from ``ldm_train.sampling.sample_images``, the function eval uses;
sample i uses seed ``train.sampling.seed + i``. Latents are decoded by the first stage when
``first_stage.checkpoint`` is set (or the first stage is the identity, ``kind: pixel``), else the grid shows
the first latent channels.
"""
from __future__ import annotations

from typing import Any

import torch

from ldm_train.trainer.config import SamplingConfig


class SampleGrid:
    def __init__(self, cfg: Any, sampling: SamplingConfig, tokenizer: Any, scale_factor: float,
                 device: torch.device) -> None:
        self.cfg, self.sampling, self.tokenizer = cfg, sampling, tokenizer
        self.scale_factor, self.device = scale_factor, device
        self.model: torch.nn.Module | None = None
        self.first_stage: torch.nn.Module | None = None

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
    def images(self, prompts: list[str], seeds: list[int], settings: Any) -> torch.Tensor:
        """Images [N, 3, H, W] in [-1, 1] (CPU) of the loaded weights, one per (prompt, seed)."""
        from ldm_train.sampling import sample_images

        unet = self.cfg.unet
        shape = (int(unet.out_channels), int(unet.image_size), int(unet.image_size))
        images = sample_images(self.model, self.first_stage, self.tokenizer, prompts, seeds, settings, shape,
                               self.scale_factor, self.device)
        return images.clamp(-1, 1).float().cpu()

    def render(self, state_dict: dict[str, torch.Tensor]) -> torch.Tensor:
        """One image per prompt -> images [N, 3, H, W] in [-1, 1], on the CPU."""
        from ldm_train.sampling import SamplerSettings

        self.load(state_dict)
        s = self.sampling
        prompts = list(s.prompts)
        settings = SamplerSettings("ddim", int(s.steps), float(s.eta), float(s.guidance_scale), int(s.seed))
        return self.images(prompts, [settings.seed + i for i in range(len(prompts))], settings)
