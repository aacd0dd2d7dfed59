"""torchrun worker of test_ema.py: the EMA under DeepSpeed ZeRO (2 gloo ranks) against independent references.

Usage: python -m torch.distributed.run --standalone --nproc_per_node 2 ema_zero_worker.py STAGE PRECISION RESULT.json
PRECISION: fp32, bf16, or bf16-accum-fp32 (ZeRO-1: DeepSpeed's BF16 optimizer).

- fp32: the gathered EMA must equal the EMA of a plain model trained on the same global batches.
- bf16: the gathered EMA must equal a plain EMA of the optimizer's full fp32 master weights (gathered each step with
  DeepSpeed's own ``safe_get_full_fp32_param``), and differ from the EMA of the bf16 weights.
Rank 0 writes the measurements to RESULT.json.
"""
from __future__ import annotations

import json
import sys

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param
from torch import nn

from ldm_train.ema import EMA

STEPS, MICRO, DECAY = 12, 4, 0.9


def build() -> nn.Module:
    torch.manual_seed(0)
    # odd sizes: 7*5 = 35 weights do not split evenly, so partitions carry padding and a parameter straddles ranks
    return nn.Sequential(nn.Linear(7, 5), nn.GELU(), nn.Linear(5, 3), nn.Linear(3, 11))


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(MICRO, 7, generator=g), torch.randn(MICRO, 11, generator=g)


def ds_config(stage: int, precision: str) -> dict:
    zero: dict = {"stage": stage}
    if stage == 3:  # threshold 0: even tiny parameters are partitioned (the default keeps small ones whole)
        zero.update(stage3_param_persistence_threshold=0, stage3_model_persistence_threshold=0)
    config = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": 1, "zero_optimization": zero,
              "zero_allow_untested_optimizer": True}
    if precision.startswith("bf16"):
        config["bf16"] = {"enabled": True}
    if precision == "bf16-accum-fp32":  # ZeRO-1: DeepSpeed's BF16 optimizer instead of its ZeRO optimizer
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    return config


def main(stage: int, precision: str, out: str) -> None:
    from ldm_train.runtime.ds_ops import skip_unused_ops

    skip_unused_ops()  # as the trainer does: no JIT build of DeepSpeed's shared-memory op (minutes on a fresh machine)
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build()
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2), config=ds_config(stage, precision)
    )
    ema_master = EMA(engine.module, decay=DECAY)  # averages this rank's part of the optimizer's fp32 master
    ema_weights = EMA(engine.module, decay=DECAY, fp32_master=False)  # the model's own (16-bit) weights
    bf16 = precision.startswith("bf16")
    optimizer_class = type(engine.optimizer).__name__

    ref_model = build()  # the same run without ZeRO: the global batch is both ranks' micro-batches
    ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=1e-2)
    ref_ema = EMA(ref_model, decay=DECAY)
    master_ema = None  # bf16: a plain EMA of the gathered fp32 master, from the master DeepSpeed starts with
    if bf16:
        master_ema = {n: safe_get_full_fp32_param(p).detach().clone() for n, p in engine.module.named_parameters()}
    for step in range(STEPS):
        x, y = batch(step, rank)
        dtype = torch.bfloat16 if bf16 else torch.float32
        engine.backward(nn.functional.mse_loss(engine(x.to(dtype)).float(), y))
        engine.step()
        ema_master.update(engine.module)
        ema_weights.update(engine.module)
        if master_ema is not None:
            d = min(DECAY, (2 + step) / (11 + step))  # CompVis warm-up, update step + 1
            for n, p in engine.module.named_parameters():
                master_ema[n].lerp_(safe_get_full_fp32_param(p).detach(), 1 - d)
        xs, ys = zip(*(batch(step, r) for r in range(world)), strict=True)
        ref_opt.zero_grad()
        nn.functional.mse_loss(ref_model(torch.cat(xs)), torch.cat(ys)).backward()
        ref_opt.step()
        ref_ema.update(ref_model)

    ref = master_ema if master_ema is not None else ref_ema.gathered_state_dict()
    full = ema_master.gathered_state_dict()
    weights_full = ema_weights.gathered_state_dict()
    result = {
        "stage": stage, "precision": precision, "world_size": world, "optimizer": optimizer_class,
        "sharded_params": len(ema_master.partitions) + len(ema_master.fragments),
        "shadow_numel_this_rank": sum(v.numel() for v in ema_master.shadow.values()),
        "model_numel": sum(v.numel() for v in init.values()),
        "max_abs_diff_gathered": max((full[n] - ref[n]).abs().max().item() for n in ref),
        "max_abs_diff_weights_ema": max((weights_full[n] - ref[n]).abs().max().item() for n in ref),
        "ema_moved": max((full[n] - init[n]).abs().max().item() for n in ref),
    }
    shadow_numels = [torch.zeros(1, dtype=torch.long) for _ in range(world)]
    dist.all_gather(shadow_numels, torch.tensor([result["shadow_numel_this_rank"]]))
    result["shadow_numel_per_rank"] = [int(t) for t in shadow_numels]
    # copy_to writes the EMA into the model (ZeRO-1/2: each parameter gathered from the fragments)
    ema_master.copy_to(engine.module)
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), enabled=stage == 3):
        result["max_abs_diff_copy_to"] = max(
            (p.detach().float() - full[n].to(p.dtype).float()).abs().max().item()
            for n, p in engine.module.named_parameters())
    # a full (gathered) state dict reloads into this rank's part: the world-size-independent resume path
    fresh = EMA(engine.module, decay=0.5)
    fresh.load_state_dict(ema_master.gathered_state_dict(with_meta=True))
    result["max_abs_diff_reload"] = max((fresh.shadow[n] - ema_master.shadow[n]).abs().max().item()
                                        for n in ref if ema_master.shadow[n].numel())
    assert fresh.num_updates == STEPS
    if rank == 0:
        result["partition_sizes"] = {n: [p.size, p.numel] for n, p in ema_master.partitions.items()}
        result["fragments_rank0"] = {n: [f.start, f.numel, f.full_numel] for n, f in ema_master.fragments.items()}
        with open(out, "w") as f:
            json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3])
