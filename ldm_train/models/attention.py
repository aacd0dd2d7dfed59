"""Attention blocks of the LDM UNet, with the parameter names of CompVis ``ldm.modules.attention``.

``SpatialTransformer`` (text / cross-attention conditioning) and the legacy ``AttentionBlock`` (used when
the UNet has no context, as the released unconditional LDMs do). Every attention runs through
``attention`` (below): ``torch.nn.functional.scaled_dot_product_attention`` everywhere (flash / memory-efficient
kernels on GPU), except narrow heads with a small attention matrix in fp32 on CPU, where an explicit softmax
attention is faster.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import FunctionCtx
from torch.utils.checkpoint import checkpoint


def autocast_enabled(device: torch.device) -> bool:
    """Whether autocast is on for ``device`` (False for devices autocast does not know, e.g. meta)."""
    try:
        return torch.is_autocast_enabled(device.type)
    except RuntimeError:
        return False


# On CPU, the flash kernel and the GEMMs whose output is one head wide (P @ V, dS @ K) run far below the
# machine's rate for 8-channel heads (the small UNets trained on CPU): there the attention matrix is kept and every
# GEMM is issued with the long side as its output (see NarrowHeadAttention). Measured on one core
# (docs/performance.md): it wins for heads of 8 channels while the kept matrix is small; for 16-channel heads only
# when Inductor compiles it (which fuses the softmax and its backward); past a few MiB the flash kernel's tiling wins.
NARROW_HEAD_MAX = 8
NARROW_HEAD_MAX_COMPILED = 16
NARROW_HEAD_MAX_BYTES = 4 * 2**20  # the kept attention matrix per call
_sdpa_only = 0


@contextlib.contextmanager
def sdpa_only() -> Iterator[None]:
    """Within: every attention runs through SDPA, as on a GPU (the planner's memory count uses this)."""
    global _sdpa_only
    _sdpa_only += 1
    try:
        yield
    finally:
        _sdpa_only -= 1


class NarrowHeadAttention(torch.autograd.Function):
    """Softmax attention of ``[B, H, N, D]`` queries over ``[B, H, M, D]`` keys/values (scale ``D**-0.5``), with
    the probabilities kept for backward and each product computed in the orientation whose output is N or M
    wide, never D wide (``P @ V`` as ``(V^T P^T)^T``, and so on): equal to SDPA to fp32 rounding."""

    @staticmethod
    def forward(ctx: FunctionCtx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, h, n, d = q.shape
        m = k.shape[2]
        q3, k3, v3 = q.reshape(b * h, n, d), k.reshape(b * h, m, d), v.reshape(b * h, m, d)
        p = torch.softmax(torch.bmm(q3 * d**-0.5, k3.transpose(1, 2)), dim=-1)
        ctx.save_for_backward(q3, k3, v3, p)
        return torch.bmm(v3.transpose(1, 2), p.transpose(1, 2)).transpose(1, 2).reshape(b, h, n, d)

    @staticmethod
    def backward(ctx: FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q3, k3, v3, p = ctx.saved_tensors
        bh, n, d = q3.shape
        m = k3.shape[1]
        shape = (grad.shape[0], grad.shape[1])
        g3 = grad.reshape(bh, n, d)
        dv = torch.bmm(g3.transpose(1, 2), p).transpose(1, 2)
        ds = torch._softmax_backward_data(torch.bmm(g3, v3.transpose(1, 2)), p, -1, p.dtype)
        dq = torch.bmm(k3.transpose(1, 2), ds.transpose(1, 2)).transpose(1, 2) * d**-0.5
        dk = torch.bmm(q3.transpose(1, 2), ds).transpose(1, 2) * d**-0.5
        return dq.reshape(*shape, n, d), dk.reshape(*shape, m, d), dv.reshape(*shape, m, d)


def uses_narrow_head_path(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether ``attention(q, k, v)`` takes ``NarrowHeadAttention`` rather than SDPA."""
    b, h, n, d = q.shape
    widest = NARROW_HEAD_MAX_COMPILED if torch.compiler.is_compiling() else NARROW_HEAD_MAX
    return (not _sdpa_only and q.device.type == "cpu" and q.dtype == torch.float32 and k.dtype == torch.float32
            and d <= widest and b * h * n * k.shape[2] * 4 <= NARROW_HEAD_MAX_BYTES
            and not autocast_enabled(q.device))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention with scale ``1/sqrt(dim_head)`` (as CompVis) of ``[B, H, N, D]`` tensors."""
    if uses_narrow_head_path(q, k):
        return NarrowHeadAttention.apply(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


def _split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    # [B, N, H*D] -> [B, H, N, D] as a strided view: SDPA takes it without a copy
    b, n, _ = t.shape
    return t.view(b, n, heads, -1).transpose(1, 2)


class CrossAttention(nn.Module):
    """Multi-head attention of ``query`` over ``context`` (self-attention when context is None)."""

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        if context.dtype != x.dtype and not autocast_enabled(x.device):
            context = context.to(x.dtype)
        q = _split_heads(self.to_q(x), self.heads)
        k = _split_heads(self.to_k(context), self.heads)
        v = _split_heads(self.to_v(context), self.heads)
        out = attention(q, k, v)
        b, _, n, _ = out.shape
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class GEGLU(nn.Module):
    """Gated GELU projection (Shazeer 2020): one Linear gives value and gate."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward, width ``dim * mult`` (CompVis ``FeedForward(glu=True)``: net.0.proj, net.2)."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention over the context, GEGLU feed-forward."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        d_head: int,
        dropout: float = 0.0,
        context_dim: int | None = None,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        self.attn1 = CrossAttention(dim, None, n_heads, d_head, dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim, n_heads, d_head, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.use_checkpoint = use_checkpoint

    def _forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, context, use_reentrant=False)
        return self._forward(x, context)


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map: GroupNorm, 1x1-conv (or linear) proj_in, blocks, proj_out.

    ``proj_out`` starts at zero, so a fresh block is the identity (as in CompVis).
    """

    def __init__(
        self,
        in_channels: int,
        n_heads: int,
        d_head: int,
        depth: int = 1,
        dropout: float = 0.0,
        context_dim: int | None = None,
        use_linear: bool = False,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        inner = n_heads * d_head
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(32, in_channels, eps=1e-6)
        if use_linear:
            self.proj_in = nn.Linear(in_channels, inner)
            self.proj_out = nn.Linear(inner, in_channels)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner, 1)
            self.proj_out = nn.Conv2d(inner, in_channels, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, n_heads, d_head, dropout, context_dim, use_checkpoint)
            for _ in range(depth)
        )
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b, _, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        # NCHW -> N(HW)C: a free view when the activations are channels-last
        x = x.permute(0, 2, 3, 1).reshape(b, h * w, -1)
        if self.use_linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.use_linear:
            x = self.proj_out(x)
        x = x.reshape(b, h, w, -1).permute(0, 3, 1, 2)
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in


class AttentionBlock(nn.Module):
    """Self-attention over pixels without context (CompVis openaimodel ``AttentionBlock``, legacy head order).

    Names: norm, qkv (1x1 conv1d to 3C), proj_out (zero-initialised conv1d). The legacy layout stores each
    head's q, k, v next to each other, which the released unconditional checkpoints rely on.
    """

    def __init__(self, channels: int, num_heads: int, use_checkpoint: bool = False) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"attention channels {channels} are not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(32, channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)
        self.use_checkpoint = use_checkpoint

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        flat = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(flat))  # [B, 3C, T]
        q, k, v = qkv.reshape(b, self.num_heads, 3 * c // self.num_heads, -1).chunk(3, dim=2)
        out = attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        out = out.transpose(-1, -2).reshape(b, c, -1)
        return (flat + self.proj_out(out)).reshape(x.shape)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)
