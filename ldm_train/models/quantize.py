"""Vector quantizer of the VQ first stages (VQGAN's codebook with a straight-through estimator).

Parameter name ``embedding.weight`` so that ``first_stage_model.quantize.embedding.weight`` matches the
released vq-f4/vq-f8/vq-f16 checkpoints.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class VectorQuantizer(nn.Module):
    """Nearest-codebook-entry quantization of a ``[B, embed_dim, h, w]`` latent.

    ``forward(z) -> (z_q, loss, info)`` where ``loss`` is the codebook + ``beta`` * commitment loss
    (VQ-VAE's two terms, ``beta`` 0.25 as in the paper's code) and ``info`` holds the code indices, the
    codebook perplexity and the per-code usage counts of this batch (for dead-code monitoring).
    """

    def __init__(self, n_embed: int, embed_dim: int, beta: float = 0.25) -> None:
        super().__init__()
        if n_embed <= 0:
            raise ValueError(f"VQ first stage needs n_embed > 0 codebook entries, got {n_embed}")
        self.n_embed = n_embed
        self.embed_dim = embed_dim
        self.beta = beta
        self.embedding = nn.Embedding(n_embed, embed_dim)
        # small uniform init keeps early codes close to the encoder's initial outputs
        nn.init.uniform_(self.embedding.weight, -1.0 / n_embed, 1.0 / n_embed)

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """Indices ``[B, h, w]`` of the nearest codebook entries (squared Euclidean distance)."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, self.embed_dim)
        codebook = self.embedding.weight
        dist = (
            flat.pow(2).sum(1, keepdim=True)
            - 2.0 * flat @ codebook.t()
            + codebook.pow(2).sum(1)[None, :]
        )
        return dist.argmin(dim=1).view(z.shape[0], z.shape[2], z.shape[3])

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Codebook vectors for indices ``[B, h, w]`` as a ``[B, embed_dim, h, w]`` latent."""
        return self.embedding(indices).permute(0, 3, 1, 2).contiguous()

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        indices = self.codes(z)
        z_q = self.lookup(indices)
        # codebook term moves the codes toward the encoder outputs, commitment term the reverse
        loss = F.mse_loss(z_q, z.detach()) + self.beta * F.mse_loss(z_q.detach(), z)
        z_q = z + (z_q - z).detach()  # straight-through: decoder gradient flows to the encoder
        with torch.no_grad():
            counts = torch.bincount(indices.flatten(), minlength=self.n_embed).to(z.dtype)
            probs = counts / counts.sum().clamp_min(1)
            perplexity = torch.exp(-(probs * torch.log(probs + 1e-10)).sum())
        return z_q, loss, {"indices": indices, "perplexity": perplexity, "counts": counts}
