"""EMA of the trained weights, ZeRO-3 aware: the trainer's fallback until ``ldm_train.ema`` lands.

CompVis LitEma semantics: fp32 shadow, ``decay_n = min(decay, (1 + n) / (10 + n))`` with warm-up,
updated after every applied optimizer step. Under ZeRO-3 each rank averages only its own partition
(``param.ds_tensor``, never the empty placeholder); ``gathered_state_dict()`` gathers the partitions
into full tensors on rank 0 (collective), and ``load_safetensors`` re-slices a full EMA for any world size.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def _local(p: nn.Parameter) -> torch.Tensor:
    return p.ds_tensor if hasattr(p, "ds_tensor") else p.data


class ShardedEMA:
    def __init__(self, module: nn.Module, decay: float = 0.9999, warmup: bool = True) -> None:
        self.decay, self.warmup = decay, warmup
        self.num_updates = 0
        self.params = dict(module.named_parameters())
        self.shadow = {n: _local(p).detach().float().clone() for n, p in self.params.items()}

    def current_decay(self) -> float:
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, module: nn.Module | None = None) -> None:
        decay = self.current_decay()
        self.num_updates += 1
        for name, p in self.params.items():
            self.shadow[name].lerp_(_local(p).float(), 1.0 - decay)

    @torch.no_grad()
    def gathered_state_dict(self) -> dict[str, torch.Tensor]:
        """Full fp32 EMA tensors by parameter name on rank 0 ({} elsewhere); collective under ZeRO-3."""
        rank0 = not dist.is_initialized() or dist.get_rank() == 0
        sharded = dist.is_initialized() and dist.get_world_size() > 1
        out = {}
        for name, p in self.params.items():
            shard = self.shadow[name]
            if hasattr(p, "ds_tensor"):
                if sharded:
                    parts = [torch.empty_like(shard) for _ in range(dist.get_world_size())] if rank0 else None
                    dist.gather(shard, parts, dst=0)
                    shard = torch.cat(parts) if rank0 else shard
                if rank0:
                    out[name] = shard[: p.ds_numel].view(p.ds_shape).cpu().clone()
            elif rank0:
                out[name] = shard.cpu().clone()
        return out

    @torch.no_grad()
    def load_safetensors(self, path: str, num_updates: int) -> None:
        """A full EMA file (the exported model_ema.safetensors) -> this rank's shards, at any world size.

        Tensors are read one at a time (and only this rank's slice under ZeRO-3): no rank holds the whole file.
        """
        from safetensors import safe_open

        rank = dist.get_rank() if dist.is_initialized() else 0
        with safe_open(path, framework="pt") as f:
            for name, p in self.params.items():
                dst = self.shadow[name]
                if hasattr(p, "ds_tensor"):
                    flat = f.get_tensor(name).float().flatten()
                    piece = flat[rank * dst.numel() : (rank + 1) * dst.numel()]
                    dst.zero_()[: piece.numel()].copy_(piece)
                else:
                    dst.copy_(f.get_tensor(name).float().view_as(dst))
        self.num_updates = num_updates

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        self.num_updates = int(state["num_updates"])
        for name, t in state["shadow"].items():
            self.shadow[name].copy_(t)
