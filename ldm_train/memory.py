"""Live-storage accounting of one training micro-step: how many bytes the activations of forward + backward hold
at their peak, counted on the meta device (no memory, any model size) or on real tensors (the check of the count).

Every tensor an operator returns is backed by a storage; :class:`LiveStorage` (a ``TorchDispatchMode``) adds a
storage's bytes when an operator first returns it and subtracts them when the storage is freed (a weak reference's
callback), keeping the peak. Storages still alive when the step ends (the parameter gradients it accumulated) are
left out of the timeline, so the step's peak is the activations' (saved tensors, recomputation under activation
checkpointing, temporaries) alone: DeepSpeed moves gradients into its buckets and partitions, which the planner
counts as fixed memory.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveStorage(TorchDispatchMode):
    """Bytes held by storages created inside the mode: ``live`` now, ``peak`` since entering, and
    :meth:`transient_peak`, the peak of the storages freed again before the mode exits (a training step's
    activations and temporaries, without the parameter gradients it leaves behind)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.ops = 0  # operators dispatched (the kernels a GPU would launch, roughly)
        self._seen: dict[int, tuple[weakref.ref, int]] = {}  # id(storage) -> (weak reference, serial key)
        self._events: list[tuple[int, int]] = []  # (serial key, +bytes when created / -bytes when freed)

    def _freed(self, ident: int, key: int, nbytes: int) -> None:
        entry = self._seen.get(ident)
        if entry is not None and entry[1] == key:
            del self._seen[ident]
            self.live -= nbytes
            self._events.append((key, -nbytes))

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        ident = id(storage)
        entry = self._seen.get(ident)
        if entry is not None and entry[0]() is storage:
            return
        key, nbytes = len(self._events), storage.nbytes()
        ref = weakref.ref(storage, lambda _, i=ident, k=key, n=nbytes: self._freed(i, k, n))
        self._seen[ident] = (ref, key)
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        self._events.append((key, nbytes))

    def transient_peak(self) -> int:
        """Peak bytes of the storages that were freed again inside the mode (those still alive at the end, such
        as accumulated gradients, are left out of every point of the timeline)."""
        alive = {key for _, key in self._seen.values()}
        live = peak = 0
        for key, delta in self._events:
            if key not in alive:
                live += delta
                peak = max(peak, live)
        return peak

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


def step_activation_bytes(model: torch.nn.Module, inputs: Callable[[], tuple]) -> tuple[int, int]:
    """(peak activation bytes, operators dispatched) of ``training_loss(model, *inputs()).backward()`` (the
    trainer's micro-step, ``ldm_train/diffusion/step.py``): the parameter gradients it leaves behind are not
    counted (DeepSpeed moves them into its buckets and partitions, which the planner counts as fixed memory)."""
    from ldm_train.diffusion.step import training_loss

    args = inputs()  # outside the count: the batch is the loader's, not the step's
    with LiveStorage() as tracker:
        training_loss(model, *args).backward()
    peak = tracker.transient_peak()  # before the gradients go: they are what is still alive now
    model.zero_grad(set_to_none=True)
    return peak, tracker.ops


class flash_attention:
    """Within: ``F.scaled_dot_product_attention`` runs as the flash kernel's op (its output and log-sum-exp saved
    for backward, no N x N matrix), which is what a GPU runs and what the CPU picks for real tensors; the meta
    device would otherwise take the math path and count the attention matrices. The UNet's narrow-head CPU path
    (``ldm_train.models.attention``) is off within, as it is on a GPU."""

    def __enter__(self) -> flash_attention:
        import torch.nn.functional as F

        from ldm_train.models.attention import sdpa_only

        self._sdpa_only = sdpa_only()
        self._sdpa_only.__enter__()

        self._orig = F.scaled_dot_product_attention

        def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if args or kwargs or q.device.type != "meta":
                return self._orig(q, k, v, *args, **kwargs)
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)[0]

        F.scaled_dot_product_attention = sdpa
        return self

    def __exit__(self, *exc: object) -> None:
        import torch.nn.functional as F

        F.scaled_dot_product_attention = self._orig
        self._sdpa_only.__exit__(None, None, None)
