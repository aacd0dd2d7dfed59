"""The first-stage objective of the paper (CompVis LPIPSWithDiscriminator / VQLPIPSWithDiscriminator).

Generator: L1 + ``perceptual_weight`` * LPIPS reconstruction, plus ``kl_weight`` * KL (KL first stages) or
``codebook_weight`` * codebook/commitment loss (VQ), plus an adversarial term from a patch discriminator
switched on at ``disc_start`` whose weight is adapted so its gradient at the decoder's last layer has
``disc_weight`` times the norm of the reconstruction gradient there (VQGAN, Esser et al. 2021, eq. 7).
Discriminator: hinge loss on real vs reconstructed images.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ldm_train.config import FirstStageLossConfig

TORCHVISION_VGG16 = "vgg16-397923af.pth"


def build_lpips(backbone: str | None, random_backbone: bool = False,
                setting: str = "loss.lpips_backbone") -> nn.Module:
    """Frozen LPIPS(vgg) with the ImageNet VGG16 backbone read from ``backbone`` (torchvision's file).

    The linear heads ship inside the ``lpips`` package; only the backbone is a separate file, which this
    never downloads. ``random_backbone=True`` builds a randomly initialised VGG instead (plumbing tests only:
    its distances are not perceptual). The file is read weights-only: a pickle that needs more, or a file that is
    not VGG16's weights, is refused naming the file and ``setting`` (the config key it came from).
    """
    import lpips

    if random_backbone:
        print("[first_stage loss] LPIPS uses a RANDOM VGG16 backbone (loss.lpips_random_backbone=true): "
              "its perceptual term is not meaningful; use only for tests", flush=True)
        model = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
    else:
        if not backbone or not Path(backbone).is_file():
            raise FileNotFoundError(
                f"LPIPS backbone {backbone!r} not found: put torchvision's ImageNet VGG16 weights "
                f"({TORCHVISION_VGG16}) there and set {setting}=PATH, or set "
                f"first_stage.lossconfig.perceptual_weight=0 to train without the perceptual term "
                f"(loss.lpips_random_backbone=true builds a random backbone, for tests only)")
        import torchvision

        from ldm_train.checkpoints.safe_load import load_weights_only

        hint = (f"Point {setting} at torchvision's own {TORCHVISION_VGG16} (download.pytorch.org/models/"
                f"{TORCHVISION_VGG16}), which holds tensors only")
        state = load_weights_only(backbone, setting, hint=hint)
        vgg = torchvision.models.vgg16()
        try:
            vgg.load_state_dict(state)
        except (RuntimeError, TypeError, AttributeError) as e:  # another network's weights, or not a state dict
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise ValueError(f"{setting}: {backbone} is not torchvision's VGG16 weights ({first}). {hint}") from None
        model = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
        # LPIPS splits vgg.features into slice1..5 whose children keep the feature indices as names
        for slice_ in (model.net.slice1, model.net.slice2, model.net.slice3, model.net.slice4, model.net.slice5):
            for name, module in slice_.named_children():
                module.load_state_dict(vgg.features[int(name)].state_dict())
    return model.eval().requires_grad_(False)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


class FirstStageLoss(nn.Module):
    """Both halves of the objective; the discriminator itself is passed in (the trainer owns and wraps it)."""

    def __init__(self, cfg: FirstStageLossConfig, kind: str, perceptual: nn.Module | None) -> None:
        super().__init__()
        if cfg.perceptual_weight > 0 and perceptual is None:
            raise ValueError("first_stage.lossconfig.perceptual_weight > 0 needs an LPIPS module (build_lpips)")
        self.cfg = cfg
        self.kind = kind
        self.perceptual = perceptual

    def disc_active(self, step: int) -> bool:
        return self.cfg.disc_factor > 0 and step >= self.cfg.disc_start

    def reconstruction(self, x: torch.Tensor, xrec: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-pixel L1 + LPIPS map ``[B, C, H, W]`` (LPIPS broadcast per image) and its parts for logging."""
        l1 = (x - xrec).abs()
        rec = self.cfg.pixelloss_weight * l1
        log = {"l1": l1.mean().detach()}
        if self.cfg.perceptual_weight > 0:
            p = self.perceptual(x, xrec)  # [B, 1, 1, 1]; inputs in [-1, 1]
            rec = rec + self.cfg.perceptual_weight * p
            log["lpips"] = p.mean().detach()
        return rec, log

    def adaptive_weight(self, rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
        rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
        g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        weight = rec_grad.norm() / (g_grad.norm() + 1e-4)
        return weight.clamp(0.0, 1e4).detach() * self.cfg.disc_weight

    def generator_loss(self, x: torch.Tensor, xrec: torch.Tensor, regularizer: torch.Tensor, step: int,
                       last_layer: torch.Tensor, discriminator: Callable[[torch.Tensor], torch.Tensor],
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``regularizer``: per-sample KL ``[B]`` (kind kl) or the scalar codebook loss (kind vq)."""
        rec, log = self.reconstruction(x, xrec)
        if self.kind == "kl":
            # sum over pixels, mean over the batch: the released models' scale, which kl_weight 1e-6 assumes
            rec_loss = rec.sum() / x.shape[0]
            reg = regularizer.sum() / x.shape[0]
            loss = rec_loss + self.cfg.kl_weight * reg
            log["kl"] = reg.detach()
        else:
            rec_loss = rec.mean()
            reg = regularizer.mean()
            loss = rec_loss + self.cfg.codebook_weight * reg
            log["codebook"] = reg.detach()
        log["rec"] = rec_loss.detach()
        if self.disc_active(step):
            g_loss = -discriminator(xrec).mean()
            d_weight = self.adaptive_weight(rec_loss, g_loss, last_layer) if self.training else \
                torch.tensor(0.0, device=x.device)
            loss = loss + d_weight * self.cfg.disc_factor * g_loss
            log["g_loss"], log["d_weight"] = g_loss.detach(), d_weight
        log["total"] = loss.detach()
        return loss, log

    def discriminator_loss(self, x: torch.Tensor, xrec: torch.Tensor,
                           discriminator: Callable[[torch.Tensor], torch.Tensor],
                           ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # separate forwards as in the released training: BatchNorm normalises real and fake batches apart
        real = discriminator(x.detach())
        fake = discriminator(xrec.detach())
        d_loss = self.cfg.disc_factor * hinge_d_loss(real, fake)
        acc = 0.5 * ((real > 0).float().mean() + (fake < 0).float().mean())
        return d_loss, {"d_loss": d_loss.detach(), "logits_real": real.mean().detach(),
                        "logits_fake": fake.mean().detach(), "d_accuracy": acc.detach()}

