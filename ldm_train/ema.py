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

Checkpoints: ``state_dict()`` is cheap and per rank (this rank's partitions or fragments under ZeRO: resume at
the same world size). A state dict holding the full tensors (``gathered_state_dict(with_meta=True)``) loads at
any world size: ``load_state_dict`` slices this rank's part out of it.

Each rank averages only what it owns wherever DeepSpeed shards the fp32 master (``fp32_master=True``, the
default; exact under bf16/fp16 training, and no full fp32 copy of the model on any rank):

- ZeRO-1/2 (and DeepSpeed's BF16 optimizer): the fragment of the optimizer's flat fp32 partition that belongs to each
  parameter (``param._hp_mapping.hp_fragment``; ``None`` where this rank holds none of it). The shadow is that
  1-D fragment; its offset in the flattened parameter is ``_hp_mapping.lp_fragment_address.start``.
- ZeRO-3: a parameter's ``.data`` is an empty placeholder outside forward/backward; the EMA averages the optimizer's
  fp32 master partition, or ``param.ds_tensor`` when there is none. Rank r holds elements ``[r * p, (r + 1) * p)``
  of the flattened, zero-padded parameter.

The update reads the master in place (``lerp`` of fp32 into fp32: no temporary). Without a sharded master (plain
modules, DDP, ``fp32_master=False``) the full parameter is averaged, through bounded fp32 temporaries when it is
16-bit. Only parameters are averaged (CompVis LitEma); frozen parameters are kept as they were at construction.
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
# what a rank averages for a parameter whose fp32 master lies wholly on other ranks (one tensor, not one per step)
_NO_FRAGMENT = torch.empty(0, dtype=torch.float32)


@dataclass
class _Partition:
    """Where this rank's slice of a ZeRO-3 parameter sits in the full tensor."""

    shape: torch.Size
    numel: int
    size: int  # elements per rank (padded)
    rank: int
    world_size: int
    group: Any


@dataclass
class _Fragment:
    """Where this rank's slice of a ZeRO-1/2 fp32 master sits in the flattened parameter (``numel`` 0: none)."""

    shape: torch.Size
    full_numel: int
    start: int
    numel: int
    world_size: int
    group: Any


def _is_zero3(p: nn.Parameter) -> bool:
    return hasattr(p, "ds_id") and getattr(p, "ds_tensor", None) is not None


def _has_master_fragment(p: nn.Parameter) -> bool:
    """DeepSpeed's ZeRO-1/2 (and BF16) optimizer linked ``p`` to its flat fp32 partition (``_hp_mapping``
    is set on every trained parameter, ``None`` where this rank holds none of it)."""
    return not _is_zero3(p) and hasattr(p, "_hp_mapping") and hasattr(p, "_dp_group")


def _fragment_of(p: nn.Parameter) -> _Fragment:
    import torch.distributed as dist

    mapping = p._hp_mapping
    addr = mapping.lp_fragment_address if mapping is not None else None
    return _Fragment(shape=p.shape, full_numel=p.numel(), start=addr.start if addr else 0,
                     numel=addr.numel if addr else 0, world_size=dist.get_world_size(group=p._dp_group),
                     group=p._dp_group)


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
        self.partitions: dict[str, _Partition] = {}  # ZeRO-3
        self.fragments: dict[str, _Fragment] = {}  # ZeRO-1/2: this rank's piece of the fp32 master
        for name, p in model.named_parameters():
            if _is_zero3(p):
                import torch.distributed as dist

                group = getattr(p, "ds_process_group", None)
                self.partitions[name] = _Partition(
                    shape=torch.Size(p.ds_shape), numel=int(p.ds_numel), size=int(p.ds_tensor.numel()),
                    rank=dist.get_rank(group=group), world_size=dist.get_world_size(group=group), group=group,
                )
            elif fp32_master and p.requires_grad and _has_master_fragment(p):
                self.fragments[name] = _fragment_of(p)
            local = self._local(p, name)  # an empty shadow sits with the parameter: _gather's buffer goes there
            device = p.device if local is _NO_FRAGMENT else local.device
            self.shadow[name] = local.detach().to(device=device, dtype=torch.float32, copy=True)

    # -- what this rank averages ------------------------------------------------------------------
    def _local(self, p: nn.Parameter, name: str) -> torch.Tensor:
        """The tensor this rank averages for ``p``: full, its ZeRO-1/2 master fragment (read each time: DeepSpeed
        relinks the fragments when it loads a checkpoint) or its ZeRO-3 partition."""
        if name in self.fragments:
            mapping = p._hp_mapping
            return _NO_FRAGMENT if mapping is None else mapping.hp_fragment
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
            if name in self.fragments and not _has_master_fragment(p):
                raise ValueError(f"parameter {name} is no longer linked to a ZeRO-1/2 fp32 master: pass the module "
                                 "the EMA was built from (engine.module)")
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
            src = self._local(p, name)
            if not src.numel():
                continue  # none of this parameter's master lives on this rank
            if src.shape != self.shadow[name].shape:
                raise ValueError(f"{name}: EMA holds {tuple(self.shadow[name].shape)}, model has {tuple(src.shape)}")
            shadows.append(self.shadow[name])
            sources.append(src.to(device=self.shadow[name].device, dtype=torch.float32))
            pending += src.numel() if src.dtype != torch.float32 else 0  # fp32 masters are read in place
            if pending >= UPDATE_CHUNK:  # bounded fp32 temporaries: never a second full copy of the model
                torch._foreach_lerp_(shadows, sources, 1.0 - decay)
                shadows, sources, pending = [], [], 0
        self.num_updates += 1
        if shadows:
            torch._foreach_lerp_(shadows, sources, 1.0 - decay)  # one fused kernel per device and dtype

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the EMA into the model's weights (under ZeRO-3: into each rank's ``ds_tensor``; under ZeRO-1/2 a
        collective: each parameter is gathered from the ranks' fragments). The optimizer's fp32 master is left
        alone, so use :meth:`average_parameters` mid-training."""
        for name, p in self._named_params(model):
            target = p.ds_tensor if name in self.partitions else p.data
            source = self._gather(name, target.device) if name in self.fragments else self.shadow[name]
            target.copy_(source.to(device=target.device, dtype=target.dtype))

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
        """This rank's state: full tensors, or its ZeRO partitions / fragments (flagged ``partitioned``)."""
        ranks = {p.world_size for p in [*self.partitions.values(), *self.fragments.values()]}
        return {
            **self._meta(),
            "partitioned": bool(self.partitions or self.fragments),
            "world_size": ranks.pop() if len(ranks) == 1 else None,
            "shadow": {k: v.detach().clone() for k, v in self.shadow.items()},
        }

    @staticmethod
    def _comm_buffer(tensor: torch.Tensor, group: Any) -> torch.Tensor:
        """NCCL can only move device tensors: a CPU-offloaded shadow goes through the GPU."""
        import torch.distributed as dist

        if dist.get_backend(group) == "nccl" and tensor.device.type != "cuda":
            return tensor.to(torch.device("cuda", torch.cuda.current_device()))
        return tensor

    def _gather(self, name: str, device: torch.device | str) -> torch.Tensor:
        """The full fp32 EMA of one sharded parameter (a collective over its data-parallel group)."""
        import torch.distributed as dist

        shadow = self.shadow[name]
        part = self.partitions.get(name)
        if part is not None:
            comm = self._comm_buffer(shadow, part.group)
            pieces = [torch.empty_like(comm) for _ in range(part.world_size)]
            dist.all_gather(pieces, comm.contiguous(), group=part.group)
            return torch.cat(pieces)[: part.numel].view(part.shape).to(device)
        frag = self.fragments[name]
        # each element lives on exactly one rank and is zero elsewhere, so the sum is exact (DeepSpeed gathers
        # its own full fp32 parameters the same way)
        full = self._comm_buffer(shadow.new_zeros(frag.full_numel), frag.group)
        if frag.numel:
            full.narrow(0, frag.start, frag.numel).copy_(shadow)
        dist.all_reduce(full, group=frag.group)
        return full.view(frag.shape).to(device)

    @torch.no_grad()
    def gathered_state_dict(
        self, device: torch.device | str = "cpu", rank0_only: bool = False, with_meta: bool = False
    ) -> dict[str, Any]:
        """The full fp32 EMA ``{name: tensor}`` (a collective under ZeRO: every rank must call it).

        Parameters are gathered one at a time (peak extra memory: one full parameter).
        ``rank0_only`` returns ``{}`` on the other ranks; ``with_meta`` wraps the tensors in a loadable
        state dict (``{"decay", "num_updates", ..., "shadow": {...}}``) for world-size-independent resume.
        """
        import torch.distributed as dist

        keep = not rank0_only or not dist.is_initialized() or dist.get_rank() == 0
        full: dict[str, torch.Tensor] = {}
        for name, shadow in self.shadow.items():
            sharded = name in self.partitions or name in self.fragments
            tensor = self._gather(name, device) if sharded else shadow.detach().to(device, copy=True)
            if keep:
                full[name] = tensor
        if not keep:
            return {}
        return {**self._meta(), "partitioned": False, "world_size": None, "shadow": full} if with_meta else full

    def _rank_slice(self, name: str, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
        """This rank's part of a full tensor ``src`` for a sharded parameter (``src`` itself otherwise)."""
        part, frag = self.partitions.get(name), self.fragments.get(name)
        if part is not None and tuple(src.shape) == tuple(part.shape) and src.shape != dst.shape:
            flat = src.reshape(-1).to(device=dst.device, dtype=torch.float32)
            padded = torch.zeros(part.size * part.world_size, dtype=torch.float32, device=dst.device)
            padded[: part.numel] = flat
            return padded[part.rank * part.size : (part.rank + 1) * part.size]
        if frag is not None and tuple(src.shape) == tuple(frag.shape):
            return src.reshape(-1).narrow(0, frag.start, frag.numel)
        return src

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` (same world size when partitioned) or from full tensors
        (``gathered_state_dict(with_meta=True)``, any world size: this rank's part is sliced out)."""
        shadow = state["shadow"]
        ours = {p.world_size for p in [*self.partitions.values(), *self.fragments.values()]}
        per_rank = bool(state.get("partitioned"))
        if per_rank and state.get("world_size") is not None and ours and state["world_size"] not in ours:
            raise ValueError(
                f"EMA state holds ZeRO partitions of world size {state['world_size']} but this run has "
                f"{ours.pop()}: save gathered_state_dict(with_meta=True) to resume at another world size"
            )
        if shadow.keys() != self.shadow.keys():
            missing, extra = self.shadow.keys() - shadow.keys(), shadow.keys() - self.shadow.keys()
            raise ValueError(f"EMA state does not fit this model: missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(extra)[:5]}")
        for name, src in shadow.items():
            dst = self.shadow[name]
            if not per_rank:
                src = self._rank_slice(name, src, dst)
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
