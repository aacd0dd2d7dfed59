"""PatchGAN discriminator of the first-stage objective (pix2pix's NLayerDiscriminator, as in VQGAN/LDM)."""
from __future__ import annotations

import torch
from torch import nn


class NLayerDiscriminator(nn.Module):
    """``n_layers`` stride-2 4x4 convs with BatchNorm and LeakyReLU(0.2), one stride-1 conv, then 1 logit per patch.

    Parameter names ``main.N.*`` as in the released checkpoints' ``loss.discriminator.main.N.*``.
    """

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(input_nc, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1  # the last hidden conv keeps the patch grid
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=False),
                       nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def _init_weights(m: nn.Module) -> None:
    # DCGAN init: N(0, 0.02) convs, BatchNorm scale N(1, 0.02)
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)
