"""Training objectives that are not diffusion losses (the first stage's LPIPS + patch-GAN objective)."""
from ldm_train.losses.first_stage import FirstStageLoss, build_lpips, hinge_d_loss

__all__ = ["FirstStageLoss", "build_lpips", "hinge_d_loss"]
