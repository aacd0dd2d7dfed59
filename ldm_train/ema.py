"""Exponential moving average of model weights, kept in fp32, ZeRO-3 aware (the paper's EMA 0.9999).

Usage in the trainer (build it AFTER ``deepspeed.initialize`` so ZeRO-3 has partitioned the weights)::

    ema = EMA(engine.module, decay=0.9999)        # warm-up: min(decay, (1 + n) / (10 + n)), as CompVis LitEma
    for batch in loader:
        engine.backward(loss); engine.step()
        if engine.is_gradient_accumulation_boundary():   # once per optimizer step, on every rank
            ema.update(engine.module)
    full = ema.gathered_state_dict()              # collective: every rank calls; {name: fp32 tensor} on CPU
    # export: rank 0 writes `full` with the model's key prefix (e.g. "model.diffusion_model.")
    with ema.average_parameters(engine.module):   # evaluate with EMA weights, then the training ones return
        sample(...)

Checkpoints: ``state_dict()`` is cheap and per rank (this rank's partitions under ZeRO-3: resume at the
same world size). A state dict holding the full tensors (``gathered_state_dict(with_meta=True)``) loads at
any world size: ``load_state_dict`` slices this rank's partition out of it.

Under ZeRO-3 a parameter's ``.data`` is an empty placeholder outside forward/backward; each rank averages
only its own partition: the optimizer's fp32 master partition when DeepSpeed's ZeRO-3 optimizer holds one
(``fp32_master=True``, exact under bf16/fp16 training) or else ``param.ds_tensor``. Partition layout is
DeepSpeed's: rank r holds elements ``[r * p, (r + 1) * p)`` of the flattened, zero-padded parameter.
Without ZeRO-3 (plain modules, DDP, ZeRO-1/2) the full parameter is averaged. Only parameters are
averaged (CompVis LitEma); frozen parameters are kept as they were at construction.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# elements per fused EMA update: the fp32 copies of 16-bit weights it needs stay under 256 MB
UPDATE_CHUNK = 64 * 2**20


@dataclass
class _Partition:
    """Where this rank's slice of a ZeRO-3 parameter sits in the full tensor."""

    shape: torch.Size
    numel: int
    size: int  # elements per rank (padded)
    rank: int
    world_size: int
    group: Any


def _is_zero3(p: nn.Parameter) -> bool:
    return hasattr(p, "ds_id") and getattr(p, "ds_tensor", None) is not None


