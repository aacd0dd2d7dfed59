"""The class-conditional cond stage: CompVis ``ldm.modules.encoders.modules.ClassEmbedder``.

``embedding`` is ``nn.Embedding(n_classes, embed_dim)`` (key ``cond_stage_model.embedding.weight`` in a
``LatentDiffusion`` state dict, as in CompVis cin256-v2: ``[1001, 512]``, 1000 ImageNet classes + the null class
1000 used as the unconditional input of classifier-free guidance). ``forward(labels [B]) -> context [B, 1,
embed_dim]``: one token the UNet's cross-attention attends to (CompVis ``batch[key][:, None]`` then the lookup).
"""
from __future__ import annotations

import torch
from torch import nn


class ClassEmbedder(nn.Module):
    def __init__(self, n_classes: int, embed_dim: int, null_label: int | None = None) -> None:
        super().__init__()
        if n_classes < 1 or embed_dim < 1:
            raise ValueError(f"ClassEmbedder: n_classes={n_classes} and embed_dim={embed_dim} must be positive")
        if null_label is not None and not 0 <= null_label < n_classes:
            raise ValueError(f"ClassEmbedder: null_label={null_label} is not a row of the {n_classes}-row embedding")
        self.n_classes, self.embed_dim, self.null_label = n_classes, embed_dim, null_label
        self.embedding = nn.Embedding(n_classes, embed_dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if labels.ndim != 1:
            raise ValueError(f"ClassEmbedder: labels must be [B] class indices, got {tuple(labels.shape)}")
        return self.embedding(labels.long())[:, None]

    def unconditional(self, batch_size: int, device: torch.device | str) -> torch.Tensor:
        """The null-class labels [B] (the unconditional input of classifier-free guidance)."""
        if self.null_label is None:
            raise ValueError("this class embedder has no null class (cond.null_class=false): classifier-free "
                             "guidance needs one; sample with guidance_scale=1")
        return torch.full((batch_size,), self.null_label, dtype=torch.long, device=device)
