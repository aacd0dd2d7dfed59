"""The latent diffusion model: UNet + cond stage in ONE nn.Module, so one DeepSpeed engine trains both jointly.

Attribute names follow CompVis ``LatentDiffusion`` (``model.diffusion_model`` = the UNet through a
``DiffusionWrapper``, ``cond_stage_model`` = the text encoder (``cond_kind`` text) or the ``ClassEmbedder``
(class) or the layout tokens (layout), the ``SpatialRescaler`` (semantic), absent when unconditional (none) and with
concat conditioning (concat, inpaint: CompVis' ``torch.nn.Identity`` cond stage has no weights)), so ``state_dict()`` keys are the released checkpoint keys and export is a plain save.
"""
from __future__ import annotations

import torch
from torch import nn

from ldm_train.config import SPATIAL_KINDS
from ldm_train.diffusion.schedule import DiffusionSchedule
from ldm_train.diffusion.step import ldm_loss


class DiffusionWrapper(nn.Module):
    """CompVis' wrapper: holds the UNet as ``diffusion_model`` (cross-attention conditioning)."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.diffusion_model = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self.diffusion_model(x, t, context=context)


class LatentDiffusion(nn.Module):
    """forward(z0, cond, t, noise) -> per-sample diffusion loss [B] (float32): ``ldm_train/diffusion/step.py``.

    ``cond`` is what ``cond_stage_model`` takes: token ids [B, L] (text), class labels [B] (class), None (none);
    with ``cond_kind`` concat it is the low-resolution image [B, 3, h, w] in [-1, 1] that goes beside the noisy
    latent (``concat_input``); inpaint: [masked image latent, mask] [B, z + 1, h, w] on the latent grid; semantic:
    a one-hot segmentation [B, K, H, W]; layout: layout token ids [B, L].
    """

    def __init__(
        self,
        unet: nn.Module,
        text_encoder: nn.Module | None,
        schedule: DiffusionSchedule,
        parameterization: str = "eps",
        min_snr_gamma: float | None = None,
        cond_kind: str = "text",
        loss_type: str = "l2",
    ) -> None:
        super().__init__()
        self.model = DiffusionWrapper(unet)
        self.cond_stage_model = text_encoder  # the text encoder, the ClassEmbedder, or None
        self.cond_kind = cond_kind
        # a plain attribute, not buffers: the schedule is config, not state, and stays out of the export
        self.schedule = schedule
        self._schedule_on: dict[torch.device, DiffusionSchedule] = {schedule.device: schedule}
        self.parameterization = parameterization
        self.min_snr_gamma = min_snr_gamma
        self.loss_type = loss_type

    def schedule_on(self, device: torch.device) -> DiffusionSchedule:
        """The schedule's tables on ``device``, copied there once: no host-device copy per step."""
        moved = self._schedule_on.get(device)
        if moved is None:
            moved = self._schedule_on[device] = self.schedule.to(device)
        return moved

    @property
    def unet(self) -> nn.Module:
        return self.model.diffusion_model

    def compile_in_place(self) -> list[str]:
        """``train.compile``: torch.compile the UNet's and the text encoder's forward in place
        (``nn.Module.compile``: the parameter names stay the eager ones). Returns what was compiled."""
        self.unet.compile()
        done = ["UNet"]
        if self.cond_stage_model is not None and self.cond_kind == "text":
            self.cond_stage_model.compile()
            done.append("text encoder")
        return done

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids [B, L] -> context [B, L, n_embed] (the empty caption's tokens are the uncond input)."""
        return self.cond_stage_model(tokens)

    def concat_input(self, image: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
        """The low-resolution image on the latent grid (bicubic when its size differs), for ``unet(concat=...)``."""
        if image.ndim != 4 or image.shape[1] != 3:
            raise ValueError(f"concat conditioning takes RGB images [B, 3, h, w], got {tuple(image.shape)}")
        if tuple(image.shape[-2:]) != tuple(latent_hw):
            image = torch.nn.functional.interpolate(image.float(), size=tuple(latent_hw), mode="bicubic",
                                                    align_corners=False, antialias=image.shape[-1] > latent_hw[-1])
        return image

    def spatial_input(self, cond: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
        """What goes beside the noisy latent (``unet(concat=...)``): the low-resolution image on the latent grid
        (concat), the ready [masked latent, mask] (inpaint), the SpatialRescaler's map of a one-hot segmentation
        (semantic; resized to the latent grid when its stages do not land on it)."""
        if self.cond_kind == "concat":
            return self.concat_input(cond, latent_hw)
        if self.cond_kind == "semantic":
            cond = self.cond_stage_model(cond)
            if tuple(cond.shape[-2:]) != tuple(latent_hw):
                cond = torch.nn.functional.interpolate(cond, size=tuple(latent_hw), mode="bilinear", align_corners=False)
        if cond.ndim != 4 or tuple(cond.shape[-2:]) != tuple(latent_hw):
            raise ValueError(f"cond.kind={self.cond_kind}: the conditioning must be [B, C, {latent_hw[0]}, "
                             f"{latent_hw[1]}] on the latent grid, got {tuple(cond.shape)}")
        return cond

    def encode_cond(self, cond: torch.Tensor | None) -> torch.Tensor | None:
        """The cross-attention context of ``cond`` (tokens or labels); None without a cond stage."""
        if self.cond_kind in SPATIAL_KINDS:
            return None
        if self.cond_stage_model is None:
            if cond is not None:
                raise ValueError("this model is unconditional (no cond_stage_model) but got a conditioning input")
            return None
        if cond is None:
            raise ValueError(f"this model is conditioned on {self.cond_kind} but got no conditioning input")
        return self.cond_stage_model(cond)

    def eps_model(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.model(x, t, context=context)

    def forward(self, z0: torch.Tensor, cond: torch.Tensor | None, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Per-sample L_LDM [B]: ``ldm_train/diffusion/step.py`` (``ldm_loss``) spells it out."""
        return ldm_loss(self, z0, cond, t, noise)
