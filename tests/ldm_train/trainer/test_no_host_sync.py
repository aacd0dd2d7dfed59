"""No host sync in the training step, checked without a GPU: the step runs with the meta device
standing in for the GPU (the autograd engine will not run fake CUDA tensors without a CUDA driver) under a dispatch
mode that records every operator that makes the host wait for the device (``.item()``, ``bool()``, data-dependent
shapes, on a device tensor) and every copy between host and device. After the first step (which moves the noise schedule
to the device once) the only host-to-device copies are the batch's own, and nothing syncs.

Covered: the batch transfer, the timestep and noise draws, the LDM's forward and backward (text encoder, UNet,
schedule lookups, loss), the numerical guard's count, the loss accumulation, an optimizer step and the EMA update.
DeepSpeed's engine (its bucketed reduction and its overflow check) is not: it needs a real GPU."""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ldm_train.build import build_ldm
from ldm_train.diffusion.step import draw_t_and_noise, training_loss
from ldm_train.ema import EMA
from ldm_train.summary import compose_config
from ldm_train.trainer.guard import NumericalGuard

aten = torch.ops.aten
DEVICE = "meta"  # the accelerator's stand-in
SYNCING = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
           aten.is_nonzero.default, aten.equal.default, aten.unique_consecutive.default, aten._unique2.default}


class HostDeviceTraffic(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []
        self.copies: list[str] = []  # "cpu->cuda <shape>" / "cuda->cpu <shape>"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNCING and any(isinstance(t, torch.Tensor) and t.device.type == DEVICE
                                   for t in tree_flatten((args, kwargs))[0]):
            self.syncs.append(str(func))
        out = func(*args, **kwargs)
        if func in (aten._to_copy.default, aten.copy_.default, aten.copy.default):
            src = args[1] if func is aten.copy_.default else args[0]
            dst = args[0] if func is aten.copy_.default else out
            if src.device.type != dst.device.type:
                self.copies.append(f"{src.device.type}->{dst.device.type} {tuple(src.shape)}")
        else:
            devices = {t.device.type for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)
                       and t.dim() > 0}
            if len(devices) > 1:
                self.copies.append(f"implicit {func} {sorted(devices)}")
        return out


def test_the_step_after_warm_up_neither_syncs_nor_copies_more_than_the_batch() -> None:
    cfg = compose_config(["experiment=tiny"])
    torch.manual_seed(0)
    model = build_ldm(cfg, activation_checkpointing=False).train()  # built on the host, as the trainer does
    side, ch = int(cfg.unet.image_size), int(cfg.unet.in_channels)
    batches = [{"latents": torch.randn(4, ch, side, side),
                "tokens": torch.randint(0, int(cfg.text_encoder.vocab_size), (4, int(cfg.text_encoder.max_seq_len)))}
               for _ in range(3)]
    device = torch.device(DEVICE)
    model = model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    ema = EMA(model, decay=0.999)
    guard = NumericalGuard(max_consecutive=5, device=device)
    loss_acc = torch.zeros((), device=device)
    traffic = []
    for batch in batches:
        with HostDeviceTraffic() as seen:
            z0 = batch["latents"].to(device, non_blocking=True).float() * 0.5
            tokens = batch["tokens"].to(device, non_blocking=True)
            t, noise = draw_t_and_noise(z0, 1000, 0.1, None)
            loss = training_loss(model, z0, tokens, t, noise)
            guard.observe_loss(loss)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            ema.update(model)
            loss_acc += loss.detach()
        traffic.append(seen)
    first, *later = traffic
    assert any(f"cpu->{DEVICE} (1000,)" in c for c in first.copies)  # the schedule's tables, moved once
    batch_copies = [f"cpu->{DEVICE} {tuple(b.shape)}" for b in batches[0].values()]
    for seen in later:
        assert seen.syncs == [], seen.syncs
        assert seen.copies == batch_copies, seen.copies
