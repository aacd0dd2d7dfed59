"""First-stage autoencoders of the paper: AutoencoderKL (kl-f*) and VQModel (vq-f*).

Module and parameter names follow the released CompVis checkpoints, so ``first_stage_model.`` + our
state_dict keys are the keys of ``kl-f8``/``vq-f4``/... (``encoder.down.0.block.0.conv1.weight``,
``quant_conv.weight``, ``quantize.embedding.weight``) and the files load both ways.

Interface used by data_prep, eval and the trainers:
- ``encode_moments(x)`` with ``x`` in [-1, 1]: posterior moments ``[B, 2*embed_dim, h, w]`` (mean then
  logvar) for KL; the pre-quantization latent ``[B, embed_dim, h, w]`` for VQ.
- ``decode(z)`` -> image in about [-1, 1] (VQ quantizes ``z`` first unless ``force_not_quantize``).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ldm_train.config import ATTN_TYPES, FIRST_STAGE_KINDS, FirstStageConfig
from ldm_train.models.quantize import VectorQuantizer


def _norm(channels: int, groups: int = 32) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice with a 1x1 ``nin_shortcut`` when the width changes (no timestep input)."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0, groups: int = 32) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv q/k/v/proj_out (the CompVis "vanilla" block)."""

    def __init__(self, channels: int, groups: int = 32) -> None:
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)

        def tokens(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, 1, c, h * w).transpose(2, 3)  # [B, heads=1, hw, c]

        out = F.scaled_dot_product_attention(tokens(self.q(hn)), tokens(self.k(hn)), tokens(self.v(hn)))
        out = out.transpose(2, 3).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after right/bottom zero padding (halves odd and even sides like the released models)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: ``block`` (ResnetBlocks), ``attn`` (AttnBlocks) and an optional resampler."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()

    def run(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn) > 0:
                h = self.attn[i](h)
        return h


def _attn(channels: int, groups: int, attn_type: str) -> nn.Module:
    """The CompVis ``make_attn``: "vanilla" self-attention, or "none" (an identity without weights)."""
    if attn_type == "vanilla":
        return AttnBlock(channels, groups)
    if attn_type == "none":
        return nn.Identity()
    raise ValueError(f"ddconfig.attn_type={attn_type!r}: use one of {', '.join(ATTN_TYPES)}")


class _Mid(nn.Module):
    def __init__(self, channels: int, dropout: float, groups: int, attn_type: str = "vanilla") -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout, groups)
        self.attn_1 = _attn(channels, groups, attn_type)
        self.block_2 = ResnetBlock(channels, channels, dropout, groups)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    """Image ``[B, in_channels, H, W]`` -> ``[B, (2 if double_z else 1) * z_channels, H/f, W/f]``."""

    def __init__(self, *, ch: int, ch_mult: list[int], num_res_blocks: int, attn_resolutions: list[int],
                 in_channels: int, resolution: int, z_channels: int, double_z: bool = True,
                 dropout: float = 0.0, norm_groups: int = 32, attn_type: str = "vanilla", **_: Any) -> None:
        super().__init__()
        g = norm_groups
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        res, block_in = resolution, ch
        for i, mult in enumerate(ch_mult):
            level, block_out = _Level(), ch * mult
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(block_in, block_out, dropout, g))
                block_in = block_out
                if res in attn_resolutions:  # attn_resolutions are feature-map sides at ddconfig.resolution
                    level.attn.append(_attn(block_in, g, attn_type))
            if i != len(ch_mult) - 1:
                level.downsample = Downsample(block_in)
                res //= 2
            self.down.append(level)
        self.mid = _Mid(block_in, dropout, g, attn_type)
        self.norm_out = _norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level.run(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent ``[B, z_channels, h, w]`` -> image ``[B, out_ch, h*f, w*f]``; ``up[i]`` is resolution level i."""

    def __init__(self, *, ch: int, out_ch: int, ch_mult: list[int], num_res_blocks: int,
                 attn_resolutions: list[int], resolution: int, z_channels: int, dropout: float = 0.0,
                 norm_groups: int = 32, attn_type: str = "vanilla", **_: Any) -> None:
        super().__init__()
        g = norm_groups
        block_in = ch * ch_mult[-1]
        res = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = _Mid(block_in, dropout, g, attn_type)
        levels: list[_Level] = []
        for i in reversed(range(len(ch_mult))):
            level, block_out = _Level(), ch * ch_mult[i]
            for _ in range(num_res_blocks + 1):
                level.block.append(ResnetBlock(block_in, block_out, dropout, g))
                block_in = block_out
                if res in attn_resolutions:
                    level.attn.append(_attn(block_in, g, attn_type))
            if i != 0:
                level.upsample = Upsample(block_in)
                res *= 2
            levels.insert(0, level)  # index by level so keys read up.0 (full resolution) .. up.N-1
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level.run(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussian:
    """The KL posterior from moments ``[B, 2z, h, w]`` (mean then logvar, logvar clamped as released)."""

    def __init__(self, moments: torch.Tensor) -> None:
        self.mean, logvar = torch.chunk(moments, 2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mean + std * noise; the noise is drawn on ``generator``'s device (a CPU generator gives the same z
        on any device)."""
        device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL to N(0, I), summed over latent elements: ``[B]``."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).sum(dim=(1, 2, 3))


def _check(cfg: FirstStageConfig) -> None:
    dd = cfg.ddconfig
    f = 2 ** (len(dd.ch_mult) - 1)
    if f != cfg.downsample_factor:
        raise ValueError(f"first_stage {cfg.name}: downsample_factor={cfg.downsample_factor} but ddconfig.ch_mult "
                         f"{list(dd.ch_mult)} gives f={f}: fix one of them in conf/first_stage/{cfg.name}.yaml")
    if cfg.kind == "kl" and not dd.double_z:
        raise ValueError(f"first_stage {cfg.name}: kind=kl needs ddconfig.double_z=true (mean and logvar)")
    if cfg.kind == "vq" and dd.double_z:
        raise ValueError(f"first_stage {cfg.name}: kind=vq needs ddconfig.double_z=false")


class AutoencoderKL(nn.Module):
    """KL-regularised autoencoder (kl-f4 .. kl-f32)."""

    def __init__(self, cfg: FirstStageConfig) -> None:
        super().__init__()
        _check(cfg)
        self.cfg = cfg
        dd = vars(cfg.ddconfig) if not isinstance(cfg.ddconfig, dict) else cfg.ddconfig
        self.encoder = Encoder(**dd)
        self.decoder = Decoder(**dd)
        self.quant_conv = nn.Conv2d(2 * cfg.ddconfig.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.ddconfig.z_channels, 1)

    @property
    def downsample_factor(self) -> int:
        return self.cfg.downsample_factor

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight the adversarial loss balances its gradient against (the decoder's output conv)."""
        return self.decoder.conv_out.weight

    def encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x))

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(self.encode_moments(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, sample_posterior: bool = True) -> tuple[torch.Tensor, DiagonalGaussian]:
        posterior = self.encode(x)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z), posterior