class EMA:
    """fp32 EMA of a module's parameters; see the module docstring for use with DeepSpeed ZeRO-3."""

    def __init__(
        self, model: nn.Module, decay: float = 0.9999, warmup: bool = True, fp32_master: bool = True
    ) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay} (the paper uses 0.9999)")
        self.decay = decay
        self.warmup = warmup
        self.fp32_master = fp32_master
        self.num_updates = 0
        self.shadow: dict[str, torch.Tensor] = {}
        self.partitions: dict[str, _Partition] = {}
        for name, p in model.named_parameters():
            if _is_zero3(p):
                import torch.distributed as dist

                group = getattr(p, "ds_process_group", None)
                self.partitions[name] = _Partition(
                    shape=torch.Size(p.ds_shape), numel=int(p.ds_numel), size=int(p.ds_tensor.numel()),
                    rank=dist.get_rank(group=group), world_size=dist.get_world_size(group=group), group=group,
                )
            self.shadow[name] = self._local(p).detach().to(torch.float32, copy=True)

    # -- what this rank averages ------------------------------------------------------------------
    def _local(self, p: nn.Parameter) -> torch.Tensor:
        """The tensor this rank averages for ``p`` (full, or its ZeRO-3 partition)."""
        if not _is_zero3(p):
            return p.data
        opt = getattr(p, "_z3_optimizer", None)
        if self.fp32_master and opt is not None and p.requires_grad:
            return opt.get_local_fp32_param(p)
        return p.ds_tensor

    def _named_params(self, model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
        params = dict(model.named_parameters())
        if params.keys() != self.shadow.keys():
            missing, extra = self.shadow.keys() - params.keys(), params.keys() - self.shadow.keys()
            raise ValueError(
                f"EMA tracks another model: missing {sorted(missing)[:5]}, unexpected {sorted(extra)[:5]}; "
                "pass the module the EMA was built from (engine.module under DeepSpeed)"
            )
        for name, p in params.items():
            if _is_zero3(p) != (name in self.partitions):
                raise ValueError(
                    f"parameter {name} is {'now' if _is_zero3(p) else 'no longer'} ZeRO-3 partitioned: "
                    "build the EMA after deepspeed.initialize, from engine.module"
                )
            yield name, p

    def current_decay(self) -> float:
        """Decay of the next update: ``min(decay, (1 + n) / (10 + n))`` with n counting this update."""
        n = self.num_updates + 1
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    # -- training -----------------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step after an optimizer step: ``shadow += (1 - decay) * (param - shadow)``."""
        decay = self.current_decay()
        shadows, sources, pending = [], [], 0
        for name, p in self._named_params(model):
            if not p.requires_grad:
                continue
            src = self._local(p)
            if src.shape != self.shadow[name].shape:
                raise ValueError(f"{name}: EMA holds {tuple(self.shadow[name].shape)}, model has {tuple(src.shape)}")
            shadows.append(self.shadow[name])
            sources.append(src.to(device=self.shadow[name].device, dtype=torch.float32))
            pending += src.numel()
            if pending >= UPDATE_CHUNK:  # bounded fp32 temporaries: never a second full copy of the model
                torch._foreach_lerp_(shadows, sources, 1.0 - decay)
                shadows, sources, pending = [], [], 0
        self.num_updates += 1
        if shadows:
            torch._foreach_lerp_(shadows, sources, 1.0 - decay)  # one fused kernel per device and dtype

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the EMA into the model's weights (under ZeRO-3: into each rank's ``ds_tensor``; the
        optimizer's fp32 master is left alone, so use :meth:`average_parameters` mid-training)."""
        for name, p in self._named_params(model):
            target = p.ds_tensor if name in self.partitions else p.data
            target.copy_(self.shadow[name].to(device=target.device, dtype=target.dtype))

    @contextlib.contextmanager
    def average_parameters(self, model: nn.Module) -> Iterator[None]:
        """Run the block with EMA weights in ``model``, then put the training weights back."""
        backup = {
            name: (p.ds_tensor if name in self.partitions else p.data).detach().clone()
            for name, p in self._named_params(model)
        }
        self.copy_to(model)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in self._named_params(model):
                    (p.ds_tensor if name in self.partitions else p.data).copy_(backup[name])

    # -- state --------------------------------------------------------------------------------------
    def _meta(self) -> dict[str, Any]:
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates}

    def state_dict(self) -> dict[str, Any]:
        """This rank's state: full tensors, or its ZeRO-3 partitions (flagged ``partitioned``)."""
        ranks = {p.world_size for p in self.partitions.values()}
        return {
            **self._meta(),
            "partitioned": bool(self.partitions),
            "world_size": ranks.pop() if len(ranks) == 1 else None,
            "shadow": {k: v.detach().clone() for k, v in self.shadow.items()},
        }

    @torch.no_grad()
    def gathered_state_dict(
        self, device: torch.device | str = "cpu", rank0_only: bool = False, with_meta: bool = False
    ) -> dict[str, Any]:
        """The full fp32 EMA ``{name: tensor}`` (a collective under ZeRO-3: every rank must call it).

        Parameters are all-gathered one at a time (peak extra memory: one full parameter).
        ``rank0_only`` returns ``{}`` on the other ranks; ``with_meta`` wraps the tensors in a loadable
        state dict (``{"decay", "num_updates", ..., "shadow": {...}}``) for world-size-independent resume.
        """
        import torch.distributed as dist

        keep = not rank0_only or not dist.is_initialized() or dist.get_rank() == 0
        full: dict[str, torch.Tensor] = {}
        for name, shadow in self.shadow.items():
            part = self.partitions.get(name)
            if part is None:
                tensor = shadow.detach().to(device, copy=True)
            else:
                # NCCL can only gather device tensors: a CPU-offloaded partition goes through the GPU
                comm = shadow
                if dist.get_backend(part.group) == "nccl" and shadow.device.type != "cuda":
                    comm = shadow.to(torch.device("cuda", torch.cuda.current_device()))
                pieces = [torch.empty_like(comm) for _ in range(part.world_size)]
                dist.all_gather(pieces, comm.contiguous(), group=part.group)
                tensor = torch.cat(pieces)[: part.numel].view(part.shape).to(device)
            if keep:
                full[name] = tensor
        if not keep:
            return {}
        return {**self._meta(), "partitioned": False, "world_size": None, "shadow": full} if with_meta else full

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` (same world size when partitioned) or from full tensors
        (``gathered_state_dict(with_meta=True)``, any world size: this rank's partition is sliced out)."""
        shadow = state["shadow"]
        ours = {p.world_size for p in self.partitions.values()}
        if state.get("partitioned") and state.get("world_size") is not None and ours and state["world_size"] not in ours:
            raise ValueError(
                f"EMA state holds ZeRO-3 partitions of world size {state['world_size']} but this run has "
                f"{ours.pop()}: save gathered_state_dict(with_meta=True) to resume at another world size"
            )
        if shadow.keys() != self.shadow.keys():
            missing, extra = self.shadow.keys() - shadow.keys(), shadow.keys() - self.shadow.keys()
            raise ValueError(f"EMA state does not fit this model: missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(extra)[:5]}")
        for name, src in shadow.items():
            dst, part = self.shadow[name], self.partitions.get(name)
            if part is not None and tuple(src.shape) == tuple(part.shape) and src.shape != dst.shape:
                flat = src.reshape(-1).to(device=dst.device, dtype=torch.float32)
                padded = torch.zeros(part.size * part.world_size, dtype=torch.float32, device=dst.device)
                padded[: part.numel] = flat
                src = padded[part.rank * part.size : (part.rank + 1) * part.size]
            if src.shape != dst.shape:
                raise ValueError(
                    f"EMA state {name} has shape {tuple(src.shape)} but this rank holds {tuple(dst.shape)}: "
                    "a partitioned state loads only at the world size it was saved at; save "
                    "gathered_state_dict(with_meta=True) to resume at another one"
                )
            dst.copy_(src.to(device=dst.device, dtype=torch.float32))
        self.decay = float(state.get("decay", self.decay))
        self.warmup = bool(state.get("warmup", self.warmup))
        self.num_updates = int(state["num_updates"])
