"""The time-conditional UNet of the LDM paper (CompVis ``openaimodel.UNetModel`` with SpatialTransformer).

Parameter names equal the released checkpoints: ``"model.diffusion_model." + key`` for every key of
``UNetModel.state_dict()``. Conditioning: cross-attention over a context (text), a class-label embedding
added to the timestep embedding (``num_classes``), and extra input channels concatenated to z
(``concat_channels``). As in CompVis configs, ``in_channels`` counts every input channel of the first conv:
z has ``in_channels - concat_channels`` channels.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ldm_train.config import UNetConfig
from ldm_train.models.attention import AttentionBlock, SpatialTransformer, autocast_enabled


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [B, dim] in float32, cos half first (CompVis / diffusers ``flip_sin_to_cos``)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, timestep embedding in between; 1x1 skip when the width changes.

    ``use_scale_shift_norm``: the embedding gives a scale and a shift applied after the second GroupNorm
    (``norm(h) * (1 + scale) + shift``) instead of being added before it, so ``emb_layers`` is twice as wide.
    ``up`` / ``down``: the block also resamples (``resblock_updown`` of the released configs): nearest x2 or
    2x2 average pooling of both the input and the hidden state, between the first SiLU and the first conv.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_checkpoint: bool = False,
        use_scale_shift_norm: bool = False,
        up: bool = False,
        down: bool = False,
    ) -> None:
        super().__init__()
        if up and down:
            raise ValueError("ResBlock: up and down are exclusive")
        out_channels = out_channels or channels
        self.in_layers = nn.Sequential(
            nn.GroupNorm(32, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.resample = "up" if up else "down" if down else None
        self.use_scale_shift_norm = use_scale_shift_norm
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        )
        self.out_layers = nn.Sequential(
            nn.GroupNorm(32, out_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        # zero-initialised last conv: a fresh block is the identity (CompVis zero_module)
        nn.init.zeros_(self.out_layers[3].weight)
        nn.init.zeros_(self.out_layers[3].bias)
        self.skip_connection = (
            nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        )
        self.use_checkpoint = use_checkpoint

    def _resampled(self, t: torch.Tensor) -> torch.Tensor:
        if self.resample == "up":
            return F.interpolate(t, scale_factor=2.0, mode="nearest")
        return F.avg_pool2d(t, kernel_size=2, stride=2)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.resample is None:
            h = self.in_layers(x)
        else:
            h = self.in_layers[2](self._resampled(self.in_layers[1](self.in_layers[0](x))))
            x = self._resampled(x)
        e = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            for layer in self.out_layers[1:]:
                h = layer(h)
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)


class Downsample(nn.Module):
    """Stride-2 3x3 conv (CompVis name ``op``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest x2 then 3x3 conv (CompVis name ``conv``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    """Sequential that hands the timestep embedding to ResBlocks and the context to attention blocks."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, (SpatialTransformer, AttentionBlock)):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    """forward(x [B, C, h, w], timesteps [B], context [B, L, D], y [B], concat [B, Cc, h, w]) -> eps or v."""

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        if cfg.num_head_channels == -1 and cfg.num_heads <= 0:
            raise ValueError("unet: set num_heads > 0 or num_head_channels > 0")
        widths = [cfg.model_channels * m for m in cfg.channel_mult]
        if any(w % 32 for w in widths):
            raise ValueError(
                f"unet widths model_channels x channel_mult = {widths} must be multiples of 32 (GroupNorm with "
                "32 groups, as CompVis): e.g. model_channels=32, 64, 320"
            )
        if not 0 <= cfg.concat_channels < cfg.in_channels:
            raise ValueError(
                f"unet.in_channels={cfg.in_channels} must count the latent channels plus "
                f"concat_channels={cfg.concat_channels} (e.g. in_channels=${{first_stage.embed_dim}} + concat)"
            )
        self.cfg = cfg
        mc = cfg.model_channels
        time_dim = mc * 4
        self.time_embed = nn.Sequential(nn.Linear(mc, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        if cfg.num_classes is not None:
            self.label_emb = nn.Embedding(cfg.num_classes, time_dim)

        def attention(ch: int) -> nn.Module:
            if cfg.num_head_channels == -1:
                heads, dim_head = cfg.num_heads, ch // cfg.num_heads
            else:
                heads, dim_head = ch // cfg.num_head_channels, cfg.num_head_channels
            if cfg.context_dim is None:
                return AttentionBlock(ch, heads, cfg.use_checkpoint)
            return SpatialTransformer(
                ch, heads, dim_head, cfg.transformer_depth, cfg.dropout, cfg.context_dim,
                cfg.use_linear_in_transformer, cfg.use_checkpoint,
            )

        def res(ch_in: int, ch_out: int, up: bool = False, down: bool = False) -> ResBlock:
            return ResBlock(
                ch_in, time_dim, cfg.dropout, ch_out, cfg.use_checkpoint, cfg.use_scale_shift_norm, up, down
            )

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))]
        )
        skip_chans, ch, ds = [mc], mc, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [res(ch, mult * mc)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(attention(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(cfg.channel_mult) - 1:
                down = res(ch, ch, down=True) if cfg.resblock_updown else Downsample(ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(res(ch, ch), attention(ch), res(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [res(ch + skip_chans.pop(), mc * mult)]
                ch = mc * mult
                if ds in cfg.attention_resolutions:
                    layers.append(attention(ch))
                if level and i == cfg.num_res_blocks:
                    layers.append(res(ch, ch, up=True) if cfg.resblock_updown else Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(nn.GroupNorm(32, ch), nn.SiLU(), nn.Conv2d(mc, cfg.out_channels, 3, padding=1))
        nn.init.zeros_(self.out[2].weight)
        nn.init.zeros_(self.out[2].bias)

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        concat: torch.Tensor | None = None,
    ) -> torch.Tensor:
        cfg = self.cfg
        if (context is None) != (cfg.context_dim is None):
            raise ValueError(
                f"unet has context_dim={cfg.context_dim} but context is {'missing' if context is None else 'given'}"
            )
        if (y is None) != (cfg.num_classes is None):
            raise ValueError(f"unet has num_classes={cfg.num_classes} but y is {'missing' if y is None else 'given'}")
        if cfg.concat_channels:
            if concat is None or concat.shape[1] != cfg.concat_channels:
                got = None if concat is None else tuple(concat.shape)
                raise ValueError(f"unet expects concat with {cfg.concat_channels} channels, got {got}")
            x = torch.cat([x, concat.to(x.dtype)], dim=1)
        elif concat is not None:
            raise ValueError("concat given but unet.concat_channels is 0")

        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        t_emb = timestep_embedding(timesteps, cfg.model_channels)
        if not autocast_enabled(x.device):
            t_emb = t_emb.to(self.time_embed[0].weight.dtype)  # a bf16-cast model without autocast
        emb = self.time_embed(t_emb)
        if y is not None:
            emb = emb + self.label_emb(y)

        hs = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb, context)
        return self.out(h).to(x.dtype)