class VQModel(nn.Module):
    """Vector-quantised autoencoder (vq-f4 .. vq-f16); the diffusion model sees the pre-quantization latent."""

    def __init__(self, cfg: FirstStageConfig) -> None:
        super().__init__()
        _check(cfg)
        self.cfg = cfg
        dd = vars(cfg.ddconfig) if not isinstance(cfg.ddconfig, dict) else cfg.ddconfig
        self.encoder = Encoder(**dd)
        self.decoder = Decoder(**dd)
        self.quantize = VectorQuantizer(cfg.n_embed, cfg.embed_dim)
        self.quant_conv = nn.Conv2d(cfg.ddconfig.z_channels, cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.ddconfig.z_channels, 1)

    @property
    def downsample_factor(self) -> int:
        return self.cfg.downsample_factor

    @property
    def last_layer(self) -> torch.Tensor:
        return self.decoder.conv_out.weight

    def encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x))

    def decode(self, z: torch.Tensor, force_not_quantize: bool = False) -> torch.Tensor:
        if not force_not_quantize:
            z = self.quantize(z)[0]
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        z_q, codebook_loss, info = self.quantize(self.encode_moments(x))
        return self.decode(z_q, force_not_quantize=True), codebook_loss, info


class PixelFirstStage(nn.Module):
    """The identity first stage (``kind: pixel``, f=1): the paper's LDM-1, a diffusion model on pixels.

    It has no weights and no file; the "latent" is the image in [-1, 1], so the pixel-space model is encoded,
    trained, sampled and evaluated by the same code as the latent ones (the f-sweep's f=1 point).
    """

    def __init__(self, cfg: FirstStageConfig) -> None:
        super().__init__()
        if cfg.downsample_factor != 1 or cfg.embed_dim != cfg.ddconfig.in_channels:
            raise ValueError(f"first_stage {cfg.name}: kind=pixel needs downsample_factor=1 and embed_dim="
                             f"ddconfig.in_channels ({cfg.ddconfig.in_channels}), got {cfg.downsample_factor} and "
                             f"{cfg.embed_dim}: see conf/first_stage/pixel.yaml")
        self.cfg = cfg

    @property
    def downsample_factor(self) -> int:
        return 1

    def encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def decode(self, z: torch.Tensor, force_not_quantize: bool = False) -> torch.Tensor:
        return z


FirstStage = AutoencoderKL | VQModel | PixelFirstStage


def build_first_stage(cfg: FirstStageConfig | Any) -> FirstStage:
    """Randomly initialised first stage for ``cfg`` (a FirstStageConfig or its DictConfig node)."""
    if not isinstance(cfg, FirstStageConfig):
        from ldm_train.config import to_dataclass

        cfg = to_dataclass(cfg, FirstStageConfig)
    if cfg.kind == "kl":
        return AutoencoderKL(cfg)
    if cfg.kind == "vq":
        return VQModel(cfg)
    if cfg.kind == "pixel":
        return PixelFirstStage(cfg).eval().requires_grad_(False)
    raise ValueError(f"first_stage {cfg.name}: kind must be one of {', '.join(FIRST_STAGE_KINDS)}, got {cfg.kind!r}")
