"""The paper's text encoder: a BERT-tokenized pre-norm transformer trained jointly with the UNet.

Parameter names follow CompVis ``BERTEmbedder`` (an x-transformers ``TransformerWrapper`` around an
``Encoder``), so ``"cond_stage_model." + key`` equals the released ``txt2img-f8-large`` keys:
``transformer.token_emb``, ``transformer.pos_emb.emb``, ``transformer.attn_layers.layers.{2i}`` (pre-norm
attention) and ``.{2i+1}`` (pre-norm GELU feed-forward), ``transformer.norm``, ``transformer.to_logits``.
``to_logits`` (a language-model head) is never used by the LDM but is kept so checkpoints load strictly
and the parameter count matches the paper's 581,994,042.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ldm_train.config import TextEncoderConfig


class Attention(nn.Module):
    """Multi-head self-attention (x-transformers names: to_q/to_k/to_v without bias, to_out with bias)."""

    def __init__(self, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (t(x).view(b, n, self.heads, -1).transpose(1, 2) for t in (self.to_q, self.to_k, self.to_v))
        # no padding mask: the released model attends to [PAD] positions too, and so must we to match it
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class FeedForward(nn.Module):
    """Linear-GELU-Linear, width ``dim * mult`` (names net.0.0 and net.2)."""

    def __init__(self, dim: int, mult: int) -> None:
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(nn.Sequential(nn.Linear(dim, inner), nn.GELU()), nn.Dropout(0.0), nn.Linear(inner, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class AbsolutePositionalEmbedding(nn.Module):
    """Learned positions (name ``emb``)."""

    def __init__(self, dim: int, max_seq_len: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(max_seq_len, dim)
        nn.init.normal_(self.emb.weight, std=0.02)

    def forward(self, seq_len: int) -> torch.Tensor:
        # a lookup, not a slice of the weight: a slice taken under no_grad is a grad-less view of a leaf
        return self.emb(torch.arange(seq_len, device=self.emb.weight.device))[None]


class Encoder(nn.Module):
    """Alternating pre-norm attention / feed-forward layers with residuals (``layers.N.0`` norm, ``.1`` block)."""

    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList()
        for _ in range(cfg.n_layer):
            self.layers.append(nn.ModuleList([nn.LayerNorm(cfg.n_embed), Attention(cfg.n_embed, cfg.heads, cfg.dim_head)]))
            self.layers.append(nn.ModuleList([nn.LayerNorm(cfg.n_embed), FeedForward(cfg.n_embed, cfg.ff_mult)]))
        self.use_checkpoint = cfg.use_checkpoint

    def _pair(self, x: torch.Tensor, i: int) -> torch.Tensor:
        for norm, block in (self.layers[i], self.layers[i + 1]):
            x = x + block(norm(x))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ckpt = self.use_checkpoint and self.training and torch.is_grad_enabled()
        for i in range(0, len(self.layers), 2):
            x = checkpoint(self._pair, x, i, use_reentrant=False) if ckpt else self._pair(x, i)
        return x


class TransformerWrapper(nn.Module):
    """Token + position embedding, encoder, final LayerNorm; ``to_logits`` kept for checkpoint parity."""

    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.max_seq_len = cfg.max_seq_len
        self.token_emb = nn.Embedding(cfg.vocab_size, cfg.n_embed)
        nn.init.normal_(self.token_emb.weight, std=0.02)
        self.pos_emb = AbsolutePositionalEmbedding(cfg.n_embed, cfg.max_seq_len)
        self.attn_layers = Encoder(cfg)
        self.norm = nn.LayerNorm(cfg.n_embed)
        self.to_logits = nn.Linear(cfg.n_embed, cfg.vocab_size)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        x = self.token_emb(token_ids) + self.pos_emb(token_ids.shape[1])
        return self.norm(self.attn_layers(x))  # embeddings; to_logits is not applied


class BERTEmbedder(nn.Module):
    """forward(token_ids LongTensor[B, L <= max_seq_len]) -> context [B, L, n_embed] for cross-attention."""

    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        if cfg.max_seq_len <= 0 or cfg.n_embed <= 0:
            raise ValueError(f"text_encoder {cfg.name}: max_seq_len and n_embed must be positive")
        self.cfg = cfg
        self.transformer = TransformerWrapper(cfg)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        if token_ids.ndim != 2 or token_ids.shape[1] > self.cfg.max_seq_len:
            raise ValueError(
                f"text_encoder {self.cfg.name}: token_ids must be [B, L<={self.cfg.max_seq_len}], "
                f"got {tuple(token_ids.shape)}: tokenize with max_len=text_encoder.max_seq_len"
            )
        return self.transformer(token_ids)

    def unused_parameter_names(self) -> list[str]:
        """Parameters that get no gradient by design (exclude them from unused-parameter checks)."""
        return [n for n, _ in self.named_parameters() if n.startswith("transformer.to_logits.")]
